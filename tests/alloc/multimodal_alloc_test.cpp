#include "alloc/alloc_support.hpp"

#include <mmkd/multimodal/modality_gram_kd.hpp>
#include <mmkd/multimodal/modality_saliency.hpp>
#include <mmkd/multimodal/modality_specific_kd.hpp>
#include <mmkd/multimodal/modality_weight_learner.hpp>
#include <mmkd/multimodal/modality_weighting.hpp>

using namespace mmkd_test;

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
