#pragma once

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/module.hpp"
#include "mmkd/core/parallel.hpp"
#include "mmkd/core/tensor.hpp"
#include "mmkd/core/types.hpp"
#include "mmkd/detail/softmax_kernels.hpp"

namespace mmkd {

template <class S>
class AttentionFusion;

/**
 * 2-D batch normalisation of NCHW feature maps, PyTorch's `BatchNorm2d` (affine, running
 * statistics tracked).
 *
 * Train mode, per channel over the M = N·H·W values: μ, biased σ² = mean((x − μ)²),
 * x̂ = (x − μ)/√(σ² + ε), y = γ x̂ + β; then running_mean ← (1 − m)·running_mean + m·μ and
 * running_var ← (1 − m)·running_var + m·σ²·M/(M − 1) (unbiased). Backward:
 *
 *     dβ = Σ dy,  dγ = Σ dy·x̂,  dx = γ/√(σ² + ε) · (dy − dβ/M − x̂·dγ/M)
 *
 * Eval mode uses the running statistics: y = γ (x − μ_r)/√(σ²_r + ε) + β, dx = γ dy/√(σ²_r + ε).
 * Defaults ε = 1e-5, momentum m = 0.1, γ = 1, β = 0, running mean 0 and variance 1. Train mode
 * needs M ≥ 2 (PyTorch raises for one value per channel too). Channel sums are accumulated per
 * plane in the scalar type and across planes in double.
 *
 * A failed call changes nothing: the running statistics are updated only after the output has
 * been computed, and `backward` adds its gradients only after they are all computed.
 *
 * **Example**:
 * @code
 * mmkd::BatchNorm2d<float> bn({64});                  // 64 channels, train mode
 * const auto& y = bn.forward(x);                      // x: N x 64 x H x W
 * bn.backward(dy, dx);                                // adds to dx and to bn.gradients()
 * @endcode
 */
template <class Scalar = float>
class BatchNorm2d : detail::FloatingScalar<Scalar> {
 public:
  //! The options; the defaults are those of the reference implementation.
  struct Options {
    Index channels = 0;     //!< C, ≥ 1
    double eps = 1e-5;      //!< > 0
    double momentum = 0.1;  //!< in [0, 1]
  };

  //! Throws InvalidArgument for an invalid option.
  explicit BatchNorm2d(const Options& options) : options_(options) {
    if (options_.channels < 1) detail::throw_invalid(kName, "option channels must be >= 1");
    detail::check_positive(kName, "eps", options_.eps);
    if (!(options_.momentum >= 0 && options_.momentum <= 1))
      detail::throw_invalid(kName, "option momentum must be in [0, 1]");
    const Index c = options_.channels;
    weight_.setOnes(1, c);
    bias_.setZero(1, c);
    running_mean_.setZero(1, c);
    running_var_.setOnes(1, c);
    num_batches_tracked_.setZero(1, 1);
    mean_.resize(c);
    var_.resize(c);
    inv_std_.resize(c);
    xhat_max_.setZero(c);
    dx_bound_.resize(c);
    dx_scale_.resize(c);
    dx_a_.resize(c);
    dx_b_.resize(c);
    pending_weight_.resize(1, c);
    pending_bias_.resize(1, c);
    zero_grad();
  }

  //! The options.
  const Options& options() const { return options_; }
  //! Training mode (batch statistics; the running statistics are updated), or eval mode with false.
  void train(bool on = true) { training_ = on; }
  //! Eval mode: normalises with the running statistics.
  void eval() { training_ = false; }
  //! Whether in training mode.
  bool is_training() const { return training_; }

  //! y for x (N x C x H x W); the reference stays valid until the next forward.
  const Tensor4<Scalar>& forward(const ConstTensor4Ref<Scalar>& x);

  //! Adds dL/dx to dx and dL/dγ, dL/dβ to gradients() for the cotangent dy of the last forward.
  void backward(const ConstTensor4Ref<Scalar>& dy, Tensor4Ref<Scalar> dx);

  //! The output of the last forward.
  const Tensor4<Scalar>& output() const { return output_; }

  //! Sets the parameter gradients to zero.
  void zero_grad() {
    grad_weight_.setZero(1, options_.channels);
    grad_bias_.setZero(1, options_.channels);
  }

