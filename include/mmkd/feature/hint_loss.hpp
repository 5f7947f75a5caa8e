#pragma once

#include <cmath>
#include <string>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/parallel.hpp"
#include "mmkd/core/tensor.hpp"
#include "mmkd/core/types.hpp"
#include "mmkd/detail/finite.hpp"
#include "mmkd/detail/row_loss.hpp"

namespace mmkd {

/**
 * FitNets' hint loss (Romero et al., ICLR 2015): the mean squared difference between a student
 * feature (the "guided" layer, usually through a regressor that maps it to the teacher's
 * shape) and a teacher feature (the "hint"), as RepDistiller's `HintLoss` (`nn.MSELoss()`) and
 * mdistiller's `FitNet` (`F.mse_loss`) compute it:
 *
 * @code
 * L = weight · (1/(N·D)) Σ_{i,k} (s_ik − t_ik)²        s, t: N x D (or N x C x H x W, D = C·H·W)
 * dL/ds = weight · 2 (s − t) / (N·D),   dL/dt = −dL/ds
 * @endcode
 *
 * The regressor is the caller's: in the reference code a 1x1 (or 3x3) convolution and a batch
 * norm, which mmkd's ReviewKD ops provide with their backward passes. The teacher's gradient is
 * available on request (a trainable hint). Inputs are N x D matrices or N x C x H x W tensors
 * (their N x C·H·W view); any non-finite input is `NumericalError` naming the first such element,
 * and a sum that overflows the scalar type too, before anything is written.
 *
 * \pre  student and teacher of the same shape, N, D ≥ 1; gradient buffers of that shape.
 *       Options: weight ≥ 0, finite.
 * \post `value_and_grad` adds the gradients (`+=`) and returns the same value as `value`. On
 *       any exception nothing has been written.
 *
 * **Example** (a conv1x1 + batch-norm regressor, as RepDistiller's FitNet stage):
 * @code
 * // r = bn(conv1x1(f_s)) with mmkd::conv2d_1x1 and mmkd::BatchNorm2d, N x C_t x H x W
 * mmkd::HintLoss<float> hint;
 * float loss = hint.value_and_grad(r, f_t, d_r);   // d_r += dL/dr, then back through bn, conv
 * @endcode
 */
template <class Scalar = float>
class HintLoss : detail::FloatingScalar<Scalar> {
 public:
  //! The options; the default is the reference's plain mean.
  struct Options {
    Scalar weight = Scalar(1);  //!< ≥ 0, scales value and gradient (the trainer's hint weight)
  };

  HintLoss() : HintLoss(Options{}) {}
  //! Throws InvalidArgument for an invalid option.
  explicit HintLoss(const Options& options) : options_(options) { validate(); }

  //! The options; may be changed between calls (validated at every call).
  Options& options() { return options_; }
  //! The options.
  const Options& options() const { return options_; }

