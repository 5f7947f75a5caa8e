#pragma once

// The 1-thread versus 2-thread comparison shared by the parallel tests: one translation unit per
// family, so a change to one family's header recompiles only its part.

#include <vector>

#include "support.hpp"

#if MMKD_HAS_OPENMP
namespace mmkd_test {

// Runs f (which returns the loss and fills its gradient buffers) with 1 and then 2 OpenMP
// threads, with Eigen's own threading left at its default, and requires bit-identical values and
// gradients.
template <class T = double, class F>
void same_with_1_and_2_threads(F&& f) {
  std::vector<Matrix<T>> g1, g2;
  omp_set_num_threads(1);
  const T v1 = f(g1);
  omp_set_num_threads(2);
  const T v2 = f(g2);
  CHECK(v1 == v2);
  REQUIRE(g1.size() == g2.size());
  for (std::size_t k = 0; k < g1.size(); ++k) CHECK(bit_identical(g1[k], g2[k]));
}

}  // namespace mmkd_test
#endif
