#pragma once

#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/module.hpp"
#include "mmkd/detail/scalar.hpp"
#include "mmkd/optim/optimizer.hpp"

namespace mmkd {

/**
 * Adam (Kingma & Ba 2015) and, with `decoupled_weight_decay`, AdamW (Loshchilov & Hutter 2019),
 * PyTorch's `torch.optim.Adam` / `AdamW` rules. At step t (from 1), with c₁ = 1 − β₁ᵗ,
 * c₂ = 1 − β₂ᵗ:
 *
 *     g = ∇ + weight_decay · θ          (Adam: L2 in the gradient)
 *     θ = θ · (1 − lr · weight_decay)   (AdamW: decoupled, instead)
 *     m = β₁ m + (1 − β₁) g,   v = β₂ v + (1 − β₂) g²,   v̂ = max(v̂, v) (amsgrad)
 *     θ = θ − (lr / c₁) · m / (√v / √c₂ + eps)     (√v̂ with amsgrad)
 *
 * The options are doubles, as PyTorch's; the coefficients (1 − β, the bias corrections, lr / c₁)
 * are computed in double and rounded once to Scalar, as PyTorch's kernels receive them. Use it
 * like `Sgd`:
 *
 * ```cpp
 * mmkd::Adam<float> adam(learner.parameters(), learner.gradients(), {1e-3});
 * adam.zero_grad();  ...;  adam.step();
 * mmkd::AdamW<float> adamw(params, grads);  // weight_decay 0.01, decoupled
 * ```
 *
 * State (PyTorch's names): `exp_avg()`, `exp_avg_sq()`, `max_exp_avg_sq()` (amsgrad), one per
 * parameter, allocated at construction; `steps()`. `step()` checks the gradients first: a NaN or
 * infinite entry throws NumericalError naming it, and nothing changes.
 */
template <class Scalar = float>
class Adam : detail::FloatingScalar<Scalar> {
 public:
  //! PyTorch's options and defaults.
  struct Options {
    double lr = 1e-3;                     //!< > 0
    double beta1 = 0.9;                   //!< in [0, 1)
    double beta2 = 0.999;                 //!< in [0, 1)
    double eps = 1e-8;                    //!< > 0
    double weight_decay = 0;              //!< ≥ 0
    bool decoupled_weight_decay = false;  //!< AdamW's decay of θ instead of L2 in g
    bool amsgrad = false;                 //!< use the running maximum of v (AMSGrad)
  };

  //! An optimiser of `params`, paired by position with `grads` (same shapes).
  Adam(std::vector<ParameterView<Scalar>> params, std::vector<ParameterView<Scalar>> grads,
       const Options& options = Options())
      : params_(std::move(params)),
        grads_(std::move(grads)),
        options_(options),
        amsgrad_(options.amsgrad) {
    detail::check_parameter_pairs(kName, params_, grads_);
    check_options();
    for (const auto& p : params_) {
      const Index r = p.value.rows(), c = p.value.cols();
      m_.push_back(Matrix<Scalar>::Zero(r, c));
      v_.push_back(Matrix<Scalar>::Zero(r, c));
      if (options_.amsgrad) vmax_.push_back(Matrix<Scalar>::Zero(r, c));
    }
  }

  //! The options.
  const Options& options() const { return options_; }
  /// May change between steps (a schedule); `amsgrad` is fixed at construction.
  Options& options() { return options_; }

  /// One update from the current gradients.
  void step();

  //! Sets the parameter gradients to zero.
  void zero_grad() { detail::zero_gradients(grads_); }

  //! The steps taken so far.
  std::int64_t steps() const { return steps_; }
  //! The first moments m, one per parameter.
  const std::vector<Matrix<Scalar>>& exp_avg() const { return m_; }
  //! The first moments, writable (to restore a checkpoint).
  std::vector<Matrix<Scalar>>& exp_avg() { return m_; }
  //! The second moments v, one per parameter.
  const std::vector<Matrix<Scalar>>& exp_avg_sq() const { return v_; }
  //! The second moments, writable (to restore a checkpoint).
  std::vector<Matrix<Scalar>>& exp_avg_sq() { return v_; }
  /// Empty unless amsgrad.
  const std::vector<Matrix<Scalar>>& max_exp_avg_sq() const { return vmax_; }
  //! The running maxima, writable (to restore a checkpoint).
  std::vector<Matrix<Scalar>>& max_exp_avg_sq() { return vmax_; }

