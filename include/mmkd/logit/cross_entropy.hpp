#pragma once

#include <cmath>
#include <limits>
#include <string>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/parallel.hpp"
#include "mmkd/core/reduction.hpp"
#include "mmkd/core/softmax.hpp"
#include "mmkd/core/types.hpp"
#include "mmkd/detail/kl.hpp"
#include "mmkd/detail/row_loss.hpp"

namespace mmkd {

/**
 * Cross-entropy with hard labels or soft (probability) targets, optional per-class weights and
 * label smoothing: the supervised term that usually accompanies a distillation loss, equal to
 * PyTorch `cross_entropy(logits, target, weight=w, label_smoothing=ε)`.
 *
 * Hard labels g_i, with y_i = (1−ε)·onehot(g_i) + ε/C and class weights w (all 1 by default):
 *
 *     ℓ_i = (1−ε)·w_g·(−log p_i,g) + (ε/C)·Σ_k w_k·(−log p_i,k),   p_i = softmax(z_i)
 *     L   = weight · Σ_i ℓ_i / Σ_i w_{g_i}       (Mean = BatchMean; N' without class weights)
 *
 * Soft targets y_i (N x C, entries ≥ 0, smoothed as (1−ε)·y + ε/C):
 *
 *     ℓ_i = −Σ_k w_k·y_i,k·log p_i,k,            L = weight · Σ_i ℓ_i / N'
 *
 * (PyTorch divides probability-target losses by the batch size, not by the weights). The sums run
 * over the N' rows that take part (a row mask plays the part of PyTorch's `ignore_index`);
 * `Reduction::Sum` drops the division. Every term is computed as y_k·(max z − z_k) +
 * y_k·log Σ exp(z − max z), a sum of non-negative parts, so logits of any magnitude (1e4 and
 * beyond) lose nothing to cancellation. Gradient: dℓ_i/dz_i = (Σ_k ỹ_k)·p_i − ỹ_i with ỹ the
 * weighted target. A logit of −inf is a class the model rules out; it is allowed unless its
 * (weighted) target is positive (then the loss is infinite and `NumericalError` is thrown).
 *
 * After each call, `row_values()` holds weight·ℓ_i for every row (0 for masked rows): PyTorch's
 * `reduction="none"`, for logging per token or sample without recomputation.
 *
 * \pre  logits N x C with N, C ≥ 1; labels N entries in [0, C) for the rows that take part, or
 *       targets N x C, finite and ≥ 0; a mask has N entries, each 0 or 1;
 *       0 ≤ label_smoothing ≤ 1; class_weights empty or C finite entries ≥ 0; weight ≥ 0.
 * \post `value_and_grad` adds the gradient (`+=`); on any exception nothing has been written.
 *       A Mean whose denominator is 0 (no row, or class weights 0 at every label) is 0.
 *
 * bfloat16 storage: with class labels, the logits may be `mmkd::bfloat16`, read row by row into
 * Scalar (no copy), with a Scalar or bfloat16 gradient buffer (sums rounded to nearest even).
 *
 * **Example**:
 * @code
 * mmkd::CrossEntropy<float> ce({0.1f});          // label smoothing 0.1
 * float loss = ce.value_and_grad(logits, labels, d_logits);
 * ce.options().class_weights = class_weights;    // C weights, as PyTorch's `weight`
 * loss = ce.value_and_grad(logits, soft_targets, d_logits);  // N x C probabilities
 * @endcode
 */
template <class Scalar = float>
class CrossEntropy : detail::FloatingScalar<Scalar> {
 public:
  //! The options; the defaults are those of the reference implementation.
  struct Options {
    Scalar label_smoothing = Scalar(0);               //!< ε in [0, 1]
    Reduction reduction = Reduction::Mean;            //!< Mean (= BatchMean) or Sum
    Scalar weight = Scalar(1);                        //!< ≥ 0, scales value and gradient
    Vector<Scalar> class_weights = Vector<Scalar>();  //!< empty (all 1) or C weights ≥ 0
  };

