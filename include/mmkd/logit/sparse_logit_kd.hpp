#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/parallel.hpp"
#include "mmkd/core/reduction.hpp"
#include "mmkd/core/types.hpp"
#include "mmkd/detail/row_loss.hpp"
#include "mmkd/detail/softmax_kernels.hpp"

namespace mmkd {

/// How SparseLogitKD completes a teacher that is known only at its top-k classes.
enum class SparseSupport {
  Renormalized,  //!< both distributions restricted to the k classes and renormalised over them
  TailBucket     //!< a (k+1)-th bucket holds each distribution's mass outside the k classes
};

namespace detail {

/// One row of the tail-bucket KL. With q = softmax(s/T) over all V classes, S the k support
/// classes, p_j = exp(lp_j) the teacher's probabilities on S, p_R = 1 − Σ_S p_j (from
/// `log_mass` = log Σ_S p_j) and q_R = Σ_{j∉S} q_j:
///
///   KL = Σ_{j∈S} p_j (log p_j − log q_j) + p_R (log p_R − log q_R)
///   dKL/da_j = q_j − p_j  (j ∈ S),   q_j − p_R·q_j/q_R  (j ∉ S),   a = s/T,
///
/// whose row sums to zero (Σ_S p + p_R = 1). q_R is summed over the classes outside S (the
/// support's exponentials are zeroed first), never formed as 1 − Σ_S q, so nothing cancels when
/// the support holds nearly all the student's mass; when that sum falls below √(smallest
/// normal), classes that underflowed may carry a visible share of it, and it is taken again
/// with its own max. `e` receives c·dKL/da when `grad` (it holds the exponentials until then);
/// `buf` is a second V-long row. A teacher tail within √ε of 0 where the student's tail is
/// exactly 0 (k = V) is the rounding of the teacher's log-softmax and counts as 0. Returns a
/// non-finite value for a row that has none (diagnosed by the caller).
template <class T, class S, class I, class L, class E, class B>
T tail_bucket_row(const S& s, const I& idx, const L& lp, T log_mass, T inv_t, T c, E& e, B& buf,
                  bool grad) {
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  const Index k = idx.size();
  const ShiftedExp<T> r = shifted_exp(s, inv_t, e);
  if (!(r.sum > T(0))) return std::numeric_limits<T>::quiet_NaN();
  const T log_z = std::log(r.sum);
  for (Index j = 0; j < k; ++j) e(idx(j)) = T(0);
  T tail = e.sum();
  T log_tail;
  const bool own_max = tail < std::sqrt(std::numeric_limits<T>::min());
  if (!own_max) {
    log_tail = std::log(tail) - log_z;
  } else {
    buf = s;
    for (Index j = 0; j < k; ++j) buf(idx(j)) = ninf;
    const ShiftedExp<T> rt = shifted_exp(buf, inv_t, buf);
    tail = rt.sum;
    log_tail = tail > T(0) ? (rt.x_max - r.x_max) * inv_t + std::log(tail) - log_z : ninf;
  }
  T p_tail = log_mass < T(0) ? -std::expm1(log_mass) : T(0);
  if (log_tail == ninf && p_tail <= std::sqrt(std::numeric_limits<T>::epsilon())) p_tail = T(0);

  T value = p_tail > T(0) ? p_tail * (std::log(p_tail) - log_tail) : T(0);
  for (Index j = 0; j < k; ++j) {
    const T l = lp(j);
    if (l > ninf) value += std::exp(l) * (l - ((s(idx(j)) - r.x_max) * inv_t - log_z));
  }
  if (grad) {
    // c·q_j − c·p_R·(e_j / tail) outside S; 1/tail ≤ 1/√(min normal) cannot overflow
    const T a = c / r.sum, b = c * p_tail;
    if (!(tail > T(0)))
      e *= a;
    else if (!own_max)
      e = e * a - (e * (T(1) / tail)) * b;
    else
      e = e * a - (buf * (T(1) / tail)) * b;
    for (Index j = 0; j < k; ++j) {
      const T lq = (s(idx(j)) - r.x_max) * inv_t - log_z;
      e(idx(j)) = c * (std::exp(lq) - (lp(j) > ninf ? std::exp(lp(j)) : T(0)));
    }
  }
  return value;
}

/// One row of the renormalised top-k KL: q̂ = softmax(x/T) over the k support logits x,
/// p̂_j = exp(lp_j − log_mass),
///
///   KL = Σ_j p̂_j (log p̂_j − log q̂_j),   dKL/dx_j = (q̂_j − p̂_j) / T   (0 outside the support).
///
/// `e` receives c·(q̂ − p̂) when `grad`.
template <class T, class X, class L, class E>
T renormalized_row(const X& x, const L& lp, T log_mass, T inv_t, T c, E& e, bool grad) {
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  const ShiftedExp<T> r = shifted_exp(x, inv_t, e);
  if (!(r.sum > T(0))) return std::numeric_limits<T>::quiet_NaN();
  const T log_z = std::log(r.sum);
  const auto log_p = lp - log_mass;
  const T value =
      (lp > ninf).select(log_p.exp() * (log_p - ((x - r.x_max) * inv_t - log_z)), T(0)).sum();
  if (grad) e = e * (c / r.sum) - (lp > ninf).select(log_p.exp(), T(0)) * c;
  return value;
}

}  // namespace detail

/**
 * Distillation from a sparse teacher: the teacher is known only at its top-k classes per row,
 * the format a teacher server or an offline logit cache stores, and the loss is the forward KL
 * over a support built from them, as TRL's DistillationTrainer does with a top-k teacher:
 *
 * @code
 * inputs   s: student logits, N x V;  idx: teacher_indices, N x k;  lp: teacher_logprobs, N x k
 *          S_i = {idx_i1, ..., idx_ik},  p_ij = exp(lp_ij) (the teacher's log-probabilities at
 *          the loss's temperature),  q_i = softmax(s_i / T) over all V classes
 * TailBucket    D_i = Σ_{j∈S} p_j log(p_j / q_j) + p_R log(p_R / q_R)       (k + 1 buckets)
 *               p_R = 1 − Σ_{j∈S} p_j,   q_R = 1 − Σ_{j∈S} q_j
 * Renormalized  D_i = Σ_{j∈S} p̂_j log(p̂_j / q̂_j),  p̂ = p / Σ_S p,  q̂ = q / Σ_S q   (k buckets)
 * L = weight · (T² if scale_by_t2) · (1/N') Σ_i D_i        (BatchMean over the N' unmasked rows)
 * @endcode
 *
 * `Reduction::Mean` divides by N'·(k + 1) (TailBucket) or N'·k (Renormalized) instead, the
 * number of terms, as TRL's mean over its per-bucket tensor; `Sum` by 1. The student's gradient
 * is dense over V for TailBucket (every class feeds q_R) and touches only the k support classes
 * for Renormalized, whose cost is O(k) per row, independent of V.
 *
 * TRL clamps the tail's log-mass at −1e-7 (a tail of at least about 1e-7 on each side); mmkd
 * uses the remaining mass itself, so the two agree exactly whenever the top-k mass is below
 * 1 − 1e-7. The student's tail is summed over the classes outside the support in the log
 * domain, so logits of ±1e4 and supports that hold nearly all the mass stay accurate in float.
 *
 * \pre  s is N x V (N, V ≥ 1); teacher_indices and teacher_logprobs are N x k with 1 ≤ k ≤ V;
 *       in each row that takes part the indices are distinct classes in [0, V) and the
 *       log-probabilities are ≤ 0 or −inf (a candidate with probability 0) with
 *       Σ_j exp(lp_ij) ≤ 1 (up to √ε, the rounding of a log-softmax); Renormalized needs a
 *       positive teacher mass in every row. Rows a mask leaves out are not read. Violations are
 *       InvalidArgument naming the row and column. A student logit of −inf where the teacher's
 *       probability is positive (or, for TailBucket, no student mass outside a support that
 *       leaves teacher mass outside) makes the KL infinite: NumericalError naming it.
 * \post `value_and_grad` adds the gradient to `d_student` (`+=`) and returns the same value as
 *       `value`. On any exception nothing has been written.
 *
 * bfloat16 storage: student logits and teacher log-probabilities may both be `mmkd::bfloat16`,
 * read row by row into Scalar (no copy), with a Scalar or bfloat16 `d_student` (sums rounded to
 * nearest even).
 *
 * **Example** (a cached top-64 teacher, sequence rows with padding):
 * @code
 * mmkd::SparseLogitKD<float> kd;                    // TailBucket, T = 1
 * // student_logits (B·L) x V; ids, logprobs (B·L) x 64 from the cache; mask B·L entries
 * float loss = kd.value_and_grad(student_logits, ids, logprobs, mask, d_student);
 * @endcode
 */
template <class Scalar = float>
class SparseLogitKD : detail::FloatingScalar<Scalar> {
 public:
  //! The options; the defaults are TRL's.
  struct Options {
    SparseSupport support = SparseSupport::TailBucket;  //!< how the top-k is completed
    Scalar temperature = Scalar(1);                     //!< T > 0, also the teacher's
    bool scale_by_t2 = false;                           //!< multiply value and gradient by T²
    Reduction reduction = Reduction::BatchMean;         //!< BatchMean, Mean (per bucket) or Sum
    Scalar weight = Scalar(1);                          //!< ≥ 0, scales value and gradient
  };

