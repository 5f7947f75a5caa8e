#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/module.hpp"
#include "mmkd/core/random.hpp"
#include "mmkd/core/tensor.hpp"
#include "mmkd/core/types.hpp"
#include "mmkd/review/batch_norm.hpp"
#include "mmkd/review/conv2d.hpp"
#include "mmkd/review/resize.hpp"

namespace mmkd {

template <class S>
class ReviewFusion;

namespace detail {

/// Per sample: A = W_x X + W_y Y + b (2 x HW, W = [W_x W_y] is 2 x 2C), Z = sigmoid(A),
/// F = X ⊙ Z₀ + Y ⊙ Z₁ with Z₀, Z₁ broadcast over the channels. Samples run in parallel.
template <class S>
void attention_forward(const S* x, const S* y, Index n, Index c, Index hw,
                       const ConstMatrixRef<S>& weight, const S* bias, S* z, S* f) {
  parallel_tiles(n, [&](Index i, int) {
    const ConstSampleMap<S> xi(x + i * c * hw, c, hw), yi(y + i * c * hw, c, hw);
    SampleMap<S> zi(z + i * 2 * hw, 2, hw), fi(f + i * c * hw, c, hw);
    zi.noalias() = weight.leftCols(c) * xi;
    zi.noalias() += weight.rightCols(c) * yi;
    zi.row(0).array() += bias[0];
    zi.row(1).array() += bias[1];
    zi = (S(1) / (S(1) + (-zi.array()).exp())).matrix();
    fi.array() =
        xi.array().rowwise() * zi.row(0).array() + yi.array().rowwise() * zi.row(1).array();
  });
}

/// Backward of attention_forward for G = dF: with dZ₀ = Σ_c G ⊙ X, dZ₁ = Σ_c G ⊙ Y and
/// dA = dZ ⊙ Z ⊙ (1 − Z): dW (+)= [dA Xᵀ, dA Yᵀ], db (+)= Σ_p dA, dX (+)= G ⊙ Z₀ + W_xᵀ dA,
/// dY (+)= G ⊙ Z₁ + W_yᵀ dA. `assign` overwrites all four. Sample groups run in parallel
/// (sum_over_sample_groups); `ws` is a workspace: a 2 x HW dA per thread, then a dW, db sum per
/// group.
template <class S>
void attention_backward(const S* x, const S* y, Index n, Index c, Index hw,
                        const ConstMatrixRef<S>& weight, const S* z, const S* df, S* dx, S* dy,
                        OutMap<S> dw, S* dbias, bool assign, Matrix<S>& ws) {
  SampleMap<S> db(dbias, 1, 2);
  if (assign) {
    dw.setZero();
    db.setZero();
  }
  const Index sum_size = 4 * c + 2;  // a group's dW (2 x 2C), then its db (1 x 2)
  // Each thread's dA starts a multiple of 64 bytes from the first: Eigen peels unaligned heads
  // with scalar code, so equal alignment keeps a sample's column sums independent of the thread
  // (and of the thread count) at every H·W.
  const Index pad = Index(64 / sizeof(S)), da_stride = (2 * hw + pad - 1) / pad * pad;
  grow(ws, max_threads() * da_stride + sample_groups(n) * sum_size);
  sum_over_sample_groups(
      n, sum_size, ws.data() + max_threads() * da_stride,
      [&](Index i, int thread, S* sum) {
        SampleMap<S> da(ws.data() + thread * da_stride, 2, hw);
        SampleMap<S> gw(sum, 2, 2 * c), gb(sum + 4 * c, 1, 2);
        const ConstSampleMap<S> xi(x + i * c * hw, c, hw), yi(y + i * c * hw, c, hw);
        const ConstSampleMap<S> zi(z + i * 2 * hw, 2, hw), g(df + i * c * hw, c, hw);
        da.row(0) = (g.array() * xi.array()).colwise().sum().matrix();
        da.row(1) = (g.array() * yi.array()).colwise().sum().matrix();
        da.array() *= zi.array() * (S(1) - zi.array());
        gw.leftCols(c).noalias() += da * xi.transpose();
        gw.rightCols(c).noalias() += da * yi.transpose();
        gb += da.rowwise().sum().transpose();
        SampleMap<S> dxi(dx + i * c * hw, c, hw), dyi(dy + i * c * hw, c, hw);
        if (assign) {
          dxi.array() = g.array().rowwise() * zi.row(0).array();
          dyi.array() = g.array().rowwise() * zi.row(1).array();
        } else {
          dxi.array() += g.array().rowwise() * zi.row(0).array();
          dyi.array() += g.array().rowwise() * zi.row(1).array();
        }
        dxi.noalias() += weight.leftCols(c).transpose() * da;
        dyi.noalias() += weight.rightCols(c).transpose() * da;
      },
      [&](const S* sum) {
        dw += ConstSampleMap<S>(sum, 2, 2 * c);
        db += ConstSampleMap<S>(sum + 4 * c, 1, 2);
      });
}

template <class S>
void check_attention_args(const char* op, const ConstTensor4Ref<S>& x, const ConstTensor4Ref<S>& y,
                          const ConstMatrixRef<S>& weight) {
  const Index n = x.dimension(0), c = x.dimension(1), h = x.dimension(2), w = x.dimension(3);
  check_shape4(op, "y", y, n, c, h, w, "same as x");
  check_shape(op, "weight", weight, 2, 2 * c, "2 x 2C");
}

}  // namespace detail

/// Sigmoid attention fusion of two N x C x H x W maps: z = sigmoid(W [x; y] + b) (N x 2 x H x W,
/// W is 2 x 2C, b 1 x 2), f = x ⊙ z₀ + y ⊙ z₁. z and f are overwritten.
template <class S>
void attention_fuse(const ConstTensor4Ref<detail::NonDeduced<S>>& x,
                    const ConstTensor4Ref<detail::NonDeduced<S>>& y,
                    const ConstMatrixRef<detail::NonDeduced<S>>& weight,
                    const ConstMatrixRef<detail::NonDeduced<S>>& bias,
                    Tensor4Ref<detail::NonDeduced<S>> z, Tensor4Ref<detail::NonDeduced<S>> f) {
  static constexpr const char* op = "attention_fuse";
  detail::check_attention_args<S>(op, x, y, weight);
  const Index n = x.dimension(0), c = x.dimension(1), h = x.dimension(2), w = x.dimension(3);
  detail::check_shape(op, "bias", bias, 1, 2, "1 x 2");
  detail::check_shape4(op, "z", z, n, 2, h, w, "N x 2 x H x W");
  detail::check_shape4(op, "f", f, n, c, h, w, "same as x");
  detail::attention_forward<S>(x.data(), y.data(), n, c, h * w, weight, bias.data(), z.data(),
                               f.data());
}

/// Backward of `attention_fuse` for the cotangent df, with z from the forward: adds to dx, dy
/// (N x C x H x W), dweight (2 x 2C) and dbias (1 x 2). `workspace` is reused across calls.
template <class S>
void attention_fuse_backward(const ConstTensor4Ref<detail::NonDeduced<S>>& x,
                             const ConstTensor4Ref<detail::NonDeduced<S>>& y,
                             const ConstMatrixRef<detail::NonDeduced<S>>& weight,
                             const ConstTensor4Ref<detail::NonDeduced<S>>& z,
                             const ConstTensor4Ref<detail::NonDeduced<S>>& df,
                             Tensor4Ref<detail::NonDeduced<S>> dx,
                             Tensor4Ref<detail::NonDeduced<S>> dy,
                             MatrixRef<detail::NonDeduced<S>> dweight,
                             MatrixRef<detail::NonDeduced<S>> dbias,
                             Matrix<detail::NonDeduced<S>>& workspace) {
  static constexpr const char* op = "attention_fuse_backward";
  detail::check_attention_args<S>(op, x, y, weight);
  const Index n = x.dimension(0), c = x.dimension(1), h = x.dimension(2), w = x.dimension(3);
  detail::check_shape4(op, "z", z, n, 2, h, w, "N x 2 x H x W");
  detail::check_shape4(op, "df", df, n, c, h, w, "same as x");
  detail::check_shape4(op, "dx", dx, n, c, h, w, "same as x");
  detail::check_shape4(op, "dy", dy, n, c, h, w, "same as x");
  detail::check_shape(op, "dweight", dweight, 2, 2 * c, "2 x 2C");
  detail::check_shape(op, "dbias", dbias, 1, 2, "1 x 2");
  detail::attention_backward<S>(x.data(), y.data(), n, c, h * w, weight, z.data(), df.data(),
                                dx.data(), dy.data(), detail::out_map(dweight), dbias.data(), false,
                                workspace);
}

/**
 * ReviewKD's attention based fusion module (ABF), Chen et al., "Distilling Knowledge via
 * Knowledge Review", CVPR 2021; the layers, initialisation and forward of the official CIFAR code
 * (`CIFAR-100/model/reviewkd.py`) and of mdistiller.
 *
 *     a = BN₁(conv1x1(x))                                   (N x mid x H x W)
 *     fuse:  u = nearest(residual → H x W),  z = sigmoid(conv1x1([a; u]) + b)   (N x 2 x H x W)
 *            f = a ⊙ z₀ + u ⊙ z₁          (two independent sigmoids, not a softmax)
 *     else:  f = a
 *     r = nearest(f → out x out) when out_size is given and differs from H x W, else f
 *     output = BN₂(conv3x3(r)),  residual() = r  (passed to the next, shallower stage)
 *
 * No ReLU anywhere. Initialisation from `seed` (mmkd's own generator, the reference's
 * distributions): conv1 and conv2 weights kaiming-uniform with a = 1, i.e. U(±√(3/fan_in));
 * the attention conv PyTorch's default, weight and bias U(±1/√(2·mid)); BN γ = 1, β = 0,
 * running mean 0, variance 1, ε = 1e-5, momentum 0.1. Deliberate difference: a non-square map
 * is resized whenever its height or width differs from out_size (the reference tests the width
 * only and supports square maps only).
 *
 * Parameter names follow the reference's `state_dict` (conv1.0.weight, conv1.1.weight, ...), so
 * a PyTorch checkpoint can be copied in by name; conv weights are O x C·kh·kw matrices in
 * PyTorch's memory order. A failed forward or backward changes no parameter, gradient, running
 * statistic or caller buffer.
 *
 * **Example**:
 * @code
 * mmkd::AttentionFusion<float> abf({16, 64, 16, true, 42});   // in, mid, out, fuse, seed
 * const auto& y = abf.forward(feature, deeper.residual());   // N x 16 x 32 x 32
 * const mmkd::ConstTensor4Ref<float> none(nullptr, 0, 0, 0, 0);  // no gradient for residual()
 * abf.backward(dy, none, d_feature, d_deeper_residual);      // adds
 * @endcode
 */
template <class Scalar = float>
class AttentionFusion : detail::FloatingScalar<Scalar> {
 public:
  //! The options; the defaults are those of the reference implementation.
  struct Options {
    Index in_channels = 0;   //!< channels of the student feature, ≥ 1
    Index mid_channels = 0;  //!< channels of the fused map and of the residual, ≥ 1
    Index out_channels = 0;  //!< channels of the output, ≥ 1
    bool fuse = true;        //!< fuse with the residual of the deeper stage
    std::uint64_t seed = 0;  //!< initialisation seed
  };