 private:
  static constexpr const char* kName = "Adam";

  void check_options() const {
    detail::check_positive(kName, "lr", options_.lr);
    detail::check_nonnegative(kName, "weight_decay", options_.weight_decay);
    detail::check_positive(kName, "eps", options_.eps);
    for (const auto& [name, beta] : {std::pair<const char*, double>{"beta1", options_.beta1},
                                     std::pair<const char*, double>{"beta2", options_.beta2}}) {
      if (!(beta >= 0 && beta < 1))
        detail::throw_invalid(kName, std::string("option ") + name + " must be in [0, 1), got " +
                                         std::to_string(beta));
    }
  }

  std::vector<ParameterView<Scalar>> params_, grads_;
  Options options_;
  bool amsgrad_;
  std::vector<Matrix<Scalar>> m_, v_, vmax_;
  std::int64_t steps_ = 0;
};

template <class Scalar>
void Adam<Scalar>::step() {
  check_options();
  if (options_.amsgrad != amsgrad_)
    detail::throw_invalid(kName, "option amsgrad cannot change after construction");
  detail::check_finite_gradients(kName, grads_);
  // Coefficients from the double options, each rounded once to Scalar, as PyTorch's kernels do.
  const Options& o = options_;
  const double t = double(steps_ + 1);
  const double c1 = 1 - std::pow(o.beta1, t), c2 = 1 - std::pow(o.beta2, t);
  const Scalar b1 = Scalar(o.beta1), keep1 = Scalar(1 - o.beta1);
  const Scalar b2 = Scalar(o.beta2), keep2 = Scalar(1 - o.beta2);
  const bool decoupled = o.decoupled_weight_decay && o.weight_decay != 0;
  const Scalar l2 = Scalar(o.decoupled_weight_decay ? 0.0 : o.weight_decay);
  const Scalar decay = Scalar(1 - o.lr * o.weight_decay), eps = Scalar(o.eps);
  const Scalar step_size = Scalar(o.lr / c1), root_c2 = Scalar(std::sqrt(c2));
  for (std::size_t k = 0; k < params_.size(); ++k) {
    auto p = params_[k].value.array();
    const auto g = grads_[k].value.array() + l2 * p;
    auto m = m_[k].array();
    auto v = v_[k].array();
    m = m * b1 + keep1 * g;
    v = v * b2 + (keep2 * g) * g;
    if (decoupled) p *= decay;
    if (o.amsgrad) {
      auto vmax = vmax_[k].array();
      vmax = vmax.max(v);
      p -= step_size * (m / (vmax.sqrt() / root_c2 + eps));
    } else {
      p -= step_size * (m / (v.sqrt() / root_c2 + eps));
    }
  }
  ++steps_;
}

/// Adam with decoupled weight decay, PyTorch's `torch.optim.AdamW` (its default decay 0.01).
template <class Scalar = float>
class AdamW : public Adam<Scalar> {
 public:
  using Options = typename Adam<Scalar>::Options;  //!< Adam's options.
  //! PyTorch's AdamW defaults: lr 1e-3, weight decay 0.01, decoupled.
  static Options defaults() {
    Options o;
    o.weight_decay = 0.01;
    o.decoupled_weight_decay = true;
    return o;
  }
  //! An optimiser of `params`, paired by position with `grads` (same shapes).
  AdamW(std::vector<ParameterView<Scalar>> params, std::vector<ParameterView<Scalar>> grads,
        const Options& options = defaults())
      : Adam<Scalar>(std::move(params), std::move(grads), options) {}
};

MMKD_EXTERN_TEMPLATE(Adam)
MMKD_EXTERN_TEMPLATE(AdamW)

}  // namespace mmkd
