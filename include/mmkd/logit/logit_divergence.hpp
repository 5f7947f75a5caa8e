#pragma once

#include <cmath>
#include <limits>
#include <string>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/parallel.hpp"
#include "mmkd/core/reduction.hpp"
#include "mmkd/core/types.hpp"
#include "mmkd/detail/divergence.hpp"
#include "mmkd/detail/kl.hpp"
#include "mmkd/detail/row_loss.hpp"

namespace mmkd {

/**
 * Token-level distillation divergences between the teacher's and the student's distributions
 * over a vocabulary, one row per token: with p_i = softmax(t_i/T) (teacher) and
 * q_i = softmax(s_i/T) (student),
 *
 * @code
 * ForwardKL       D_i = KL(p ‖ q)                                  (Hinton KD; = LogitKD)
 * ReverseKL       D_i = KL(q ‖ p)                                  (MiniLLM's direction)
 * GeneralizedJSD  D_i = β·KL(p ‖ m) + (1−β)·KL(q ‖ m),  m = β·p + (1−β)·q,  0 < β < 1
 * SkewForwardKL   D_i = KL(p ‖ λ·p + (1−λ)·q),  λ = skew
 * SkewReverseKL   D_i = KL(q ‖ λ·q + (1−λ)·p)
 * TotalVariation  D_i = ½ Σ_k |p_k − q_k|
 * L = weight · (T² if scale_by_t2) · (1/N') Σ_i D_i          (BatchMean over the N' unmasked rows)
 * @endcode
 *
 * GeneralizedJSD is TRL's `generalized_jsd_loss` (GKD, Agarwal et al. 2024) for 0 < β < 1; its
 * β = 0 and β = 1 are ForwardKL and ReverseKL here. The skew divergences are DistiLLM's (Ko et
 * al. 2024, λ = 0.1); mmkd returns the divergence itself, where DistiLLM's value drops the
 * teacher's entropy (a constant: the gradient is the same). `Reduction::Mean` divides by N'·V
 * instead, `Sum` by 1. The student's gradient is always available, the teacher's on request
 * (online or mutual distillation).
 *
 * Numerics: every distribution, log and mixture is formed from the max-shifted logits in the log
 * domain (`log m` by log-add-exp of the two log-probabilities), so logits of ±1e4, one-hot
 * teachers (−inf logits: probability 0, term 0) and β or λ next to 0 or 1 stay finite and
 * accurate in float. A divergence that is infinite (ForwardKL where the student rules out a class
 * the teacher does not, ReverseKL the other way round, the skew forms at λ = 0 likewise) throws
 * `NumericalError` naming the element. TotalVariation takes sign(0) = 0 where p_k = q_k.
 *
 * bfloat16 storage: as LogitKD, both logit matrices may be `mmkd::bfloat16`, read row by row
 * into Scalar (no copy of the inputs), with Scalar or bfloat16 gradient buffers (sums rounded
 * to nearest even).
 *
 * \pre  student and teacher are N x V with N, V ≥ 1; a mask has N entries, each 0 or 1; gradient
 *       buffers are N x V. Options: temperature > 0, weight ≥ 0, 0 < beta < 1, 0 ≤ skew ≤ 1.
 * \post `value_and_grad` adds the gradient to the buffers (`+=`) and returns the same value as
 *       `value`. On any exception nothing has been written.
 *
 * **Example** (token-level distillation with a padding mask):
 * @code
 * mmkd::LogitDivergence<float>::Options o;
 * o.divergence = mmkd::Divergence::GeneralizedJSD;    // β = 0.5
 * mmkd::LogitDivergence<float> jsd(o);
 * // logits (B·L) x V, mask B·L entries (0 at padding)
 * float loss = jsd.value_and_grad(student_logits, teacher_logits, mask, d_student);
 * @endcode
 */
template <class Scalar = float>
class LogitDivergence : detail::FloatingScalar<Scalar> {
 public:
  //! The options; the defaults are TRL's and DistiLLM's.
  struct Options {
    Divergence divergence = Divergence::ForwardKL;  //!< which divergence
    Scalar beta = Scalar(0.5);                      //!< GeneralizedJSD's β, in (0, 1)
    Scalar skew = Scalar(0.1);                      //!< the skew divergences' λ, in [0, 1]
    Scalar temperature = Scalar(1);                 //!< T > 0
    bool scale_by_t2 = false;                       //!< multiply value and gradient by T²
    Reduction reduction = Reduction::BatchMean;     //!< BatchMean, Mean (over N'·V) or Sum
    Scalar weight = Scalar(1);                      //!< ≥ 0, scales value and gradient
  };

