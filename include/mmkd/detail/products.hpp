#pragma once

// Matrix products split into a fixed grid of tiles that run on mmkd's threads. Each tile is one
// single-threaded Eigen product whose shape depends only on the problem's shape, so the result is
// bit-identical for any number of threads: Eigen's own parallel GEMM changes its blocking with the
// thread count, and its symmetric products (rankUpdate, selfadjointView products) do not run in
// parallel at all.

#include <algorithm>

#include "mmkd/core/parallel.hpp"
#include "mmkd/core/types.hpp"

namespace mmkd {
namespace detail {

/// Products with fewer multiply-adds than this are one tile: splitting would only add overhead.
inline constexpr double kTiledProductMin = double(Index(1) << 23);

/// Tile edge along a dimension of the output: 256, where Eigen's kernel runs at its full rate
/// (128 loses 10–20%) and a 2048-wide output still gives 8 tiles to share out.
inline Index product_tile(Index dim, bool split) {
  return (!split || dim <= 256) ? std::max<Index>(dim, 1) : 256;
}

/// Calls f(t, thread) for t in [0, count), items dealt round-robin (the triangle tiles of a rank
/// update differ in cost); thread < max_threads() indexes per-thread scratch. Every product in f
/// runs single-threaded, inside a parallel region or (one tile, or cores contended) on the
/// calling thread with OpenMP's thread count set to 1, so it has the same blocking for any number
/// of threads.
template <class F>
void parallel_tiles(Index count, F&& f) {
#if MMKD_HAS_OPENMP
  if (omp_get_max_threads() > 1 && !omp_in_parallel()) {
    if (count > 1) {
      guarded_loop(count, true, f);
    } else {
      one_thread([&] {
        if (count == 1) f(0, 0);
      });
    }
    return;
  }
#endif
  for (Index t = 0; t < count; ++t) f(t, 0);
}

/// dst = alpha · lhs · rhs, or dst += alpha · lhs · rhs with `add`, in tiles of dst. lhs and rhs
/// are matrices or views (blocks, transposes); dst must not alias them.
template <class Dst, class Lhs, class Rhs, class S>
void tiled_product(Dst&& dst, const Lhs& lhs, const Rhs& rhs, S alpha, bool add) {
  const Index m = dst.rows(), n = dst.cols(), k = lhs.cols();
  const bool split = double(m) * double(n) * double(k) > kTiledProductMin;
  const Index tm = product_tile(m, split), tn = product_tile(n, split);
  const Index rows = (m + tm - 1) / tm, cols = (n + tn - 1) / tn;
  parallel_tiles(rows * cols, [&](Index t, int) {
    const Index r0 = (t / cols) * tm, c0 = (t % cols) * tn;
    const Index rb = std::min(tm, m - r0), cb = std::min(tn, n - c0);
    auto d = dst.block(r0, c0, rb, cb);
    if (rb == 1) {
      // A one-row tile as the matrix-vector product dᵀ = rhsᵀ lhsᵀ: as a matrix product, Eigen
      // would slice the row out of alpha · lhs and copy it to the heap.
      auto dv = d.row(0).transpose();
      const auto prod = rhs.middleCols(c0, cb).transpose() * lhs.row(r0).transpose();
      if (add) {
        dv.noalias() += alpha * prod;
      } else {
        dv.noalias() = alpha * prod;
      }
    } else if (add) {
      d.noalias() += alpha * (lhs.middleRows(r0, rb) * rhs.middleCols(c0, cb));
    } else {
      d.noalias() = alpha * (lhs.middleRows(r0, rb) * rhs.middleCols(c0, cb));
    }
  });
}

/// The lower triangle (diagonal included) of c (p x p) += alpha · x xᵀ, x p x k: tiles on and
/// below the diagonal, the diagonal ones by Eigen's rank update. The strict upper triangle is not
/// touched.
template <class C, class X, class S>
void tiled_rank_update(C&& c, const X& x, S alpha) {
  const Index p = c.rows(), k = x.cols();
  const bool split = double(p) * double(p) * double(k) / 2 > kTiledProductMin;
  const Index tile = product_tile(p, split), nb = (p + tile - 1) / tile;
  parallel_tiles(nb * (nb + 1) / 2, [&](Index t, int) {
    Index bi = 0;  // tile t is (bi, bj) in the row-by-row order of the lower triangle
    while ((bi + 1) * (bi + 2) / 2 <= t) ++bi;
    const Index bj = t - bi * (bi + 1) / 2;
    const Index r0 = bi * tile, c0 = bj * tile;
    const Index rb = std::min(tile, p - r0), cb = std::min(tile, p - c0);
    if (bi == bj) {
      c.block(r0, r0, rb, rb)
          .template selfadjointView<Eigen::Lower>()
          .rankUpdate(x.middleRows(r0, rb), alpha);
    } else {
      c.block(r0, c0, rb, cb).noalias() +=
          alpha * (x.middleRows(r0, rb) * x.middleRows(c0, cb).transpose());
    }
  });
}

/// dst (p x q) = alpha · sym(l) · x, or += with `add`, where sym(l) is the symmetric p x p matrix
/// whose lower triangle l holds (its strict upper triangle is not read) and x is p x q. Each
/// output tile sums its row of l's tiles in a fixed order.
template <class Dst, class L, class X, class S>
void tiled_symmetric_product(Dst&& dst, const L& l, const X& x, S alpha, bool add) {
  const Index p = dst.rows(), q = dst.cols();
  const bool split = double(p) * double(p) * double(q) > kTiledProductMin;
  const Index tp = product_tile(p, split), tq = product_tile(q, split);
  const Index nb = (p + tp - 1) / tp, cols = (q + tq - 1) / tq;
  parallel_tiles(nb * cols, [&](Index t, int) {
    const Index bi = t / cols, r0 = bi * tp, c0 = (t % cols) * tq;
    const Index rb = std::min(tp, p - r0), cb = std::min(tq, q - c0);
    auto d = dst.block(r0, c0, rb, cb);
    if (!add) d.setZero();
    for (Index bj = 0; bj < nb; ++bj) {
      const Index j0 = bj * tp, jb = std::min(tp, p - j0);
      const auto xj = x.block(j0, c0, jb, cb);
      if (bj < bi) {
        d.noalias() += alpha * (l.block(r0, j0, rb, jb) * xj);
      } else if (bj == bi) {
        d.noalias() +=
            alpha * (l.block(r0, r0, rb, rb).template selfadjointView<Eigen::Lower>() * xj);
      } else {
        d.noalias() += alpha * (l.block(j0, r0, jb, rb).transpose() * xj);
      }
    }
  });
}

}  // namespace detail
}  // namespace mmkd
