#pragma once

#include <cmath>
#include <limits>
#include <string>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/parallel.hpp"
#include "mmkd/core/reduction.hpp"
#include "mmkd/core/softmax.hpp"
#include "mmkd/core/types.hpp"
#include "mmkd/detail/row_loss.hpp"

namespace mmkd {

/**
 * Cross-entropy with hard labels and optional label smoothing: the supervised term that
 * usually accompanies a distillation loss.
 *
 *     y_i = (1−ε)·onehot(g_i) + ε/C,    L = weight · (1/N') Σ_i ( −Σ_k y_ik log softmax(z_i)_k )
 *
 * equal to PyTorch `cross_entropy(logits, labels, label_smoothing=ε)` with the default mean
 * reduction. For this loss the per-row term is the element, so `Reduction::Mean` and
 * `Reduction::BatchMean` coincide (mean over the N' rows that take part; a row mask plays the
 * part of PyTorch's `ignore_index`); `Reduction::Sum` sums. Gradient: dL/dz_i = c (p_i − y_i)
 * with c = weight/N'. A logit of −inf is a class the model rules out; it is allowed unless it is
 * the label or ε > 0 (then the loss is infinite and `NumericalError` is thrown).
 *
 * \pre  logits N x C with N, C ≥ 1; labels N entries in [0, C) for the rows that take part;
 *       a mask has N entries, each 0 or 1; 0 ≤ label_smoothing ≤ 1; weight ≥ 0.
 * \post `value_and_grad` adds the gradient (`+=`); on any exception nothing has been written.
 *
 * **Example**:
 * @code
 * mmkd::CrossEntropy<float> ce({0.1f});          // label smoothing 0.1
 * float loss = ce.value_and_grad(logits, labels, d_logits);
 * @endcode
 */
template <class Scalar = float>
class CrossEntropy : detail::FloatingScalar<Scalar> {
 public:
  struct Options {
    Scalar label_smoothing = Scalar(0);     //!< ε in [0, 1]
    Reduction reduction = Reduction::Mean;  //!< Mean (= BatchMean) or Sum
    Scalar weight = Scalar(1);              //!< ≥ 0, scales value and gradient
  };

  CrossEntropy() : CrossEntropy(Options{}) {}
  explicit CrossEntropy(const Options& options) : options_(options) { validate(); }

  Options& options() { return options_; }
  const Options& options() const { return options_; }

  Scalar value(const ConstMatrixRef<Scalar>& logits, const ConstLabelsRef& labels) {
    return run(logits, labels, nullptr, nullptr);
  }
  Scalar value(const ConstMatrixRef<Scalar>& logits, const ConstLabelsRef& labels,
               const ConstRowMaskRef& mask) {
    return run(logits, labels, &mask, nullptr);
  }
  //! Returns the loss and adds dL/d(logits) to `d_logits`.
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& logits, const ConstLabelsRef& labels,
                        MatrixRef<Scalar> d_logits) {
    return run(logits, labels, nullptr, &d_logits);
  }
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& logits, const ConstLabelsRef& labels,
                        const ConstRowMaskRef& mask, MatrixRef<Scalar> d_logits) {
    return run(logits, labels, &mask, &d_logits);
  }

  //! Frees the scratch memory kept between calls.
  void release_workspace() { ws_.release(); }

 private:
  static constexpr const char* kName = "CrossEntropy";

  void validate() const {
    detail::check_enum(kName, "reduction", options_.reduction, 3);
    const Scalar eps = options_.label_smoothing;
    if (!(eps >= 0 && eps <= 1)) {
      detail::throw_invalid(kName,
                            "option label_smoothing must be in [0, 1], got " + std::to_string(eps));
    }
    detail::check_nonnegative(kName, "weight", options_.weight);
  }

  Scalar run(const ConstMatrixRef<Scalar>& z, const ConstLabelsRef& labels,
             const ConstRowMaskRef* mask, MatrixRef<Scalar>* dz) {
    validate();
    const Index n = z.rows(), c = z.cols();
    detail::check_nonempty(kName, "logits", n, c);
    if (dz) detail::check_shape(kName, "d_logits", *dz, n, c, "same as logits");
    detail::RowSelect rows{mask ? mask->data() : nullptr};
    const Index used = mask ? detail::count_rows(kName, *mask, n) : n;
    detail::check_labels(kName, labels, n, c, rows);

    const Scalar eps = options_.label_smoothing;
    const Scalar on = Scalar(1) - eps, off = eps / Scalar(c);
    const Reduction red =
        options_.reduction == Reduction::Sum ? Reduction::Sum : Reduction::BatchMean;
    const Scalar factor = options_.weight * detail::reduction_scale<Scalar>(red, used, c);

    ws_.prepare(n, c, dz ? 1 : 0, 1);
    detail::parallel_for(n, c, [&](Index i, int thread) {
      if (!rows(i)) {
        ws_.row_value(i) = Scalar(0);
        return;
      }
      const Index g = labels(i);
      const auto zrow = detail::const_row_map(z, i);
      auto e = dz ? ws_.grad_row(0, i) : ws_.buffer(thread, 1, 0);
      const auto st = detail::shifted_exp(zrow, Scalar(1), e);
      // −Σ y_k log p_k = lse − (1−ε) z_g − (ε/C) Σ_k z_k
      Scalar loss = st.lse() - on * zrow(g);
      if (eps > 0) loss -= off * zrow.sum();
      ws_.row_value(i) = loss;
      if (dz) {
        e = e * (factor / st.sum) - factor * off;
        e(g) -= factor * on;
      }
    });

    const Scalar raw = ws_.row_value.sum();
    if (!std::isfinite(raw)) diagnose(z, labels, rows);
    const Scalar value = detail::scaled_value(kName, factor, raw, dz ? 2 * factor : Scalar(0));
    if (dz) ws_.commit(0, *dz, rows);
    return value;
  }

  [[noreturn]] void diagnose(const ConstMatrixRef<Scalar>& z, const ConstLabelsRef& labels,
                             detail::RowSelect rows) const {
    constexpr Scalar ninf = -std::numeric_limits<Scalar>::infinity();
    const Index i = detail::first_nonfinite_row(ws_.row_value, rows);
    std::string why;
    if (i >= 0) {
      why = detail::bad_element_in_row("logits", z, i, true);
      if (why.empty()) why = detail::all_neg_inf_row("logits", z, i);
      if (why.empty() && z(i, labels(i)) == ninf) {
        why = detail::element_str("logits", i, labels(i), ninf) +
              " at the label: the loss is infinite";
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

}  // namespace mmkd
