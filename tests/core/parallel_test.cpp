#include <mmkd/contrastive/info_nce.hpp>
#include <mmkd/contrastive/similarity_distillation.hpp>
#include <mmkd/logit/cross_entropy.hpp>
#include <mmkd/logit/decoupled_kd.hpp>
#include <mmkd/logit/logit_kd.hpp>
#include <mmkd/multimodal/modality_gram_kd.hpp>
#include <mmkd/multimodal/modality_saliency.hpp>
#include <mmkd/multimodal/modality_specific_kd.hpp>
#include <mmkd/multimodal/modality_weight_learner.hpp>
#include <mmkd/multimodal/modality_weighting.hpp>
#include <mmkd/review/attention_fusion.hpp>
#include <mmkd/review/batch_norm.hpp>
#include <mmkd/review/hierarchical_context_loss.hpp>
#include <mmkd/structure/channel_decorrelation.hpp>
#include <mmkd/structure/uniformity.hpp>

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

#if MMKD_HAS_OPENMP
namespace {

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

}  // namespace

TEST_CASE("every loss gives bit-identical results with 1 and 2 threads", "[core][parallel]") {
  // Sizes large enough for mmkd's loops to run in parallel (rows x work >= 2^15).
  const Index n = 512, c = 96, m = 3, d = 64;
  const Matrix<double> s = random_matrix<double>(n, c, 1, 3), t = random_matrix<double>(n, c, 2, 3);
  const mmkd::Labels y = random_labels(n, c, 3);
  const mmkd::Tensor3<double> zs = random_stack<double>(m, n, c, 4, 2),
                              zt = random_stack<double>(m, n, c, 5, 2);
  const mmkd::Tensor3<double> es = random_stack<double>(m, n, d, 6),
                              et = random_stack<double>(m, n, d + 5, 7);
  auto flat3 = [](const mmkd::Tensor3<double>& x) {
    return Matrix<double>(Eigen::Map<const Matrix<double>>(
        x.data(), x.dimension(0) * x.dimension(1), x.dimension(2)));
  };
  SECTION("logit losses") {
    same_with_1_and_2_threads([&](std::vector<Matrix<double>>& g) {
      g.assign(3, Matrix<double>::Zero(n, c));
      mmkd::LogitKD<double> kd;
      mmkd::DecoupledKD<double> dkd;
      mmkd::CrossEntropy<double> ce({0.1});
      return kd.value_and_grad(s, t, g[0], g[1]) + dkd.value_and_grad(s, t, y, g[2]) +
             ce.value_and_grad(s, y, g[2]);
    });
  }
  SECTION("multimodal losses, saliency and weighting") {
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
  SECTION("structure and contrastive losses") {
    // Wide enough that every product is split into tiles (uneven ones: 300 is no multiple of
    // the tile edge), where Eigen's parallel GEMM would change the rounding with the threads.
    const Index wide = 300;
    const Matrix<double> e = random_matrix<double>(n, wide, 8),
                         k = random_matrix<double>(n, wide, 9);
    same_with_1_and_2_threads([&](std::vector<Matrix<double>>& g) {
      g.assign(2, Matrix<double>::Zero(n, wide));
      mmkd::ChannelDecorrelation<double> decor;
      mmkd::Uniformity<double> unif;
      mmkd::InfoNCE<double> nce;
      mmkd::SimilarityDistillation<double> seed;
      return decor.value_and_grad(e, g[0]) + unif.value_and_grad(e, g[0]) +
             nce.value_and_grad(e, k, g[0], g[1]) + seed.value_and_grad(e, k, g[1]);
    });
  }
  SECTION("weight learner, batch norm and HCL") {
    const Matrix<double> features = random_matrix<double>(4000, 1, 10).cwiseAbs(),
                         dw = random_matrix<double>(4000, 1, 11);
    const mmkd::Tensor4<double> x = random_map<double>(8, 16, 16, 16, 12),
                                dy = random_map<double>(8, 16, 16, 16, 13),
                                t = random_map<double>(8, 16, 16, 16, 14);
    auto planes = [](const mmkd::Tensor4<double>& a) {
      return Matrix<double>(Eigen::Map<const Matrix<double>>(
          a.data(), a.dimension(0) * a.dimension(1), a.dimension(2) * a.dimension(3)));
    };
    same_with_1_and_2_threads([&](std::vector<Matrix<double>>& g) {
      mmkd::ModalityWeightLearner<double> learner;
      const Matrix<double> w = learner.forward(features);
      learner.backward(dw);
      mmkd::BatchNorm2d<double> bn({16});
      const mmkd::Tensor4<double> y = bn.forward(x);
      mmkd::Tensor4<double> dx(x.dimensions()), dh(x.dimensions());
      dx.setZero();
      dh.setZero();
      bn.backward(dy, dx);
      mmkd::HierarchicalContextLoss<double> hcl;
      const double v = hcl.value_and_grad({x}, {t}, {dh});
      g = {w, planes(y), planes(dx), planes(dh)};
      for (auto& p : learner.gradients()) g.emplace_back(p.value);
      for (auto& p : bn.gradients()) g.emplace_back(p.value);
      for (auto& b : bn.buffers()) g.emplace_back(b.value);
      return v;
    });
  }
}
#endif

#if MMKD_HAS_OPENMP
TEST_CASE("AttentionFusion in float is bit-identical with 1 and 2 threads at odd H·W",
          "[core][parallel][review]") {
  // Odd H·W puts each thread's scratch at a different alignment unless it is padded.
  for (Index h : {7, 15}) {
    INFO("H = W = " << h);
    const mmkd::Tensor4<float> x = random_map<float>(6, 8, h, h, 1),
                               res = random_map<float>(6, 8, h, h, 2),
                               dy = random_map<float>(6, 4, h, h, 3);
    auto run = [&](int threads, std::vector<Matrix<float>>& out) {
      omp_set_num_threads(threads);
      mmkd::AttentionFusion<float> abf({8, 8, 4, true, 5});
      const mmkd::Tensor4<float> y = abf.forward(x, res);
      mmkd::Tensor4<float> dx(x.dimensions()), dr(res.dimensions());
      dx.setZero();
      dr.setZero();
      const mmkd::ConstTensor4Ref<float> none(nullptr, 0, 0, 0, 0);
      abf.backward(dy, none, dx, dr);
      out = {flat(y), flat(dx), flat(dr)};
      for (auto& p : abf.gradients()) out.emplace_back(p.value);
    };
    std::vector<Matrix<float>> g1, g2;
    run(1, g1);
    run(2, g2);
    omp_set_num_threads(2);
    REQUIRE(g1.size() == g2.size());
    for (std::size_t k = 0; k < g1.size(); ++k) CHECK(bit_identical(g1[k], g2[k]));
  }
}
#endif

#if MMKD_HAS_OPENMP
TEST_CASE("float losses are bit-identical with 1 and 2 threads at odd widths", "[core][parallel]") {
  // Odd column counts and odd H·W put per-thread scratch rows at different alignments, where a
  // vectorised reduction would round differently unless the scratch is padded.
  for (Index c : {97, 1001}) {
    INFO(c << " columns");
    const Index n = 300, m = 3;
    const Matrix<float> s = random_matrix<float>(n, c, 1, 3), t = random_matrix<float>(n, c, 2, 3);
    const mmkd::Labels y = random_labels(n, c, 3);
    const mmkd::Tensor3<float> zs = random_stack<float>(m, n, c, 4, 2),
                               zt = random_stack<float>(m, n, c, 5, 2);
    same_with_1_and_2_threads<float>([&](std::vector<Matrix<float>>& g) {
      g.assign(4, Matrix<float>::Zero(n, c));
      mmkd::LogitKD<float> kd;
      mmkd::DecoupledKD<float> dkd;
      mmkd::CrossEntropy<float> ce({0.1f});
      mmkd::ModalitySaliency<float> saliency;
      mmkd::ModalityWeighting<float> weighting;
      const Matrix<float> w = weighting.compute(saliency.compute_removal(t, zt));
      mmkd::ModalitySpecificKD<float> msd;
      mmkd::Tensor3<float> dzs(m, n, c);
      dzs.setZero();
      const float v = kd.value_and_grad(s, t, g[0], g[1]) + dkd.value_and_grad(s, t, y, g[2]) +
                      ce.value_and_grad(s, y, g[2]) +
                      msd.value_and_grad(s, t, zs, zt, w, g[3], dzs);
      g.emplace_back(w);
      g.emplace_back(Eigen::Map<const Matrix<float>>(dzs.data(), m * n, c));
      return v;
    });
  }
  for (Index h : {7, 15}) {
    INFO("H = W = " << h);
    const mmkd::Tensor4<float> x = random_map<float>(8, 6, h, h, 12),
                               dy = random_map<float>(8, 6, h, h, 13),
                               t = random_map<float>(8, 6, h, h, 14);
    same_with_1_and_2_threads<float>([&](std::vector<Matrix<float>>& g) {
      mmkd::BatchNorm2d<float> bn({6});
      const mmkd::Tensor4<float> yb = bn.forward(x);
      mmkd::Tensor4<float> dx(x.dimensions()), dh(x.dimensions());
      dx.setZero();
      dh.setZero();
      bn.backward(dy, dx);
      mmkd::HierarchicalContextLoss<float> hcl;
      const float v = hcl.value_and_grad({x}, {t}, {dh});
      g = {flat(yb), flat(dx), flat(dh)};
      for (auto& p : bn.gradients()) g.emplace_back(p.value);
      for (auto& b : bn.buffers()) g.emplace_back(b.value);
      return v;
    });
  }
}
#endif
