#pragma once

// Spatial resampling of NCHW feature maps with PyTorch's exact index rules, and their backward:
// nearest resize (`F.interpolate(mode="nearest", size=...)`, the legacy rule, not
// "nearest-exact") and adaptive average pooling (`F.adaptive_avg_pool2d`, overlapping bins when
// the sizes do not divide). The output size is the size of the output tensor. Forward ops
// overwrite their output, backward ops add to the input gradient. The scalar type is explicit:
// `mmkd::nearest_resize<float>(x, y)`.

#include <cmath>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/parallel.hpp"
#include "mmkd/core/tensor.hpp"
#include "mmkd/core/types.hpp"

namespace mmkd {
namespace detail {

/// PyTorch's nearest source index along one axis (ATen `nearest_idx`): identity for equal sizes,
/// o >> 1 for exact doubling, else min(floor(o · (in/out)), in − 1) with the scale in float.
inline Index nearest_source(Index o, Index in, Index out) {
  if (out == in) return o;
  if (out == 2 * in) return o >> 1;
  const float scale = float(in) / float(out);
  const Index s = Index(std::floor(float(o) * scale));
  return s < in - 1 ? s : in - 1;
}

/// Adaptive pooling bin [start, end) of output cell i (ATen `start_index` / `end_index`).
inline Index pool_start(Index i, Index in, Index out) {
  return (i * in) / out;
}
inline Index pool_end(Index i, Index in, Index out) {
  return ((i + 1) * in + out - 1) / out;
}

/// y (P planes of oh x ow) = nearest resize of x (P planes of h x w).
template <class S>
void nearest_forward(const S* x, Index planes, Index h, Index w, S* y, Index oh, Index ow) {
  parallel_for(planes, oh * ow, [&](Index p, int) {
    const S* xp = x + p * h * w;
    S* yp = y + p * oh * ow;
    for (Index r = 0; r < oh; ++r) {
      const S* src = xp + nearest_source(r, h, oh) * w;
      S* dst = yp + r * ow;
      if (ow == w) {
        std::copy(src, src + w, dst);
      } else {
        for (Index c = 0; c < ow; ++c) dst[c] = src[nearest_source(c, w, ow)];
      }
    }
  });
}

/// dx (+)= scatter-add of dy through the nearest index map.
template <class S>
void nearest_backward(const S* dy, Index planes, Index h, Index w, S* dx, Index oh, Index ow) {
  parallel_for(planes, oh * ow, [&](Index p, int) {
    const S* gp = dy + p * oh * ow;
    S* dp = dx + p * h * w;
    for (Index r = 0; r < oh; ++r) {
      S* dst = dp + nearest_source(r, h, oh) * w;
      const S* src = gp + r * ow;
      for (Index c = 0; c < ow; ++c) dst[nearest_source(c, w, ow)] += src[c];
    }
  });
}

/// The r x c block at p of a plane with row stride w (Eigen vectorises along its rows).
template <class S>
using PlaneBlock = Eigen::Map<Eigen::Array<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, 0,
                              Eigen::OuterStride<>>;
template <class S>
using ConstPlaneBlock =
    Eigen::Map<const Eigen::Array<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, 0,
               Eigen::OuterStride<>>;

/// y = adaptive average pooling of x to oh x ow per plane.
template <class S>
void pool_forward(const S* x, Index planes, Index h, Index w, S* y, Index oh, Index ow) {
  for (Index p = 0; p < planes; ++p) {
    const S* xp = x + p * h * w;
    S* yp = y + p * oh * ow;
    for (Index i = 0; i < oh; ++i) {
      const Index r0 = pool_start(i, h, oh), r1 = pool_end(i, h, oh);
      for (Index j = 0; j < ow; ++j) {
        const Index c0 = pool_start(j, w, ow), c1 = pool_end(j, w, ow);
        const ConstPlaneBlock<S> cell(xp + r0 * w + c0, r1 - r0, c1 - c0, Eigen::OuterStride<>(w));
        yp[i * ow + j] = cell.sum() / S((r1 - r0) * (c1 - c0));
      }
    }
  }
}

/// dx (+)= dy[cell] / area(cell) on every element of every (possibly overlapping) cell.
template <class S>
void pool_backward(const S* dy, Index planes, Index h, Index w, S* dx, Index oh, Index ow) {
  for (Index p = 0; p < planes; ++p) {
    const S* gp = dy + p * oh * ow;
    S* dp = dx + p * h * w;
    for (Index i = 0; i < oh; ++i) {
      const Index r0 = pool_start(i, h, oh), r1 = pool_end(i, h, oh);
      for (Index j = 0; j < ow; ++j) {
        const Index c0 = pool_start(j, w, ow), c1 = pool_end(j, w, ow);
        PlaneBlock<S>(dp + r0 * w + c0, r1 - r0, c1 - c0, Eigen::OuterStride<>(w)) +=
            gp[i * ow + j] / S((r1 - r0) * (c1 - c0));
      }
    }
  }
}

template <class X, class Y>
void check_resample(const char* op, const char* xname, const X& x, const char* yname, const Y& y) {
  if (x.dimension(0) != y.dimension(0) || x.dimension(1) != y.dimension(1)) {
    throw_invalid(op,
                  std::string(yname) + " has shape " +
                      shape_str4(y.dimension(0), y.dimension(1), y.dimension(2), y.dimension(3)) +
                      ", expected " + std::to_string(x.dimension(0)) + "x" +
                      std::to_string(x.dimension(1)) + "xHxW (same N and C as " + xname + ")");
  }
  if (x.dimension(2) < 1 || x.dimension(3) < 1 || y.dimension(2) < 1 || y.dimension(3) < 1) {
    throw_invalid(op, "spatial sizes must be >= 1, got " + std::string(xname) + " " +
                          shape_str(x.dimension(2), x.dimension(3)) + " and " + yname + " " +
                          shape_str(y.dimension(2), y.dimension(3)));
  }
}

MMKD_EXTERN_FUNCTION(nearest_forward)
MMKD_EXTERN_FUNCTION(nearest_backward)
MMKD_EXTERN_FUNCTION(pool_forward)
MMKD_EXTERN_FUNCTION(pool_backward)

}  // namespace detail

/// Nearest resize of x (N x C x H x W) to y's size (N x C x H' x W'), y overwritten:
/// y[.., i, j] = x[.., src(i, H, H'), src(j, W, W')] with PyTorch's legacy index rule.
template <class S>
void nearest_resize(const ConstTensor4Ref<detail::NonDeduced<S>>& x,
                    Tensor4Ref<detail::NonDeduced<S>> y) {
  detail::check_resample("nearest_resize", "x", x, "y", y);
  detail::nearest_forward<S>(x.data(), x.dimension(0) * x.dimension(1), x.dimension(2),
                             x.dimension(3), y.data(), y.dimension(2), y.dimension(3));
}

/// Backward of `nearest_resize`: dx (N x C x H x W) += the scatter-add of dy (N x C x H' x W').
template <class S>
void nearest_resize_backward(const ConstTensor4Ref<detail::NonDeduced<S>>& dy,
                             Tensor4Ref<detail::NonDeduced<S>> dx) {
  detail::check_resample("nearest_resize_backward", "dx", dx, "dy", dy);
  detail::nearest_backward<S>(dy.data(), dx.dimension(0) * dx.dimension(1), dx.dimension(2),
                              dx.dimension(3), dx.data(), dy.dimension(2), dy.dimension(3));
}

/// Adaptive average pooling of x (N x C x H x W) to y's size (N x C x H' x W'), y overwritten.
/// Cell i along an axis covers [⌊i·In/Out⌋, ⌈(i+1)·In/Out⌉): bins overlap when Out ∤ In.
template <class S>
void adaptive_avg_pool2d(const ConstTensor4Ref<detail::NonDeduced<S>>& x,
                         Tensor4Ref<detail::NonDeduced<S>> y) {
  detail::check_resample("adaptive_avg_pool2d", "x", x, "y", y);
  detail::pool_forward<S>(x.data(), x.dimension(0) * x.dimension(1), x.dimension(2), x.dimension(3),
                          y.data(), y.dimension(2), y.dimension(3));
}

/// Backward of `adaptive_avg_pool2d`: dx += dy[cell] / area(cell) over every cell holding it.
template <class S>
void adaptive_avg_pool2d_backward(const ConstTensor4Ref<detail::NonDeduced<S>>& dy,
                                  Tensor4Ref<detail::NonDeduced<S>> dx) {
  detail::check_resample("adaptive_avg_pool2d_backward", "dx", dx, "dy", dy);
  detail::pool_backward<S>(dy.data(), dx.dimension(0) * dx.dimension(1), dx.dimension(2),
                           dx.dimension(3), dx.data(), dy.dimension(2), dy.dimension(3));
}

}  // namespace mmkd
