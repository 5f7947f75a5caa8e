// Logit losses: bit-identical values and gradients with 1 and 2 OpenMP threads.

#include <mmkd/logit/cross_entropy.hpp>
#include <mmkd/logit/decoupled_kd.hpp>
#include <mmkd/logit/fused_linear_kd.hpp>
#include <mmkd/logit/logit_divergence.hpp>
#include <mmkd/logit/logit_kd.hpp>
#include <mmkd/logit/sparse_logit_kd.hpp>

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
  const float v1 = run(1, g1);
  const GuardMode parallel(mmkd::detail::ContentionGuard::Mode::Parallel);
  const float v2 = run(2, g2);
  CHECK(v1 == v2);
  CHECK(bit_identical(g1, g2));
}

namespace {

// LogitKD, DecoupledKD, CrossEntropy and the LogitDivergence kinds on one n x c batch, with 1 and
// then 2 threads.
template <class T>
void logit_losses_same_with_1_and_2_threads(Index n, Index c) {
  const Matrix<T> s = random_matrix<T>(n, c, 1, 3), t = random_matrix<T>(n, c, 2, 3);
  const mmkd::Labels y = random_labels(n, c, 3);
  same_with_1_and_2_threads<T>([&](std::vector<Matrix<T>>& g) {
    g.assign(5, Matrix<T>::Zero(n, c));
    T divergences = 0;
    for (int k = 1; k < 6; ++k) {  // ForwardKL is LogitKD's kernel
      typename mmkd::LogitDivergence<T>::Options o;
      o.divergence = static_cast<mmkd::Divergence>(k);
      divergences += mmkd::LogitDivergence<T>(o).value_and_grad(s, t, g[3], g[4]);
    }
    // a sparse teacher: k = 7 classes per row, the student's own log-softmax shifted
    const Index k = 7;
    mmkd::IndexMatrix idx(n, k);
    Matrix<T> lp(n, k);
    mmkd::Vector<T> lse(n);
    mmkd::log_sum_exp(t, lse);
    for (Index i = 0; i < n; ++i) {
      for (Index j = 0; j < k; ++j) {
        idx(i, j) = int((i + 5 * j) % c);
        lp(i, j) = t(i, idx(i, j)) - lse(i);
      }
    }
    for (auto support : {mmkd::SparseSupport::TailBucket, mmkd::SparseSupport::Renormalized})
      divergences += mmkd::SparseLogitKD<T>({support}).value_and_grad(s, idx, lp, g[2]);
    mmkd::LogitKD<T> kd;
    mmkd::DecoupledKD<T> dkd;
    mmkd::CrossEntropy<T> ce({T(0.1)});
    return kd.value_and_grad(s, t, g[0], g[1]) + dkd.value_and_grad(s, t, y, g[2]) +
           ce.value_and_grad(s, y, g[2]) + divergences;
  });
}

}  // namespace

TEST_CASE("logit losses give bit-identical results with 1 and 2 threads", "[core][parallel]") {
  // Sizes large enough for mmkd's loops to run in parallel (rows x work >= 2^15).
  logit_losses_same_with_1_and_2_threads<double>(512, 96);
}

TEMPLATE_TEST_CASE("FusedLinearKD gives bit-identical results with 1 and 2 threads",
                   "[core][parallel]", float, double) {
  using T = TestType;
  // 600 tokens through a 1001-class head of width 96, in chunks of 256: tiled products and
  // parallel rows
  const Index n = 600, d = 96, v = 1001;
  const Matrix<T> h = random_matrix<T>(n, d, 4), w = random_matrix<T>(v, d, 5, 0.2),
                  ht = random_matrix<T>(n, 40, 6), wt = random_matrix<T>(v, 40, 7, 0.2);
  const mmkd::Vector<T> b = random_matrix<T>(v, 1, 8);
  const mmkd::Labels y = random_labels(n, v, 9);
  same_with_1_and_2_threads<T>([&](std::vector<Matrix<T>>& g) {
    g.assign(3, Matrix<T>());
    g[0] = Matrix<T>::Zero(n, d);
    g[1] = Matrix<T>::Zero(v, d);
    mmkd::Vector<T> db = mmkd::Vector<T>::Zero(v);
    typename mmkd::FusedLinearKD<T>::Options o;
    o.chunk_rows = 256;
    o.hard_weight = T(0.3);
    o.divergence.divergence = mmkd::Divergence::GeneralizedJSD;
    const T value = mmkd::FusedLinearKD<T>(o).value_and_grad(h, w, ht, wt, y, b, b, g[0], g[1], db);
    g[2] = db;
    return value;
  });
}

TEST_CASE("float logit losses are bit-identical with 1 and 2 threads at odd widths",
          "[core][parallel]") {
  // Odd column counts put per-thread scratch rows at different alignments, where a vectorised
  // reduction would round differently unless the scratch is padded.
  for (Index c : {97, 1001}) {
    INFO(c << " columns");
    logit_losses_same_with_1_and_2_threads<float>(300, c);
  }
}
#endif