  CrossEntropy() : CrossEntropy(Options{}) {}
  //! Throws InvalidArgument for an invalid option.
  explicit CrossEntropy(const Options& options) : options_(options) { validate(-1); }

  //! The options; may be changed between calls (validated at every call).
  Options& options() { return options_; }
  //! The options.
  const Options& options() const { return options_; }

  //! The loss for class labels (N, in [0, C)).
  Scalar value(const ConstMatrixRef<Scalar>& logits, const ConstLabelsRef& labels) {
    return run(logits, &labels, nullptr, nullptr, nullptr);
  }
  //! With a row mask (1 = the row takes part).
  Scalar value(const ConstMatrixRef<Scalar>& logits, const ConstLabelsRef& labels,
               const ConstRowMaskRef& mask) {
    return run(logits, &labels, nullptr, &mask, nullptr);
  }
  //! Returns the loss and adds dL/d(logits) to `d_logits`.
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& logits, const ConstLabelsRef& labels,
                        MatrixRef<Scalar> d_logits) {
    return run(logits, &labels, nullptr, nullptr, &d_logits);
  }
  //! With a row mask; masked rows get no gradient.
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& logits, const ConstLabelsRef& labels,
                        const ConstRowMaskRef& mask, MatrixRef<Scalar> d_logits) {
    return run(logits, &labels, nullptr, &mask, &d_logits);
  }

  //! bfloat16 logits with class labels, computed in Scalar without a copy of the logits.
  Scalar value(const ConstMatrixRef<bfloat16>& logits, const ConstLabelsRef& labels) {
    return run(logits, &labels, nullptr, nullptr, kNoGrad);
  }
  //! bfloat16 logits with class labels and a row mask.
  Scalar value(const ConstMatrixRef<bfloat16>& logits, const ConstLabelsRef& labels,
               const ConstRowMaskRef& mask) {
    return run(logits, &labels, nullptr, &mask, kNoGrad);
  }
  //! bfloat16 logits; adds dL/d(logits) to a Scalar `d_logits`.
  Scalar value_and_grad(const ConstMatrixRef<bfloat16>& logits, const ConstLabelsRef& labels,
                        MatrixRef<Scalar> d_logits) {
    return run(logits, &labels, nullptr, nullptr, &d_logits);
  }
  //! bfloat16 logits and gradient: d_logits = bf16(d_logits + dL/d(logits)), to nearest even.
  Scalar value_and_grad(const ConstMatrixRef<bfloat16>& logits, const ConstLabelsRef& labels,
                        MatrixRef<bfloat16> d_logits) {
    return run(logits, &labels, nullptr, nullptr, &d_logits);
  }
  //! bfloat16 logits with a row mask; adds to a Scalar `d_logits`.
  Scalar value_and_grad(const ConstMatrixRef<bfloat16>& logits, const ConstLabelsRef& labels,
                        const ConstRowMaskRef& mask, MatrixRef<Scalar> d_logits) {
    return run(logits, &labels, nullptr, &mask, &d_logits);
  }
  //! bfloat16 logits and gradient with a row mask.
  Scalar value_and_grad(const ConstMatrixRef<bfloat16>& logits, const ConstLabelsRef& labels,
                        const ConstRowMaskRef& mask, MatrixRef<bfloat16> d_logits) {
    return run(logits, &labels, nullptr, &mask, &d_logits);
  }

  //! Soft targets: `targets` is N x C (probabilities, or any entries ≥ 0).
  Scalar value(const ConstMatrixRef<Scalar>& logits, const ConstMatrixRef<Scalar>& targets) {
    return run(logits, nullptr, &targets, nullptr, nullptr);
  }
  //! Soft targets with a row mask.
  Scalar value(const ConstMatrixRef<Scalar>& logits, const ConstMatrixRef<Scalar>& targets,
               const ConstRowMaskRef& mask) {
    return run(logits, nullptr, &targets, &mask, nullptr);
  }
  //! Soft targets; adds dL/d(logits) to `d_logits`.
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& logits, const ConstMatrixRef<Scalar>& targets,
                        MatrixRef<Scalar> d_logits) {
    return run(logits, nullptr, &targets, nullptr, &d_logits);
  }
  //! Soft targets with a row mask; adds dL/d(logits) to `d_logits`.
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& logits, const ConstMatrixRef<Scalar>& targets,
                        const ConstRowMaskRef& mask, MatrixRef<Scalar> d_logits) {
    return run(logits, nullptr, &targets, &mask, &d_logits);
  }

  //! weight·ℓ_i of each row of the last call (0 for masked rows): `reduction="none"`.
  const Vector<Scalar>& row_values() const { return ws_.row_value; }

  //! Frees the scratch memory kept between calls.
  void release_workspace() { ws_.release(); }

 private:
  static constexpr const char* kName = "CrossEntropy";

  void validate(Index c) const {
    detail::check_enum(kName, "reduction", options_.reduction, 3);
    const Scalar eps = options_.label_smoothing;
    if (!(eps >= 0 && eps <= 1)) {
      detail::throw_invalid(kName,
                            "option label_smoothing must be in [0, 1], got " + std::to_string(eps));
    }
    detail::check_nonnegative(kName, "weight", options_.weight);
    const auto& w = options_.class_weights;
    if (c >= 0 && w.size() != 0 && w.size() != c) {
      detail::throw_invalid(kName, "option class_weights has " + std::to_string(w.size()) +
                                       " entries, expected 0 or " + std::to_string(c) +
                                       " (one per class)");
    }
    for (Index k = 0; k < w.size(); ++k) {
      if (!(w(k) >= 0) || !detail::is_finite(w(k))) {
        detail::throw_invalid(kName, "option class_weights[" + std::to_string(k) + "] is " +
                                         std::to_string(w(k)) + ", expected finite and >= 0");
      }
    }
  }

  // Finite, non-negative soft targets in the rows that take part.
  template <class Rows>
  static void check_targets(const ConstMatrixRef<Scalar>& y, Rows&& rows) {
    for (Index i = 0; i < y.rows(); ++i) {
      if (!rows(i) || ((y.row(i).array() >= Scalar(0)).all() && detail::all_finite(y.row(i))))
        continue;
      for (Index k = 0; k < y.cols(); ++k) {
        if (!(y(i, k) >= Scalar(0)) || !detail::is_finite(y(i, k))) {
          const std::string where = "targets[" + std::to_string(i) + "," + std::to_string(k) + "]";
          detail::throw_invalid(
              kName, (detail::is_finite(y(i, k)) ? where + " is " + std::to_string(y(i, k))
                                                 : detail::element_str("targets", i, k, y(i, k))) +
                         ", expected finite and >= 0");
        }
      }
    }
  }

  static constexpr MatrixRef<Scalar>* kNoGrad = nullptr;

  // One body (run_rows) for each storage type of the logits and of the gradient.
  Scalar run(const ConstMatrixRef<Scalar>& z, const ConstLabelsRef* labels,
             const ConstMatrixRef<Scalar>* targets, const ConstRowMaskRef* mask,
             MatrixRef<Scalar>* dz);
  Scalar run(const ConstMatrixRef<bfloat16>& z, const ConstLabelsRef* labels,
             const ConstMatrixRef<Scalar>* targets, const ConstRowMaskRef* mask,
             MatrixRef<Scalar>* dz);
  Scalar run(const ConstMatrixRef<bfloat16>& z, const ConstLabelsRef* labels,
             const ConstMatrixRef<Scalar>* targets, const ConstRowMaskRef* mask,
             MatrixRef<bfloat16>* dz);
  template <class In, class G>
  Scalar run_rows(const ConstMatrixRef<In>& z, const ConstLabelsRef* labels,
                  const ConstMatrixRef<Scalar>* targets, const ConstRowMaskRef* mask,
                  MatrixRef<G>* dz);

  template <class Rows>
  static Scalar max_target_sum(const ConstMatrixRef<Scalar>& y, Rows&& rows) {
    Scalar m = 0;
    for (Index i = 0; i < y.rows(); ++i)
      if (rows(i)) m = std::max(m, y.row(i).sum());
    return m;
  }

  template <class In>
  [[noreturn]] void diagnose(const ConstMatrixRef<In>& z, const ConstLabelsRef* labels,
                             const ConstMatrixRef<Scalar>* targets, detail::RowSelect rows) const {
    constexpr double ninf = -std::numeric_limits<double>::infinity();  // any storage type
    const Index i = detail::first_nonfinite_row(ws_.row_value, rows);
    std::string why;
    if (i >= 0) {
      why = detail::bad_element_in_row("logits", z, i, true);
      if (why.empty()) why = detail::all_neg_inf_row("logits", z, i);
      if (why.empty() && labels && double(z(i, (*labels)(i))) == ninf) {
        why = detail::element_str("logits", i, (*labels)(i), ninf) +
              " at the label: the loss is infinite";
      }
      for (Index k = 0; why.empty() && targets && k < z.cols(); ++k) {
        if (double(z(i, k)) == ninf && (*targets)(i, k) > 0) {
          why = detail::element_str("logits", i, k, ninf) +
                " where the target is positive: the loss is infinite";
        }
      }
      if (why.empty()) {
        why = detail::bad_element_in_row("logits", z, i, false);
        if (!why.empty()) why += " and label smoothing gives every class positive probability";
      }
      if (why.empty()) why = "row " + std::to_string(i) + " overflows";
    } else {
      why = "the sum over rows overflows";
    }
    detail::throw_numerical(kName, why);
  }

  Options options_;
  detail::RowWorkspace<Scalar> ws_;
};