  LogitDivergence() : LogitDivergence(Options{}) {}
  //! Throws InvalidArgument for an invalid option.
  explicit LogitDivergence(const Options& options) : options_(options) { validate(); }

  //! The options; may be changed between calls (validated at every call).
  Options& options() { return options_; }
  //! The options.
  const Options& options() const { return options_; }

  //! The loss.
  Scalar value(const ConstMatrixRef<Scalar>& student, const ConstMatrixRef<Scalar>& teacher) {
    return run(student, teacher, nullptr, nullptr, nullptr);
  }
  //! With a row mask (1 = the row takes part); BatchMean averages over the unmasked rows.
  Scalar value(const ConstMatrixRef<Scalar>& student, const ConstMatrixRef<Scalar>& teacher,
               const ConstRowMaskRef& mask) {
    return run(student, teacher, &mask, nullptr, nullptr);
  }
  //! Returns the loss and adds dL/d(student) to `d_student`.
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& student,
                        const ConstMatrixRef<Scalar>& teacher, MatrixRef<Scalar> d_student) {
    return run(student, teacher, nullptr, &d_student, nullptr);
  }
  //! Also adds dL/d(teacher) to `d_teacher`.
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& student,
                        const ConstMatrixRef<Scalar>& teacher, MatrixRef<Scalar> d_student,
                        MatrixRef<Scalar> d_teacher) {
    return run(student, teacher, nullptr, &d_student, &d_teacher);
  }
  //! With a row mask; masked rows get no gradient.
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& student,
                        const ConstMatrixRef<Scalar>& teacher, const ConstRowMaskRef& mask,
                        MatrixRef<Scalar> d_student) {
    return run(student, teacher, &mask, &d_student, nullptr);
  }
  //! With a row mask; adds to both gradients.
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& student,
                        const ConstMatrixRef<Scalar>& teacher, const ConstRowMaskRef& mask,
                        MatrixRef<Scalar> d_student, MatrixRef<Scalar> d_teacher) {
    return run(student, teacher, &mask, &d_student, &d_teacher);
  }

  //! bfloat16 logits (both), computed in Scalar without a copy of the inputs.
  Scalar value(const ConstMatrixRef<bfloat16>& student, const ConstMatrixRef<bfloat16>& teacher) {
    return run(student, teacher, nullptr, kNoGrad, kNoGrad);
  }
  //! bfloat16 logits with a row mask.
  Scalar value(const ConstMatrixRef<bfloat16>& student, const ConstMatrixRef<bfloat16>& teacher,
               const ConstRowMaskRef& mask) {
    return run(student, teacher, &mask, kNoGrad, kNoGrad);
  }
  //! bfloat16 logits; adds dL/d(student) to a Scalar `d_student`.
  Scalar value_and_grad(const ConstMatrixRef<bfloat16>& student,
                        const ConstMatrixRef<bfloat16>& teacher, MatrixRef<Scalar> d_student) {
    return run(student, teacher, nullptr, &d_student, kNoGrad);
  }
  //! bfloat16 logits and gradient: d_student = bf16(d_student + dL/d(student)), to nearest even.
  Scalar value_and_grad(const ConstMatrixRef<bfloat16>& student,
                        const ConstMatrixRef<bfloat16>& teacher, MatrixRef<bfloat16> d_student) {
    return run(student, teacher, nullptr, &d_student, kNoGrad16);
  }
  //! bfloat16 logits; adds to both gradients (Scalar).
  Scalar value_and_grad(const ConstMatrixRef<bfloat16>& student,
                        const ConstMatrixRef<bfloat16>& teacher, MatrixRef<Scalar> d_student,
                        MatrixRef<Scalar> d_teacher) {
    return run(student, teacher, nullptr, &d_student, &d_teacher);
  }
  //! bfloat16 logits; adds to both gradients (bfloat16).
  Scalar value_and_grad(const ConstMatrixRef<bfloat16>& student,
                        const ConstMatrixRef<bfloat16>& teacher, MatrixRef<bfloat16> d_student,
                        MatrixRef<bfloat16> d_teacher) {
    return run(student, teacher, nullptr, &d_student, &d_teacher);
  }
  //! bfloat16 logits with a row mask; adds dL/d(student) to a Scalar `d_student`.
  Scalar value_and_grad(const ConstMatrixRef<bfloat16>& student,
                        const ConstMatrixRef<bfloat16>& teacher, const ConstRowMaskRef& mask,
                        MatrixRef<Scalar> d_student) {
    return run(student, teacher, &mask, &d_student, kNoGrad);
  }
  //! bfloat16 logits and gradient with a row mask.
  Scalar value_and_grad(const ConstMatrixRef<bfloat16>& student,
                        const ConstMatrixRef<bfloat16>& teacher, const ConstRowMaskRef& mask,
                        MatrixRef<bfloat16> d_student) {
    return run(student, teacher, &mask, &d_student, kNoGrad16);
  }
  //! bfloat16 logits with a row mask; adds to both gradients (Scalar).
  Scalar value_and_grad(const ConstMatrixRef<bfloat16>& student,
                        const ConstMatrixRef<bfloat16>& teacher, const ConstRowMaskRef& mask,
                        MatrixRef<Scalar> d_student, MatrixRef<Scalar> d_teacher) {
    return run(student, teacher, &mask, &d_student, &d_teacher);
  }
  //! bfloat16 logits with a row mask; adds to both gradients (bfloat16).
  Scalar value_and_grad(const ConstMatrixRef<bfloat16>& student,
                        const ConstMatrixRef<bfloat16>& teacher, const ConstRowMaskRef& mask,
                        MatrixRef<bfloat16> d_student, MatrixRef<bfloat16> d_teacher) {
    return run(student, teacher, &mask, &d_student, &d_teacher);
  }

  //! weight·(T²)·D_i of each row of the last call (0 for masked rows), before the reduction.
  const Vector<Scalar>& row_values() const { return ws_.row_value; }

  //! Frees the scratch memory kept between calls (the next call allocates it again).
  void release_workspace() {
    ws_.release();
    bad_grad_ = Eigen::Matrix<std::uint8_t, Eigen::Dynamic, 1>();
  }

 private:
  static constexpr const char* kName = "LogitDivergence";
  static constexpr int kBuffers = 5;  // q, p, log q, log p, log m per thread

  void validate() const {
    detail::check_enum(kName, "divergence", options_.divergence, 6);
    detail::check_enum(kName, "reduction", options_.reduction, 3);
    detail::check_positive(kName, "temperature", options_.temperature);
    detail::check_nonnegative(kName, "weight", options_.weight);
    if (!(options_.beta > Scalar(0) && options_.beta < Scalar(1)))
      detail::throw_invalid(kName, "option beta must be in (0, 1), got " +
                                       std::to_string(options_.beta) +
                                       " (beta 0 and 1 are ForwardKL and ReverseKL)");
    if (!(options_.skew >= Scalar(0) && options_.skew <= Scalar(1)))
      detail::throw_invalid(kName,
                            "option skew must be in [0, 1], got " + std::to_string(options_.skew));
  }

  Scalar mix() const {
    return options_.divergence == Divergence::GeneralizedJSD ? options_.beta : options_.skew;
  }

  static constexpr MatrixRef<Scalar>* kNoGrad = nullptr;
  static constexpr MatrixRef<bfloat16>* kNoGrad16 = nullptr;

  // One body (run_rows) for each storage type of the logits and of the gradients.
  Scalar run(const ConstMatrixRef<Scalar>& s, const ConstMatrixRef<Scalar>& t,
             const ConstRowMaskRef* mask, MatrixRef<Scalar>* ds, MatrixRef<Scalar>* dt);
  Scalar run(const ConstMatrixRef<bfloat16>& s, const ConstMatrixRef<bfloat16>& t,
             const ConstRowMaskRef* mask, MatrixRef<Scalar>* ds, MatrixRef<Scalar>* dt);
  Scalar run(const ConstMatrixRef<bfloat16>& s, const ConstMatrixRef<bfloat16>& t,
             const ConstRowMaskRef* mask, MatrixRef<bfloat16>* ds, MatrixRef<bfloat16>* dt);
  template <class In, class G>
  Scalar run_rows(const ConstMatrixRef<In>& s, const ConstMatrixRef<In>& t,
                  const ConstRowMaskRef* mask, MatrixRef<G>* ds, MatrixRef<G>* dt);

  template <class In>
  [[noreturn]] void diagnose(const ConstMatrixRef<In>& s, const ConstMatrixRef<In>& t,
                             detail::RowSelect rows) const;

  Options options_;
  detail::RowWorkspace<Scalar> ws_;
  Eigen::Matrix<std::uint8_t, Eigen::Dynamic, 1> bad_grad_;  // rows whose gradient overflowed
};

