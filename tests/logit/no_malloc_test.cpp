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

TEMPLATE_TEST_CASE("weight learner, saliency variants and running mean allocate nothing",
                   "[multimodal][alloc]", float, double) {
  using T = TestType;
  const Index n = 16, c = 10, m = 2;
  const Matrix<T> t = random_matrix<T>(n, c, 1);
  const mmkd::Tensor3<T> tm = random_stack<T>(m, n, c, 2);
  const mmkd::Labels y = random_labels(n, c, 3);
  const mmkd::PresenceMask mask = mmkd::PresenceMask::Ones(n, m);
  mmkd::ModalitySaliency<T> sufficiency({mmkd::SaliencyKind::Sufficiency, T(2)});
  mmkd::ModalitySaliency<T> label_prob({mmkd::SaliencyKind::LabelProbability, T(1)});
  mmkd::SaliencyRunningMean<T> running;
  typename mmkd::ModalityWeightLearner<T>::Options lo;
  lo.onehot_modalities = m;
  mmkd::ModalityWeightLearner<T> learner(lo);
  const Matrix<T> aux = random_matrix<T>(n, m, 4).cwiseAbs();
  const Matrix<T> g = random_matrix<T>(n * m, c, 5), h = random_matrix<T>(n * m, 8, 6);
  const Matrix<T> gm = random_matrix<T>(6, c, 7), hm = random_matrix<T>(6, 8, 8);
  const Matrix<T> dots = random_matrix<T>(n * m, 1, 9);
  Matrix<T> features, dw = Matrix<T>::Zero(n * m, 1);
  for (int warm = 0; warm < 2; ++warm) {
    std::unique_ptr<NoMalloc> guard;
    if (warm == 1) guard = std::make_unique<NoMalloc>();
    CHECK_NOTHROW(sufficiency.compute(t, tm, mask));
    CHECK_NOTHROW(label_prob.compute(t, tm, y));
    CHECK_NOTHROW(running.update(sufficiency.scores(), mask));
    CHECK_NOTHROW(learner.make_features(aux, features));
    CHECK_NOTHROW(learner.forward(features));
    CHECK_NOTHROW(learner.backward(dw));
    CHECK_NOTHROW(
        mmkd::ModalityWeightLearner<T>::hypergradient_linear(g, h, gm, hm, T(0.1), n, dw));
    CHECK_NOTHROW(mmkd::ModalityWeightLearner<T>::hypergradient(dots, T(0.1), n, dw));
  }
}

TEMPLATE_TEST_CASE("ReviewKD ops, BatchNorm2d and AttentionFusion allocate nothing",
                   "[review][alloc]", float, double) {
  using T = TestType;
  const mmkd::Tensor4<T> x = random_map<T>(2, 8, 6, 6, 1), dy8 = random_map<T>(2, 8, 6, 6, 2);
  const mmkd::Tensor4<T> dy4 = random_map<T>(2, 4, 6, 6, 3), small = random_map<T>(2, 8, 3, 3, 4);
  const Matrix<T> w3 = random_matrix<T>(4, 72, 5), w1 = random_matrix<T>(4, 8, 6),
                  b1 = random_matrix<T>(1, 4, 7);
  mmkd::Tensor4<T> y(2, 4, 6, 6), dx(2, 8, 6, 6), up(2, 8, 6, 6), pooled(2, 8, 3, 3),
      d_small(2, 8, 3, 3);
  dx.setZero();
  d_small.setZero();
  Matrix<T> ws[2], dw3 = Matrix<T>::Zero(4, 72), dw1 = Matrix<T>::Zero(4, 8),
                   db1 = Matrix<T>::Zero(1, 4);
  mmkd::BatchNorm2d<T> bn({8});
  typename mmkd::AttentionFusion<T>::Options ao;
  ao.in_channels = 8;
  ao.mid_channels = 4;
  ao.out_channels = 6;
  ao.fuse = true;
  mmkd::AttentionFusion<T> abf(ao);
  const mmkd::Tensor4<T> residual = random_map<T>(2, 4, 3, 3, 8),
                         d_out = random_map<T>(2, 6, 6, 6, 9),
                         d_res = random_map<T>(2, 4, 6, 6, 10);
  mmkd::Tensor4<T> d_res_in(2, 4, 3, 3);
  d_res_in.setZero();
  for (int warm = 0; warm < 2; ++warm) {
    std::unique_ptr<NoMalloc> guard;
    if (warm == 1) guard = std::make_unique<NoMalloc>();
    // One workspace per algorithm: their sizes differ.
    for (int a = 0; a < 2; ++a) {
      const auto algo = a ? mmkd::Conv3x3Algorithm::Winograd : mmkd::Conv3x3Algorithm::Im2col;
      CHECK_NOTHROW(mmkd::conv2d_3x3<T>(x, w3, y, ws[a], algo));
      CHECK_NOTHROW(mmkd::conv2d_3x3_backward<T>(x, w3, dy4, dx, dw3, ws[a], algo));
    }
    CHECK_NOTHROW(mmkd::conv2d_1x1<T>(x, w1, b1, y));
    CHECK_NOTHROW(mmkd::conv2d_1x1_backward<T>(x, w1, dy4, dx, dw1, db1));
    CHECK_NOTHROW(mmkd::nearest_resize<T>(small, up));
    CHECK_NOTHROW(mmkd::nearest_resize_backward<T>(dy8, d_small));
    CHECK_NOTHROW(mmkd::adaptive_avg_pool2d<T>(x, pooled));
    CHECK_NOTHROW(mmkd::adaptive_avg_pool2d_backward<T>(small, dx));
    CHECK_NOTHROW(bn.forward(x));
    CHECK_NOTHROW(bn.backward(dy8, dx));
    CHECK_NOTHROW(abf.forward(x, residual));
    CHECK_NOTHROW(abf.backward(d_out, d_res, dx, d_res_in));
  }
}
