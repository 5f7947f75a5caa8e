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
//
// Parallel (with MMKD_OPENMP) over samples, Winograd coefficients or output-channel blocks, every
// product a single-threaded Eigen product of a shape fixed by the problem; sums over samples run
// in fixed groups added in order. Results do not depend on the number of threads.

#include <algorithm>
#include <string>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/tensor.hpp"
#include "mmkd/core/types.hpp"
#include "mmkd/detail/products.hpp"

namespace mmkd {

/// How `conv2d_3x3` computes: im2col + GEMM, Winograd F(2x2, 3x3) + GEMMs (2.25x fewer flops,
/// extra transforms), or Auto (picks per shape; what the modules use).
enum class Conv3x3Algorithm { Auto, Im2col, Winograd };

namespace detail {

template <class S>
using SampleMap = Eigen::Map<Matrix<S>>;
template <class S>
using ConstSampleMap = Eigen::Map<const Matrix<S>>;

/// A kernel's optional matrix output (skipped when data() is null) with rows outerStride() apart,
/// so that a caller's strided view (a block of a wider gradient matrix) is written in place.
template <class S>
using OutMap = Eigen::Map<Matrix<S>, 0, Eigen::OuterStride<>>;
template <class M>
OutMap<typename M::Scalar> out_map(M& m) {
  return {m.size() ? m.data() : nullptr, m.rows(), m.cols(), Eigen::OuterStride<>(m.outerStride())};
}

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

/// Samples of a batch are summed in at most kSampleGroups fixed groups (each group's sum, then
/// the groups in order), so a sum over samples does not depend on the number of threads.
inline constexpr Index kSampleGroups = 8;
inline Index sample_groups(Index n) {
  return std::min(n, kSampleGroups);
}

/// Sums per-sample terms over a batch independently of the thread count: sample groups run in
/// parallel, each calling f(i, thread, sum) for its samples in order with `sum` its own zeroed
/// accumulator of sum_size values (sums holds sample_groups(n) of them); then add_sum(sum) is
/// called for each group in order.
template <class S, class F, class A>
void sum_over_sample_groups(Index n, Index sum_size, S* sums, F&& f, A&& add_sum) {
  const Index groups = sample_groups(n);
  parallel_tiles(groups, [&](Index gi, int thread) {
    S* sum = sums + gi * sum_size;
    std::fill(sum, sum + sum_size, S(0));
    for (Index i = gi * n / groups; i < (gi + 1) * n / groups; ++i) f(i, thread, sum);
  });
  for (Index gi = 0; gi < groups; ++gi) add_sum(static_cast<const S*>(sums + gi * sum_size));
}

/// y[n] = W im2col(x[n]), samples in parallel; `ws` holds a 9C x HW column buffer per thread.
template <class S>
void conv3x3_forward_im2col(const S* x, Index n, Index c, Index h, Index w,
                            const ConstMatrixRef<S>& weight, S* y, S* ws) {
  const Index o = weight.rows(), hw = h * w, per_thread = 9 * c * hw;
  parallel_tiles(n, [&](Index i, int thread) {
    S* col = ws + thread * per_thread;
    im2col3x3(x + i * c * hw, c, h, w, col);
    SampleMap<S>(y + i * o * hw, o, hw).noalias() = weight * ConstSampleMap<S>(col, 9 * c, hw);
  });
}

/// dW += Σ_n dy[n] im2col(x[n])ᵀ, dx[n] += col2im(Wᵀ dy[n]); null pointers skip. Sample groups
/// run in parallel. `ws`: two 9C x HW buffers per thread, then an O x 9C sum per group.
template <class S>
void conv3x3_backward_im2col(const S* x, Index n, Index c, Index h, Index w,
                             const ConstMatrixRef<S>& weight, const S* dy, OutMap<S> dweight, S* dx,
                             S* ws) {
  const Index o = weight.rows(), hw = h * w, per_thread = 18 * c * hw;
  const Index sum_size = dweight.data() ? o * 9 * c : 0;
  sum_over_sample_groups(
      n, sum_size, ws + max_threads() * per_thread,
      [&](Index i, int thread, S* sum) {
        S* col_data = ws + thread * per_thread;
        S* dcol_data = col_data + 9 * c * hw;
        const ConstSampleMap<S> g(dy + i * o * hw, o, hw);
        if (dweight.data()) {
          im2col3x3(x + i * c * hw, c, h, w, col_data);
          SampleMap<S>(sum, o, 9 * c).noalias() +=
              g * ConstSampleMap<S>(col_data, 9 * c, hw).transpose();
        }
        if (dx) {
          SampleMap<S>(dcol_data, 9 * c, hw).noalias() = weight.transpose() * g;
          col2im3x3_add(dcol_data, c, h, w, dx + i * c * hw);
        }
      },
      [&](const S* sum) {
        if (dweight.data()) dweight += ConstSampleMap<S>(sum, o, 9 * c);
      });
}

// 3x3 convolutions use Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms
// for Convolutional Neural Networks", CVPR 2016): each 2x2 output tile is
//     Y = Aᵀ [ Σ_c (G g_c Gᵀ) ⊙ (Bᵀ d_c B) ] A
// for the 4x4 input patch d_c, with 16 multiplications per tile and channel pair instead of 36, so
// the products become 16 GEMMs (one per transform coefficient ξ) of 2.25x fewer flops than
// im2col. The backward passes are the adjoints of the same linear maps:
//     dV_ξ = U_ξᵀ M_ξ,  d_c += B dV Bᵀ (scatter over overlapping patches)
//     dU_ξ = Σ_tiles M_ξ V_ξᵀ,  dg = Gᵀ dU G,    with M = A dY Aᵀ.
// Odd sizes are padded to whole tiles with zeros.

// Bᵀ u (4-vector, stride st) and its adjoint B v.
template <class S>
inline void wino_bt(const S* u, Index st, S* v, Index sv) {
  v[0] = u[0] - u[2 * st];
  v[sv] = u[st] + u[2 * st];
  v[2 * sv] = u[2 * st] - u[st];
  v[3 * sv] = u[st] - u[3 * st];
}
template <class S>
inline void wino_b(const S* v, Index sv, S* u, Index st) {
  u[0] = v[0];
  u[st] = v[sv] - v[2 * sv] + v[3 * sv];
  u[2 * st] = v[sv] + v[2 * sv] - v[0];
  u[3 * st] = -v[3 * sv];
}
// Aᵀ m (4 → 2) and its adjoint A v (2 → 4).
template <class S>
inline void wino_at(const S* m, Index sm, S* y, Index sy) {
  y[0] = m[0] + m[sm] + m[2 * sm];
  y[sy] = m[sm] - m[2 * sm] - m[3 * sm];
}
template <class S>
inline void wino_a(const S* v, Index sv, S* u, Index su) {
  u[0] = v[0];
  u[su] = v[0] + v[sv];
  u[2 * su] = v[0] - v[sv];
  u[3 * su] = -v[sv];
}
// G g (3 → 4) and its adjoint Gᵀ v (4 → 3).
template <class S>
inline void wino_g(const S* g, Index sg, S* u, Index su) {
  u[0] = g[0];
  u[su] = S(0.5) * (g[0] + g[sg] + g[2 * sg]);
  u[2 * su] = S(0.5) * (g[0] - g[sg] + g[2 * sg]);
  u[3 * su] = g[2 * sg];
}
template <class S>
inline void wino_gt(const S* v, Index sv, S* g, Index sg) {
  g[0] = v[0] + S(0.5) * (v[sv] + v[2 * sv]);
  g[sg] = S(0.5) * (v[sv] - v[2 * sv]);
  g[2 * sg] = S(0.5) * (v[sv] + v[2 * sv]) + v[3 * sv];
}

/// Tiling of an H x W map into 2x2 output tiles, processed in chunks of samples.
struct WinogradPlan {
  Index c, o, h, w, th, tw, tiles_per_sample, chunk;  // chunk: samples per pass
  WinogradPlan(Index c_in, Index c_out, Index h_, Index w_, Index n)
      : c(c_in), o(c_out), h(h_), w(w_), th((h_ + 1) / 2), tw((w_ + 1) / 2) {
    tiles_per_sample = th * tw;
    // About 512 tiles per GEMM: large enough for GEMM efficiency, small enough for the caches.
    chunk = std::max<Index>(1, std::min<Index>(n, (512 + tiles_per_sample - 1) / tiles_per_sample));
  }
  Index tiles(Index samples) const { return samples * tiles_per_sample; }
};

/// U_ξ (16 x O x C) = G g Gᵀ for every filter g = W[o, c·9 .. c·9+8].
template <class S>
void wino_filter(const ConstMatrixRef<S>& weight, Index c_in, S* u) {
  const Index o = weight.rows(), oc = o * c_in;
  parallel_for(o, 16 * c_in, [&](Index q, int) {
    S t[12], r[16];
    for (Index c = 0; c < c_in; ++c) {
      const S* g = weight.data() + q * weight.outerStride() + c * 9;
      for (Index j = 0; j < 3; ++j) wino_g(g + j, 3, t + j, 3);  // columns: 4x3
      for (Index i = 0; i < 4; ++i) wino_g(t + 3 * i, 1, r + 4 * i, 1);
      for (Index k = 0; k < 16; ++k) u[k * oc + q * c_in + c] = r[k];
    }
  });
}

/// dW[o, c·9 + ·] += Gᵀ dU Gᵀᵀ for dU_ξ (16 x O x C).
template <class S>
void wino_filter_adjoint(const S* du, Index o, Index c_in, OutMap<S>& dweight) {
  const Index oc = o * c_in;
  parallel_for(o, 16 * c_in, [&](Index q, int) {
    S r[16], t[12], g[9];
    for (Index c = 0; c < c_in; ++c) {
      for (Index k = 0; k < 16; ++k) r[k] = du[k * oc + q * c_in + c];
      for (Index i = 0; i < 4; ++i) wino_gt(r + 4 * i, 1, t + 3 * i, 1);  // rows: 4x3
      for (Index j = 0; j < 3; ++j) wino_gt(t + j, 3, g + j, 3);          // columns: 3x3
      S* dw = dweight.data() + q * dweight.outerStride() + c * 9;
      for (Index k = 0; k < 9; ++k) dw[k] += g[k];
    }
  });
}

/// Calls f(plane, coeff, r0, c0) for every tile of samples [s0, s0 + ns) and every one of
/// `channels` planes: `plane` is the map's (sample, channel) plane offset in elements, `coeff` the
/// tile's entry of coefficient 0 in a 16 x channels x T array (coefficient k at + k·channels·T),
/// (r0, c0) the tile's top-left output pixel. Planes run in parallel: f must only write to its
/// plane's tiles.
template <class F>
void for_each_tile(const WinogradPlan& p, Index s0, Index ns, Index channels, F&& f) {
  const Index t_all = p.tiles(ns);
  parallel_for(ns * channels, 16 * p.tiles_per_sample, [&](Index q, int) {
    const Index s = q / channels, ch = q % channels;
    for (Index ty = 0; ty < p.th; ++ty)
      for (Index tx = 0; tx < p.tw; ++tx)
        f(((s0 + s) * channels + ch) * p.h * p.w,
          ch * t_all + s * p.tiles_per_sample + ty * p.tw + tx, 2 * ty, 2 * tx);
  });
}

/// V_ξ (16 x C x T) = Bᵀ d B for every 4x4 patch d (zero outside the map).
template <class S>
void wino_input(const S* x, const WinogradPlan& p, Index s0, Index ns, S* v) {
  const Index stride = p.c * p.tiles(ns);
  for_each_tile(p, s0, ns, p.c, [&](Index plane, Index coeff, Index r0, Index c0) {
    S d[16], t[16], r[16];
    const S* xp = x + plane;
    for (Index i = 0; i < 4; ++i)
      for (Index j = 0; j < 4; ++j) {
        const Index rr = r0 - 1 + i, cc = c0 - 1 + j;
        d[4 * i + j] = (rr >= 0 && rr < p.h && cc >= 0 && cc < p.w) ? xp[rr * p.w + cc] : S(0);
      }
    for (Index j = 0; j < 4; ++j) wino_bt(d + j, 4, t + j, 4);
    for (Index i = 0; i < 4; ++i) wino_bt(t + 4 * i, 1, r + 4 * i, 1);
    for (Index k = 0; k < 16; ++k) v[coeff + k * stride] = r[k];
  });
}

/// dx += B dV Bᵀ scattered over the patches (the adjoint of wino_input).
template <class S>
void wino_input_adjoint(const S* dv, const WinogradPlan& p, Index s0, Index ns, S* dx) {
  const Index stride = p.c * p.tiles(ns);
  for_each_tile(p, s0, ns, p.c, [&](Index plane, Index coeff, Index r0, Index c0) {
    S r[16], t[16], d[16];
    for (Index k = 0; k < 16; ++k) r[k] = dv[coeff + k * stride];
    for (Index i = 0; i < 4; ++i) wino_b(r + 4 * i, 1, t + 4 * i, 1);
    for (Index j = 0; j < 4; ++j) wino_b(t + j, 4, d + j, 4);
    S* xp = dx + plane;
    for (Index i = 0; i < 4; ++i)
      for (Index j = 0; j < 4; ++j) {
        const Index rr = r0 - 1 + i, cc = c0 - 1 + j;
        if (rr >= 0 && rr < p.h && cc >= 0 && cc < p.w) xp[rr * p.w + cc] += d[4 * i + j];
      }
  });
}

/// y = Aᵀ M A per tile (the output transform), clipped to H x W.
template <class S>
void wino_output(const S* m, const WinogradPlan& p, Index s0, Index ns, S* y) {
  const Index stride = p.o * p.tiles(ns);
  for_each_tile(p, s0, ns, p.o, [&](Index plane, Index coeff, Index r0, Index c0) {
    S r[16], t[8], out[4];
    for (Index k = 0; k < 16; ++k) r[k] = m[coeff + k * stride];
    for (Index j = 0; j < 4; ++j) wino_at(r + j, 4, t + j, 4);  // 2x4
    for (Index i = 0; i < 2; ++i) wino_at(t + 4 * i, 1, out + 2 * i, 1);
    S* yp = y + plane;
    for (Index i = 0; i < 2 && r0 + i < p.h; ++i)
      for (Index j = 0; j < 2 && c0 + j < p.w; ++j) yp[(r0 + i) * p.w + c0 + j] = out[2 * i + j];
  });
}

/// M_ξ (16 x O x T) = A dY Aᵀ per tile (the adjoint of the output transform).
template <class S>
void wino_output_adjoint(const S* dy, const WinogradPlan& p, Index s0, Index ns, S* m) {
  const Index stride = p.o * p.tiles(ns);
  for_each_tile(p, s0, ns, p.o, [&](Index plane, Index coeff, Index r0, Index c0) {
    S g[4], t[8], r[16];
    const S* gp = dy + plane;
    for (Index i = 0; i < 2; ++i)
      for (Index j = 0; j < 2; ++j)
        g[2 * i + j] = (r0 + i < p.h && c0 + j < p.w) ? gp[(r0 + i) * p.w + c0 + j] : S(0);
    for (Index i = 0; i < 2; ++i) wino_a(g + 2 * i, 1, t + 4 * i, 1);  // 2x4
    for (Index j = 0; j < 4; ++j) wino_a(t + j, 4, r + j, 4);          // 4x4
    for (Index k = 0; k < 16; ++k) m[coeff + k * stride] = r[k];
  });
}

// Unchecked kernels on raw NCHW buffers; the public ops and the modules check shapes first.

/// y[n] = W x[n] (+ b): W is O x C, x N x C x HW, y N x O x HW (overwritten).
template <class S>
void conv1x1_forward(const S* x, Index n, Index c, Index hw, const ConstMatrixRef<S>& weight,
                     const S* bias, S* y) {
  if (n == 0 || hw == 0) return;  // an empty output
  const Index o = weight.rows();
  if (hw == 1) {  // one GEMM over the batch: Y (N x O) = X (N x C) Wᵀ
    SampleMap<S> yy(y, n, o);
    tiled_product(yy, ConstSampleMap<S>(x, n, c), weight.transpose(), S(1), false);
    if (bias) yy.rowwise() += Eigen::Map<const Eigen::Matrix<S, 1, Eigen::Dynamic>>(bias, o);
    return;
  }
  parallel_tiles(n, [&](Index i, int) {
    SampleMap<S> yi(y + i * o * hw, o, hw);
    yi.noalias() = weight * ConstSampleMap<S>(x + i * c * hw, c, hw);
    if (bias) yi.colwise() += Eigen::Map<const Eigen::Matrix<S, Eigen::Dynamic, 1>>(bias, o);
  });
}

/// Output channels per block of a 1x1 weight gradient: blocks run in parallel, each summing
/// over the samples in order.
inline constexpr Index kConv1x1RowBlock = 16;

/// dW (+)= Σ_n dy[n] x[n]ᵀ, db (+)= Σ_{n,p} dy[n,:,p], dx[n] (+)= Wᵀ dy[n]; a null pointer skips.
/// `assign` overwrites dW, db and dx instead of adding.
template <class S>
void conv1x1_backward(const S* x, Index n, Index c, Index hw, const ConstMatrixRef<S>& weight,
                      const S* dy, OutMap<S> dweight, S* dbias, S* dx, bool assign) {
  const Index o = weight.rows();
  if (n == 0 || hw == 0) {  // empty sums
    if (assign && dweight.data()) dweight.setZero();
    if (assign && dbias) std::fill(dbias, dbias + o, S(0));
    return;
  }
  if (hw == 1) {
    const ConstSampleMap<S> g(dy, n, o), xx(x, n, c);
    if (dweight.data()) tiled_product(dweight, g.transpose(), xx, S(1), !assign);
    if (dbias) {
      Eigen::Map<Eigen::Matrix<S, 1, Eigen::Dynamic>> db(dbias, o);
      if (assign)
        db = g.colwise().sum();
      else
        db += g.colwise().sum();
    }
    if (dx) tiled_product(SampleMap<S>(dx, n, c), g, weight, S(1), !assign);
    return;
  }
  if (dweight.data() || dbias) {
    const Index blocks = (o + kConv1x1RowBlock - 1) / kConv1x1RowBlock;
    parallel_tiles(blocks, [&](Index b, int) {
      const Index r0 = b * kConv1x1RowBlock, rows = std::min(kConv1x1RowBlock, o - r0);
      if (assign) {
        if (dweight.data()) dweight.middleRows(r0, rows).setZero();
        if (dbias) SampleMap<S>(dbias + r0, rows, 1).setZero();
      }
      for (Index i = 0; i < n; ++i) {
        const ConstSampleMap<S> g(dy + (i * o + r0) * hw, rows, hw);
        if (dweight.data()) {
          dweight.middleRows(r0, rows).noalias() +=
              g * ConstSampleMap<S>(x + i * c * hw, c, hw).transpose();
        }
        if (dbias) SampleMap<S>(dbias + r0, rows, 1) += g.rowwise().sum();
      }
    });
  }
  if (dx) {
    parallel_tiles(n, [&](Index i, int) {
      const ConstSampleMap<S> g(dy + i * o * hw, o, hw);
      SampleMap<S> d(dx + i * c * hw, c, hw);
      if (assign)
        d.noalias() = weight.transpose() * g;
      else
        d.noalias() += weight.transpose() * g;
    });
  }
}

/// The centre tap W[:, c·9 + 4] of a 3x3 weight as an O x C strided view: all a 1x1 input sees.
template <class S, class W>
auto centre_taps(W& weight, Index c) {
  using Mat = std::conditional_t<std::is_const_v<std::remove_pointer_t<decltype(weight.data())>>,
                                 const Matrix<S>, Matrix<S>>;
  return Eigen::Map<Mat, 0, Eigen::Stride<Eigen::Dynamic, 9>>(
      weight.size() ? weight.data() + 4 : weight.data(), weight.rows(), c,
      Eigen::Stride<Eigen::Dynamic, 9>(weight.outerStride(), 9));
}

/// Auto: Winograd pays off when the products dominate its transforms — their cost per tile
/// grows with C + O, the flops saved with C·O — and when padding to whole 2x2 tiles wastes
/// little (7x7 pads to 8x8). Thresholds measured with AVX2 (e.g. C 256 → O 128 at 28x28: 1.3x
/// faster; C 64 → O 16 at 32x32: 1.9x slower).
inline bool use_winograd(Conv3x3Algorithm algorithm, Index c, Index o, Index h, Index w) {
  if (algorithm != Conv3x3Algorithm::Auto) return algorithm == Conv3x3Algorithm::Winograd;
  const double padded = double(2 * ((h + 1) / 2)) * double(2 * ((w + 1) / 2));
  return double(c) * double(o) >= 48.0 * double(c + o) && padded <= 1.15 * double(h * w);
}

/// Makes `ws` hold at least n scalars; it only grows, so one workspace serves the forward and the
/// backward pass of any shape without reallocating once it has reached the largest.
template <class S>
void grow(Matrix<S>& ws, Index n) {
  if (ws.size() < n) ws.resize(1, n);
}

/// y = conv3x3(x; W) for N x C x H x W input and O x 9C weight. `ws` is a workspace reused
/// across calls.
template <class S>
void conv3x3_forward(const S* x, Index n, Index c, Index h, Index w,
                     const ConstMatrixRef<S>& weight, S* y, Matrix<S>& ws,
                     Conv3x3Algorithm algorithm = Conv3x3Algorithm::Auto) {
  const Index o = weight.rows(), hw = h * w;
  if (n == 0 || hw == 0) return;  // an empty output
  if (hw == 1) {                  // only the centre tap meets data: Y (N x O) = X (N x C) W_cᵀ
    tiled_product(SampleMap<S>(y, n, o), ConstSampleMap<S>(x, n, c),
                  centre_taps<S>(weight, c).transpose(), S(1), false);
    return;
  }
  if (!use_winograd(algorithm, c, o, h, w)) {
    grow(ws, max_threads() * 9 * c * hw);
    conv3x3_forward_im2col(x, n, c, h, w, weight, y, ws.data());
    return;
  }
  const WinogradPlan p(c, o, h, w, n);
  const Index tc = p.tiles(p.chunk);
  grow(ws, 16 * (o * c + c * tc + o * tc));
  S* u = ws.data();
  S* v = u + 16 * o * c;
  S* m = v + 16 * c * tc;
  wino_filter(weight, c, u);
  for (Index s0 = 0; s0 < n; s0 += p.chunk) {
    const Index ns = std::min(p.chunk, n - s0), t = p.tiles(ns);
    wino_input(x, p, s0, ns, v);
    parallel_tiles(16, [&](Index k, int) {  // the 16 coefficients' products, independent
      SampleMap<S>(m + k * o * t, o, t).noalias() =
          ConstSampleMap<S>(u + k * o * c, o, c) * ConstSampleMap<S>(v + k * c * t, c, t);
    });
    wino_output(m, p, s0, ns, y);
  }
}

/// dW (+)= ∂/∂W ⟨dy, conv3x3(x; W)⟩, dx (+)= ∂/∂x; null pointers skip. `assign` overwrites dW
/// and dx. `ws` is a workspace reused across calls.
template <class S>
void conv3x3_backward(const S* x, Index n, Index c, Index h, Index w,
                      const ConstMatrixRef<S>& weight, const S* dy, OutMap<S> dweight, S* dx,
                      bool assign, Matrix<S>& ws,
                      Conv3x3Algorithm algorithm = Conv3x3Algorithm::Auto) {
  const Index o = weight.rows(), hw = h * w;
  if (assign) {
    if (dweight.data()) dweight.setZero();
    if (dx) std::fill(dx, dx + n * c * hw, S(0));
  }
  if (n == 0 || hw == 0) return;  // nothing to add
  if (hw == 1) {
    const ConstSampleMap<S> g(dy, n, o);
    if (dweight.data())
      tiled_product(centre_taps<S>(dweight, c), g.transpose(), ConstSampleMap<S>(x, n, c), S(1),
                    true);
    if (dx) tiled_product(SampleMap<S>(dx, n, c), g, centre_taps<S>(weight, c), S(1), true);
    return;
  }
  if (!use_winograd(algorithm, c, o, h, w)) {
    grow(ws, max_threads() * 18 * c * hw + sample_groups(n) * o * 9 * c);
    conv3x3_backward_im2col(x, n, c, h, w, weight, dy, dweight, dx, ws.data());
    return;
  }
  const WinogradPlan p(c, o, h, w, n);
  const Index tc = p.tiles(p.chunk);
  grow(ws, 16 * (2 * o * c + 2 * c * tc + o * tc));
  S* u = ws.data();
  S* du = u + 16 * o * c;
  S* v = du + 16 * o * c;
  S* m = v + 16 * c * tc;
  S* dv = m + 16 * o * tc;
  wino_filter(weight, c, u);
  SampleMap<S>(du, 16 * o, c).setZero();
  for (Index s0 = 0; s0 < n; s0 += p.chunk) {
    const Index ns = std::min(p.chunk, n - s0), t = p.tiles(ns);
    wino_output_adjoint(dy, p, s0, ns, m);
    if (dweight.data()) {
      wino_input(x, p, s0, ns, v);
      parallel_tiles(16, [&](Index k, int) {
        SampleMap<S>(du + k * o * c, o, c).noalias() +=
            ConstSampleMap<S>(m + k * o * t, o, t) *
            ConstSampleMap<S>(v + k * c * t, c, t).transpose();
      });
    }
    if (dx) {
      parallel_tiles(16, [&](Index k, int) {
        SampleMap<S>(dv + k * c * t, c, t).noalias() =
            ConstSampleMap<S>(u + k * o * c, o, c).transpose() *
            ConstSampleMap<S>(m + k * o * t, o, t);
      });
      wino_input_adjoint(dv, p, s0, ns, dx);
    }
  }
  if (dweight.data()) wino_filter_adjoint(du, o, c, dweight);
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

MMKD_EXTERN_FUNCTION(conv1x1_forward)
MMKD_EXTERN_FUNCTION(conv1x1_backward)
MMKD_EXTERN_FUNCTION(conv3x3_forward)
MMKD_EXTERN_FUNCTION(conv3x3_backward)

}  // namespace detail

/// 1x1 convolution y[n,o,p] = Σ_i W[o,i] x[n,i,p] + b[o]. x: N x C x H x W; weight: O x C;
/// bias: 1 x O, or empty for none; y: N x O x H x W, overwritten.
template <class S>
void conv2d_1x1(const ConstTensor4Ref<detail::NonDeduced<S>>& x,
                const ConstMatrixRef<detail::NonDeduced<S>>& weight,
                const ConstMatrixRef<detail::NonDeduced<S>>& bias,
                Tensor4Ref<detail::NonDeduced<S>> y) {
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
  if (dweight.size())
    detail::check_shape(op, "dweight", dweight, weight.rows(), weight.cols(), "same as weight");
  if (dbias.size()) detail::check_shape(op, "dbias", dbias, 1, weight.rows(), "1 x out_channels");
  detail::conv1x1_backward<S>(x.data(), n, x.dimension(1), h * w, weight, dy.data(),
                              detail::out_map(dweight), dbias.size() ? dbias.data() : nullptr,
                              dx.size() ? dx.data() : nullptr, false);
}

/// 3x3 convolution, stride 1, zero padding 1, no bias:
/// y[n,o,h,w] = Σ_{i,a,b} W[o, 9i + 3a + b] x[n, i, h + a − 1, w + b − 1].
/// x: N x C x H x W; weight: O x 9C; y: N x O x H x W, overwritten. `workspace` is reused
/// across calls (it only grows: one workspace can serve the forward and backward passes). A 1x1
/// input is valid: only the centre taps meet data. `algorithm` picks im2col + GEMM or Winograd's
/// F(2x2, 3x3) (see the note above); Auto chooses per shape.
template <class S>
void conv2d_3x3(const ConstTensor4Ref<detail::NonDeduced<S>>& x,
                const ConstMatrixRef<detail::NonDeduced<S>>& weight,
                Tensor4Ref<detail::NonDeduced<S>> y, Matrix<detail::NonDeduced<S>>& workspace,
                Conv3x3Algorithm algorithm = Conv3x3Algorithm::Auto) {
  static constexpr const char* op = "conv2d_3x3";
  detail::check_enum(op, "algorithm", algorithm, 3);
  detail::check_conv_args<S>(op, x, weight, 9);
  detail::check_shape4(op, "y", y, x.dimension(0), weight.rows(), x.dimension(2), x.dimension(3),
                       "N x out_channels x H x W");
  detail::conv3x3_forward<S>(x.data(), x.dimension(0), x.dimension(1), x.dimension(2),
                             x.dimension(3), weight, y.data(), workspace, algorithm);
}

/// Backward of `conv2d_3x3`: adds dL/dx and dL/dW to the non-empty arguments among dx
/// (N x C x H x W) and dweight (O x 9C). The workspace is reused across calls.
template <class S>
void conv2d_3x3_backward(const ConstTensor4Ref<detail::NonDeduced<S>>& x,
                         const ConstMatrixRef<detail::NonDeduced<S>>& weight,
                         const ConstTensor4Ref<detail::NonDeduced<S>>& dy,
                         Tensor4Ref<detail::NonDeduced<S>> dx,
                         MatrixRef<detail::NonDeduced<S>> dweight,
                         Matrix<detail::NonDeduced<S>>& workspace,
                         Conv3x3Algorithm algorithm = Conv3x3Algorithm::Auto) {
  static constexpr const char* op = "conv2d_3x3_backward";
  detail::check_enum(op, "algorithm", algorithm, 3);
  detail::check_conv_args<S>(op, x, weight, 9);
  const Index n = x.dimension(0), h = x.dimension(2), w = x.dimension(3);
  detail::check_shape4(op, "dy", dy, n, weight.rows(), h, w, "N x out_channels x H x W");
  if (dx.size()) detail::check_shape4(op, "dx", dx, n, x.dimension(1), h, w, "same as x");
  if (dweight.size())
    detail::check_shape(op, "dweight", dweight, weight.rows(), weight.cols(), "same as weight");
  detail::conv3x3_backward<S>(x.data(), n, x.dimension(1), h, w, weight, dy.data(),
                              detail::out_map(dweight), dx.size() ? dx.data() : nullptr, false,
                              workspace, algorithm);
}

}  // namespace mmkd
