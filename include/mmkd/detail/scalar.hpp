#pragma once

#include <type_traits>

namespace mmkd {
namespace detail {

/// Empty base of every class template over a scalar type: mmkd computes in float or double.
template <class Scalar>
struct FloatingScalar {
  static_assert(std::is_same<Scalar, float>::value || std::is_same<Scalar, double>::value,
                "mmkd: the scalar type must be float or double");
};

}  // namespace detail
}  // namespace mmkd
