#pragma once

// Row kernels behind every softmax-based loss: shifted exponentials, log-sum-exp, max with NaN
// propagation. Internal: use the public functions of mmkd/core/softmax.hpp.

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/types.hpp"
#include "mmkd/detail/finite.hpp"

namespace mmkd {
namespace detail {

template <class T>
using RowArray = Eigen::Array<T, 1, Eigen::Dynamic>;
template <class T>
using RowMap = Eigen::Map<RowArray<T>>;
template <class T>
using ConstRowMap = Eigen::Map<const RowArray<T>>;

template <class M>
auto row_map(M& m, Index i) {
  using T = typename M::Scalar;
  return RowMap<T>(m.data() + i * m.outerStride(), m.cols());
}
template <class M>
auto const_row_map(const M& m, Index i) {
  using T = typename M::Scalar;
  return ConstRowMap<T>(m.data() + i * m.outerStride(), m.cols());
}

/// exp(x) for the shifted arguments of a softmax (x = logit − max ≤ 0, though any x ≤ 88 works):
/// exactly 0 for −inf and below the smallest normal result, NaN for NaN.
///
/// Float: x = n·ln2 + r with n = round(x/ln2), |r| ≤ ln2/2; exp(r) = 1 + r + r²·P(r) with the
/// degree-5 Cephes minimax P (≈1 ulp), and 2^n built directly in the exponent bits, valid because
/// n ∈ [−126, 127] after the lower cut. That is about half the work of Eigen 3.4's generic pexp,
/// whose pldexp handles exponents this kernel never sees. Double uses Eigen's pexp.
template <class T>
struct ExpShifted {
  static constexpr T lower() { return std::is_same<T, float>::value ? T(-87.33654) : T(-708.39); }

  T operator()(T x) const { return x < lower() ? T(0) : std::exp(x); }

  template <class Packet>
  Packet packetOp(const Packet& x) const {
    using namespace Eigen::internal;
    const Packet lo = pset1<Packet>(lower());
    Packet y;
    if constexpr (std::is_same<T, float>::value) {
      using PacketI = typename unpacket_traits<Packet>::integer_packet;
      const Packet xc = pmax(x, lo);
      // Adding 1.5·2^23 rounds x/ln2 to the nearest integer n and leaves n in the low mantissa
      // bits: no floor, no float→int conversion.
      const Packet shift = pset1<Packet>(12582912.0f);
      const Packet t = pmadd(xc, pset1<Packet>(1.44269504088896341f), shift);
      const Packet n = psub(t, shift);
      Packet r = pmadd(n, pset1<Packet>(-0.693359375f), xc);  // ln2 in two parts: exact n·ln2_hi
      r = pmadd(n, pset1<Packet>(2.12194440e-4f), r);
      Packet p = pset1<Packet>(1.9875691500e-4f);
      p = pmadd(p, r, pset1<Packet>(1.3981999507e-3f));
      p = pmadd(p, r, pset1<Packet>(8.3334519073e-3f));
      p = pmadd(p, r, pset1<Packet>(4.1665795894e-2f));
      p = pmadd(p, r, pset1<Packet>(1.6666665459e-1f));
      p = pmadd(p, r, pset1<Packet>(5.0000001201e-1f));
      p = pmadd(p, pmul(r, r), padd(r, pset1<Packet>(1.0f)));
      const PacketI n_int = psub(preinterpret<PacketI>(t), preinterpret<PacketI>(shift));
      const PacketI bits = plogical_shift_left<23>(padd(n_int, pset1<PacketI>(127)));
      y = pmul(p, preinterpret<Packet>(bits));
    } else {
      y = pexp(x);
    }
    y = pselect(pcmp_lt(x, lo), pzero(y), y);
    return pselect(pcmp_eq(x, x), y, x);  // NaN in, NaN out
  }
};

/// The shifted exponentials of one row: e_k = exp((x_k − x_max)/T), max = x_max/T, sum = Σ e_k.
template <class T>
struct ShiftedExp {
  T max;
  T sum;
  T x_max;  // the row's max before the temperature
  /// log Σ exp(x_k/T), -inf for a row of -inf, NaN if the row holds NaN or +inf.
  T lse() const { return max + std::log(sum); }
};

/// max(a, b) that returns NaN if either is NaN.
template <class T>
T max_nan(T a, T b) {
  return (detail::is_nan(a) || detail::is_nan(b)) ? std::numeric_limits<T>::quiet_NaN()
                                                  : std::max(a, b);
}

/// max_k x_k (k ≠ exclude), NaN if any such entry is NaN, -inf over an empty set.
template <class X, class T = typename X::Scalar>
T row_max(const Eigen::ArrayBase<X>& x, Index exclude = -1) {
  if (exclude < 0) return x.derived().template maxCoeff<Eigen::PropagateNaN>();
  T m = -std::numeric_limits<T>::infinity();
  const Index tail = x.size() - exclude - 1;
  if (exclude > 0)
    m = max_nan(m, x.derived().head(exclude).template maxCoeff<Eigen::PropagateNaN>());
  if (tail > 0) m = max_nan(m, x.derived().tail(tail).template maxCoeff<Eigen::PropagateNaN>());
  return m;
}

/// Writes e_k = exp((x_k − x_max) · inv_t), x_max = max_k x_k (inv_t > 0), into `e`. The shift
/// comes before the temperature: x_k − x_max is exact for logits near the max whatever their
/// magnitude, so a common offset of the row (logits around 1e4) costs no precision, where
/// x_k · inv_t would round at the offset's scale. With `exclude` ≥ 0 that class is left out of
/// the max and the sum (e_exclude = 0): the softmax over the other classes. A row of -inf gives
/// e = 0, max = -inf; NaN or +inf propagates as NaN.
template <class X, class EOut, class T = typename X::Scalar>
ShiftedExp<T> shifted_exp(const Eigen::ArrayBase<X>& x, T inv_t, EOut&& e, Index exclude = -1) {
  const T xm = row_max(x, exclude);
  const T m = xm * inv_t;  // max(x)*inv_t == max(x*inv_t): inv_t > 0 is monotone
  if (classify(m) == FloatClass::NegInf) {
    e.setZero();
    return {m, T(0), xm};
  }
  e = ((x - xm) * inv_t).unaryExpr(ExpShifted<T>());
  if (exclude >= 0) e(exclude) = T(0);
  return {m, e.sum(), xm};
}

/// log(exp(x) + exp(y)) without overflow.
template <class T>
T log_add_exp(T x, T y) {
  if (classify(x) == FloatClass::NegInf) return y;
  if (classify(y) == FloatClass::NegInf) return x;
  return std::max(x, y) + std::log1p(std::exp(-std::abs(x - y)));
}

/// log Σ_k exp(x_k * inv_t) without storing the exponentials.
template <class X, class T = typename X::Scalar>
T log_sum_exp_row(const Eigen::ArrayBase<X>& x, T inv_t) {
  const T xm = row_max(x), m = xm * inv_t;
  if (classify(m) == FloatClass::NegInf) return m;
  return m + std::log(((x - xm) * inv_t).unaryExpr(ExpShifted<T>()).sum());
}

template <class T>
void check_temperature(const char* fn, T temperature) {
  check_positive(fn, "temperature", temperature);
}

}  // namespace detail
}  // namespace mmkd

namespace Eigen {
namespace internal {
template <class T>
struct functor_traits<mmkd::detail::ExpShifted<T>> {
  enum { Cost = 20 * NumTraits<T>::MulCost, PacketAccess = packet_traits<T>::HasExp };
};
}  // namespace internal
}  // namespace Eigen
