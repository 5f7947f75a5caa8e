#pragma once

#include <Eigen/Core>

namespace mmkd {
namespace detail {

/// g where h > 0, else 0 (the relu's backward given its output h), vectorised as a mask.
template <class T>
struct ReluBackward {
  T operator()(T h, T g) const { return h > T(0) ? g : T(0); }
  template <class Packet>
  Packet packetOp(const Packet& h, const Packet& g) const {
    using namespace Eigen::internal;
    return pand(pcmp_lt(pzero(h), h), g);
  }
};

}  // namespace detail
}  // namespace mmkd

namespace Eigen {
namespace internal {
template <class T>
struct functor_traits<mmkd::detail::ReluBackward<T>> {
  enum { Cost = 2 * NumTraits<T>::AddCost, PacketAccess = packet_traits<T>::HasCmp };
};
}  // namespace internal
}  // namespace Eigen