  //! Throws InvalidArgument for an invalid option.
  explicit AttentionFusion(const Options& options)
      : AttentionFusion(options, std::string(kName), "") {}

  //! The options.
  const Options& options() const { return options_; }
  //! Training mode (batch statistics; the running statistics are updated), or eval mode with false.
  void train(bool on = true) {
    bn1_.train(on);
    bn2_.train(on);
  }
  //! Eval mode: normalises with the running statistics.
  void eval() { train(false); }
  //! Whether in training mode.
  bool is_training() const { return bn1_.is_training(); }

  //! Forward of a stage without fusion (`fuse` false). out_size > 0 resizes to out_size²
  //! before conv2; 0 keeps H x W.
  const Tensor4<Scalar>& forward(const ConstTensor4Ref<Scalar>& x, Index out_size = 0) {
    if (options_.fuse) throw_here("fuse is set: pass the residual of the deeper stage");
    return forward_impl(x, nullptr, out_size);
  }
  //! Forward of a fusing stage: `residual` (N x mid x h' x w') is the deeper stage's residual().
  const Tensor4<Scalar>& forward(const ConstTensor4Ref<Scalar>& x,
                                 const ConstTensor4Ref<Scalar>& residual, Index out_size = 0) {
    if (!options_.fuse) throw_here("fuse is not set: this stage takes no residual");
    return forward_impl(x, &residual, out_size);
  }

