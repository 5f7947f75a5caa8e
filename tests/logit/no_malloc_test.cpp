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

TEMPLATE_TEST_CASE("structure and contrastive losses allocate nothing in steady state",
                   "[structure][contrastive][alloc]", float, double) {
  using T = TestType;
  const Index n = 24, d = 20;
  const Matrix<T> z = random_matrix<T>(n, d, 1), zt = random_matrix<T>(n + 2, d, 2);
  const Matrix<T> q = random_matrix<T>(n, d, 3), k = random_matrix<T>(n + 4, d, 4);
  mmkd::Tensor4<T> maps(4, 3, 4, 5), dmaps(4, 3, 4, 5);
  maps.setRandom();
  dmaps.setZero();
  Matrix<T> dz = Matrix<T>::Zero(n, d), dq = Matrix<T>::Zero(n, d), dk = Matrix<T>::Zero(n + 4, d);
  mmkd::ChannelDecorrelation<T> decor;
  mmkd::ChannelDecorrelation<T> decor_t(
      {mmkd::ChannelStatistic::Covariance, mmkd::DecorrelationTarget::Teacher});
  mmkd::Uniformity<T> unif;
  mmkd::Uniformity<T> tokens({mmkd::UniformityMode::SpatialTokens});
  mmkd::Uniformity<T> entropy({mmkd::UniformityMode::SpatialEntropy});
  typename mmkd::InfoNCE<T>::Options o;
  o.offset = 4;
  o.learn_temperature = true;
  mmkd::InfoNCE<T> nce(o);
  o.stream = true;
  o.block_rows = 7;
  mmkd::InfoNCE<T> nce_stream(o);
  mmkd::SimilarityDistillation<T> seed;
  mmkd::EmbeddingQueue<T> queue(16, d);
  queue.push(zt);
  for (int warm = 0; warm < 2; ++warm) {
    std::unique_ptr<NoMalloc> guard;
    if (warm == 1) guard = std::make_unique<NoMalloc>();
    CHECK_NOTHROW(decor.value_and_grad(z, dz));
    CHECK_NOTHROW(decor_t.value_and_grad(z, zt, dz));
    CHECK_NOTHROW(unif.value_and_grad(z, dz));
    CHECK_NOTHROW(tokens.value_and_grad(maps, dmaps));
    CHECK_NOTHROW(entropy.value_and_grad(maps, dmaps));
    CHECK_NOTHROW(nce.value_and_grad(q, k, dq, dk));
    CHECK_NOTHROW(nce_stream.value_and_grad(q, k, dq, dk));
    CHECK_NOTHROW(seed.value_and_grad(q, z, queue, dq));
    CHECK_NOTHROW(queue.push(z.topRows(3)));
  }
}

TEMPLATE_TEST_CASE("ReviewKD modules and HCL allocate nothing in steady state", "[review][alloc]",
                   float, double) {
  using T = TestType;
  typename mmkd::ReviewFusion<T>::Options o;
  o.in_channels = {3, 4, 4};
  o.out_channels = {2, 3, 4};
  o.shapes = {6, 3, 1};
  o.out_shapes = {8, 3, 1};  // the resize path too
  o.mid_channels = 4;
  mmkd::ReviewFusion<T> review(o);
  mmkd::HierarchicalContextLoss<T> hcl;
  std::vector<mmkd::Tensor4<T>> f, t, d_out, d_f;
  for (std::size_t k = 0; k < 3; ++k) {
    const Index h = o.shapes[k], oh = o.out_shapes[k];
    f.push_back(random_map<T>(2, o.in_channels[k], h, h, 1 + k));
    t.push_back(random_map<T>(2, o.out_channels[k], oh, oh, 5 + k));
    d_out.push_back(random_map<T>(2, o.out_channels[k], oh, oh, 9 + k));
    d_f.push_back(random_map<T>(2, o.in_channels[k], h, h, 13 + k));
  }
  const std::vector<mmkd::ConstTensor4Ref<T>> fv(f.begin(), f.end()), tv(t.begin(), t.end()),
      dov(d_out.begin(), d_out.end());
  const std::vector<mmkd::Tensor4Ref<T>> gv(d_out.begin(), d_out.end()),
      dfv(d_f.begin(), d_f.end());
  for (bool train : {true, false}) {
    review.train(train);
    for (int warm = 0; warm < 2; ++warm) {
      std::unique_ptr<NoMalloc> guard;
      if (warm == 1) guard = std::make_unique<NoMalloc>();
      CHECK_NOTHROW(hcl.value_and_grad(review.forward(fv), tv, gv));
      CHECK_NOTHROW(review.backward(dov, dfv));
      CHECK_NOTHROW(review.zero_grad());
    }
  }
}
