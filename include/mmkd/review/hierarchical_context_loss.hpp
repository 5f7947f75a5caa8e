#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/parallel.hpp"
#include "mmkd/core/tensor.hpp"
#include "mmkd/core/types.hpp"
#include "mmkd/review/resize.hpp"

namespace mmkd {

/**
 * ReviewKD's hierarchical context loss (HCL), Chen et al., CVPR 2021; `hcl` of the official code,
 * `hcl_loss` of mdistiller, torchdistill's `HierarchicalContextLoss`.
 *
 * For each stage pair (s, t), both N x C x H x W, with d = s − t and P_l adaptive average pooling
 * to l x l (PyTorch's bins, overlapping when l ∤ H):
 *
 *     stage = (mse(d) + Σ_j w_j · mse(P_{l_j} d)) / (1 + Σ_j w_j),   w_j = 2^−j (j = 1, 2, ...)
 *     HCL   = weight · Σ_stages stage                      (a sum, not a mean, over stages)
 *
 * where mse is the mean of squares and the levels l_j are `levels` (default 4, 2, 1) with
 * l < H — the reference tests the height only. Pooling is linear, so P(s) − P(t) = P(d). With the
 * defaults the total weight is 1 (H = 1), 1.5 (H = 2), 1.75 (H = 3, 4) and 1.875 (H ≥ 5).
 * Gradient to the student only (the teacher is a constant):
 *
 *     ∂stage/∂s = 2/(1 + Σw) · (d/numel + Σ_j w_j · P_{l_j}ᵀ(P_{l_j} d)/numel_j)
 *
 * Loss protocol: `value` / `value_and_grad` (adds); a non-finite loss throws `NumericalError`
 * naming the first non-finite input element and writes nothing.
 *
 * **Example**:
 * @code
 * mmkd::HierarchicalContextLoss<float> hcl;
 * float loss = hcl.value_and_grad(review.forward(features), teacher_features, grads);
 * @endcode
 */
template <class Scalar = float>
class HierarchicalContextLoss : detail::FloatingScalar<Scalar> {
 public:
  //! The options; the defaults are those of the reference implementation.
  struct Options {
    std::vector<Index> levels = {4, 2, 1};  //!< pooled sizes, in weight order; each ≥ 1
    Scalar weight = Scalar(1);              //!< ≥ 0, scales value and gradient (e.g. a warm-up)
  };

  HierarchicalContextLoss() : HierarchicalContextLoss(Options{}) {}
  //! Throws InvalidArgument for an invalid option.
  explicit HierarchicalContextLoss(const Options& options) : options_(options) { check_options(); }

  //! The options.
  const Options& options() const { return options_; }
  //! The options; may be changed between calls (validated at every call).
  Options& options() { return options_; }

  //! The loss of the S student outputs against the S teacher features.
  Scalar value(const std::vector<ConstTensor4Ref<Scalar>>& student,
               const std::vector<ConstTensor4Ref<Scalar>>& teacher) {
    check_options();
    check(student, teacher);
    return compute(student, teacher, nullptr);
  }

  //! Adds ∂HCL/∂student[k] to grad[k] (same shapes) and returns HCL.
  Scalar value_and_grad(const std::vector<ConstTensor4Ref<Scalar>>& student,
                        const std::vector<ConstTensor4Ref<Scalar>>& teacher,
                        const std::vector<Tensor4Ref<Scalar>>& grad) {
    check_options();
    check(student, teacher);
    if (grad.size() != student.size()) {
      detail::throw_invalid(kName, "grad has " + std::to_string(grad.size()) +
                                       " entries, expected " + std::to_string(student.size()) +
                                       " (one per stage)");
    }
    for (std::size_t k = 0; k < student.size(); ++k) {
      const auto& s = student[k];
      detail::check_shape4(
          kName, [&] { return "grad[" + std::to_string(k) + "]"; }, grad[k], s.dimension(0),
          s.dimension(1), s.dimension(2), s.dimension(3), "same as student");
    }
    return compute(student, teacher, &grad);
  }

  //! The total weight 1 + Σ_j w_j of a stage of height h.
  Scalar total_weight(Index h) const {
    Scalar tot(1), w(1);
    for (Index l : options_.levels) {
      if (l >= h) continue;
      w /= Scalar(2);
      tot += w;
    }
    return tot;
  }

 private:
  static constexpr const char* kName = "HierarchicalContextLoss";
  using Arr = Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>>;
  using OutArr = Eigen::Map<Eigen::Array<Scalar, Eigen::Dynamic, 1>>;