  //! "weight" (γ) and "bias" (β), each 1 x C.
  std::vector<ParameterView<Scalar>> parameters() {
    return {view("weight", weight_), view("bias", bias_)};
  }
  //! The parameter gradients, paired by position with parameters().
  std::vector<ParameterView<Scalar>> gradients() {
    return {view("weight", grad_weight_), view("bias", grad_bias_)};
  }
  //! "running_mean" and "running_var", each 1 x C, and "num_batches_tracked" (1 x 1): PyTorch's
  //! buffers, by name, so a `state_dict` round-trips. The count of train-mode forwards is kept in
  //! the scalar type (exact up to 2^24 in float); it is informational here, as momentum is fixed.
  std::vector<ParameterView<Scalar>> buffers() {
    return {view("running_mean", running_mean_), view("running_var", running_var_),
            view("num_batches_tracked", num_batches_tracked_)};
  }

 private:
  template <class>
  friend class AttentionFusion;
  static constexpr const char* kName = "BatchNorm2d";

  static ParameterView<Scalar> view(const char* name, Matrix<Scalar>& m) {
    return {name, Eigen::Map<Matrix<Scalar>>(m.data(), m.rows(), m.cols())};
  }

  template <class X>
  void check_input(const char* cls, const std::string& name, const X& x) const {
    if (x.dimension(1) != options_.channels) {
      detail::throw_invalid(cls, name + " has " + std::to_string(x.dimension(1)) +
                                     " channels, expected " + std::to_string(options_.channels));
    }
    check_batch(cls, name, x.dimension(0) * x.dimension(2) * x.dimension(3));
  }
  void check_batch(const char* cls, const std::string& name, Index m) const {
    if (m == 0) detail::throw_invalid(cls, name + " is empty");
    if (training_ && m < 2) {
      detail::throw_invalid(cls, name +
                                     " has one value per channel (N·H·W = 1); batch norm in "
                                     "train mode needs at least 2");
    }
  }
  template <class D, class X>
  void check_backward(const char* cls, const D& dy, const X& dx) const {
    if (!has_forward_) detail::throw_invalid(cls, "backward called before forward");
    const auto& d = output_.dimensions();
    detail::check_shape4(cls, "dy", dy, d[0], d[1], d[2], d[3], "shape of the last output");
    detail::check_shape4(cls, "dx", dx, d[0], d[1], d[2], d[3], "shape of the last input");
  }

  // Computes the output, x̂ and the batch statistics; changes no parameter or buffer. Channels
  // are independent, so they run in parallel with results that do not depend on the threads.
  void forward_pending(const Scalar* x, Index n, Index h, Index w) {
    using Arr = Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>>;
    using OutArr = Eigen::Map<Eigen::Array<Scalar, Eigen::Dynamic, 1>>;
    const Index c = options_.channels, hw = h * w, m = n * hw;
    output_.resize(n, c, h, w);
    xhat_.resize(n, c, h, w);
    detail::parallel_for(c, 4 * m, [&](Index k, int) {
      double mu, var;
      if (training_) {
        double sum = 0;
        for (Index i = 0; i < n; ++i) sum += double(Arr(x + (i * c + k) * hw, hw).sum());
        mu = sum / double(m);
        double sq = 0;
        for (Index i = 0; i < n; ++i)
          sq += double((Arr(x + (i * c + k) * hw, hw) - Scalar(mu)).square().sum());
        var = sq / double(m);
      } else {
        mu = double(running_mean_(0, k));
        var = double(running_var_(0, k));
      }
      mean_(k) = mu;
      var_(k) = var;
      inv_std_(k) = 1.0 / std::sqrt(var + options_.eps);
      const Scalar mean_s = Scalar(mu), inv = Scalar(inv_std_(k));
      const Scalar gamma = weight_(0, k), beta = bias_(0, k);
      Scalar xhat_max(0);
      for (Index i = 0; i < n; ++i) {
        const Index off = (i * c + k) * hw;
        OutArr xh(xhat_.data() + off, hw);
        xh = (Arr(x + off, hw) - mean_s) * inv;
        OutArr(output_.data() + off, hw) = xh * gamma + beta;
        xhat_max = detail::max_nan(xhat_max, xh.abs().template maxCoeff<Eigen::PropagateNaN>());
      }
      xhat_max_(k) = double(xhat_max);
    });
    batch_m_ = m;
    forward_training_ = training_;
    has_forward_ = true;
  }

