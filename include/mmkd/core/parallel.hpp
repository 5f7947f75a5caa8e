#pragma once

#include <algorithm>

#include "mmkd/core/types.hpp"

#if defined(MMKD_OPENMP) && defined(_OPENMP)
#include <omp.h>
#define MMKD_HAS_OPENMP 1
#else
#define MMKD_HAS_OPENMP 0
#endif

namespace mmkd {

/// Threads a parallel loop of mmkd may use: `omp_get_max_threads()` when mmkd is built with
/// `MMKD_OPENMP`, else 1. Results never depend on it: every loop writes per-row results and
/// reductions over rows run serially, in row order.
inline int max_threads() {
#if MMKD_HAS_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

namespace detail {

/// Below this many elements of work a loop stays serial (thread start-up would dominate).
inline constexpr Index kParallelGrain = Index(1) << 15;

/// Calls f(i, thread) for i in [0, n). `thread` < max_threads() indexes per-thread scratch.
/// f must not throw and must only write state owned by row i or by `thread`.
template <class F>
void parallel_for(Index n, Index work_per_item, F&& f) {
#if MMKD_HAS_OPENMP
  if (n > 1 && n * work_per_item >= kParallelGrain && omp_get_max_threads() > 1 &&
      !omp_in_parallel()) {
#pragma omp parallel for schedule(static)
    for (Index i = 0; i < n; ++i) f(i, omp_get_thread_num());
    return;
  }
#else
  (void)work_per_item;
#endif
  for (Index i = 0; i < n; ++i) f(i, 0);
}

/// Calls f(begin, length) over [0, n) in chunks of 2^14 elements, in parallel: for elementwise
/// passes over whole tensors.
template <class F>
void parallel_chunks(Index n, F&& f) {
  constexpr Index chunk = Index(1) << 14;
  parallel_for((n + chunk - 1) / chunk, chunk, [&](Index q, int) {
    const Index begin = q * chunk;
    f(begin, std::min(chunk, n - begin));
  });
}

/// dst[k] += src[k] for k < n, in parallel.
template <class S>
void parallel_add(S* dst, const S* src, Index n) {
  parallel_chunks(n, [&](Index b, Index len) {
    Eigen::Map<Eigen::Array<S, Eigen::Dynamic, 1>>(dst + b, len) +=
        Eigen::Map<const Eigen::Array<S, Eigen::Dynamic, 1>>(src + b, len);
  });
}

/// dst[k] = src[k] (src null: 0) for k < n, in parallel.
template <class S>
void parallel_assign(S* dst, const S* src, Index n) {
  parallel_chunks(n, [&](Index b, Index len) {
    if (src)
      std::copy(src + b, src + b + len, dst + b);
    else
      std::fill(dst + b, dst + b + len, S(0));
  });
}

}  // namespace detail
}  // namespace mmkd