template <class Scalar>
Scalar CrossEntropy<Scalar>::run(const ConstMatrixRef<Scalar>& z, const ConstLabelsRef* labels,
                                 const ConstMatrixRef<Scalar>* targets, const ConstRowMaskRef* mask,
                                 MatrixRef<Scalar>* dz) {
  return run_rows(z, labels, targets, mask, dz);
}
template <class Scalar>
Scalar CrossEntropy<Scalar>::run(const ConstMatrixRef<bfloat16>& z, const ConstLabelsRef* labels,
                                 const ConstMatrixRef<Scalar>* targets, const ConstRowMaskRef* mask,
                                 MatrixRef<Scalar>* dz) {
  return run_rows(z, labels, targets, mask, dz);
}
template <class Scalar>
Scalar CrossEntropy<Scalar>::run(const ConstMatrixRef<bfloat16>& z, const ConstLabelsRef* labels,
                                 const ConstMatrixRef<Scalar>* targets, const ConstRowMaskRef* mask,
                                 MatrixRef<bfloat16>* dz) {
  return run_rows(z, labels, targets, mask, dz);
}

template <class Scalar>
template <class In, class G>
Scalar CrossEntropy<Scalar>::run_rows(const ConstMatrixRef<In>& z, const ConstLabelsRef* labels,
                                      const ConstMatrixRef<Scalar>* targets,
                                      const ConstRowMaskRef* mask, MatrixRef<G>* dz) {
  const Index n = z.rows(), c = z.cols();
  validate(c);
  detail::check_nonempty(kName, "logits", n, c);
  if (targets) detail::check_shape(kName, "targets", *targets, n, c, "same as logits");
  if (dz) detail::check_shape(kName, "d_logits", *dz, n, c, "same as logits");
  detail::RowSelect rows{mask ? mask->data() : nullptr};
  const Index used = mask ? detail::count_rows(kName, *mask, n) : n;
  if (labels) detail::check_labels(kName, *labels, n, c, rows);
  if (targets) check_targets(*targets, rows);

  const Scalar eps = options_.label_smoothing;
  const Scalar on = Scalar(1) - eps, off = eps / Scalar(c);
  const bool weighted = options_.class_weights.size() != 0;
  const detail::ConstRowMap<Scalar> w(weighted ? options_.class_weights.data() : nullptr,
                                      weighted ? c : 0);
  const auto ones = detail::RowArray<Scalar>::Ones(c);
  const Scalar w_sum = weighted ? w.sum() : Scalar(c);
  // Mean over rows, or over the class weights at the labels (PyTorch's hard-label weighting).
  Scalar denom = Scalar(used);
  if (weighted && labels) {
    denom = 0;
    for (Index i = 0; i < n; ++i)
      if (rows(i)) denom += w((*labels)(i));
  }
  const Scalar factor = options_.weight * (options_.reduction == Reduction::Sum
                                               ? Scalar(used > 0)
                                               : (denom > 0 ? Scalar(1) / denom : Scalar(0)));

  ws_.prepare(n, c, dz ? 1 : 0, 1, detail::staged_rows<Scalar, In>(1));
  detail::parallel_for(n, c, [&](Index i, int thread) {
    if (!rows(i)) {
      ws_.row_value(i) = Scalar(0);
      return;
    }
    const auto zrow = detail::input_row(z, i, ws_, thread, 0);
    auto e = dz ? ws_.grad_row(0, i) : ws_.buffer(thread, 1, 0);
    detail::ShiftedExp<Scalar> st;
    Scalar loss, y_sum;
    if (labels) {
      // ℓ = (1−ε)·w_g·(max z − z_g) + (ε/C)·Σ_k w_k (max z − z_k) + ỹ_sum·log Σ exp(z − max z)
      const Index g = (*labels)(i);
      const Scalar wg = weighted ? w(g) : Scalar(1);
      y_sum = on * wg + off * w_sum;
      if (eps > 0) {
        loss = weighted ? detail::soft_ce_row(zrow, Scalar(1), w, off, y_sum, st, e)
                        : detail::soft_ce_row(zrow, Scalar(1), ones, off, y_sum, st, e);
      } else {
        st = detail::shifted_exp(zrow, Scalar(1), e);
        loss = y_sum * std::log(st.sum);
      }
      if (on * wg > 0) loss += on * wg * (st.x_max - zrow(g));
      if (dz) {
        e *= factor * y_sum / st.sum;
        if (eps > 0 && weighted) e -= (factor * off) * w;
        if (eps > 0 && !weighted) e -= factor * off;
        e(g) -= factor * on * wg;
      }
    } else {
      // ℓ = Σ_k ỹ_k (max z − z_k) + ỹ_sum·log Σ exp(z − max z), ỹ = w ⊙ ((1−ε) y + ε/C)
      const auto yrow = detail::const_row_map(*targets, i);
      if (weighted) {
        y_sum = on * (w * yrow).sum() + off * w_sum;
        loss = detail::soft_ce_row(zrow, Scalar(1), w * (on * yrow + off), Scalar(1), y_sum, st, e);
      } else {
        y_sum = on * yrow.sum() + off * Scalar(c);
        loss = detail::soft_ce_row(zrow, Scalar(1), on * yrow + off, Scalar(1), y_sum, st, e);
      }
      if (dz) {
        e *= factor * y_sum / st.sum;
        if (weighted) {
          e -= factor * (w * (on * yrow + off));
        } else {
          e -= factor * (on * yrow + off);
        }
      }
    }
    ws_.row_value(i) = loss;
  });

  const Scalar raw = ws_.row_value.sum();
  if (!detail::is_finite(raw)) diagnose(z, labels, targets, rows);
  // Gradient elements are factor · (ỹ_sum·p_k − ỹ_k), at most factor · max ỹ_sum.
  const Scalar y_max = (weighted ? options_.class_weights.maxCoeff() : Scalar(1)) *
                       (targets ? std::max(Scalar(1), max_target_sum(*targets, rows)) : Scalar(1));
  const Scalar value =
      detail::scaled_value(kName, factor, raw, dz ? 2 * factor * y_max : Scalar(0));
  ws_.row_value *= options_.weight;
  if (dz) ws_.commit(0, *dz, rows);
  return value;
}

MMKD_EXTERN_TEMPLATE(CrossEntropy)

}  // namespace mmkd