  //! The output of the last forward.
  const Tensor4<Scalar>& output() const { return bn2_.output_; }
  //! The map r passed on to the next (shallower) stage: N x mid x out x out.
  const Tensor4<Scalar>& residual() const {
    return resized_ ? r_ : (options_.fuse ? f_ : bn1_.output_);
  }

  //! Backward of a non-fusing stage whose residual feeds nothing.
  void backward(const ConstTensor4Ref<Scalar>& d_output, Tensor4Ref<Scalar> d_input);
  //! Backward: d_output for output(), d_residual for residual() (may be empty: no gradient).
  //! Adds to d_input (shape of x) and, for a fusing stage, to d_residual_in (shape of the
  //! residual given to forward); a non-fusing stage takes an empty d_residual_in.
  void backward(const ConstTensor4Ref<Scalar>& d_output, const ConstTensor4Ref<Scalar>& d_residual,
                Tensor4Ref<Scalar> d_input, Tensor4Ref<Scalar> d_residual_in);

  //! Sets the parameter gradients to zero.
  void zero_grad() {
    grad_w1_.setZero(w1_.rows(), w1_.cols());
    grad_w2_.setZero(w2_.rows(), w2_.cols());
    grad_watt_.setZero(watt_.rows(), watt_.cols());
    grad_batt_.setZero(batt_.rows(), batt_.cols());
    bn1_.zero_grad();
    bn2_.zero_grad();
  }

