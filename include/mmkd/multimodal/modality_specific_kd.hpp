#pragma once

#include <cmath>
#include <limits>
#include <string>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/tensor.hpp"
#include "mmkd/core/types.hpp"
#include "mmkd/detail/kl.hpp"
#include "mmkd/detail/row_loss.hpp"

namespace mmkd {

/**
 * Modality-specific distillation (MSD): temperature KD on the full input plus one auxiliary KD
 * term per modality, on the logits the student and the teacher give when only that modality is
 * kept, weighted per sample and modality.
 *
 *     L = weight · [ beta · KD(s, t) + (1/N) Σ_i Σ_m w_im · KD_i(z_i^[m], t_i^[m]) ]
 *     KD_i(a, b) = T² · KL(softmax(b/T) ‖ softmax(a/T)),   KD(s, t) = (1/N) Σ_i KD_i(s_i, t_i)
 *
 * KD is exactly `LogitKD`'s (same T² and batch-mean conventions, same kernel). The weights w
 * (N x M) are an input and constants for the gradient (detached; the reference note's reading,
 * not a statement of the paper, whose text was not available: weights computed from the
 * teacher's fixed outputs carry no student gradient, and meta-learned ones get theirs from
 * `ModalityWeightLearner`'s hypergradient, not from this loss). Build them
 * with `ModalitySaliency` + `ModalityWeighting` (fixed, population or instance-wise), or with
 * `ModalityWeightLearner` (meta-learned). A missing modality (mask 0) drops its auxiliary term:
 * its logits are never read and its gradient is exactly zero.
 *
 * The paper's method section could not be read; the auxiliary terms' form (same KD, same T) is
 * the reference note's reading, and T = 1 its proposed default.
 *
 * Gradients: dL/ds_i = weight·beta·(T/N)(p_s,i − p_t,i);
 *            dL/dz_i^[m] = weight·w_im·(T/N)(p(z_i^[m]) − p(t_i^[m])).
 *
 * \pre  student, teacher N x C; student_modal, teacher_modal M x N x C (modality-major: block m is
 *       an ordinary N x C matrix); weights N x M, finite and ≥ 0 where present; mask N x M of 0/1;
 *       gradient buffers shaped like their inputs.
 * \post `value_and_grad` adds to both gradient buffers; on any exception nothing is written.
 *       `auxiliary_losses()` holds KD_i(z_i^[m], t_i^[m]) (N x M, 0 where missing).
 *
 * Reference:
 * @code
 * @inproceedings{jin2021msd,
 *   title     = {{MSD}: Saliency-aware Knowledge Distillation for Multimodal Understanding},
 *   author    = {Jin, Woojeong and Sanjabi, Maziar and Nie, Shaoliang and Tan, Liang and
 *                Ren, Xiang and Firooz, Hamed},
 *   booktitle = {Findings of EMNLP}, pages = {3557--3569}, year = {2021}}
 * @endcode
 *
 * **Example**:
 * @code
 * mmkd::ModalitySaliency<float> saliency;
 * mmkd::ModalityWeighting<float> weighting;
 * const auto& w = weighting.compute(saliency.compute(teacher, teacher_modal));
 * mmkd::ModalitySpecificKD<float> msd;
 * float loss = msd.value_and_grad(student, teacher, student_modal, teacher_modal, w,
 *                                 d_student, d_student_modal);
 * @endcode
 */
template <class Scalar = float>
class ModalitySpecificKD : detail::FloatingScalar<Scalar> {
 public:
  //! The options; the defaults are those of the reference implementation.
  struct Options {
    Scalar temperature = Scalar(1);  //!< T > 0
    Scalar beta = Scalar(1);         //!< weight of the full-input KD term, ≥ 0
    Scalar weight = Scalar(1);       //!< ≥ 0, scales value and gradient
  };

  ModalitySpecificKD() : ModalitySpecificKD(Options{}) {}
  //! Throws InvalidArgument for an invalid option.
  explicit ModalitySpecificKD(const Options& options) : options_(options) { validate(); }

