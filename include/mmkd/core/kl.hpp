#pragma once

#include <cmath>
#include <limits>

#include "mmkd/core/softmax.hpp"

namespace mmkd {
namespace detail {

/// One row of the temperature KL, KL(softmax(t/T) ‖ softmax(s/T)), with its softmax factors.
template <class T>
struct KlRow {
  T value;             // KL, +inf when the student rules out a class the teacher does not
  ShiftedExp<T> s, t;  // es = exp(s/T − s.max), et = exp(t/T − t.max)
};

/// Computes one row of the KL stably and leaves the unnormalised softmax factors in `es`, `et`
/// (p_s = es / s.sum, p_t = et / t.sum).
///
///   KL = Σ_k p_t,k (b_k − a_k) + lse(a) − lse(b),   a = s/T, b = t/T,
///
/// where a class with teacher logit −inf is ruled out: its term is 0 (0·log 0 = 0). The test is
/// on the logit, not on et_k > 0: Eigen's vectorised exp clamps its argument, so exp(−inf) comes
/// out as the smallest normal number rather than 0 (harmless in the sums, wrong as a test).
/// With `exclude` ≥ 0 that class is left out of both distributions (DKD's non-target KL).
/// Shared by every loss built on temperature KD, so they all have one KL kernel.
template <class T, class S, class U, class ES, class ET>
KlRow<T> kl_row(const Eigen::ArrayBase<S>& s, const Eigen::ArrayBase<U>& t, T inv_t, ES&& es,
                ET&& et, Index exclude = -1) {
  KlRow<T> r;
  r.s = shifted_exp(s, inv_t, es, exclude);
  r.t = shifted_exp(t, inv_t, et, exclude);
  T cross = (et * (t - s)).sum();  // vectorised; non-finite only if some logit is ±inf
  if (!std::isfinite(cross)) {
    constexpr T ninf = -std::numeric_limits<T>::infinity();
    cross = (t > ninf).select(et * (t - s), T(0)).sum();
  }
  r.value = cross * inv_t / r.t.sum + r.s.lse() - r.t.lse();
  return r;
}

}  // namespace detail
}  // namespace mmkd
