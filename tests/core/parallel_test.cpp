// The parallel loop itself; each family's 1- versus 2-thread checks are in
// parallel_<family>_test.cpp.

#include <vector>

#include "support.hpp"

using namespace mmkd_test;

TEST_CASE("parallel_for visits every row exactly once", "[core][parallel]") {
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