  void check_options() const {
    detail::check_nonnegative(kName, "weight", options_.weight);
    for (Index l : options_.levels) {
      if (l < 1) detail::throw_invalid(kName, "option levels: each level must be >= 1");
    }
  }

  void check(const std::vector<ConstTensor4Ref<Scalar>>& student,
             const std::vector<ConstTensor4Ref<Scalar>>& teacher) const {
    if (student.empty()) detail::throw_invalid(kName, "student is empty: need at least one stage");
    if (teacher.size() != student.size()) {
      detail::throw_invalid(kName, "teacher has " + std::to_string(teacher.size()) +
                                       " stages, expected " + std::to_string(student.size()) +
                                       " (one per student stage)");
    }
    for (std::size_t k = 0; k < student.size(); ++k) {
      const auto& s = student[k];
      if (s.size() == 0) {
        detail::throw_invalid(kName, "student[" + std::to_string(k) + "] is empty (shape " +
                                         detail::shape_str4(s.dimension(0), s.dimension(1),
                                                            s.dimension(2), s.dimension(3)) +
                                         ")");
      }
      detail::check_shape4(
          kName,
          [&] { return "stage " + std::to_string(k) + ": teacher[" + std::to_string(k) + "]"; },
          teacher[k], s.dimension(0), s.dimension(1), s.dimension(2), s.dimension(3),
          "same as student");
    }
  }

  // Pass 1: the value, keeping each stage's pooled differences; pass 2 (only when the value is
  // finite and a gradient is wanted): grad += 2/tot · (d/numel + Σ w_j P_jᵀ P_j d / numel_j).
  // Planes run in parallel; their sums of squares are added afterwards, in a fixed order.
  Scalar compute(const std::vector<ConstTensor4Ref<Scalar>>& student,
                 const std::vector<ConstTensor4Ref<Scalar>>& teacher,
                 const std::vector<Tensor4Ref<Scalar>>* grad);

  // O(1) per stage, before anything is written: every gradient element is at most
  // max|d| · (c0 + 4 Σ_j scale·w_j / (planes·l_j²)) (a pooled mean is at most max|d|, and an
  // element lies in at most 2 x 2 adaptive bins), so a finite bound means a finite gradient.
  void check_gradient_bound(const std::vector<ConstTensor4Ref<Scalar>>& student) const {
    for (std::size_t k = 0; k < student.size(); ++k) {
      const auto& s = student[k];
      const Index planes = s.dimension(0) * s.dimension(1), h = s.dimension(2);
      const Scalar scale = Scalar(2) * options_.weight / total_weight(h);
      Scalar factor = scale / Scalar(planes * s.dimension(2) * s.dimension(3)), wgt(1);
      for (Index l : options_.levels) {
        if (l >= h) continue;
        wgt /= Scalar(2);
        factor += Scalar(4) * (scale * wgt / Scalar(planes * l * l));
      }
      if (!detail::is_finite(factor * stage_max_(Index(k)))) {
        detail::throw_numerical(kName, "the gradient of stage " + std::to_string(k) +
                                           " overflows: the weight scales it beyond the range "
                                           "of the scalar type");
      }
    }
  }

  void add_gradient(const std::vector<ConstTensor4Ref<Scalar>>& student,
                    const std::vector<ConstTensor4Ref<Scalar>>& teacher,
                    const std::vector<Tensor4Ref<Scalar>>& grad) {
    const std::size_t ns = student.size(), nl = options_.levels.size();
    for (std::size_t k = 0; k < ns; ++k) {
      const auto& s = student[k];
      const Index planes = s.dimension(0) * s.dimension(1), h = s.dimension(2), w = s.dimension(3);
      const Index hw = h * w;
      const Scalar scale = Scalar(2) * options_.weight / total_weight(h);
      const Scalar c0 = scale / Scalar(planes * hw);
      Scalar wgt(1);
      for (std::size_t j = 0; j < nl; ++j) {
        const Index l = options_.levels[j];
        if (l >= h) continue;
        wgt /= Scalar(2);
        pooled_[k * nl + j] *= scale * wgt / Scalar(planes * l * l);
      }
      const Scalar* sp = s.data();
      const Scalar* tp = teacher[k].data();
      Scalar* gp = grad[k].data();
      detail::parallel_for(planes, 3 * hw, [&](Index p, int thread) {
        OutArr g(diff_.row(thread).data(), hw);
        g = (Arr(sp + p * hw, hw) - Arr(tp + p * hw, hw)) * c0;
        for (std::size_t j = 0; j < nl; ++j) {
          const Index l = options_.levels[j];
          if (l >= h) continue;
          detail::pool_backward(pooled_[k * nl + j].data() + p * l * l, 1, h, w, g.data(), l, l);
        }
        OutArr(gp + p * hw, hw) += g;
      });
    }
  }

