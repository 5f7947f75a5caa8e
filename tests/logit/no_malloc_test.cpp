// A steady-state call (same shapes as the previous one) must not allocate. Eigen's malloc guard
// turns any heap allocation by Eigen into an exception here.
#include <memory>
#include <stdexcept>
#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(x) ((x) ? (void)0 : throw std::runtime_error("Eigen assertion failed: " #x))

#include "support.hpp"

using namespace mmkd_test;

namespace {

struct NoMalloc {
  NoMalloc() { Eigen::internal::set_is_malloc_allowed(false); }
  ~NoMalloc() { Eigen::internal::set_is_malloc_allowed(true); }
};

}  // namespace

TEMPLATE_TEST_CASE("logit losses allocate nothing in steady state", "[logit][alloc]", float,
                   double) {
  using T = TestType;
  const Matrix<T> s = random_matrix<T>(64, 100, 1), t = random_matrix<T>(64, 100, 2);
  const mmkd::Labels y = random_labels(64, 100, 3);
  mmkd::RowMask mask = mmkd::RowMask::Ones(64);
  mask(5) = 0;
  Matrix<T> ds = Matrix<T>::Zero(64, 100), dt = Matrix<T>::Zero(64, 100);
  mmkd::LogitKD<T> kd;
  mmkd::DecoupledKD<T> dkd;
  mmkd::CrossEntropy<T> ce;
  for (int warm = 0; warm < 2; ++warm) {
    std::unique_ptr<NoMalloc> guard;
    if (warm == 1) guard = std::make_unique<NoMalloc>();
    CHECK_NOTHROW(kd.value_and_grad(s, t, mask, ds, dt));
    CHECK_NOTHROW(kd.value(s, t));
    CHECK_NOTHROW(dkd.value_and_grad(s, t, y, mask, ds));
    CHECK_NOTHROW(dkd.value(s, t, y));
    CHECK_NOTHROW(ce.value_and_grad(s, y, ds));
    CHECK_NOTHROW(ce.value(s, y, mask));
  }
  // The guard is live: an allocation under it throws.
  NoMalloc guard;
  CHECK_THROWS(Matrix<T>(10, 10));
}

TEMPLATE_TEST_CASE("multimodal losses allocate nothing in steady state", "[multimodal][alloc]",
                   float, double) {
  using T = TestType;
  const Index n = 32, c = 50, m = 3, d = 40;
  const Matrix<T> s = random_matrix<T>(n, c, 1), t = random_matrix<T>(n, c, 2);
  const mmkd::Tensor3<T> zs = random_stack<T>(m, n, c, 3), zt = random_stack<T>(m, n, c, 4);
  const mmkd::Tensor3<T> fs = random_stack<T>(m, n, d, 5), ft = random_stack<T>(m, n, d + 3, 6);
  mmkd::PresenceMask mask = mmkd::PresenceMask::Ones(n, m);
  mask(3, 1) = 0;
  Matrix<T> ds = Matrix<T>::Zero(n, c);
  mmkd::Tensor3<T> dzs(m, n, c), dfs(m, n, d), dft(m, n, d + 3);
  dzs.setZero();
  dfs.setZero();
  dft.setZero();
  mmkd::ModalitySaliency<T> saliency({mmkd::SaliencyKind::RemovalKL, T(1)});
  mmkd::ModalityWeighting<T> weighting;
  mmkd::ModalitySpecificKD<T> msd;
  mmkd::ModalityGramKD<T> gram;
  mmkd::ModalityGramKD<T> gram_batch({mmkd::GramNormalization::Frobenius, mmkd::GramScope::Batch});
  const mmkd::Tensor3<T> drop = random_stack<T>(m, n, c, 7);
  for (int warm = 0; warm < 2; ++warm) {
    std::unique_ptr<NoMalloc> guard;
    if (warm == 1) guard = std::make_unique<NoMalloc>();
    CHECK_NOTHROW(saliency.compute_removal(t, drop, mask));
    CHECK_NOTHROW(weighting.compute(saliency.scores(), mask));
    CHECK_NOTHROW(msd.value_and_grad(s, t, zs, zt, weighting.weights(), mask, ds, dzs));
    CHECK_NOTHROW(msd.auxiliary_losses(zs, zt, mask));
    CHECK_NOTHROW(gram.value_and_grad(fs, ft, mask, dfs, dft));
    CHECK_NOTHROW(gram_batch.value_and_grad(fs, ft, dfs));
  }
}