template <class Scalar>
Scalar LogitDivergence<Scalar>::run(const ConstMatrixRef<Scalar>& s,
                                    const ConstMatrixRef<Scalar>& t, const ConstRowMaskRef* mask,
                                    MatrixRef<Scalar>* ds, MatrixRef<Scalar>* dt) {
  return run_rows(s, t, mask, ds, dt);
}
template <class Scalar>
Scalar LogitDivergence<Scalar>::run(const ConstMatrixRef<bfloat16>& s,
                                    const ConstMatrixRef<bfloat16>& t, const ConstRowMaskRef* mask,
                                    MatrixRef<Scalar>* ds, MatrixRef<Scalar>* dt) {
  return run_rows(s, t, mask, ds, dt);
}
template <class Scalar>
Scalar LogitDivergence<Scalar>::run(const ConstMatrixRef<bfloat16>& s,
                                    const ConstMatrixRef<bfloat16>& t, const ConstRowMaskRef* mask,
                                    MatrixRef<bfloat16>* ds, MatrixRef<bfloat16>* dt) {
  return run_rows(s, t, mask, ds, dt);
}

template <class Scalar>
template <class In, class G>
Scalar LogitDivergence<Scalar>::run_rows(const ConstMatrixRef<In>& s, const ConstMatrixRef<In>& t,
                                         const ConstRowMaskRef* mask, MatrixRef<G>* ds,
                                         MatrixRef<G>* dt) {
  validate();
  const Index n = s.rows(), c = s.cols();
  detail::check_nonempty(kName, "student", n, c);
  detail::check_shape(kName, "teacher", t, n, c, "same as student");
  if (ds) detail::check_shape(kName, "d_student", *ds, n, c, "same as student");
  if (dt) detail::check_shape(kName, "d_teacher", *dt, n, c, "same as teacher");
  detail::RowSelect rows{mask ? mask->data() : nullptr};
  const Index used = mask ? detail::count_rows(kName, *mask, n) : n;

  const Scalar temp = options_.temperature, inv_t = Scalar(1) / temp;
  const Scalar t2 = options_.scale_by_t2 ? temp * temp : Scalar(1);
  const Scalar factor =
      options_.weight * t2 * detail::reduction_scale<Scalar>(options_.reduction, used, c);
  const Scalar g_scale = factor * inv_t;                    // chain rule through a = s/T, b = t/T
  const int gs = ds ? 0 : -1, gt = dt ? (ds ? 1 : 0) : -1;  // scratch gradient slots
  const Divergence kind = options_.divergence;

  Scalar bound = 0;  // a bound on the scaled gradient elements, when one exists
  if (kind == Divergence::ForwardKL) {
    ws_.prepare(n, c, (ds ? 1 : 0) + (dt ? 1 : 0), 2, detail::staged_rows<Scalar, In>(2));
    detail::kd_rows(s, t, inv_t, rows, ws_, gs, gt, [g_scale](Index) { return g_scale; });
    bound = ds ? 2 * g_scale : Scalar(0);
  }
  const bool scan = kind != Divergence::ForwardKL || dt;  // gradients without an O(1) bound
  if (scan) bad_grad_.resize(n);
  if (kind != Divergence::ForwardKL) {
    ws_.prepare(n, c, (ds ? 1 : 0) + (dt ? 1 : 0), kBuffers, detail::staged_rows<Scalar, In>(2));
    const Scalar m = mix();
    detail::parallel_for(n, c, [&](Index i, int thread) {
      if (!rows(i)) {
        ws_.row_value(i) = Scalar(0);
        bad_grad_(i) = 0;
        return;
      }
      detail::DivergenceBuffers<Scalar> b{
          ws_.buffer(thread, kBuffers, 0), ws_.buffer(thread, kBuffers, 1),
          ws_.buffer(thread, kBuffers, 2), ws_.buffer(thread, kBuffers, 3),
          ws_.buffer(thread, kBuffers, 4)};
      detail::RowMap<Scalar> ga = gs >= 0 ? ws_.grad_row(gs, i) : b.q;
      detail::RowMap<Scalar> gb = gt >= 0 ? ws_.grad_row(gt, i) : b.q;
      ws_.row_value(i) = detail::divergence_row(
          kind, m, detail::input_row(s, i, ws_, thread, 0), detail::input_row(t, i, ws_, thread, 1),
          inv_t, b, gs >= 0 ? &ga : nullptr, gt >= 0 ? &gb : nullptr, g_scale);
      // Scanned here, while the row is in cache.
      bad_grad_(i) = (gs >= 0 && !detail::all_finite(ga)) || (gt >= 0 && !detail::all_finite(gb));
    });
  }

  const Scalar raw = ws_.row_value.sum();
  if (!detail::is_finite(raw)) diagnose(s, t, rows);
  const Scalar value = detail::scaled_value(kName, factor, raw, bound);
  if (scan) {
    if (kind == Divergence::ForwardKL) {  // only the teacher's gradient needs the scan
      detail::parallel_for(n, c, [&](Index i, int) {
        bad_grad_(i) = rows(i) && !detail::all_finite(ws_.grad_row(gt, i));
      });
    }
    for (Index i = 0; i < n; ++i) {
      if (bad_grad_(i))
        detail::throw_numerical(kName, "the gradient overflows in row " + std::to_string(i) +
                                           " (the options' scale or a small temperature take "
                                           "it beyond the range of the scalar type)");
    }
  }
  ws_.row_value *= options_.weight * t2;
  if (ds) ws_.commit(gs, *ds, rows);
  if (dt) ws_.commit(gt, *dt, rows);
  return value;
}