  SparseLogitKD() : SparseLogitKD(Options{}) {}
  //! Throws InvalidArgument for an invalid option.
  explicit SparseLogitKD(const Options& options) : options_(options) { validate(); }

  //! The options; may be changed between calls (validated at every call).
  Options& options() { return options_; }
  //! The options.
  const Options& options() const { return options_; }

  //! The loss.
  Scalar value(const ConstMatrixRef<Scalar>& student, const ConstIndexMatrixRef& teacher_indices,
               const ConstMatrixRef<Scalar>& teacher_logprobs) {
    return run(student, teacher_indices, teacher_logprobs, nullptr, nullptr);
  }
  //! With a row mask (1 = the row takes part); BatchMean averages over the unmasked rows.
  Scalar value(const ConstMatrixRef<Scalar>& student, const ConstIndexMatrixRef& teacher_indices,
               const ConstMatrixRef<Scalar>& teacher_logprobs, const ConstRowMaskRef& mask) {
    return run(student, teacher_indices, teacher_logprobs, &mask, nullptr);
  }
  //! Returns the loss and adds dL/d(student) to `d_student` (N x V).
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& student,
                        const ConstIndexMatrixRef& teacher_indices,
                        const ConstMatrixRef<Scalar>& teacher_logprobs,
                        MatrixRef<Scalar> d_student) {
    return run(student, teacher_indices, teacher_logprobs, nullptr, &d_student);
  }
  //! With a row mask; masked rows get no gradient.
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& student,
                        const ConstIndexMatrixRef& teacher_indices,
                        const ConstMatrixRef<Scalar>& teacher_logprobs, const ConstRowMaskRef& mask,
                        MatrixRef<Scalar> d_student) {
    return run(student, teacher_indices, teacher_logprobs, &mask, &d_student);
  }

  //! bfloat16 student logits and teacher log-probabilities, computed in Scalar (no copy).
  Scalar value(const ConstMatrixRef<bfloat16>& student, const ConstIndexMatrixRef& teacher_indices,
               const ConstMatrixRef<bfloat16>& teacher_logprobs) {
    return run(student, teacher_indices, teacher_logprobs, nullptr, kNoGrad);
  }
  //! bfloat16 inputs with a row mask.
  Scalar value(const ConstMatrixRef<bfloat16>& student, const ConstIndexMatrixRef& teacher_indices,
               const ConstMatrixRef<bfloat16>& teacher_logprobs, const ConstRowMaskRef& mask) {
    return run(student, teacher_indices, teacher_logprobs, &mask, kNoGrad);
  }
  //! bfloat16 inputs; adds dL/d(student) to a Scalar `d_student`.
  Scalar value_and_grad(const ConstMatrixRef<bfloat16>& student,
                        const ConstIndexMatrixRef& teacher_indices,
                        const ConstMatrixRef<bfloat16>& teacher_logprobs,
                        MatrixRef<Scalar> d_student) {
    return run(student, teacher_indices, teacher_logprobs, nullptr, &d_student);
  }
  //! bfloat16 inputs and gradient: d_student = bf16(d_student + dL/d(student)), to nearest even.
  Scalar value_and_grad(const ConstMatrixRef<bfloat16>& student,
                        const ConstIndexMatrixRef& teacher_indices,
                        const ConstMatrixRef<bfloat16>& teacher_logprobs,
                        MatrixRef<bfloat16> d_student) {
    return run(student, teacher_indices, teacher_logprobs, nullptr, &d_student);
  }
  //! bfloat16 inputs with a row mask; adds to a Scalar `d_student`.
  Scalar value_and_grad(const ConstMatrixRef<bfloat16>& student,
                        const ConstIndexMatrixRef& teacher_indices,
                        const ConstMatrixRef<bfloat16>& teacher_logprobs,
                        const ConstRowMaskRef& mask, MatrixRef<Scalar> d_student) {
    return run(student, teacher_indices, teacher_logprobs, &mask, &d_student);
  }
  //! bfloat16 inputs and gradient with a row mask.
  Scalar value_and_grad(const ConstMatrixRef<bfloat16>& student,
                        const ConstIndexMatrixRef& teacher_indices,
                        const ConstMatrixRef<bfloat16>& teacher_logprobs,
                        const ConstRowMaskRef& mask, MatrixRef<bfloat16> d_student) {
    return run(student, teacher_indices, teacher_logprobs, &mask, &d_student);
  }

  //! weight·(T²)·D_i of each row of the last call (0 for masked rows), before the reduction.
  const Vector<Scalar>& row_values() const { return ws_.row_value; }

  //! Frees the scratch memory kept between calls (the next call allocates it again).
  void release_workspace() {
    ws_.release();
    log_mass_ = Vector<Scalar>();
    seen_ = Eigen::Matrix<Index, Eigen::Dynamic, 1>();
  }

 private:
  static constexpr const char* kName = "SparseLogitKD";

  void validate() const {
    detail::check_enum(kName, "support", options_.support, 2);
    detail::check_enum(kName, "reduction", options_.reduction, 3);
    detail::check_positive(kName, "temperature", options_.temperature);
    detail::check_nonnegative(kName, "weight", options_.weight);
  }

  template <class In>
  void check_teacher(const ConstIndexMatrixRef& idx, const ConstMatrixRef<In>& lp,
                     detail::RowSelect rows, Index classes);

  static constexpr MatrixRef<Scalar>* kNoGrad = nullptr;

  // One body (run_rows) for each storage type of the inputs and of the gradient.
  Scalar run(const ConstMatrixRef<Scalar>& s, const ConstIndexMatrixRef& idx,
             const ConstMatrixRef<Scalar>& lp, const ConstRowMaskRef* mask, MatrixRef<Scalar>* ds);
  Scalar run(const ConstMatrixRef<bfloat16>& s, const ConstIndexMatrixRef& idx,
             const ConstMatrixRef<bfloat16>& lp, const ConstRowMaskRef* mask,
             MatrixRef<Scalar>* ds);
  Scalar run(const ConstMatrixRef<bfloat16>& s, const ConstIndexMatrixRef& idx,
             const ConstMatrixRef<bfloat16>& lp, const ConstRowMaskRef* mask,
             MatrixRef<bfloat16>* ds);
  template <class In, class G>
  Scalar run_rows(const ConstMatrixRef<In>& s, const ConstIndexMatrixRef& idx,
                  const ConstMatrixRef<In>& lp, const ConstRowMaskRef* mask, MatrixRef<G>* ds);

  template <class In>
  [[noreturn]] void diagnose(const ConstMatrixRef<In>& s, const ConstIndexMatrixRef& idx,
                             const ConstMatrixRef<In>& lp, detail::RowSelect rows) const;

  Options options_;
  detail::RowWorkspace<Scalar> ws_;
  Vector<Scalar> log_mass_;                       // log Σ_j exp(lp_ij), per row
  Eigen::Matrix<Index, Eigen::Dynamic, 1> seen_;  // per class: the stamp of its last occurrence
  Index stamp_base_ = 0;                          // stamps of earlier calls are ≤ this
};

