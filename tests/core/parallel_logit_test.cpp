// Logit losses: bit-identical values and gradients with 1 and 2 OpenMP threads.

#include <mmkd/logit/cross_entropy.hpp>
#include <mmkd/logit/decoupled_kd.hpp>
#include <mmkd/logit/logit_kd.hpp>

#include "core/parallel_support.hpp"

#if MMKD_HAS_OPENMP
using namespace mmkd_test;

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

TEST_CASE("logit losses give bit-identical results with 1 and 2 threads", "[core][parallel]") {
  // Sizes large enough for mmkd's loops to run in parallel (rows x work >= 2^15).
  const Index n = 512, c = 96;
  const Matrix<double> s = random_matrix<double>(n, c, 1, 3), t = random_matrix<double>(n, c, 2, 3);
  const mmkd::Labels y = random_labels(n, c, 3);
  same_with_1_and_2_threads([&](std::vector<Matrix<double>>& g) {
    g.assign(3, Matrix<double>::Zero(n, c));
    mmkd::LogitKD<double> kd;
    mmkd::DecoupledKD<double> dkd;
    mmkd::CrossEntropy<double> ce({0.1});
    return kd.value_and_grad(s, t, g[0], g[1]) + dkd.value_and_grad(s, t, y, g[2]) +
           ce.value_and_grad(s, y, g[2]);
  });
}

TEST_CASE("float logit losses are bit-identical with 1 and 2 threads at odd widths",
          "[core][parallel]") {
  // Odd column counts put per-thread scratch rows at different alignments, where a vectorised
  // reduction would round differently unless the scratch is padded.
  for (Index c : {97, 1001}) {
    INFO(c << " columns");
    const Index n = 300;
    const Matrix<float> s = random_matrix<float>(n, c, 1, 3), t = random_matrix<float>(n, c, 2, 3);
    const mmkd::Labels y = random_labels(n, c, 3);
    same_with_1_and_2_threads<float>([&](std::vector<Matrix<float>>& g) {
      g.assign(3, Matrix<float>::Zero(n, c));
      mmkd::LogitKD<float> kd;
      mmkd::DecoupledKD<float> dkd;
      mmkd::CrossEntropy<float> ce({0.1f});
      return kd.value_and_grad(s, t, g[0], g[1]) + dkd.value_and_grad(s, t, y, g[2]) +
             ce.value_and_grad(s, y, g[2]);
    });
  }
}
#endif
