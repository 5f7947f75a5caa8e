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
 * Decoupled knowledge distillation (DKD): the KD loss split into a target-class term (TCKD)
 * and a non-target-class term (NCKD), weighted separately.
 *
 *     p = softmax(s/T), q = softmax(t/T), g = label of the row
 *     TCKD_i = KL( [q_g, 1−q_g] ‖ [p_g, 1−p_g] )               (binary: target vs the rest)
 *     NCKD_i = KL( q̂ ‖ p̂ ),  p̂_k = p_k / (1−p_g) over k ≠ g     (distribution among non-targets)
 *     L = weight · T² · (1/N') Σ_i ( alpha · TCKD_i + beta · NCKD_i )
 *
 * Same values as mdistiller `dkd_loss` (commit a08d46f) on ordinary input, computed without its
 * `−1000·mask` trick and without `log(softmax)`: every quantity is formed in the log domain from
 * max-subtracted sums over the target and the non-target classes, so two classes (NCKD = 0) and
 * a certain teacher (logits ±1e4, or −inf on classes it rules out) give finite values and
 * gradients. If the teacher rules out every non-target class (all −inf), q̂ is undefined and
 * that row's NCKD is 0. `Reduction::BatchMean` (default) averages over the rows that take part,
 * `Reduction::Sum` sums; `Mean` is rejected (the two terms have different element counts).
 *
 * Gradient (a = s/T):  dL/da_g = c·alpha·(p_g − q_g),
 *                      dL/da_k = c·(alpha·(p_o − q_o)·p̂_k + beta·(p̂_k − q̂_k)),  k ≠ g,
 * with p_o = 1 − p_g, c = weight·T²/N', and dL/ds = dL/da / T. The teacher is a constant.
 *
 * \pre  student, teacher N x C with N ≥ 1, C ≥ 2; labels N entries in [0, C) for the rows that
 *       take part; a mask has N entries, each 0 or 1. Options: temperature > 0, alpha, beta,
 *       weight ≥ 0.
 * \post `value_and_grad` adds the gradient (`+=`); on any exception nothing has been written.
 *
 * Reference:
 * @code
 * @inproceedings{zhao2022dkd,
 *   title     = {Decoupled Knowledge Distillation},
 *   author    = {Zhao, Borui and Cui, Quan and Song, Renjie and Qiu, Yiyu and Liang, Jiajun},
 *   booktitle = {CVPR}, year = {2022}}
 * @endcode
 *
 * **Example**:
 * @code
 * mmkd::DecoupledKD<float> dkd;                   // alpha 1, beta 8, T 4
 * dkd.options().beta = 2.0f;                      // resnet56 -> resnet20 setting
 * float loss = dkd.value_and_grad(student, teacher, labels, d_student);
 * @endcode
 */
template <class Scalar = float>
class DecoupledKD : detail::FloatingScalar<Scalar> {
 public:
  //! The options; the defaults are those of the reference implementation.
  struct Options {
    Scalar alpha = Scalar(1);                    //!< weight of TCKD, ≥ 0
    Scalar beta = Scalar(8);                     //!< weight of NCKD, ≥ 0
    Scalar temperature = Scalar(4);              //!< T > 0
    Reduction reduction = Reduction::BatchMean;  //!< BatchMean or Sum
    Scalar weight = Scalar(1);                   //!< ≥ 0, scales value and gradient
  };

  DecoupledKD() : DecoupledKD(Options{}) {}
  //! Throws InvalidArgument for an invalid option.
  explicit DecoupledKD(const Options& options) : options_(options) { validate(); }

  //! The options; may be changed between calls (validated at every call).
  Options& options() { return options_; }
  //! The options.
  const Options& options() const { return options_; }

  //! The loss; `labels` (N, in [0, C)) pick each row's target class.
  Scalar value(const ConstMatrixRef<Scalar>& student, const ConstMatrixRef<Scalar>& teacher,
               const ConstLabelsRef& labels) {
    return run(student, teacher, labels, nullptr, nullptr);
  }
  //! With a row mask (1 = the row takes part).
  Scalar value(const ConstMatrixRef<Scalar>& student, const ConstMatrixRef<Scalar>& teacher,
               const ConstLabelsRef& labels, const ConstRowMaskRef& mask) {
    return run(student, teacher, labels, &mask, nullptr);
  }
  //! Returns the loss and adds dL/d(student) to `d_student`.
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& student,
                        const ConstMatrixRef<Scalar>& teacher, const ConstLabelsRef& labels,
                        MatrixRef<Scalar> d_student) {
    return run(student, teacher, labels, nullptr, &d_student);
  }
  //! With a row mask; adds dL/d(student) to `d_student`.
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& student,
                        const ConstMatrixRef<Scalar>& teacher, const ConstLabelsRef& labels,
                        const ConstRowMaskRef& mask, MatrixRef<Scalar> d_student) {
    return run(student, teacher, labels, &mask, &d_student);
  }

  //! weight·T²·(alpha·TCKD_i + beta·NCKD_i) of each row of the last call (0 for masked rows).
  const Vector<Scalar>& row_values() const { return ws_.row_value; }

  //! Frees the scratch memory kept between calls.
  void release_workspace() { ws_.release(); }

 private:
  static constexpr const char* kName = "DecoupledKD";

  void validate() const {
    detail::check_enum(kName, "reduction", options_.reduction, 3);
    detail::check_positive(kName, "temperature", options_.temperature);
    detail::check_nonnegative(kName, "alpha", options_.alpha);
    detail::check_nonnegative(kName, "beta", options_.beta);
    detail::check_nonnegative(kName, "weight", options_.weight);
    if (options_.reduction == Reduction::Mean) {
      detail::throw_invalid(kName,
                            "option reduction must be BatchMean or Sum, got Mean (TCKD has 2 terms "
                            "per row and NCKD C-1, so there is no single element count)");
    }
  }

  Scalar run(const ConstMatrixRef<Scalar>& s, const ConstMatrixRef<Scalar>& t,
             const ConstLabelsRef& labels, const ConstRowMaskRef* mask, MatrixRef<Scalar>* ds);

  [[noreturn]] void diagnose(const ConstMatrixRef<Scalar>& s, const ConstMatrixRef<Scalar>& t,
                             const ConstLabelsRef& labels, detail::RowSelect rows) const {
    constexpr Scalar ninf = -std::numeric_limits<Scalar>::infinity();
    const Index i = detail::first_nonfinite_row(ws_.row_value, rows);
    std::string why;
    if (i >= 0) {
      why = detail::kd_row_reason("student", s, "teacher", t, i);
      if (why.empty() && s(i, labels(i)) == ninf) {
        why = detail::element_str("student", i, labels(i), ninf) + " at the target class";
      }
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
Scalar DecoupledKD<Scalar>::run(const ConstMatrixRef<Scalar>& s, const ConstMatrixRef<Scalar>& t,
                                const ConstLabelsRef& labels, const ConstRowMaskRef* mask,
                                MatrixRef<Scalar>* ds) {
  validate();
  const Index n = s.rows(), c = s.cols();
  detail::check_nonempty(kName, "student", n, c);
  if (c < 2) {
    detail::throw_invalid(kName, "student has " + std::to_string(c) +
                                     " class, expected at least 2 (target and non-target)");
  }
  detail::check_shape(kName, "teacher", t, n, c, "same as student");
  if (ds) detail::check_shape(kName, "d_student", *ds, n, c, "same as student");
  detail::RowSelect rows{mask ? mask->data() : nullptr};
  const Index used = mask ? detail::count_rows(kName, *mask, n) : n;
  detail::check_labels(kName, labels, n, c, rows);

  const Scalar temp = options_.temperature, inv_t = Scalar(1) / temp;
  const Scalar alpha = options_.alpha, beta = options_.beta;
  const Scalar factor =
      options_.weight * temp * temp * detail::reduction_scale<Scalar>(options_.reduction, used, c);
  const Scalar g_scale = factor * inv_t;

  ws_.prepare(n, c, ds ? 1 : 0, 2);
  detail::parallel_for(n, c, [&](Index i, int thread) {
    if (!rows(i)) {
      ws_.row_value(i) = Scalar(0);
      return;
    }
    const Index g = labels(i);
    auto es = ds ? ws_.grad_row(0, i) : ws_.buffer(thread, 2, 0);
    auto et = ws_.buffer(thread, 2, 1);
    const auto srow = detail::const_row_map(s, i);
    const auto trow = detail::const_row_map(t, i);
    // NCKD is the KL over the non-target classes; es, et hold their unnormalised softmax.
    const auto r = detail::kl_row(srow, trow, inv_t, es, et, g);
    // The binary (target, rest) log-probabilities, relative to the row's max so that a large
    // common offset of the logits costs no precision.
    const Scalar cs = std::max(srow(g), r.s.x_max), ct = std::max(trow(g), r.t.x_max);
    const Scalar a_g = (srow(g) - cs) * inv_t, b_g = (trow(g) - ct) * inv_t;  // ≤ 0
    const Scalar lse_so = (r.s.x_max - cs) * inv_t + std::log(r.s.sum);
    const Scalar lse_to = (r.t.x_max - ct) * inv_t + std::log(r.t.sum);
    const Scalar lse_s = detail::log_add_exp(a_g, lse_so);
    const Scalar lse_t = detail::log_add_exp(b_g, lse_to);
    const Scalar log_pg = a_g - lse_s, log_po = lse_so - lse_s;
    const Scalar log_qg = b_g - lse_t, log_qo = lse_to - lse_t;
    const Scalar qg = std::exp(log_qg), qo = std::exp(log_qo);
    // Written so that a NaN anywhere in the row reaches the value (NaN > 0 is false).
    const Scalar tckd = (!(qg <= 0) ? qg * (log_qg - log_pg) : Scalar(0)) +
                        (!(qo <= 0) ? qo * (log_qo - log_po) : Scalar(0));
    const bool teacher_has_non_target = !(r.t.sum <= Scalar(0));
    const Scalar nckd = teacher_has_non_target ? r.value : Scalar(0);
    ws_.row_value(i) = alpha * tckd + beta * nckd;
    if (ds) {
      const Scalar beta_row = teacher_has_non_target ? beta : Scalar(0);
      const Scalar inv_zs = r.s.sum > 0 ? Scalar(1) / r.s.sum : Scalar(0);
      const Scalar inv_zt = teacher_has_non_target ? Scalar(1) / r.t.sum : Scalar(0);
      const Scalar pg = std::exp(log_pg), po = std::exp(log_po);
      es = es * (g_scale * (alpha * (po - qo) + beta_row) * inv_zs) -
           et * (g_scale * beta_row * inv_zt);
      es(g) = g_scale * alpha * (pg - qg);
    }
  });

  const Scalar raw = ws_.row_value.sum();
  if (!detail::is_finite(raw)) diagnose(s, t, labels, rows);
  const Scalar value =
      detail::scaled_value(kName, factor, raw, ds ? 2 * g_scale * (alpha + beta) : Scalar(0));
  ws_.row_value *= options_.weight * temp * temp;
  if (ds) ws_.commit(0, *ds, rows);
  return value;
}

MMKD_EXTERN_TEMPLATE(DecoupledKD)

}  // namespace mmkd
