#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>

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

#if MMKD_HAS_OPENMP

/// Back-off from parallel regions while the cores are contended. When other processes keep the
/// cores busy, a thread of a region can wait a scheduler slice (milliseconds) for a core, and the
/// region's closing barrier waits with it: a short region then costs many times its work. Each
/// region compares its wall time with the sum of its threads' working times (about what one
/// thread would have needed); a region slower than that by more than 100 µs sends every region
/// of the process to one thread for a back-off period (10 ms, doubled after each slow region up
/// to 1 s, reset by a fast one). Results never depend on it: every region gives the same bits on
/// any number of threads.
class ContentionGuard {
 public:
  /// Adaptive as above; `Parallel` never backs off and `Serial` always does (for tests).
  enum class Mode { Adaptive, Parallel, Serial };

  static std::int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  static void set_mode(Mode m) { mode_.store(m, std::memory_order_relaxed); }
  /// Ends any back-off and restarts the period at its first length.
  static void reset() {
    until_.store(0, std::memory_order_relaxed);
    backoff_.store(kFirstBackoff, std::memory_order_relaxed);
  }
  /// True while backing off: the caller runs its region on one thread.
  static bool backing_off() {
    switch (mode_.load(std::memory_order_relaxed)) {
      case Mode::Parallel:
        return false;
      case Mode::Serial:
        return true;
      default:
        return now_ns() < until_.load(std::memory_order_relaxed);
    }
  }
  /// Records a region that took `wall_ns` while its threads worked `busy_ns` in all.
  static void record(std::int64_t wall_ns, std::int64_t busy_ns) {
    constexpr std::int64_t slack = 100000, longest = 1000000000;
    if (wall_ns <= busy_ns + slack) {
      backoff_.store(kFirstBackoff, std::memory_order_relaxed);
      return;
    }
    const std::int64_t b = backoff_.load(std::memory_order_relaxed);
    until_.store(now_ns() + b, std::memory_order_relaxed);
    backoff_.store(std::min(2 * b, longest), std::memory_order_relaxed);
  }

 private:
  static inline std::atomic<Mode> mode_{Mode::Adaptive};
  static inline std::atomic<std::int64_t> until_{0};
  static constexpr std::int64_t kFirstBackoff = 10000000;
  static inline std::atomic<std::int64_t> backoff_{kFirstBackoff};
};

/// Runs f() on the calling thread with OpenMP's thread count set to 1 for its duration, so that
/// Eigen's products inside f stay single-threaded, as they are inside a region.
template <class F>
void one_thread(F&& f) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  f();
  omp_set_num_threads(saved);
}

/// Runs the timed region: body(thread) on every thread of the team, then records the region's
/// wall time and its threads' summed working time with the contention guard.
template <class Body>
void timed_region(Body&& body) {
  std::atomic<std::int64_t> busy{0};
  const std::int64_t t0 = ContentionGuard::now_ns();
#pragma omp parallel
  {
    const std::int64_t b0 = ContentionGuard::now_ns();
    body(omp_get_thread_num());
    busy.fetch_add(ContentionGuard::now_ns() - b0, std::memory_order_relaxed);
  }
  ContentionGuard::record(ContentionGuard::now_ns() - t0, busy.load(std::memory_order_relaxed));
}

/// Calls f(i, thread) for i in [0, n) in a timed region, in contiguous blocks per thread or
/// dealt round-robin; on the calling thread (with one OpenMP thread) while the guard backs off.
template <class F>
void guarded_loop(Index n, bool round_robin, F&& f) {
  if (ContentionGuard::backing_off()) {
    one_thread([&] {
      for (Index i = 0; i < n; ++i) f(i, 0);
    });
    return;
  }
  timed_region([&](int thread) {
    if (round_robin) {
#pragma omp for schedule(static, 1) nowait
      for (Index i = 0; i < n; ++i) f(i, thread);
    } else {
#pragma omp for schedule(static) nowait
      for (Index i = 0; i < n; ++i) f(i, thread);
    }
  });
}

#endif

/// Calls f(i, thread) for i in [0, n). `thread` < max_threads() indexes per-thread scratch.
/// f must not throw and must only write state owned by row i or by `thread`.
template <class F>
void parallel_for(Index n, Index work_per_item, F&& f) {
#if MMKD_HAS_OPENMP
  if (n > 1 && n * work_per_item >= kParallelGrain && omp_get_max_threads() > 1 &&
      !omp_in_parallel()) {
    guarded_loop(n, false, f);
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