  // Whether the last output is finite: O(C) through |y| ≤ |γ|·max|x̂| + |β|, a scan only when
  // that bound is not finite (NaN input, overflow, or a bound that is merely loose).
  // The first non-finite parameter or buffer, or negative running variance, named under `prefix`
  // as parameters() and buffers() name it; "" if none. Failure paths only.
  std::string bad_state(const std::string& prefix) const {
    std::string why = detail::bad_entry("parameter", prefix + "weight", weight_);
    if (why.empty()) why = detail::bad_entry("parameter", prefix + "bias", bias_);
    if (why.empty()) why = detail::bad_entry("buffer", prefix + "running_mean", running_mean_);
    if (why.empty()) why = detail::bad_entry("buffer", prefix + "running_var", running_var_, true);
    return why;
  }

  bool output_finite() const {
    for (Index k = 0; k < options_.channels; ++k) {
      const double bound =
          std::abs(double(weight_(0, k))) * xhat_max_(k) + std::abs(double(bias_(0, k)));
      if (!(bound * kBoundMargin <= double(std::numeric_limits<Scalar>::max())))
        return detail::all_finite4(output_);
    }
    return true;
  }

  // Whether the running statistics commit_forward would write are finite in the scalar type.
  bool pending_finite() const {
    if (!forward_training_) return true;
    const double mom = options_.momentum, m = double(batch_m_);
    for (Index k = 0; k < options_.channels; ++k) {
      const Scalar mean = Scalar((1 - mom) * double(running_mean_(0, k)) + mom * mean_(k));
      const Scalar var =
          Scalar((1 - mom) * double(running_var_(0, k)) + mom * var_(k) * m / (m - 1));
      if (!detail::is_finite(mean) || !detail::is_finite(var)) return false;
    }
    return true;
  }

  // The running-statistics update of the last train-mode forward_pending.
  void commit_forward() {
    if (!forward_training_) return;
    num_batches_tracked_(0, 0) += Scalar(1);
    const double mom = options_.momentum, m = double(batch_m_);
    for (Index k = 0; k < options_.channels; ++k) {
      running_mean_(0, k) = Scalar((1 - mom) * double(running_mean_(0, k)) + mom * mean_(k));
      running_var_(0, k) =
          Scalar((1 - mom) * double(running_var_(0, k)) + mom * var_(k) * m / (m - 1));
    }
  }

  // The pending γ, β gradients for dy and the per-channel coefficients of
  // dx = scale·(dy − a − x̂·b); true when every sum is finite and |dx| ≤ |scale|·(max|dy| + |a| +
  // max|x̂|·|b|) is within the scalar type's range (so every dx is finite).
  bool backward_stats(const Scalar* dy) {
    using Arr = Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>>;
    const auto& d = output_.dimensions();
    const Index n = d[0], c = d[1], hw = d[2] * d[3];
    detail::parallel_for(c, 3 * n * hw, [&](Index k, int) {
      double sum_dy = 0, sum_dy_xhat = 0;
      Scalar dy_max(0);
      for (Index i = 0; i < n; ++i) {
        const Index off = (i * c + k) * hw;
        const Arr g(dy + off, hw);
        sum_dy += double(g.sum());
        sum_dy_xhat += double((g * Arr(xhat_.data() + off, hw)).sum());
        dy_max = detail::max_nan(dy_max, g.abs().template maxCoeff<Eigen::PropagateNaN>());
      }
      pending_bias_(0, k) = Scalar(sum_dy);
      pending_weight_(0, k) = Scalar(sum_dy_xhat);
      const double scale = double(weight_(0, k)) * inv_std_(k);
      // Batch statistics depend on x in train mode; the running ones are constants.
      const double a = forward_training_ ? sum_dy / double(batch_m_) : 0.0;
      const double b = forward_training_ ? sum_dy_xhat / double(batch_m_) : 0.0;
      dx_scale_(k) = Scalar(scale);
      dx_a_(k) = Scalar(a);
      dx_b_(k) = Scalar(b);
      dx_bound_(k) = std::abs(scale) * (double(dy_max) + std::abs(a) + xhat_max_(k) * std::abs(b));
    });
    for (Index k = 0; k < c; ++k) {
      if (!(dx_bound_(k) * kBoundMargin <= double(std::numeric_limits<Scalar>::max())))
        return false;
    }
    return true;
  }

