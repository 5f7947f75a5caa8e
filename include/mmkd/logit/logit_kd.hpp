#pragma once

#include <cmath>
#include <limits>
#include <string>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/parallel.hpp"
#include "mmkd/core/reduction.hpp"
#include "mmkd/core/types.hpp"
#include "mmkd/detail/kl.hpp"
#include "mmkd/detail/row_loss.hpp"

namespace mmkd {

/**
 * Hinton knowledge distillation: the temperature-softened KL divergence from the teacher's to
 * the student's class distribution.
 *
 *     L = weight · T² · (1/N') Σ_i KL( softmax(t_i/T) ‖ softmax(s_i/T) )
 *
 * with s the student logits, t the teacher logits (both N x C, raw logits, never probabilities),
 * T the temperature and N' the number of rows that take part (all rows, or the rows whose mask
 * entry is 1). This is `Reduction::BatchMean`, the default, and equals mdistiller `kd_loss` and
 * RepDistiller / ReviewKD `DistillKL` (commit a08d46f / b84f547). `Reduction::Mean` divides by
 * N'·C instead (PyTorch `kl_div(reduction="mean")`), `Reduction::Sum` by 1. With
 * `scale_by_t2 = false` the T² factor is dropped (torchdistill `KDLoss` without `alpha`); the
 * factor always applies to value and gradient alike.
 *
 * Gradients:  dL/ds_i = weight · T²/N' · (1/T) (p_s,i − p_t,i), and, for online/mutual
 * distillation, dL/dt_i = weight · T²/N' · (1/T) p_t,i ⊙ (log p_t,i − log p_s,i − KL_i).
 *
 * Numerics: fused, max-subtracted log-softmax, and every term of the KL formed from the
 * max-shifted logits, so a common offset of a row (logits around ±1e4) costs no precision in
 * float. A teacher logit of −inf is a class the teacher rules out (probability 0, term 0). If the
 * student rules out (−inf) a class the teacher does not, the KL is infinite and `NumericalError` is
 * thrown.
 *
 * Token-level (LLM) distillation: pass rows = batch × sequence positions and a row mask that is
 * 0 at padding tokens; `BatchMean` then averages over the real tokens only, and masked rows are
 * never read (they may hold garbage) and get exactly zero gradient.
 *
 * bfloat16 storage: student and teacher may both be `mmkd::bfloat16` matrices (the dtype LLM
 * logits come in). Each row is read into a per-thread row of Scalar (exact) and computed as a
 * Scalar row would be; the inputs are never copied whole. Gradient buffers are then Scalar or
 * bfloat16; a bfloat16 buffer gets each element's sum d + g rounded to nearest even.
 *
 * \pre  student and teacher are N x C with N, C ≥ 1; a mask has N entries, each 0 or 1;
 *       gradient buffers are N x C. Options: temperature > 0, weight ≥ 0 (finite).
 * \post `value_and_grad` adds the gradient to the buffers (`+=`) and returns the same value as
 *       `value`. On any exception nothing has been written.
 *
 * Reference:
 * @code
 * @article{hinton2015distilling,
 *   title   = {Distilling the Knowledge in a Neural Network},
 *   author  = {Hinton, Geoffrey and Vinyals, Oriol and Dean, Jeff},
 *   journal = {arXiv preprint arXiv:1503.02531}, year = {2015}}
 * @endcode
 *
 * **Example**:
 * @code
 * mmkd::LogitKD<float> kd({4.0f});                 // temperature 4
 * float loss = kd.value_and_grad(student, teacher, d_student);  // d_student += dL/dstudent
 * @endcode
 */
template <class Scalar = float>
class LogitKD : detail::FloatingScalar<Scalar> {
 public:
  //! The options; the defaults are those of the reference implementation.
  struct Options {
    Scalar temperature = Scalar(4);  //!< T > 0
    bool scale_by_t2 = true;         //!< multiply value and gradient by T²
    Reduction reduction =
        Reduction::BatchMean;   //!< BatchMean (PyTorch's `batchmean`), Sum or Mean (over N·C)
    Scalar weight = Scalar(1);  //!< ≥ 0, scales value and gradient
  };

  LogitKD() : LogitKD(Options{}) {}
  //! Throws InvalidArgument for an invalid option.
  explicit LogitKD(const Options& options) : options_(options) { validate(); }

  //! The options; may be changed between calls (they are validated at every call).
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
  //! Also adds dL/d(teacher) to `d_teacher` (online / mutual distillation).
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

  //! weight·T²·KL_i of each row of the last call (0 for masked rows), before the reduction:
  //! PyTorch's `reduction="none"` summed over classes, for logging per token or sample.
  const Vector<Scalar>& row_values() const { return ws_.row_value; }

