// Multimodal losses, saliency, weighting and the weight learner: bit-identical values and
// gradients with 1 and 2 OpenMP threads.

#include <mmkd/multimodal/modality_gram_kd.hpp>
#include <mmkd/multimodal/modality_saliency.hpp>
#include <mmkd/multimodal/modality_specific_kd.hpp>
#include <mmkd/multimodal/modality_weight_learner.hpp>
#include <mmkd/multimodal/modality_weighting.hpp>

#include "core/parallel_support.hpp"

#if MMKD_HAS_OPENMP
using namespace mmkd_test;

TEST_CASE("multimodal losses give bit-identical results with 1 and 2 threads", "[core][parallel]") {
  // Sizes large enough for mmkd's loops to run in parallel (rows x work >= 2^15).
  const Index n = 512, c = 96, m = 3, d = 64;
  const Matrix<double> s = random_matrix<double>(n, c, 1, 3), t = random_matrix<double>(n, c, 2, 3);
  const mmkd::Tensor3<double> zs = random_stack<double>(m, n, c, 4, 2),
                              zt = random_stack<double>(m, n, c, 5, 2);
  const mmkd::Tensor3<double> es = random_stack<double>(m, n, d, 6),
                              et = random_stack<double>(m, n, d + 5, 7);
  auto flat3 = [](const mmkd::Tensor3<double>& x) {
    return Matrix<double>(Eigen::Map<const Matrix<double>>(
        x.data(), x.dimension(0) * x.dimension(1), x.dimension(2)));
  };
  SECTION("saliency, weighting, MSD and the Gram loss") {
    same_with_1_and_2_threads([&](std::vector<Matrix<double>>& g) {
      mmkd::ModalitySaliency<double> saliency;
      mmkd::ModalityWeighting<double> weighting;
      const Matrix<double> w = weighting.compute(saliency.compute_removal(t, zt));
      mmkd::ModalitySpecificKD<double> msd;
      mmkd::ModalityGramKD<double> gram;
      Matrix<double> ds = Matrix<double>::Zero(n, c);
      mmkd::Tensor3<double> dzs(m, n, c), des(m, n, d);
      dzs.setZero();
      des.setZero();
      const double v =
          msd.value_and_grad(s, t, zs, zt, w, ds, dzs) + gram.value_and_grad(es, et, des);
      g = {w, ds, flat3(dzs), flat3(des)};
      return v;
    });
  }
  SECTION("the weight learner") {
    const Matrix<double> features = random_matrix<double>(4000, 1, 10).cwiseAbs(),
                         dw = random_matrix<double>(4000, 1, 11);
    same_with_1_and_2_threads([&](std::vector<Matrix<double>>& g) {
      mmkd::ModalityWeightLearner<double> learner;
      const Matrix<double> w = learner.forward(features);
      learner.backward(dw);
      g = {w};
      for (auto& p : learner.gradients()) g.emplace_back(p.value);
      return w.sum();
    });
  }
}

TEST_CASE("float MSD is bit-identical with 1 and 2 threads at odd widths", "[core][parallel]") {
  // Odd column counts put per-thread scratch rows at different alignments, where a vectorised
  // reduction would round differently unless the scratch is padded.
  for (Index c : {97, 1001}) {
    INFO(c << " columns");
    const Index n = 300, m = 3;
    const Matrix<float> s = random_matrix<float>(n, c, 1, 3), t = random_matrix<float>(n, c, 2, 3);
    const mmkd::Tensor3<float> zs = random_stack<float>(m, n, c, 4, 2),
                               zt = random_stack<float>(m, n, c, 5, 2);
    same_with_1_and_2_threads<float>([&](std::vector<Matrix<float>>& g) {
      mmkd::ModalitySaliency<float> saliency;
      mmkd::ModalityWeighting<float> weighting;
      const Matrix<float> w = weighting.compute(saliency.compute_removal(t, zt));
      mmkd::ModalitySpecificKD<float> msd;
      Matrix<float> ds = Matrix<float>::Zero(n, c);
      mmkd::Tensor3<float> dzs(m, n, c);
      dzs.setZero();
      const float v = msd.value_and_grad(s, t, zs, zt, w, ds, dzs);
      g = {ds, w, Eigen::Map<const Matrix<float>>(dzs.data(), m * n, c)};
      return v;
    });
  }
}
#endif
