#pragma once

// 2-D convolutions of NCHW feature maps with hand-written backward passes, through Eigen's GEMM:
// 1x1 (optional bias) and 3x3 with stride 1 and zero padding 1 (no bias), PyTorch's
// cross-correlation convention. The ops take the scalar type explicitly:
// `mmkd::conv2d_3x3<float>(x, weight, y, workspace)`.
//
// Weights are stored as PyTorch stores them, flattened row-major: a 1x1 weight (O, C, 1, 1) is an
// O x C matrix, a 3x3 weight (O, C, 3, 3) an O x 9C matrix with column c·9 + 3a + b for tap (a, b).
// Forward ops overwrite their output; backward ops *add* to every gradient they are given, and an
// empty (0-element) gradient argument is skipped.

#include <algorithm>
#include <string>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/tensor.hpp"
#include "mmkd/core/types.hpp"

namespace mmkd {
namespace detail {

template <class S>
using SampleMap = Eigen::Map<Matrix<S>>;
template <class S>
using ConstSampleMap = Eigen::Map<const Matrix<S>>;

/// im2col for a 3x3 kernel, stride 1, padding 1: x (C x H x W) → col (9C x HW) with
/// col[c·9 + 3a + b, h·W + w] = x[c, h + a − 1, w + b − 1] (0 outside the image).
template <class S>
void im2col3x3(const S* x, Index c_in, Index h, Index w, S* col) {
  const Index hw = h * w;
  for (Index c = 0; c < c_in; ++c) {
    const S* xc = x + c * hw;
    for (Index a = 0; a < 3; ++a) {
      for (Index b = 0; b < 3; ++b) {
        S* dst = col + (c * 9 + a * 3 + b) * hw;
        for (Index r = 0; r < h; ++r) {
          S* d = dst + r * w;
          const Index sr = r + a - 1;
          if (sr < 0 || sr >= h) {
            std::fill(d, d + w, S(0));
            continue;
          }
          const S* s = xc + sr * w;
          if (b == 0) {
            d[0] = S(0);
            std::copy(s, s + w - 1, d + 1);
          } else if (b == 1) {
            std::copy(s, s + w, d);
          } else {
            std::copy(s + 1, s + w, d);
            d[w - 1] = S(0);
          }
        }
      }
    }
  }
}

/// The adjoint of im2col3x3: dx (C x H x W) += scatter of dcol (9C x HW).
template <class S>
void col2im3x3_add(const S* dcol, Index c_in, Index h, Index w, S* dx) {
  using Seg = Eigen::Map<Eigen::Array<S, Eigen::Dynamic, 1>>;
  using ConstSeg = Eigen::Map<const Eigen::Array<S, Eigen::Dynamic, 1>>;
  const Index hw = h * w;
  for (Index c = 0; c < c_in; ++c) {
    S* xc = dx + c * hw;
    for (Index a = 0; a < 3; ++a) {
      for (Index b = 0; b < 3; ++b) {
        const S* src = dcol + (c * 9 + a * 3 + b) * hw;
        for (Index r = 0; r < h; ++r) {
          const Index sr = r + a - 1;
          if (sr < 0 || sr >= h) continue;
          const S* s = src + r * w;
          S* d = xc + sr * w;
          if (b == 0) {
            if (w > 1) Seg(d, w - 1) += ConstSeg(s + 1, w - 1);
          } else if (b == 1) {
            Seg(d, w) += ConstSeg(s, w);
          } else if (w > 1) {
            Seg(d + 1, w - 1) += ConstSeg(s, w - 1);
          }
        }
      }
    }
  }
}

// Unchecked kernels on raw NCHW buffers; the public ops and the modules check shapes first.

/// y[n] = W x[n] (+ b): W is O x C, x N x C x HW, y N x O x HW (overwritten).
template <class S>
void conv1x1_forward(const S* x, Index n, Index c, Index hw, const ConstMatrixRef<S>& weight,
                     const S* bias, S* y) {
  const Index o = weight.rows();
  if (hw == 1) {  // one GEMM over the batch: Y (N x O) = X (N x C) Wᵀ
    SampleMap<S> yy(y, n, o);
    yy.noalias() = ConstSampleMap<S>(x, n, c) * weight.transpose();
    if (bias) yy.rowwise() += Eigen::Map<const Eigen::Matrix<S, 1, Eigen::Dynamic>>(bias, o);
    return;
  }
  for (Index i = 0; i < n; ++i) {
    SampleMap<S> yi(y + i * o * hw, o, hw);
    yi.noalias() = weight * ConstSampleMap<S>(x + i * c * hw, c, hw);
    if (bias) yi.colwise() += Eigen::Map<const Eigen::Matrix<S, Eigen::Dynamic, 1>>(bias, o);
  }
}

/// dW (+)= Σ_n dy[n] x[n]ᵀ, db (+)= Σ_{n,p} dy[n,:,p], dx[n] (+)= Wᵀ dy[n]; a null pointer skips.
/// `assign` overwrites dW, db and dx instead of adding.
template <class S>
void conv1x1_backward(const S* x, Index n, Index c, Index hw, const ConstMatrixRef<S>& weight,
                      const S* dy, S* dweight, S* dbias, S* dx, bool assign) {
  const Index o = weight.rows();
  if (hw == 1) {
    const ConstSampleMap<S> g(dy, n, o), xx(x, n, c);
    if (dweight) {
      SampleMap<S> dw(dweight, o, c);
      if (assign) dw.noalias() = g.transpose() * xx;
      else dw.noalias() += g.transpose() * xx;
    }
    if (dbias) {
      Eigen::Map<Eigen::Matrix<S, 1, Eigen::Dynamic>> db(dbias, o);
      if (assign) db = g.colwise().sum();
      else db += g.colwise().sum();
    }
    if (dx) {
      SampleMap<S> d(dx, n, c);
      if (assign) d.noalias() = g * weight;
      else d.noalias() += g * weight;
    }
    return;
  }
  if (assign) {
    if (dweight) SampleMap<S>(dweight, o, c).setZero();
    if (dbias) SampleMap<S>(dbias, 1, o).setZero();
  }
  for (Index i = 0; i < n; ++i) {
    const ConstSampleMap<S> g(dy + i * o * hw, o, hw);
    if (dweight) {
      SampleMap<S>(dweight, o, c).noalias() += g * ConstSampleMap<S>(x + i * c * hw, c, hw).transpose();
    }
    if (dbias) SampleMap<S>(dbias, o, 1) += g.rowwise().sum();
    if (dx) {
      SampleMap<S> d(dx + i * c * hw, c, hw);
      if (assign) d.noalias() = weight.transpose() * g;
      else d.noalias() += weight.transpose() * g;
    }
  }
}

/// The centre tap W[:, c·9 + 4] of a 3x3 weight as an O x C strided view: all a 1x1 input sees.
template <class S, class W>
auto centre_taps(W& weight, Index c) {
  using Mat = std::conditional_t<std::is_const_v<std::remove_pointer_t<decltype(weight.data())>>,
                                 const Matrix<S>, Matrix<S>>;
  return Eigen::Map<Mat, 0, Eigen::Stride<Eigen::Dynamic, 9>>(weight.data() + 4, weight.rows(), c,
                                                              Eigen::Stride<Eigen::Dynamic, 9>(
                                                                  weight.outerStride(), 9));
}

/// y[n] = W * im2col(x[n]); `col` is a 9C x HW workspace (resized on first use).
template <class S>
void conv3x3_forward(const S* x, Index n, Index c, Index h, Index w,
                     const ConstMatrixRef<S>& weight, S* y, Matrix<S>& col) {
  const Index o = weight.rows(), hw = h * w;
  if (hw == 1) {  // only the centre tap meets data: Y (N x O) = X (N x C) W_cᵀ
    SampleMap<S>(y, n, o).noalias() = ConstSampleMap<S>(x, n, c) * centre_taps<S>(weight, c).transpose();
    return;
  }
  col.resize(9 * c, hw);
  for (Index i = 0; i < n; ++i) {
    im2col3x3(x + i * c * hw, c, h, w, col.data());
    SampleMap<S>(y + i * o * hw, o, hw).noalias() = weight * col;
  }
}

/// dW (+)= Σ_n dy[n] im2col(x[n])ᵀ, dx[n] (+)= col2im(Wᵀ dy[n]); null pointers skip. `assign`
/// overwrites dW and dx. `col` and `dcol` are 9C x HW workspaces.
template <class S>
void conv3x3_backward(const S* x, Index n, Index c, Index h, Index w,
                      const ConstMatrixRef<S>& weight, const S* dy, S* dweight, S* dx,
                      bool assign, Matrix<S>& col, Matrix<S>& dcol) {
  const Index o = weight.rows(), hw = h * w;
  if (assign) {
    if (dweight) SampleMap<S>(dweight, o, 9 * c).setZero();
    if (dx) std::fill(dx, dx + n * c * hw, S(0));
  }
  if (hw == 1) {
    const ConstSampleMap<S> g(dy, n, o);
    if (dweight) {
      SampleMap<S> dw(dweight, o, 9 * c);
      centre_taps<S>(dw, c).noalias() += g.transpose() * ConstSampleMap<S>(x, n, c);
    }
    if (dx) SampleMap<S>(dx, n, c).noalias() += g * centre_taps<S>(weight, c);
    return;
  }
  col.resize(9 * c, hw);
  dcol.resize(9 * c, hw);
  for (Index i = 0; i < n; ++i) {
    const ConstSampleMap<S> g(dy + i * o * hw, o, hw);
    if (dweight) {
      im2col3x3(x + i * c * hw, c, h, w, col.data());
      SampleMap<S>(dweight, o, 9 * c).noalias() += g * col.transpose();
    }
    if (dx) {
      dcol.noalias() = weight.transpose() * g;
      col2im3x3_add(dcol.data(), c, h, w, dx + i * c * hw);
    }
  }
}

template <class S>
void check_conv_args(const char* op, const ConstTensor4Ref<S>& x, const ConstMatrixRef<S>& weight,
                     Index taps) {
  if (weight.cols() != x.dimension(1) * taps) {
    throw_invalid(op, "weight has shape " + shape_str(weight.rows(), weight.cols()) +
                          ", expected " + std::to_string(weight.rows()) + "x" +
                          std::to_string(x.dimension(1) * taps) + " (out_channels x " +
                          (taps == 1 ? "in_channels" : "9·in_channels") + " of x, " +
                          std::to_string(x.dimension(1)) + " channels)");
  }
}

}  // namespace detail

/// 1x1 convolution y[n,o,p] = Σ_i W[o,i] x[n,i,p] + b[o]. x: N x C x H x W; weight: O x C;
/// bias: 1 x O, or empty for none; y: N x O x H x W, overwritten.
template <class S>
void conv2d_1x1(const ConstTensor4Ref<detail::NonDeduced<S>>& x,
                const ConstMatrixRef<detail::NonDeduced<S>>& weight,
                const ConstMatrixRef<detail::NonDeduced<S>>& bias, Tensor4Ref<detail::NonDeduced<S>> y) {
  static constexpr const char* op = "conv2d_1x1";
  detail::check_conv_args<S>(op, x, weight, 1);
  if (bias.size() != 0) detail::check_shape(op, "bias", bias, 1, weight.rows(), "1 x out_channels");
  detail::check_shape4(op, "y", y, x.dimension(0), weight.rows(), x.dimension(2), x.dimension(3),
                       "N x out_channels x H x W");
  detail::conv1x1_forward<S>(x.data(), x.dimension(0), x.dimension(1),
                             x.dimension(2) * x.dimension(3), weight,
                             bias.size() ? bias.data() : nullptr, y.data());
}

/// Backward of `conv2d_1x1` for the cotangent dy: adds dL/dx, dL/dW and dL/db to the non-empty
/// arguments among dx (N x C x H x W), dweight (O x C) and dbias (1 x O).
template <class S>
void conv2d_1x1_backward(const ConstTensor4Ref<detail::NonDeduced<S>>& x,
                         const ConstMatrixRef<detail::NonDeduced<S>>& weight,
                         const ConstTensor4Ref<detail::NonDeduced<S>>& dy,
                         Tensor4Ref<detail::NonDeduced<S>> dx,
                         MatrixRef<detail::NonDeduced<S>> dweight,
                         MatrixRef<detail::NonDeduced<S>> dbias) {
  static constexpr const char* op = "conv2d_1x1_backward";
  detail::check_conv_args<S>(op, x, weight, 1);
  const Index n = x.dimension(0), h = x.dimension(2), w = x.dimension(3);
  detail::check_shape4(op, "dy", dy, n, weight.rows(), h, w, "N x out_channels x H x W");
  if (dx.size()) detail::check_shape4(op, "dx", dx, n, x.dimension(1), h, w, "same as x");
  if (dweight.size()) detail::check_shape(op, "dweight", dweight, weight.rows(), weight.cols(), "same as weight");
  if (dbias.size()) detail::check_shape(op, "dbias", dbias, 1, weight.rows(), "1 x out_channels");
  detail::conv1x1_backward<S>(x.data(), n, x.dimension(1), h * w, weight, dy.data(),
                              dweight.size() ? dweight.data() : nullptr,
                              dbias.size() ? dbias.data() : nullptr, dx.size() ? dx.data() : nullptr,
                              false);
}

/// 3x3 convolution, stride 1, zero padding 1, no bias:
/// y[n,o,h,w] = Σ_{i,a,b} W[o, 9i + 3a + b] x[n, i, h + a − 1, w + b − 1].
/// x: N x C x H x W; weight: O x 9C; y: N x O x H x W, overwritten. `workspace` (9C x HW) is
/// reused across calls. A 1x1 input is valid: only the centre taps meet data.
template <class S>
void conv2d_3x3(const ConstTensor4Ref<detail::NonDeduced<S>>& x,
                const ConstMatrixRef<detail::NonDeduced<S>>& weight,
                Tensor4Ref<detail::NonDeduced<S>> y, Matrix<detail::NonDeduced<S>>& workspace) {
  static constexpr const char* op = "conv2d_3x3";
  detail::check_conv_args<S>(op, x, weight, 9);
  detail::check_shape4(op, "y", y, x.dimension(0), weight.rows(), x.dimension(2), x.dimension(3),
                       "N x out_channels x H x W");
  detail::conv3x3_forward<S>(x.data(), x.dimension(0), x.dimension(1), x.dimension(2),
                             x.dimension(3), weight, y.data(), workspace);
}

/// Backward of `conv2d_3x3`: adds dL/dx and dL/dW to the non-empty arguments among dx
/// (N x C x H x W) and dweight (O x 9C). The two workspaces are reused across calls.
template <class S>
void conv2d_3x3_backward(const ConstTensor4Ref<detail::NonDeduced<S>>& x,
                         const ConstMatrixRef<detail::NonDeduced<S>>& weight,
                         const ConstTensor4Ref<detail::NonDeduced<S>>& dy,
                         Tensor4Ref<detail::NonDeduced<S>> dx,
                         MatrixRef<detail::NonDeduced<S>> dweight,
                         Matrix<detail::NonDeduced<S>>& workspace,
                         Matrix<detail::NonDeduced<S>>& workspace2) {
  static constexpr const char* op = "conv2d_3x3_backward";
  detail::check_conv_args<S>(op, x, weight, 9);
  const Index n = x.dimension(0), h = x.dimension(2), w = x.dimension(3);
  detail::check_shape4(op, "dy", dy, n, weight.rows(), h, w, "N x out_channels x H x W");
  if (dx.size()) detail::check_shape4(op, "dx", dx, n, x.dimension(1), h, w, "same as x");
  if (dweight.size()) detail::check_shape(op, "dweight", dweight, weight.rows(), weight.cols(), "same as weight");
  detail::conv3x3_backward<S>(x.data(), n, x.dimension(1), h, w, weight, dy.data(),
                              dweight.size() ? dweight.data() : nullptr,
                              dx.size() ? dx.data() : nullptr, false, workspace, workspace2);
}

}  // namespace mmkd
