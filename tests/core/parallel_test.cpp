#include "support.hpp"

#include <vector>

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

#if MMKD_HAS_OPENMP
TEST_CASE("LogitKD gives bit-identical results with 1 and 2 threads", "[core][parallel]") {
  const Matrix<float> s = random_matrix<float>(512, 300, 1, 3),
                      t = random_matrix<float>(512, 300, 2, 3);
  auto run = [&](int threads, Matrix<float>& g) {
    omp_set_num_threads(threads);
    mmkd::LogitKD<float> kd;
    g = Matrix<float>::Zero(512, 300);
    return kd.value_and_grad(s, t, g);
  };
  Matrix<float> g1, g2;
  const float v1 = run(1, g1), v2 = run(2, g2);
  omp_set_num_threads(2);
  CHECK(v1 == v2);
  CHECK(bit_identical(g1, g2));
}
#endif