  //! The loss of N x D features.
  Scalar value(const ConstMatrixRef<Scalar>& student, const ConstMatrixRef<Scalar>& teacher) {
    return run(student, teacher, nullptr, nullptr);
  }
  //! Returns the loss and adds dL/d(student) to `d_student`.
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& student,
                        const ConstMatrixRef<Scalar>& teacher, MatrixRef<Scalar> d_student) {
    return run(student, teacher, &d_student, nullptr);
  }
  //! Also adds dL/d(teacher) to `d_teacher`.
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& student,
                        const ConstMatrixRef<Scalar>& teacher, MatrixRef<Scalar> d_student,
                        MatrixRef<Scalar> d_teacher) {
    return run(student, teacher, &d_student, &d_teacher);
  }

  //! The loss of N x C x H x W feature maps.
  Scalar value(const ConstTensor4Ref<Scalar>& student, const ConstTensor4Ref<Scalar>& teacher) {
    check4(student, teacher, nullptr, nullptr);
    return run(flat(student), flat(teacher), nullptr, nullptr);
  }
  //! Feature maps; adds dL/d(student) to `d_student` (N x C x H x W).
  Scalar value_and_grad(const ConstTensor4Ref<Scalar>& student,
                        const ConstTensor4Ref<Scalar>& teacher, Tensor4Ref<Scalar> d_student) {
    check4(student, teacher, &d_student, nullptr);
    MatrixRef<Scalar> ds = flat(d_student);
    return run(flat(student), flat(teacher), &ds, nullptr);
  }
  //! Feature maps; adds to both gradients.
  Scalar value_and_grad(const ConstTensor4Ref<Scalar>& student,
                        const ConstTensor4Ref<Scalar>& teacher, Tensor4Ref<Scalar> d_student,
                        Tensor4Ref<Scalar> d_teacher) {
    check4(student, teacher, &d_student, &d_teacher);
    MatrixRef<Scalar> ds = flat(d_student), dt = flat(d_teacher);
    return run(flat(student), flat(teacher), &ds, &dt);
  }

 private:
  static constexpr const char* kName = "HintLoss";

  void validate() const { detail::check_nonnegative(kName, "weight", options_.weight); }

  static Eigen::Map<const Matrix<Scalar>> flat(const ConstTensor4Ref<Scalar>& x) {
    return {x.data(), x.dimension(0), x.dimension(1) * x.dimension(2) * x.dimension(3)};
  }
  static Eigen::Map<Matrix<Scalar>> flat(Tensor4Ref<Scalar>& x) {
    return {x.data(), x.dimension(0), x.dimension(1) * x.dimension(2) * x.dimension(3)};
  }
  static void check4(const ConstTensor4Ref<Scalar>& s, const ConstTensor4Ref<Scalar>& t,
                     const Tensor4Ref<Scalar>* ds, const Tensor4Ref<Scalar>* dt) {
    const Index n = s.dimension(0), c = s.dimension(1), h = s.dimension(2), w = s.dimension(3);
    detail::check_shape4(kName, "teacher", t, n, c, h, w, "same as student");
    if (ds) detail::check_shape4(kName, "d_student", *ds, n, c, h, w, "same as student");
    if (dt) detail::check_shape4(kName, "d_teacher", *dt, n, c, h, w, "same as student");
  }

  Scalar run(const ConstMatrixRef<Scalar>& s, const ConstMatrixRef<Scalar>& t,
             MatrixRef<Scalar>* ds, MatrixRef<Scalar>* dt);

  Options options_;
  Vector<Scalar> row_sum_;  // Σ_k (s_ik − t_ik)² per row: a sum whose order is fixed
};

template <class Scalar>
Scalar HintLoss<Scalar>::run(const ConstMatrixRef<Scalar>& s, const ConstMatrixRef<Scalar>& t,
                             MatrixRef<Scalar>* ds, MatrixRef<Scalar>* dt) {
  validate();
  const Index n = s.rows(), d = s.cols();
  detail::check_nonempty(kName, "student", n, d);
  detail::check_shape(kName, "teacher", t, n, d, "same as student");
  if (ds) detail::check_shape(kName, "d_student", *ds, n, d, "same as student");
  if (dt) detail::check_shape(kName, "d_teacher", *dt, n, d, "same as student");
  row_sum_.resize(n);
  detail::parallel_for(n, d,
                       [&](Index i, int) { row_sum_(i) = (s.row(i) - t.row(i)).squaredNorm(); });
  const Scalar raw = row_sum_.sum();
  if (!detail::is_finite(raw)) {
    std::string why = detail::bad_element("student", s, false);
    if (why.empty()) why = detail::bad_element("teacher", t, false);
    detail::throw_numerical(kName,
                            why.empty() ? "the sum of squares overflows the scalar type" : why);
  }
  // |s_ik − t_ik| ≤ √(max row sum), so the gradient elements are at most g·√max.
  const Scalar inv = Scalar(1) / (Scalar(n) * Scalar(d));
  const Scalar g = 2 * options_.weight * inv;
  const Scalar value =
      detail::scaled_value(kName, options_.weight * inv, raw,
                           (ds || dt) ? g * std::sqrt(row_sum_.maxCoeff()) : Scalar(0));
  if (ds || dt) {
    detail::parallel_for(n, d, [&](Index i, int) {
      if (ds) ds->row(i) += g * (s.row(i) - t.row(i));
      if (dt) dt->row(i) -= g * (s.row(i) - t.row(i));
    });
  }
  return value;
}

MMKD_EXTERN_TEMPLATE(HintLoss)

}  // namespace mmkd