  //! conv1.0.weight (mid x in), conv1.1.weight/bias (1 x mid), conv2.0.weight (out x 9·mid),
  //! conv2.1.weight/bias (1 x out), and when fusing att_conv.0.weight (2 x 2·mid) and
  //! att_conv.0.bias (1 x 2).
  std::vector<ParameterView<Scalar>> parameters() {
    return views(w1_, bn1_.weight_, bn1_.bias_, w2_, bn2_.weight_, bn2_.bias_, watt_, batt_);
  }
  //! The parameter gradients, paired by position with parameters().
  std::vector<ParameterView<Scalar>> gradients() {
    return views(grad_w1_, bn1_.grad_weight_, bn1_.grad_bias_, grad_w2_, bn2_.grad_weight_,
                 bn2_.grad_bias_, grad_watt_, grad_batt_);
  }
  //! conv1.1.running_mean, conv1.1.running_var, conv1.1.num_batches_tracked, and the same three
  //! of conv2.1 (PyTorch's state_dict names).
  std::vector<ParameterView<Scalar>> buffers() {
    auto v = [&](Index k, Matrix<Scalar>& m) {
      return ParameterView<Scalar>{names_[std::size_t(k)].c_str(),
                                   Eigen::Map<Matrix<Scalar>>(m.data(), m.rows(), m.cols())};
    };
    return {v(8, bn1_.running_mean_),  v(9, bn1_.running_var_),  v(12, bn1_.num_batches_tracked_),
            v(10, bn2_.running_mean_), v(11, bn2_.running_var_), v(13, bn2_.num_batches_tracked_)};
  }

 private:
  template <class>
  friend class ReviewFusion;
  static constexpr const char* kName = "AttentionFusion";