template <class Scalar>
template <class In>
void SparseLogitKD<Scalar>::check_teacher(const ConstIndexMatrixRef& idx,
                                          const ConstMatrixRef<In>& lp, detail::RowSelect rows,
                                          Index classes) {
  constexpr Scalar ninf = -std::numeric_limits<Scalar>::infinity();
  const Scalar tol = std::sqrt(std::numeric_limits<Scalar>::epsilon());
  const Index n = idx.rows(), k = idx.cols();
  if (seen_.size() != classes) {
    seen_.setZero(classes);
    stamp_base_ = 0;
  }
  log_mass_.resize(n);
  // A class seen in row i at column j carries the stamp base + i·k + j + 1, so a stamp above
  // base + i·k marks a duplicate within row i; stamps of earlier rows and calls are smaller.
  const Index base = stamp_base_;
  stamp_base_ += n * k;
  for (Index i = 0; i < n; ++i) {
    if (!rows(i)) continue;
    Scalar m = ninf;
    for (Index j = 0; j < k; ++j) {
      const std::int32_t c = idx(i, j);
      auto at = [i, j] { return "[" + std::to_string(i) + "," + std::to_string(j) + "]"; };
      if (c < 0 || c >= classes)
        detail::throw_invalid(kName, "teacher_indices" + at() + " is " + std::to_string(c) +
                                         ", expected a class in [0, " + std::to_string(classes) +
                                         ")");
      const Index row_stamp = base + i * k;
      if (seen_(c) > row_stamp)
        detail::throw_invalid(kName, "teacher_indices" + at() + " is " + std::to_string(c) +
                                         ", which row " + std::to_string(i) +
                                         " already holds at column " +
                                         std::to_string(seen_(c) - row_stamp - 1) +
                                         " (the k indices of a row must be distinct)");
      seen_(c) = row_stamp + j + 1;
      const Scalar v = Scalar(lp(i, j));
      if (detail::is_nan(v) || v == -ninf)
        detail::throw_invalid(kName, detail::element_str("teacher_logprobs", i, j, double(v)));
      if (v > tol)
        detail::throw_invalid(kName, "teacher_logprobs" + at() + " is " + std::to_string(v) +
                                         ", a log-probability above 0");
      m = std::max(m, v);
    }
    Scalar log_mass = m;
    if (m > ninf) {
      Scalar sum = 0;
      for (Index j = 0; j < k; ++j) sum += std::exp(Scalar(lp(i, j)) - m);
      log_mass = m + std::log(sum);
    }
    if (log_mass > tol)
      detail::throw_invalid(kName, "teacher_logprobs row " + std::to_string(i) +
                                       " holds probability mass " +
                                       std::to_string(std::exp(log_mass)) +
                                       " > 1 (the top-k of a distribution sums to at most 1)");
    if (log_mass == ninf && options_.support == SparseSupport::Renormalized)
      detail::throw_invalid(kName, "teacher_logprobs row " + std::to_string(i) +
                                       " is entirely -Inf: Renormalized needs a positive teacher "
                                       "mass on the k classes");
    log_mass_(i) = log_mass;
  }
}