  //! Frees the scratch memory kept between calls (the next call allocates it again).
  void release_workspace() { ws_.release(); }

 private:
  static constexpr const char* kName = "LogitKD";

  void validate() const {
    detail::check_enum(kName, "reduction", options_.reduction, 3);
    detail::check_positive(kName, "temperature", options_.temperature);
    detail::check_nonnegative(kName, "weight", options_.weight);
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

  template <class MS, class MT>
  [[noreturn]] void diagnose(const MS& s, const MT& t, detail::RowSelect rows) const {
    const Index i = detail::first_nonfinite_row(ws_.row_value, rows);
    std::string why;
    if (i >= 0) {
      why = detail::kd_row_reason("student", s, "teacher", t, i);
      if (why.empty()) {
        why = "row " + std::to_string(i) +
              " overflows: logits / temperature exceed the range of the scalar type";
      }
    } else {
      why = "the sum over rows overflows";
    }
    detail::throw_numerical(kName, why);
  }

  Options options_;
  detail::RowWorkspace<Scalar> ws_;
};

template <class Scalar>
Scalar LogitKD<Scalar>::run(const ConstMatrixRef<Scalar>& s, const ConstMatrixRef<Scalar>& t,
                            const ConstRowMaskRef* mask, MatrixRef<Scalar>* ds,
                            MatrixRef<Scalar>* dt) {
  return run_rows(s, t, mask, ds, dt);
}
template <class Scalar>
Scalar LogitKD<Scalar>::run(const ConstMatrixRef<bfloat16>& s, const ConstMatrixRef<bfloat16>& t,
                            const ConstRowMaskRef* mask, MatrixRef<Scalar>* ds,
                            MatrixRef<Scalar>* dt) {
  return run_rows(s, t, mask, ds, dt);
}
template <class Scalar>
Scalar LogitKD<Scalar>::run(const ConstMatrixRef<bfloat16>& s, const ConstMatrixRef<bfloat16>& t,
                            const ConstRowMaskRef* mask, MatrixRef<bfloat16>* ds,
                            MatrixRef<bfloat16>* dt) {
  return run_rows(s, t, mask, ds, dt);
}

template <class Scalar>
template <class In, class G>
Scalar LogitKD<Scalar>::run_rows(const ConstMatrixRef<In>& s, const ConstMatrixRef<In>& t,
                                 const ConstRowMaskRef* mask, MatrixRef<G>* ds, MatrixRef<G>* dt) {
  validate();
  const Index n = s.rows(), c = s.cols();
  detail::check_nonempty(kName, "student", n, c);
  detail::check_shape(kName, "teacher", t, n, c, "same as student");
  if (ds) detail::check_shape(kName, "d_student", *ds, n, c, "same as student");
  if (dt) detail::check_shape(kName, "d_teacher", *dt, n, c, "same as teacher");
  detail::RowSelect rows{mask ? mask->data() : nullptr};
  const Index used = mask ? detail::count_rows(kName, *mask, n) : n;

  const Scalar temp = options_.temperature;
  const Scalar inv_t = Scalar(1) / temp;
  const Scalar factor = options_.weight * (options_.scale_by_t2 ? temp * temp : Scalar(1)) *
                        detail::reduction_scale<Scalar>(options_.reduction, used, c);
  const Scalar g_scale = factor * inv_t;  // chain rule through a = s/T

  ws_.prepare(n, c, (ds ? 1 : 0) + (dt ? 1 : 0), 2, detail::staged_rows<Scalar, In>(2));
  const int gs = ds ? 0 : -1, gt = dt ? (ds ? 1 : 0) : -1;  // scratch gradient slots
  detail::kd_rows(s, t, inv_t, rows, ws_, gs, gt, [g_scale](Index) { return g_scale; });

  const Scalar raw = ws_.row_value.sum();
  if (!detail::is_finite(raw)) diagnose(s, t, rows);
  // Gradient elements are g_scale · (difference of two probabilities, or T·KL terms).
  const Scalar value = detail::scaled_value(kName, factor, raw, ds ? 2 * g_scale : Scalar(0));
  // The teacher's gradient carries log-ratios / T, with no O(1) bound: scan it (opt-in output).
  for (Index i = 0; dt && i < n; ++i) {
    if (rows(i) && !detail::all_finite(ws_.grad_row(gt, i)))
      detail::throw_numerical(kName, "the teacher's gradient overflows in row " +
                                         std::to_string(i) +
                                         " (temperature too small for the scalar type)");
  }
  ws_.row_value *= options_.weight * (options_.scale_by_t2 ? temp * temp : Scalar(1));
  if (ds) ws_.commit(gs, *ds, rows);
  if (dt) ws_.commit(gt, *dt, rows);
  return value;
}

MMKD_EXTERN_TEMPLATE(LogitKD)

}  // namespace mmkd