  //! The options; may be changed between calls (validated at every call).
  Options& options() { return options_; }
  //! The options.
  const Options& options() const { return options_; }

  //! The loss for instance weights `weights` (N x M).
  Scalar value(const ConstMatrixRef<Scalar>& student, const ConstMatrixRef<Scalar>& teacher,
               const ConstTensor3Ref<Scalar>& student_modal,
               const ConstTensor3Ref<Scalar>& teacher_modal,
               const ConstMatrixRef<Scalar>& weights) {
    return run(student, teacher, student_modal, teacher_modal, &weights, nullptr, nullptr, nullptr);
  }
  //! With a presence mask (N x M, 1 = sample i has modality m).
  Scalar value(const ConstMatrixRef<Scalar>& student, const ConstMatrixRef<Scalar>& teacher,
               const ConstTensor3Ref<Scalar>& student_modal,
               const ConstTensor3Ref<Scalar>& teacher_modal, const ConstMatrixRef<Scalar>& weights,
               const ConstPresenceMaskRef& mask) {
    return run(student, teacher, student_modal, teacher_modal, &weights, &mask, nullptr, nullptr);
  }
  //! Returns the loss; adds dL/d(student) and dL/d(student_modal).
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& student,
                        const ConstMatrixRef<Scalar>& teacher,
                        const ConstTensor3Ref<Scalar>& student_modal,
                        const ConstTensor3Ref<Scalar>& teacher_modal,
                        const ConstMatrixRef<Scalar>& weights, MatrixRef<Scalar> d_student,
                        Tensor3Ref<Scalar> d_student_modal) {
    return run(student, teacher, student_modal, teacher_modal, &weights, nullptr, &d_student,
               &d_student_modal);
  }
  //! With a presence mask; adds dL/d(student) and dL/d(student_modal).
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& student,
                        const ConstMatrixRef<Scalar>& teacher,
                        const ConstTensor3Ref<Scalar>& student_modal,
                        const ConstTensor3Ref<Scalar>& teacher_modal,
                        const ConstMatrixRef<Scalar>& weights, const ConstPresenceMaskRef& mask,
                        MatrixRef<Scalar> d_student, Tensor3Ref<Scalar> d_student_modal) {
    return run(student, teacher, student_modal, teacher_modal, &weights, &mask, &d_student,
               &d_student_modal);
  }

  //! Only the auxiliary losses KD_i(z_i^[m], t_i^[m]) (N x M, 0 where missing): the input
  //! features of `ModalityWeightLearner`, needed before the weights exist.
  const Matrix<Scalar>& auxiliary_losses(const ConstTensor3Ref<Scalar>& student_modal,
                                         const ConstTensor3Ref<Scalar>& teacher_modal) {
    return run_aux_only(student_modal, teacher_modal, nullptr);
  }
  //! With a presence mask (0 where a modality is missing).
  const Matrix<Scalar>& auxiliary_losses(const ConstTensor3Ref<Scalar>& student_modal,
                                         const ConstTensor3Ref<Scalar>& teacher_modal,
                                         const ConstPresenceMaskRef& mask) {
    return run_aux_only(student_modal, teacher_modal, &mask);
  }
  //! The auxiliary losses of the last call.
  const Matrix<Scalar>& auxiliary_losses() const { return aux_; }

  //! Frees the scratch memory kept between calls.
  void release_workspace() {
    full_.release();
    modal_.release();
  }

 private:
  static constexpr const char* kName = "ModalitySpecificKD";

  void validate() const {
    detail::check_positive(kName, "temperature", options_.temperature);
    detail::check_nonnegative(kName, "beta", options_.beta);
    detail::check_nonnegative(kName, "weight", options_.weight);
  }

  // Shapes of the modal stacks and the mask; returns M.
  Index check_modal(const ConstTensor3Ref<Scalar>& zs, const ConstTensor3Ref<Scalar>& zt, Index n,
                    Index c, const ConstPresenceMaskRef* mask) const {
    const Index m = zs.dimension(0);
    if (n < 0) n = zs.dimension(1);
    if (c < 0) c = zs.dimension(2);
    if (m == 0 || n == 0 || c == 0) {
      detail::throw_invalid(
          kName, "student_modal is empty (shape " +
                     detail::shape_str3(zs.dimension(0), zs.dimension(1), zs.dimension(2)) + ")");
    }
    detail::check_shape3(kName, "student_modal", zs, m, n, c, "modalities x samples x classes");
    detail::check_shape3(kName, "teacher_modal", zt, m, n, c, "same as student_modal");
    if (mask) detail::check_presence(kName, *mask, n, m);
    return m;
  }

  const Matrix<Scalar>& run_aux_only(const ConstTensor3Ref<Scalar>& zs,
                                     const ConstTensor3Ref<Scalar>& zt,
                                     const ConstPresenceMaskRef* mask);

  Scalar run(const ConstMatrixRef<Scalar>& s, const ConstMatrixRef<Scalar>& t,
             const ConstTensor3Ref<Scalar>& zs, const ConstTensor3Ref<Scalar>& zt,
             const ConstMatrixRef<Scalar>* w, const ConstPresenceMaskRef* mask,
             MatrixRef<Scalar>* ds, Tensor3Ref<Scalar>* dzs);

  void store_aux(Index n, Index m) {
    const Scalar t2 = options_.temperature * options_.temperature;
    aux_.resize(n, m);
    for (Index k = 0; k < m; ++k) {
      for (Index i = 0; i < n; ++i) aux_(i, k) = t2 * modal_.row_value(k * n + i);
    }
  }

  [[noreturn]] void diagnose_full(const ConstMatrixRef<Scalar>& s,
                                  const ConstMatrixRef<Scalar>& t) const {
    const Index i = detail::first_nonfinite_row(full_.row_value, [](Index) { return true; });
    std::string why;
    if (i >= 0) {
      why = detail::kd_row_reason("student", s, "teacher", t, i);
    }
    if (why.empty()) why = "the full-input KD term is infinite (row " + std::to_string(i) + ")";
    detail::throw_numerical(kName, why);
  }

  template <class Rows>
  [[noreturn]] void diagnose_modal(const ConstTensor3Ref<Scalar>& zs,
                                   const ConstTensor3Ref<Scalar>& zt, Index n, Rows&& rows) const {
    const Index k = detail::first_nonfinite_row(modal_.row_value, rows);
    std::string why;
    if (k >= 0) {
      const auto bs = detail::as_matrix(zs);
      const auto bt = detail::as_matrix(zt);
      const std::string where =
          " (modality " + std::to_string(k / n) + ", sample " + std::to_string(k % n) + ")";
      why = detail::kd_row_reason("student_modal", bs, "teacher_modal", bt, k);
      if (why.empty()) why = "the auxiliary KD term is infinite";
      why += where;
    } else {
      why = "the weighted sum of auxiliary terms overflows";
    }
    detail::throw_numerical(kName, why);
  }

  Options options_;
  detail::RowWorkspace<Scalar> full_, modal_;
  Matrix<Scalar> aux_;
};