  // dx = scale·(dy − a − x̂·b) per channel, written to `out` (add: added to it).
  void write_dx(const Scalar* dy, Scalar* out, bool add) const {
    using Arr = Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>>;
    using OutArr = Eigen::Map<Eigen::Array<Scalar, Eigen::Dynamic, 1>>;
    const auto& d = output_.dimensions();
    const Index n = d[0], c = d[1], hw = d[2] * d[3];
    detail::parallel_for(c, 3 * n * hw, [&](Index k, int) {
      const Scalar scale = dx_scale_(k), a = dx_a_(k), b = dx_b_(k);
      for (Index i = 0; i < n; ++i) {
        const Index off = (i * c + k) * hw;
        const auto v = scale * (Arr(dy + off, hw) - a - Arr(xhat_.data() + off, hw) * b);
        if (add) {
          OutArr(out + off, hw) += v;
        } else {
          OutArr(out + off, hw) = v;
        }
      }
    });
  }

  // dx_ (overwritten) and the pending γ, β gradients for dy (the caller checks dx_).
  void backward_pending(const Scalar* dy) {
    backward_stats(dy);
    dx_.resize(output_.dimensions());
    write_dx(dy, dx_.data(), false);
  }

  void commit_backward() {
    grad_weight_ += pending_weight_;
    grad_bias_ += pending_bias_;
  }

  Options options_;
  bool training_ = true, forward_training_ = true, has_forward_ = false;
  Matrix<Scalar> weight_, bias_, running_mean_, running_var_, grad_weight_, grad_bias_;
  Matrix<Scalar> num_batches_tracked_;
  Matrix<Scalar> pending_weight_, pending_bias_;
  // Rounding allowance of the |y| and |dx| bounds (a few ulps; this is far more).
  static constexpr double kBoundMargin = 1.001;

  Eigen::VectorXd mean_, var_, inv_std_, xhat_max_, dx_bound_;
  Eigen::Array<Scalar, Eigen::Dynamic, 1> dx_scale_, dx_a_, dx_b_;
  Index batch_m_ = 0;
  Tensor4<Scalar> output_, xhat_, dx_;
};

template <class Scalar>
const Tensor4<Scalar>& BatchNorm2d<Scalar>::forward(const ConstTensor4Ref<Scalar>& x) {
  check_input(kName, "x", x);
  forward_pending(x.data(), x.dimension(0), x.dimension(2), x.dimension(3));
  if (!output_finite() || !pending_finite()) {
    has_forward_ = false;  // refuse a backward through this failed forward
    if (!detail::all_finite4(x)) detail::throw_numerical(kName, detail::bad_element4("x", x));
    const std::string why = bad_state("");
    if (!why.empty()) detail::throw_numerical(kName, why);
    detail::throw_numerical(kName,
                            "the output or the running statistics overflow (values too large "
                            "or eps too small for the scalar type)");
  }
  commit_forward();
  return output_;
}

template <class Scalar>
void BatchNorm2d<Scalar>::backward(const ConstTensor4Ref<Scalar>& dy, Tensor4Ref<Scalar> dx) {
  check_backward(kName, dy, dx);
  // Fast path: finite sums and a finite bound on |dx| let dx be added to in place; otherwise
  // dx is computed aside and checked exactly.
  const bool bounded = backward_stats(dy.data());
  if (!bounded) {
    if (!detail::all_finite4(dy)) detail::throw_numerical(kName, detail::bad_element4("dy", dy));
    dx_.resize(dy.dimensions());
    write_dx(dy.data(), dx_.data(), false);
  }
  if ((!bounded && !detail::all_finite4(dx_)) ||
      !detail::all_finite(grad_weight_ + pending_weight_) ||
      !detail::all_finite(grad_bias_ + pending_bias_)) {
    const std::string why = bad_state("");
    if (!why.empty()) detail::throw_numerical(kName, why);
    detail::throw_numerical(kName,
                            "a gradient overflows (the cotangents are finite; check "
                            "their scale and eps)");
  }
  if (bounded) {
    write_dx(dy.data(), dx.data(), true);
  } else {
    detail::planes(dx) += detail::planes(dx_);
  }
  commit_backward();
}

MMKD_EXTERN_TEMPLATE(BatchNorm2d)

}  // namespace mmkd
