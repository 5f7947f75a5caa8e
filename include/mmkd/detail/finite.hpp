#pragma once

// Classification of floating-point values by their bit pattern. std::isfinite, std::isnan,
// comparisons with infinity and Eigen's allFinite() are folded away under -ffast-math or
// -ffinite-math-only (the compiler may then assume no value is NaN or infinite), which would
// silently turn every one of mmkd's input and overflow checks off. Integer tests on the bits
// cannot be folded so.

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include <Eigen/Core>

namespace mmkd {
namespace detail {

enum class FloatClass { Finite, NaN, PosInf, NegInf };

template <class T>
FloatClass classify(T v) {
  static_assert(std::is_arithmetic<T>::value, "classify: an arithmetic type");
  if constexpr (std::is_integral<T>::value) {
    return FloatClass::Finite;
  } else if constexpr (sizeof(T) > sizeof(std::uint64_t)) {  // long double: through double
    return classify(double(v));
  } else {
    // IEEE binary32 / binary64: sign, exponent, then digits − 1 mantissa bits.
    using U = std::conditional_t<sizeof(T) == sizeof(std::uint32_t), std::uint32_t, std::uint64_t>;
    constexpr int sign_bit = int(8 * sizeof(U)) - 1;
    constexpr U mant = (U(1) << (std::numeric_limits<T>::digits - 1)) - 1;
    constexpr U exp = ~mant & ~(U(1) << sign_bit);
    U b;
    std::memcpy(&b, &v, sizeof b);
    if ((b & exp) != exp) return FloatClass::Finite;
    if (b & mant) return FloatClass::NaN;
    return (b >> sign_bit) ? FloatClass::NegInf : FloatClass::PosInf;
  }
}

template <class T>
bool is_finite(T v) {
  return classify(v) == FloatClass::Finite;
}

template <class T>
bool is_nan(T v) {
  return classify(v) == FloatClass::NaN;
}

#if defined(__FAST_MATH__) || (defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__)
/// Whether every entry is finite: under fast math, entry by entry on the bits.
template <class Derived>
bool all_finite(const Eigen::DenseBase<Derived>& x) {
  const auto& e = x.derived();
  for (Eigen::Index i = 0; i < e.rows(); ++i)
    for (Eigen::Index j = 0; j < e.cols(); ++j)
      if (!is_finite(e.coeff(i, j))) return false;
  return true;
}
#else
/// Whether every entry is finite, vectorised: Σ x·0 is 0 unless some x is ±inf or NaN
/// (Eigen's allFinite() compares x − x elementwise without vectorising).
template <class Derived>
bool all_finite(const Eigen::DenseBase<Derived>& x) {
  using T = typename Derived::Scalar;
  return (x.derived().array() * T(0)).sum() == T(0);
}
#endif

}  // namespace detail
}  // namespace mmkd