template <class Scalar>
Scalar SparseLogitKD<Scalar>::run(const ConstMatrixRef<Scalar>& s, const ConstIndexMatrixRef& idx,
                                  const ConstMatrixRef<Scalar>& lp, const ConstRowMaskRef* mask,
                                  MatrixRef<Scalar>* ds) {
  return run_rows(s, idx, lp, mask, ds);
}
template <class Scalar>
Scalar SparseLogitKD<Scalar>::run(const ConstMatrixRef<bfloat16>& s, const ConstIndexMatrixRef& idx,
                                  const ConstMatrixRef<bfloat16>& lp, const ConstRowMaskRef* mask,
                                  MatrixRef<Scalar>* ds) {
  return run_rows(s, idx, lp, mask, ds);
}
template <class Scalar>
Scalar SparseLogitKD<Scalar>::run(const ConstMatrixRef<bfloat16>& s, const ConstIndexMatrixRef& idx,
                                  const ConstMatrixRef<bfloat16>& lp, const ConstRowMaskRef* mask,
                                  MatrixRef<bfloat16>* ds) {
  return run_rows(s, idx, lp, mask, ds);
}

template <class Scalar>
template <class In, class G>
Scalar SparseLogitKD<Scalar>::run_rows(const ConstMatrixRef<In>& s, const ConstIndexMatrixRef& idx,
                                       const ConstMatrixRef<In>& lp, const ConstRowMaskRef* mask,
                                       MatrixRef<G>* ds) {
  validate();
  const Index n = s.rows(), v = s.cols(), k = idx.cols();
  detail::check_nonempty(kName, "student", n, v);
  if (idx.rows() != n || k < 1 || k > v)
    detail::throw_invalid(kName, "teacher_indices has shape " + detail::shape_str(idx.rows(), k) +
                                     ", expected " + std::to_string(n) + "xk with 1 <= k <= " +
                                     std::to_string(v) + " (the top-k classes of each row)");
  detail::check_shape(kName, "teacher_logprobs", lp, n, k, "same as teacher_indices");
  if (ds) detail::check_shape(kName, "d_student", *ds, n, v, "same as student");
  detail::RowSelect rows{mask ? mask->data() : nullptr};
  const Index used = mask ? detail::count_rows(kName, *mask, n) : n;
  check_teacher(idx, lp, rows, v);

  const bool tail = options_.support == SparseSupport::TailBucket;
  const Scalar temp = options_.temperature, inv_t = Scalar(1) / temp;
  const Scalar t2 = options_.scale_by_t2 ? temp * temp : Scalar(1);
  const Scalar factor = options_.weight * t2 *
                        detail::reduction_scale<Scalar>(options_.reduction, used, tail ? k + 1 : k);
  const Scalar g_scale = factor * inv_t;  // chain rule through a = s/T
  const bool grad = ds != nullptr;

  if (tail) {
    ws_.prepare(n, v, grad ? 1 : 0, 2, detail::staged_rows<Scalar, In>(2));
    detail::parallel_for(n, v, [&](Index i, int thread) {
      if (!rows(i)) {
        ws_.row_value(i) = Scalar(0);
        return;
      }
      detail::RowMap<Scalar> e = grad ? ws_.grad_row(0, i) : ws_.buffer(thread, 2, 0);
      detail::RowMap<Scalar> buf = ws_.buffer(thread, 2, 1);
      ws_.row_value(i) = detail::tail_bucket_row(
          detail::input_row(s, i, ws_, thread, 0), idx.row(i),
          detail::input_row(lp, i, ws_, thread, 1), log_mass_(i), inv_t, g_scale, e, buf, grad);
    });
  } else {
    ws_.prepare(n, k, grad ? 1 : 0, 2, detail::staged_rows<Scalar, In>(1));
    detail::parallel_for(n, k, [&](Index i, int thread) {
      if (!rows(i)) {
        ws_.row_value(i) = Scalar(0);
        return;
      }
      detail::RowMap<Scalar> x = ws_.buffer(thread, 2, 0);
      detail::RowMap<Scalar> e = grad ? ws_.grad_row(0, i) : ws_.buffer(thread, 2, 1);
      for (Index j = 0; j < k; ++j) x(j) = Scalar(s(i, idx(i, j)));
      ws_.row_value(i) = detail::renormalized_row(x, detail::input_row(lp, i, ws_, thread, 0),
                                                  log_mass_(i), inv_t, g_scale, e, grad);
    });
  }

  const Scalar raw = ws_.row_value.sum();
  if (!detail::is_finite(raw)) diagnose(s, idx, lp, rows);
  const Scalar value = detail::scaled_value(kName, factor, raw, grad ? 2 * g_scale : Scalar(0));
  ws_.row_value *= options_.weight * t2;
  if (grad && tail) ws_.commit(0, *ds, rows);
  if (grad && !tail) {
    detail::parallel_for(n, k, [&](Index i, int) {
      if (!rows(i)) return;
      const detail::RowMap<Scalar> g = ws_.grad_row(0, i);
      for (Index j = 0; j < k; ++j) {
        if constexpr (std::is_same<G, bfloat16>::value)
          detail::add_to_bf16(&(*ds)(i, idx(i, j)), &g(j), 1);
        else
          (*ds)(i, idx(i, j)) += g(j);
      }
    });
  }
  return value;
}

