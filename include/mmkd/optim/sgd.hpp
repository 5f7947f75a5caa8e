#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/module.hpp"
#include "mmkd/detail/scalar.hpp"
#include "mmkd/optim/optimizer.hpp"

namespace mmkd {

/**
 * Stochastic gradient descent with momentum and weight decay, PyTorch's `torch.optim.SGD` rule:
 *
 *     g = ∇ + weight_decay · θ
 *     b = g (first step),  b = momentum · b + (1 − dampening) · g (later steps)
 *     g = g + momentum · b (nesterov)  or  g = b   (when momentum ≠ 0)
 *     θ = θ − lr · g
 *
 * Over a module's `parameters()` and `gradients()` (paired by position) or any ParameterViews:
 *
 * ```cpp
 * mmkd::Sgd<float> sgd(fusion.parameters(), fusion.gradients(), {0.1, 0.9});  // lr, momentum
 * sgd.zero_grad();  ...forward, loss, backward...;  sgd.step();
 * ```
 *
 * The views must stay valid (a module's views do while it lives and is not resized). State:
 * `momentum_buffer()` (PyTorch's name), allocated at construction and taken as g on the first
 * step with momentum; `steps()`. `step()` checks
 * the gradients first: a NaN or infinite entry throws NumericalError naming it, and nothing
 * changes. `options()` may change between steps (a learning-rate schedule); each step
 * validates them. The options are doubles, as PyTorch's.
 */
template <class Scalar = float>
class Sgd : detail::FloatingScalar<Scalar> {
 public:
  //! PyTorch's options and defaults.
  struct Options {
    double lr = 1e-3;         //!< > 0
    double momentum = 0;      //!< ≥ 0
    double dampening = 0;     //!< ≥ 0
    double weight_decay = 0;  //!< ≥ 0, added to the gradient (L2)
    bool nesterov = false;    //!< needs momentum > 0 and dampening 0
  };

  //! An optimiser of `params`, paired by position with `grads` (same shapes).
  Sgd(std::vector<ParameterView<Scalar>> params, std::vector<ParameterView<Scalar>> grads,
      const Options& options = Options())
      : params_(std::move(params)), grads_(std::move(grads)), options_(options) {
    detail::check_parameter_pairs(kName, params_, grads_);
    check_options();
    for (const auto& p : params_)
      buffer_.push_back(Matrix<Scalar>::Zero(p.value.rows(), p.value.cols()));
  }

  //! The options.
  const Options& options() const { return options_; }
  //! The options; may be changed between calls (validated at every call).
  Options& options() { return options_; }

  /// One update from the current gradients.
  void step();

  //! Sets the parameter gradients to zero.
  void zero_grad() { detail::zero_gradients(grads_); }

  //! The steps taken so far.
  std::int64_t steps() const { return steps_; }
  /// One buffer per parameter (zero until the first step with momentum).
  const std::vector<Matrix<Scalar>>& momentum_buffer() const { return buffer_; }
  //! The momentum buffers, writable (to restore a checkpoint).
  std::vector<Matrix<Scalar>>& momentum_buffer() { return buffer_; }

 private:
  static constexpr const char* kName = "Sgd";

  void check_options() const {
    detail::check_positive(kName, "lr", options_.lr);
    detail::check_nonnegative(kName, "momentum", options_.momentum);
    detail::check_nonnegative(kName, "dampening", options_.dampening);
    detail::check_nonnegative(kName, "weight_decay", options_.weight_decay);
    if (options_.nesterov && (options_.momentum == 0 || options_.dampening != 0))
      detail::throw_invalid(kName, "option nesterov needs momentum > 0 and dampening 0");
  }

  std::vector<ParameterView<Scalar>> params_, grads_;
  Options options_;
  std::vector<Matrix<Scalar>> buffer_;
  std::int64_t steps_ = 0;
  bool started_ = false;  // whether the buffers hold a momentum (PyTorch: not None)
};

template <class Scalar>
void Sgd<Scalar>::step() {
  check_options();
  detail::check_finite_gradients(kName, grads_);
  // Coefficients from the double options, each rounded once to Scalar, as PyTorch's kernels do.
  const Scalar lr = Scalar(options_.lr), mu = Scalar(options_.momentum);
  const Scalar wd = Scalar(options_.weight_decay), keep = Scalar(1 - options_.dampening);
  for (std::size_t k = 0; k < params_.size(); ++k) {
    auto p = params_[k].value.array();
    const auto g = grads_[k].value.array() + wd * p;  // PyTorch: grad.add(p, alpha = wd)
    if (options_.momentum == 0) {
      p -= lr * g;
      continue;
    }
    auto b = buffer_[k].array();
    if (!started_)
      b = g;
    else
      b = mu * b + keep * g;
    if (options_.nesterov)
      p -= lr * (g + mu * b);
    else
      p -= lr * b;
  }
  started_ = started_ || options_.momentum != 0;
  ++steps_;
}

MMKD_EXTERN_TEMPLATE(Sgd)

}  // namespace mmkd
