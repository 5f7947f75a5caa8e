// The parallel loop itself; each family's 1- versus 2-thread checks are in
// parallel_<family>_test.cpp.

#include <algorithm>
#include <vector>

#include <mmkd/detail/products.hpp>

#include "core/parallel_support.hpp"

using namespace mmkd_test;

TEST_CASE("parallel_for visits every row exactly once", "[core][parallel]") {
#if MMKD_HAS_OPENMP
  using Mode = mmkd::detail::ContentionGuard::Mode;
  const Mode mode = GENERATE(Mode::Parallel, Mode::Serial);
  const GuardMode guard(mode);
#endif
  for (Index n : {0, 1, 7, 5000}) {
    std::vector<int> hits(std::size_t(n), 0);
    std::vector<int> bad_thread(std::size_t(n), 0);
    mmkd::detail::parallel_for(n, 100, [&](Index i, int thread) {
      hits[std::size_t(i)] += 1;
      bad_thread[std::size_t(i)] = (thread < 0 || thread >= mmkd::max_threads()) ? 1 : 0;
    });
    for (Index i = 0; i < n; ++i) {
      CHECK(hits[std::size_t(i)] == 1);
      CHECK(bad_thread[std::size_t(i)] == 0);
    }
  }
}

#if MMKD_HAS_OPENMP
TEST_CASE("The contention guard backs off after a slow region and not after a fast one",
          "[core][parallel]") {
  using Guard = mmkd::detail::ContentionGuard;
  Guard::reset();
  Guard::record(1000000, 999000);  // 1 ms of wall time for 0.999 ms of work: not slow
  CHECK_FALSE(Guard::backing_off());
  // Eight slow regions in a row: the back-off has doubled to 1.28 s, so it cannot have expired
  // by the check below however slow the machine.
  for (int k = 0; k < 8; ++k) Guard::record(5000000, 1000000);
  CHECK(Guard::backing_off());
  // Backing off: loops and products run on the calling thread with one OpenMP thread, and the
  // caller's thread count is restored after.
  omp_set_num_threads(2);
  int inside = 0;
  std::vector<int> threads(64, -1);
  mmkd::detail::parallel_for(64, 1 << 12, [&](Index i, int thread) {
    threads[std::size_t(i)] = thread;
    inside = std::max(inside, omp_get_max_threads());
  });
  CHECK(inside == 1);
  CHECK(std::count(threads.begin(), threads.end(), 0) == 64);
  CHECK(omp_get_max_threads() == 2);
  Guard::reset();
  CHECK_FALSE(Guard::backing_off());
}

TEST_CASE("A one-tile product runs on the calling thread with one OpenMP thread",
          "[core][parallel]") {
  omp_set_num_threads(2);
  const GuardMode guard(mmkd::detail::ContentionGuard::Mode::Parallel);
  int in_parallel = -1, max_inside = -1;
  mmkd::detail::parallel_tiles(1, [&](Index, int) {
    in_parallel = omp_in_parallel();
    max_inside = omp_get_max_threads();
  });
  CHECK(in_parallel == 0);
  CHECK(max_inside == 1);
  CHECK(omp_get_max_threads() == 2);
}
#endif
