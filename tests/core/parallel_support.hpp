#pragma once

// The 1-thread versus 2-thread comparison shared by the parallel tests: one translation unit per
// family, so a change to one family's header recompiles only its part.

#include <vector>

#include "support.hpp"

#if MMKD_HAS_OPENMP
namespace mmkd_test {

// Sets the contention guard's mode for a scope, and 2 OpenMP threads and the adaptive mode after.
struct GuardMode {
  explicit GuardMode(mmkd::detail::ContentionGuard::Mode m) {
    mmkd::detail::ContentionGuard::set_mode(m);
  }
  ~GuardMode() {
    mmkd::detail::ContentionGuard::set_mode(mmkd::detail::ContentionGuard::Mode::Adaptive);
    omp_set_num_threads(2);
  }
  GuardMode(const GuardMode&) = delete;
  GuardMode& operator=(const GuardMode&) = delete;
};

// Runs f (which returns the loss and fills its gradient buffers) with 1 and then 2 OpenMP
// threads, with Eigen's own threading left at its default, and requires bit-identical values and
// gradients. The 2-thread run is made twice: with every region on both threads (the contention
// guard off, whatever the machine's load), and with the guard backing off, where mmkd's loops and
// products run on the calling thread.
template <class T = double, class F>
void same_with_1_and_2_threads(F&& f) {
  using Mode = mmkd::detail::ContentionGuard::Mode;
  std::vector<Matrix<T>> g1, g2, g3;
  omp_set_num_threads(1);
  const T v1 = f(g1);
  omp_set_num_threads(2);
  T v2, v3;
  {
    const GuardMode parallel(Mode::Parallel);
    v2 = f(g2);
  }
  {
    const GuardMode serial(Mode::Serial);
    v3 = f(g3);
  }
  CHECK(omp_get_max_threads() == 2);
  CHECK(v1 == v2);
  CHECK(v1 == v3);
  REQUIRE(g1.size() == g2.size());
  REQUIRE(g1.size() == g3.size());
  for (std::size_t k = 0; k < g1.size(); ++k) {
    CHECK(bit_identical(g1[k], g2[k]));
    CHECK(bit_identical(g1[k], g3[k]));
  }
}

}  // namespace mmkd_test
#endif