template <class Scalar>
template <class In>
void LogitDivergence<Scalar>::diagnose(const ConstMatrixRef<In>& s, const ConstMatrixRef<In>& t,
                                       detail::RowSelect rows) const {
  constexpr double ninf = -std::numeric_limits<double>::infinity();  // any storage type
  const Index i = detail::first_nonfinite_row(ws_.row_value, rows);
  if (i < 0) detail::throw_numerical(kName, "the sum over rows overflows");
  std::string why = detail::bad_element_in_row("student", s, i, true);
  if (why.empty()) why = detail::bad_element_in_row("teacher", t, i, true);
  if (why.empty()) why = detail::all_neg_inf_row("teacher", t, i);
  if (why.empty()) why = detail::all_neg_inf_row("student", s, i);
  const Divergence kind = options_.divergence;
  const bool zero_skew = options_.skew == Scalar(0);
  const bool forward =
      kind == Divergence::ForwardKL || (kind == Divergence::SkewForwardKL && zero_skew);
  const bool reverse =
      kind == Divergence::ReverseKL || (kind == Divergence::SkewReverseKL && zero_skew);
  for (Index j = 0; j < s.cols() && why.empty(); ++j) {
    const double sij = double(s(i, j)), tij = double(t(i, j));
    if (forward && sij == ninf && tij > ninf)
      why = detail::element_str("student", i, j, sij) +
            " where the teacher's probability is positive: the divergence is infinite";
    if (reverse && tij == ninf && sij > ninf)
      why = detail::element_str("teacher", i, j, tij) +
            " where the student's probability is positive: the divergence is infinite";
  }
  if (why.empty())
    why = "row " + std::to_string(i) +
          " overflows: logits / temperature exceed the range of the scalar type";
  detail::throw_numerical(kName, why);
}

MMKD_EXTERN_TEMPLATE(LogitDivergence)

}  // namespace mmkd