template <class Scalar>
const Matrix<Scalar>& ModalitySpecificKD<Scalar>::run_aux_only(const ConstTensor3Ref<Scalar>& zs,
                                                               const ConstTensor3Ref<Scalar>& zt,
                                                               const ConstPresenceMaskRef* mask) {
  validate();
  const Index m = check_modal(zs, zt, -1, -1, mask), n = zs.dimension(1), c = zs.dimension(2);
  const auto present = detail::presence(mask);
  auto rows = [&](Index k) { return present(k % n, k / n); };
  modal_.prepare(m * n, c, 0, 2);
  detail::kd_rows(detail::as_matrix(zs), detail::as_matrix(zt), Scalar(1) / options_.temperature,
                  rows, modal_, -1, -1, [](Index) { return Scalar(0); });
  if (!detail::all_finite(modal_.row_value)) diagnose_modal(zs, zt, n, rows);
  store_aux(n, m);
  return aux_;
}

template <class Scalar>
Scalar ModalitySpecificKD<Scalar>::run(const ConstMatrixRef<Scalar>& s,
                                       const ConstMatrixRef<Scalar>& t,
                                       const ConstTensor3Ref<Scalar>& zs,
                                       const ConstTensor3Ref<Scalar>& zt,
                                       const ConstMatrixRef<Scalar>* w,
                                       const ConstPresenceMaskRef* mask, MatrixRef<Scalar>* ds,
                                       Tensor3Ref<Scalar>* dzs) {
  validate();
  const Index n = s.rows(), c = s.cols();
  detail::check_nonempty(kName, "student", n, c);
  detail::check_shape(kName, "teacher", t, n, c, "same as student");
  const Index m = check_modal(zs, zt, n, c, mask);
  detail::check_shape(kName, "weights", *w, n, m, "samples x modalities");
  if (ds) detail::check_shape(kName, "d_student", *ds, n, c, "same as student");
  if (dzs) detail::check_shape3(kName, "d_student_modal", *dzs, m, n, c, "same as student_modal");
  const auto present = detail::presence(mask);
  for (Index i = 0; i < n; ++i) {
    for (Index k = 0; k < m; ++k) {
      const Scalar v = (*w)(i, k);
      if (present(i, k) && (!(v >= 0) || !detail::is_finite(v))) {
        detail::throw_invalid(kName, "weights[" + std::to_string(i) + "," + std::to_string(k) +
                                         "] is " + std::to_string(v) +
                                         ", expected finite and >= 0");
      }
    }
  }

  const Scalar temp = options_.temperature, inv_t = Scalar(1) / temp;
  const Scalar base = options_.weight * temp * temp / Scalar(n);  // T²/N
  // The gradient's scale weight·T/N is formed before β or w_im multiplies it, as in the bound
  // below: base·β alone can overflow where the gradient does not (T = 1e6, β = 1e300).
  const Scalar grad_base = base * inv_t;
  const Scalar full_scale = grad_base * options_.beta;
  auto all_rows = [](Index) { return true; };
  auto modal_rows = [&](Index k) { return present(k % n, k / n); };
  full_.prepare(n, c, ds ? 1 : 0, 2);
  modal_.prepare(m * n, c, dzs ? 1 : 0, 2);
  detail::kd_rows(s, t, inv_t, all_rows, full_, ds ? 0 : -1, -1,
                  [full_scale](Index) { return full_scale; });
  detail::kd_rows(detail::as_matrix(zs), detail::as_matrix(zt), inv_t, modal_rows, modal_,
                  dzs ? 0 : -1, -1, [&](Index k) { return grad_base * (*w)(k % n, k / n); });

  const Scalar full_raw = full_.row_value.sum();
  Scalar modal_raw = 0;
  for (Index k = 0; k < m * n; ++k) {
    if (modal_rows(k)) modal_raw += (*w)(k % n, k / n) * modal_.row_value(k);
  }
  if (!detail::is_finite(full_raw)) diagnose_full(s, t);
  if (!detail::all_finite(modal_.row_value) || !detail::is_finite(modal_raw))
    diagnose_modal(zs, zt, n, modal_rows);
  // Gradient elements are at most 2 · base / T times β or the largest weight used.
  Scalar w_max = options_.beta;
  for (Index k = 0; k < m * n; ++k) {
    if (modal_rows(k)) w_max = std::max(w_max, (*w)(k % n, k / n));
  }
  const Scalar value = detail::scaled_value(kName, base, options_.beta * full_raw + modal_raw,
                                            (ds || dzs) ? 2 * grad_base * w_max : Scalar(0));
  store_aux(n, m);
  if (ds) full_.commit(0, *ds, all_rows);
  if (dzs) {
    auto dst = detail::as_matrix(*dzs);
    modal_.commit(0, dst, modal_rows);
  }
  return value;
}

MMKD_EXTERN_TEMPLATE(ModalitySpecificKD)

}  // namespace mmkd
