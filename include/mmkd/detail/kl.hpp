#pragma once

#include <cmath>
#include <limits>

#include "mmkd/detail/row_loss.hpp"
#include "mmkd/detail/softmax_kernels.hpp"

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

/// Why KD row i of (s, t) is not finite: a NaN/+Inf input, a row of -Inf, or a student -Inf where
/// the teacher's probability is positive (an infinite KL); "" if none of these.
template <class MS, class MT>
std::string kd_row_reason(const char* sname, const MS& s, const char* tname, const MT& t, Index i) {
  using T = typename MS::Scalar;
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  std::string why = bad_element_in_row(sname, s, i, true);
  if (why.empty()) why = bad_element_in_row(tname, t, i, true);
  if (why.empty()) why = all_neg_inf_row(tname, t, i);
  if (why.empty()) why = all_neg_inf_row(sname, s, i);
  for (Index j = 0; j < s.cols() && why.empty(); ++j) {
    if (s(i, j) == ninf && t(i, j) > ninf) {
      why = element_str(sname, i, j, s(i, j)) +
            " where the teacher's probability is positive: the KL divergence is infinite";
    }
  }
  return why;
}

/// The temperature-KD rows of two logit matrices (N x C), computed into a workspace prepared
/// with two buffers per thread: for each row with rows(i), ws.row_value(i) = KL_i, and
///   slot_s ≥ 0:  ws.grad_row(slot_s, i) = scale(i) · (p_s − p_t)                 (dKL/da)
///   slot_t ≥ 0:  ws.grad_row(slot_t, i) = scale(i) · p_t ⊙ (log p_t − log p_s − KL_i)  (dKL/db)
/// with a = s/T, b = t/T; other rows get row_value 0. Every temperature-KD loss runs this loop.
/// `hook(i, r, et)` runs for each computed row while et = exp(b − max b) is still in cache.
template <class T, class MS, class MT, class Rows, class Scale, class Hook>
void kd_rows(const MS& s, const MT& t, T inv_t, Rows&& rows, RowWorkspace<T>& ws, int slot_s,
             int slot_t, Scale&& scale, Hook&& hook) {
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  parallel_for(s.rows(), s.cols(), [&](Index i, int thread) {
    if (!rows(i)) {
      ws.row_value(i) = T(0);
      return;
    }
    auto es = slot_s >= 0 ? ws.grad_row(slot_s, i) : ws.buffer(thread, 2, 0);
    auto et = ws.buffer(thread, 2, 1);
    const auto srow = const_row_map(s, i);
    const auto trow = const_row_map(t, i);
    const auto r = kl_row(srow, trow, inv_t, es, et);
    ws.row_value(i) = r.value;
    hook(i, r, et);
    const T c = scale(i);
    if (slot_t >= 0) {
      const T lse_s = r.s.lse(), lse_t = r.t.lse();
      ws.grad_row(slot_t, i) =
          (trow > ninf)
              .select((et / r.t.sum) * ((trow * inv_t - lse_t) - (srow * inv_t - lse_s) - r.value),
                      T(0)) *
          c;
    }
    if (slot_s >= 0) es = es * (c / r.s.sum) - et * (c / r.t.sum);
  });
}

template <class T, class MS, class MT, class Rows, class Scale>
void kd_rows(const MS& s, const MT& t, T inv_t, Rows&& rows, RowWorkspace<T>& ws, int slot_s,
             int slot_t, Scale&& scale) {
  kd_rows(s, t, inv_t, rows, ws, slot_s, slot_t, scale,
          [](Index, const KlRow<T>&, const RowMap<T>&) {});
}

}  // namespace detail
}  // namespace mmkd