  AttentionFusion(const Options& options, std::string label, const std::string& prefix)
      : options_(options),
        label_(std::move(label)),
        bn1_({options.mid_channels}),
        bn2_({options.out_channels}) {
    if (options_.in_channels < 1 || options_.mid_channels < 1 || options_.out_channels < 1) {
      throw_here("channels must be >= 1, got in " + std::to_string(options_.in_channels) +
                 ", mid " + std::to_string(options_.mid_channels) + ", out " +
                 std::to_string(options_.out_channels));
    }
    const Index in = options_.in_channels, mid = options_.mid_channels, out = options_.out_channels;
    w1_.resize(mid, in);
    w2_.resize(out, 9 * mid);
    watt_.resize(options_.fuse ? 2 : 0, 2 * mid);
    batt_.resize(options_.fuse ? 1 : 0, 2);
    SplitMix64 rng(options_.seed);
    auto fill = [&](Matrix<Scalar>& m, double bound) {
      for (Index k = 0; k < m.size(); ++k) m.data()[k] = Scalar(rng.uniform(-bound, bound));
    };
    fill(w1_, std::sqrt(3.0 / double(in)));
    fill(w2_, std::sqrt(3.0 / double(9 * mid)));
    fill(watt_, 1.0 / std::sqrt(double(2 * mid)));
    fill(batt_, 1.0 / std::sqrt(double(2 * mid)));
    for (const char* n :
         {"conv1.0.weight", "conv1.1.weight", "conv1.1.bias", "conv2.0.weight", "conv2.1.weight",
          "conv2.1.bias", "att_conv.0.weight", "att_conv.0.bias", "conv1.1.running_mean",
          "conv1.1.running_var", "conv2.1.running_mean", "conv2.1.running_var",
          "conv1.1.num_batches_tracked", "conv2.1.num_batches_tracked"}) {
      names_.push_back(prefix + n);
    }
    pending_w1_.resize(w1_.rows(), w1_.cols());
    pending_w2_.resize(w2_.rows(), w2_.cols());
    pending_watt_.resize(watt_.rows(), watt_.cols());
    pending_batt_.resize(batt_.rows(), batt_.cols());
    zero_grad();
  }

  [[noreturn]] void throw_here(const std::string& what) const {
    detail::throw_invalid(label_.c_str(), what);
  }

  static ConstTensor4Ref<Scalar> empty_const() { return {nullptr, 0, 0, 0, 0}; }
  static Tensor4Ref<Scalar> empty() { return {nullptr, 0, 0, 0, 0}; }

  std::vector<ParameterView<Scalar>> views(Matrix<Scalar>& w1, Matrix<Scalar>& g1,
                                           Matrix<Scalar>& b1, Matrix<Scalar>& w2,
                                           Matrix<Scalar>& g2, Matrix<Scalar>& b2,
                                           Matrix<Scalar>& wa, Matrix<Scalar>& ba) {
    Matrix<Scalar>* m[] = {&w1, &g1, &b1, &w2, &g2, &b2, &wa, &ba};
    std::vector<ParameterView<Scalar>> out;
    for (Index k = 0; k < (options_.fuse ? 8 : 6); ++k) {
      out.push_back({names_[std::size_t(k)].c_str(),
                     Eigen::Map<Matrix<Scalar>>(m[k]->data(), m[k]->rows(), m[k]->cols())});
    }
    return out;
  }

