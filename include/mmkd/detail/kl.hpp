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
  ShiftedExp<T> s, t;  // es = exp((s − max s)/T), et = exp((t − max t)/T)
};

/// Computes one row of the KL stably and leaves the unnormalised softmax factors in `es`, `et`
/// (p_s = es / s.sum, p_t = et / t.sum).
///
///   KL = Σ_k p_t,k ((t_k − max t) − (s_k − max s)) / T + log s.sum − log t.sum,
///
/// every term taken from the max-shifted logits, shifted before the temperature, so a common offset
/// of the row (logits around 1e4, where one float ulp is 1e-3) costs no precision: log-sum-exps are
/// never formed at the offset's magnitude and subtracted. A class with teacher logit −inf is ruled
/// out: its term is 0 (0·log 0 = 0). The test is on the logit, not on et_k > 0: Eigen's vectorised
/// exp clamps its argument, so exp(−inf) comes out as the smallest normal number rather than 0
/// (harmless in the sums, wrong as a test). With `exclude` ≥ 0 that class is left out of both
/// distributions (DKD's non-target KL). Shared by every loss built on temperature KD, so they all
/// have one KL kernel.
template <class T, class S, class U, class ES, class ET>
KlRow<T> kl_row(const Eigen::ArrayBase<S>& s, const Eigen::ArrayBase<U>& t, T inv_t, ES&& es,
                ET&& et, Index exclude = -1) {
  KlRow<T> r;
  r.s = shifted_exp(s, inv_t, es, exclude);
  r.t = shifted_exp(t, inv_t, et, exclude);
  const T ms = r.s.x_max, mt = r.t.x_max;
  // vectorised; non-finite only if some logit is ±inf
  T cross = (et * ((t - mt) - (s - ms))).sum() * inv_t;
  if (!detail::is_finite(cross)) {
    constexpr T ninf = -std::numeric_limits<T>::infinity();
    cross = (t > ninf).select(et * ((t - mt) - (s - ms)), T(0)).sum() * inv_t;
  }
  r.value = cross / r.t.sum + std::log(r.s.sum) - std::log(r.t.sum);
  return r;
}

/// One row of the soft cross-entropy −Σ_k y_k log softmax(a)_k, a = z/T, for a target y ≥ 0
/// given as y = w · w_scale with Σ_k y_k = y_sum:
///
///   CE = Σ_k y_k (max z − z_k) / T + y_sum · log Σ_k exp((z_k − max z) / T),
///
/// a sum of non-negative terms, so nothing cancels however large the logits (against
/// lse(a) − Σ y·a, which loses the logits' magnitude in ulps). A class with y_k = 0 adds 0 even
/// at a_k = −inf. Leaves exp(a − max a) in `ez`, and its max and sum in `sz`.
template <class T, class Z, class W, class EZ>
T soft_ce_row(const Eigen::ArrayBase<Z>& z, T inv_t, const Eigen::ArrayBase<W>& w, T w_scale,
              T y_sum, ShiftedExp<T>& sz, EZ&& ez) {
  sz = shifted_exp(z, inv_t, ez);
  const T m = sz.x_max;
  T cross = (w * (m - z)).sum() * inv_t;
  if (!detail::is_finite(cross)) cross = (w > T(0)).select(w * (m - z), T(0)).sum() * inv_t;
  return cross * w_scale + y_sum * std::log(sz.sum);
}

/// Why KD row i of (s, t) is not finite: a NaN/+Inf input, a row of -Inf, or a student -Inf where
/// the teacher's probability is positive (an infinite KL); "" if none of these.
template <class MS, class MT>
std::string kd_row_reason(const char* sname, const MS& s, const char* tname, const MT& t, Index i) {
  constexpr double ninf = -std::numeric_limits<double>::infinity();  // any storage type
  std::string why = bad_element_in_row(sname, s, i, true);
  if (why.empty()) why = bad_element_in_row(tname, t, i, true);
  if (why.empty()) why = all_neg_inf_row(tname, t, i);
  if (why.empty()) why = all_neg_inf_row(sname, s, i);
  for (Index j = 0; j < s.cols() && why.empty(); ++j) {
    if (double(s(i, j)) == ninf && double(t(i, j)) > ninf) {
      why = element_str(sname, i, j, ninf) +
            " where the teacher's probability is positive: the KL divergence is infinite";
    }
  }
  return why;
}

/// The temperature-KD rows of two logit matrices (N x C), computed into a workspace prepared
/// with two buffers per thread (and two staging rows for bfloat16 inputs): for each row with
/// rows(i), ws.row_value(i) = KL_i, and
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
    const auto srow = input_row(s, i, ws, thread, 0);
    const auto trow = input_row(t, i, ws, thread, 1);
    const auto r = kl_row(srow, trow, inv_t, es, et);
    ws.row_value(i) = r.value;
    hook(i, r, et);
    const T c = scale(i);
    if (slot_t >= 0) {
      // log p_t − log p_s − KL from the shifted logits, as in kl_row
      const T ms = r.s.x_max, mt = r.t.x_max;
      const T shift = std::log(r.t.sum) - std::log(r.s.sum) + r.value;
      ws.grad_row(slot_t, i) =
          (trow > ninf)
              .select((et / r.t.sum) * (((trow - mt) - (srow - ms)) * inv_t - shift), T(0)) *
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