template <class Scalar>
template <class In>
void SparseLogitKD<Scalar>::diagnose(const ConstMatrixRef<In>& s, const ConstIndexMatrixRef& idx,
                                     const ConstMatrixRef<In>& lp, detail::RowSelect rows) const {
  constexpr Scalar ninf = -std::numeric_limits<Scalar>::infinity();
  const Index i = detail::first_nonfinite_row(ws_.row_value, rows);
  if (i < 0) detail::throw_numerical(kName, "the sum over rows overflows");
  const bool tail = options_.support == SparseSupport::TailBucket;
  std::string why = tail ? detail::bad_element_in_row("student", s, i, true) : std::string();
  for (Index j = 0; j < idx.cols() && why.empty(); ++j) {
    const Scalar x = Scalar(s(i, idx(i, j)));
    if (!detail::is_finite(x) && x != ninf)
      why = detail::element_str("student", i, idx(i, j), double(x));
  }
  if (why.empty() && tail) why = detail::all_neg_inf_row("student", s, i);
  for (Index j = 0; j < idx.cols() && why.empty(); ++j) {
    if (Scalar(lp(i, j)) > ninf && Scalar(s(i, idx(i, j))) == ninf)
      why = detail::element_str("student", i, idx(i, j), double(ninf)) +
            " where the teacher's probability (teacher_logprobs[" + std::to_string(i) + "," +
            std::to_string(j) + "]) is positive: the KL divergence is infinite";
  }
  if (why.empty() && tail)
    why = "row " + std::to_string(i) + ": the teacher leaves probability mass " +
          std::to_string(-std::expm1(double(log_mass_(i)))) +
          " outside its k classes, where the student's probability is 0: the KL divergence is "
          "infinite";
  if (why.empty())
    why = "row " + std::to_string(i) +
          " overflows: logits / temperature exceed the range of the scalar type";
  detail::throw_numerical(kName, why);
}

MMKD_EXTERN_TEMPLATE(SparseLogitKD)

}  // namespace mmkd