  // Shape, mode and value checks of a forward; throws before anything is written.
  void check_forward(const ConstTensor4Ref<Scalar>& x, const ConstTensor4Ref<Scalar>* residual,
                     Index out_size) const {
    const Index n = x.dimension(0), h = x.dimension(2), w = x.dimension(3);
    if (x.dimension(1) != options_.in_channels || n < 1 || h < 1 || w < 1) {
      throw_here("input has shape " + detail::shape_str4(n, x.dimension(1), h, w) +
                 ", expected Nx" + std::to_string(options_.in_channels) +
                 "xHxW with N, H, W >= 1 (in_channels " + std::to_string(options_.in_channels) +
                 ")");
    }
    if (out_size < 0) throw_here("out_size must be >= 0, got " + std::to_string(out_size));
    if (residual) {
      const auto& r = *residual;
      if (r.dimension(0) != n || r.dimension(1) != options_.mid_channels || r.dimension(2) < 1 ||
          r.dimension(3) < 1) {
        throw_here(
            "residual has shape " +
            detail::shape_str4(r.dimension(0), r.dimension(1), r.dimension(2), r.dimension(3)) +
            ", expected " + std::to_string(n) + "x" + std::to_string(options_.mid_channels) +
            "xHxW (the batch of the input, mid_channels)");
      }
    }
    if (is_training()) {
      const Index oh = out_size ? out_size : h, ow = out_size ? out_size : w;
      if (n * h * w < 2 || n * oh * ow < 2) {
        throw_here("batch norm in train mode needs at least 2 values per channel, got N·H·W = " +
                   std::to_string(std::min(n * h * w, n * oh * ow)) +
                   " (use a batch of 2 or more, or eval())");
      }
    }
    if (!detail::all_finite4(x))
      detail::throw_numerical(label_.c_str(), detail::bad_element4("input", x));
    if (residual && !detail::all_finite4(*residual))
      detail::throw_numerical(label_.c_str(), detail::bad_element4("residual", *residual));
    const Matrix<Scalar>* params[] = {&w1_,          &w2_,        &watt_,        &batt_,
                                      &bn1_.weight_, &bn1_.bias_, &bn2_.weight_, &bn2_.bias_};
    for (const auto* p : params) {
      if (!detail::all_finite(*p)) throw_here(bad_state());
    }
  }

  const Tensor4<Scalar>& forward_impl(const ConstTensor4Ref<Scalar>& x,
                                      const ConstTensor4Ref<Scalar>* residual, Index out_size);

  // Everything of a forward except the running-statistics update.
  void forward_pending(const ConstTensor4Ref<Scalar>& x, const ConstTensor4Ref<Scalar>* residual,
                       Index out_size) {
    has_forward_ = false;  // the caches are being overwritten: no backward until the commit
    const Index n = x.dimension(0), h = x.dimension(2), w = x.dimension(3);
    const Index in = options_.in_channels, mid = options_.mid_channels;
    x_.resize(n, in, h, w);
    detail::parallel_assign(x_.data(), x.data(), x.size());
    c1_.resize(n, mid, h, w);
    detail::conv1x1_forward<Scalar>(x_.data(), n, in, h * w, w1_, nullptr, c1_.data());
    bn1_.forward_pending(c1_.data(), n, h, w);
    const Tensor4<Scalar>* fused = &bn1_.output_;  // f = a without fusion
    if (residual) {
      const auto& r = *residual;
      res_dims_ = {r.dimension(0), r.dimension(1), r.dimension(2), r.dimension(3)};
      up_.resize(n, mid, h, w);
      detail::nearest_forward(r.data(), n * mid, r.dimension(2), r.dimension(3), up_.data(), h, w);
      z_.resize(n, 2, h, w);
      f_.resize(n, mid, h, w);
      detail::attention_forward<Scalar>(bn1_.output_.data(), up_.data(), n, mid, h * w, watt_,
                                        batt_.data(), z_.data(), f_.data());
      fused = &f_;
    }
    oh_ = out_size ? out_size : h;
    ow_ = out_size ? out_size : w;
    resized_ = (oh_ != h || ow_ != w);
    if (resized_) {
      r_.resize(n, mid, oh_, ow_);
      detail::nearest_forward(fused->data(), n * mid, h, w, r_.data(), oh_, ow_);
    }
    c2_.resize(n, options_.out_channels, oh_, ow_);
    detail::conv3x3_forward<Scalar>(this->residual().data(), n, mid, oh_, ow_, w2_, c2_.data(),
                                    col_);
    bn2_.forward_pending(c2_.data(), n, oh_, ow_);
  }

  // The first non-finite parameter or buffer (or negative running variance), by its parameters()
  // or buffers() name; "" if none. Failure paths only.
  std::string bad_state() const {
    const Matrix<Scalar>* own[] = {&w1_, &w2_, &watt_, &batt_};
    const int own_name[] = {0, 3, 6, 7};
    for (int k = 0; k < 4; ++k) {
      std::string why = detail::bad_entry("parameter", names_[std::size_t(own_name[k])], *own[k]);
      if (!why.empty()) return why;
    }
    const std::string& w1 = names_[0];  // "<prefix>conv1.0.weight"
    const std::string prefix = w1.substr(0, w1.size() - std::string("conv1.0.weight").size());
    std::string why = bn1_.bad_state(prefix + "conv1.1.");
    return why.empty() ? bn2_.bad_state(prefix + "conv2.1.") : why;
  }