  [[noreturn]] void diagnose(const std::vector<ConstTensor4Ref<Scalar>>& student,
                             const std::vector<ConstTensor4Ref<Scalar>>& teacher) const {
    for (std::size_t k = 0; k < student.size(); ++k) {
      std::string why = detail::bad_element4("student[" + std::to_string(k) + "]", student[k]);
      if (why.empty()) why = detail::bad_element4("teacher[" + std::to_string(k) + "]", teacher[k]);
      if (!why.empty()) detail::throw_numerical(kName, why);
    }
    detail::throw_numerical(kName, "the loss overflowed (inputs are finite; check their scale)");
  }

  Options options_;
  std::vector<Eigen::Array<Scalar, Eigen::Dynamic, 1>> pooled_;
  Matrix<Scalar> diff_;                               // one difference plane per thread
  Eigen::Array<double, Eigen::Dynamic, 1> plane_sq_;  // Σ d² of each plane of a stage
  Eigen::Array<Scalar, Eigen::Dynamic, 1> plane_max_, stage_max_;  // max |d|, for the bound
};

template <class Scalar>
Scalar HierarchicalContextLoss<Scalar>::compute(const std::vector<ConstTensor4Ref<Scalar>>& student,
                                                const std::vector<ConstTensor4Ref<Scalar>>& teacher,
                                                const std::vector<Tensor4Ref<Scalar>>* grad) {
  const std::size_t ns = student.size(), nl = options_.levels.size();
  pooled_.resize(ns * nl);
  Index max_hw = 0, max_planes = 0;  // scratch for every stage: it only grows
  for (const auto& s : student) {
    max_hw = std::max(max_hw, s.dimension(2) * s.dimension(3));
    max_planes = std::max(max_planes, s.dimension(0) * s.dimension(1));
  }
  const Index threads = max_threads();
  if (diff_.rows() < threads || diff_.cols() < max_hw)
    diff_.resize(std::max(threads, diff_.rows()), std::max(max_hw, diff_.cols()));
  if (plane_sq_.size() < max_planes) plane_sq_.resize(max_planes);
  if (grad && plane_max_.size() < max_planes) plane_max_.resize(max_planes);
  if (grad) stage_max_.resize(Index(ns));
  double total = 0;
  for (std::size_t k = 0; k < ns; ++k) {
    const auto& s = student[k];
    const Index planes = s.dimension(0) * s.dimension(1), h = s.dimension(2), w = s.dimension(3);
    const Index hw = h * w;
    const Scalar* sp = s.data();
    const Scalar* tp = teacher[k].data();
    for (std::size_t j = 0; j < nl; ++j) {
      const Index l = options_.levels[j];
      if (l < h) pooled_[k * nl + j].resize(planes * l * l);
    }
    detail::parallel_for(planes, 3 * hw, [&](Index p, int thread) {
      OutArr d(diff_.row(thread).data(), hw);
      d = Arr(sp + p * hw, hw) - Arr(tp + p * hw, hw);
      plane_sq_(p) = double(d.square().sum());
      if (grad) plane_max_(p) = d.abs().maxCoeff();
      for (std::size_t j = 0; j < nl; ++j) {
        const Index l = options_.levels[j];
        if (l >= h) continue;
        detail::pool_forward(d.data(), 1, h, w, pooled_[k * nl + j].data() + p * l * l, l, l);
      }
    });
    double stage = plane_sq_.head(planes).sum() / double(planes * hw);
    if (grad) stage_max_(Index(k)) = plane_max_.head(planes).maxCoeff();
    Scalar wgt(1);
    for (std::size_t j = 0; j < nl; ++j) {
      const Index l = options_.levels[j];
      if (l >= h) continue;
      wgt /= Scalar(2);
      stage += double(wgt) * double(pooled_[k * nl + j].square().sum()) / double(planes * l * l);
    }
    total += stage / double(total_weight(h));
  }
  const Scalar loss = options_.weight * Scalar(total);
  if (!detail::is_finite(loss)) diagnose(student, teacher);
  if (grad) {
    check_gradient_bound(student);
    add_gradient(student, teacher, *grad);
  }
  return loss;
}

MMKD_EXTERN_TEMPLATE(HierarchicalContextLoss)

}  // namespace mmkd