  void check_output() const {
    if (!bn2_.output_finite() || !bn1_.pending_finite() || !bn2_.pending_finite()) {
      const std::string why = bad_state();
      if (!why.empty()) detail::throw_numerical(label_.c_str(), why);
      detail::throw_numerical(label_.c_str(),
                              "output or running statistics overflowed to a non-finite value "
                              "(input and parameters are finite; check their scale)");
    }
  }

  void commit_forward() {
    bn1_.commit_forward();
    bn2_.commit_forward();
    has_forward_ = true;
  }

  void check_backward(const ConstTensor4Ref<Scalar>& d_output,
                      const ConstTensor4Ref<Scalar>& d_residual, const Tensor4Ref<Scalar>& d_input,
                      const Tensor4Ref<Scalar>& d_residual_in) const {
    if (!has_forward_) throw_here("backward called before forward");
    const char* cls = label_.c_str();
    const auto& o = bn2_.output_.dimensions();
    detail::check_shape4(cls, "d_output", d_output, o[0], o[1], o[2], o[3], "shape of output()");
    const auto& r = residual().dimensions();
    if (d_residual.size())
      detail::check_shape4(cls, "d_residual", d_residual, r[0], r[1], r[2], r[3],
                           "shape of residual(), or empty");
    const auto& x = x_.dimensions();
    detail::check_shape4(cls, "d_input", d_input, x[0], x[1], x[2], x[3], "shape of the input");
    if (options_.fuse) {
      detail::check_shape4(cls, "d_residual_in", d_residual_in, res_dims_[0], res_dims_[1],
                           res_dims_[2], res_dims_[3], "shape of the residual given to forward");
    } else if (d_residual_in.size()) {
      throw_here("d_residual_in must be empty: this stage takes no residual");
    }
    if (!detail::all_finite4(d_output))
      detail::throw_numerical(cls, detail::bad_element4("d_output", d_output));
    if (d_residual.size() && !detail::all_finite4(d_residual))
      detail::throw_numerical(cls, detail::bad_element4("d_residual", d_residual));
  }

  // Computes the input and residual gradients (dx_, dres_in_) and the pending parameter
  // gradients; changes no parameter gradient.
  void backward_pending(const ConstTensor4Ref<Scalar>& d_output, const Scalar* d_residual) {
    const auto& xd = x_.dimensions();
    const Index n = xd[0], in = xd[1], h = xd[2], w = xd[3];
    const Index mid = options_.mid_channels;
    bn2_.backward_pending(d_output.data());
    dr_.resize(n, mid, oh_, ow_);
    detail::conv3x3_backward<Scalar>(residual().data(), n, mid, oh_, ow_, w2_, bn2_.dx_.data(),
                                     detail::out_map(pending_w2_), dr_.data(), true, dcol_);
    if (d_residual) {
      detail::parallel_add(dr_.data(), d_residual, dr_.size());
    }
    const Tensor4<Scalar>* dfused = &dr_;
    if (resized_) {
      df_.resize(n, mid, h, w);
      detail::parallel_assign<Scalar>(df_.data(), nullptr, df_.size());
      detail::nearest_backward(dr_.data(), n * mid, h, w, df_.data(), oh_, ow_);
      dfused = &df_;
    }
    const Tensor4<Scalar>* da1 = dfused;
    if (options_.fuse) {
      da1_.resize(n, mid, h, w);
      dup_.resize(n, mid, h, w);
      detail::attention_backward<Scalar>(bn1_.output_.data(), up_.data(), n, mid, h * w, watt_,
                                         z_.data(), dfused->data(), da1_.data(), dup_.data(),
                                         detail::out_map(pending_watt_), pending_batt_.data(), true,
                                         datt_);
      dres_in_.resize(res_dims_[0], res_dims_[1], res_dims_[2], res_dims_[3]);
      detail::parallel_assign<Scalar>(dres_in_.data(), nullptr, dres_in_.size());
      detail::nearest_backward(dup_.data(), n * mid, res_dims_[2], res_dims_[3], dres_in_.data(), h,
                               w);
      da1 = &da1_;
    }
    bn1_.backward_pending(da1->data());
    dx_.resize(n, in, h, w);
    detail::conv1x1_backward<Scalar>(x_.data(), n, in, h * w, w1_, bn1_.dx_.data(),
                                     detail::out_map(pending_w1_), nullptr, dx_.data(), true);
  }

  bool pending_finite() const {
    return detail::all_finite(pending_w1_) && detail::all_finite(pending_w2_) &&
           detail::all_finite(pending_watt_) && detail::all_finite(pending_batt_) &&
           detail::all_finite(bn1_.pending_weight_) && detail::all_finite(bn1_.pending_bias_) &&
           detail::all_finite(bn2_.pending_weight_) && detail::all_finite(bn2_.pending_bias_) &&
           detail::all_finite4(dx_) && (!options_.fuse || detail::all_finite4(dres_in_));
  }
  void check_pending() const {
    if (!pending_finite()) {
      const std::string why = bad_state();
      if (!why.empty()) detail::throw_numerical(label_.c_str(), why);
      detail::throw_numerical(label_.c_str(),
                              "a gradient overflowed to a non-finite value (the cotangents are "
                              "finite; check their scale)");
    }
  }

  void commit_backward(Scalar* d_input, Scalar* d_residual_in) {
    grad_w1_ += pending_w1_;
    grad_w2_ += pending_w2_;
    if (options_.fuse) {
      grad_watt_ += pending_watt_;
      grad_batt_ += pending_batt_;
    }
    bn1_.commit_backward();
    bn2_.commit_backward();
    detail::parallel_add(d_input, dx_.data(), dx_.size());
    if (d_residual_in) detail::parallel_add(d_residual_in, dres_in_.data(), dres_in_.size());
  }

  Options options_;
  std::string label_;
  std::vector<std::string> names_;
  Matrix<Scalar> w1_, w2_, watt_, batt_;                      // parameters (BN's in bn1_, bn2_)
  Matrix<Scalar> grad_w1_, grad_w2_, grad_watt_, grad_batt_;  // their gradients
  Matrix<Scalar> pending_w1_, pending_w2_, pending_watt_, pending_batt_;
  BatchNorm2d<Scalar> bn1_, bn2_;
  // forward cache
  bool has_forward_ = false, resized_ = false;
  Index oh_ = 0, ow_ = 0;
  std::array<Index, 4> res_dims_{};
  Tensor4<Scalar> x_, c1_, up_, z_, f_, r_, c2_;
  // backward scratch
  Tensor4<Scalar> dr_, df_, da1_, dup_, dres_in_, dx_;
  Matrix<Scalar> col_, dcol_, datt_;
};

template <class Scalar>
void AttentionFusion<Scalar>::backward(const ConstTensor4Ref<Scalar>& d_output,
                                       Tensor4Ref<Scalar> d_input) {
  backward(d_output, empty_const(), d_input, empty());
}

template <class Scalar>
void AttentionFusion<Scalar>::backward(const ConstTensor4Ref<Scalar>& d_output,
                                       const ConstTensor4Ref<Scalar>& d_residual,
                                       Tensor4Ref<Scalar> d_input,
                                       Tensor4Ref<Scalar> d_residual_in) {
  check_backward(d_output, d_residual, d_input, d_residual_in);
  backward_pending(d_output, d_residual.size() ? d_residual.data() : nullptr);
  check_pending();
  commit_backward(d_input.data(), options_.fuse ? d_residual_in.data() : nullptr);
}

template <class Scalar>
const Tensor4<Scalar>& AttentionFusion<Scalar>::forward_impl(
    const ConstTensor4Ref<Scalar>& x, const ConstTensor4Ref<Scalar>* residual, Index out_size) {
  check_forward(x, residual, out_size);
  forward_pending(x, residual, out_size);
  check_output();
  commit_forward();
  return output();
}

MMKD_EXTERN_TEMPLATE(AttentionFusion)

}  // namespace mmkd
