// Cross-checks of the dimensional-structure and contrastive losses against the same losses
// written with libtorch ops and differentiated by libtorch's autograd.

#include <mmkd/contrastive/embedding_queue.hpp>
#include <mmkd/contrastive/info_nce.hpp>
#include <mmkd/contrastive/similarity_distillation.hpp>
#include <mmkd/structure/channel_decorrelation.hpp>
#include <mmkd/structure/uniformity.hpp>

#include <cstdio>
#include <cstdlib>

#include "torch/torch_losses.hpp"
#include "torch/torch_support.hpp"

using namespace mmkd_test;
using namespace torch_ref;
namespace F = torch::nn::functional;

TEST_CASE("ChannelDecorrelation equals libtorch", "[torch][structure][decor]") {
  mmkd::SplitMix64 rng(5);
  for (int rep = 0; rep < 6; ++rep) {
    const Index n = 2 + rng.next() % 30, c = 1 + rng.next() % 12;
    const Matrix<double> z = random_matrix<double>(n, c, rep, 2),
                         zt = random_matrix<double>(n + 3, c, rep + 50);
    for (auto stat : {mmkd::ChannelStatistic::Correlation, mmkd::ChannelStatistic::Covariance}) {
      for (bool teacher : {false, true}) {
        INFO("N " << n << " C " << c << " stat " << int(stat) << " teacher " << teacher);
        auto tz = to_torch(z, true);
        const auto loss = torch_decorrelation(tz, stat, teacher ? to_torch(zt) : torch::Tensor());
        loss.backward();
        mmkd::ChannelDecorrelation<double>::Options o;
        o.statistic = stat;
        o.target =
            teacher ? mmkd::DecorrelationTarget::Teacher : mmkd::DecorrelationTarget::Identity;
        mmkd::ChannelDecorrelation<double> decor(o);
        Matrix<double> g = Matrix<double>::Zero(n, c);
        const double v = teacher ? decor.value_and_grad(z, zt, g) : decor.value_and_grad(z, g);
        CHECK(v == Approx(loss.item<double>()).epsilon(1e-10).margin(1e-15));
        CHECK(max_rel_diff(g, from_torch(tz.grad())) < 1e-9);
      }
    }
  }
}

TEST_CASE("Uniformity equals libtorch (Wang & Isola's lunif)", "[torch][structure][uniformity]") {
  for (int rep = 0; rep < 4; ++rep) {
    const Matrix<double> x = random_matrix<double>(3 + rep * 5, 2 + rep, rep, 2);
    auto tx = to_torch(x, true);
    const auto loss = torch_uniformity(tx);
    loss.backward();
    mmkd::Uniformity<double> unif;
    Matrix<double> g = Matrix<double>::Zero(x.rows(), x.cols());
    CHECK(unif.value_and_grad(x, g) == Approx(loss.item<double>()).epsilon(1e-10));
    CHECK(max_rel_diff(g, from_torch(tx.grad())) < 1e-9);
  }
}

TEST_CASE("Uniformity with zero rows equals lunif on F.normalize'd inputs in libtorch",
          "[torch][structure][uniformity]") {
  Matrix<double> x = random_matrix<double>(8, 5, 3);
  x.row(2).setZero();
  auto tx = to_torch(x, true);
  const auto loss = torch_uniformity(tx);
  loss.backward();
  mmkd::Uniformity<double> unif;
  Matrix<double> g = Matrix<double>::Zero(8, 5);
  CHECK(unif.value_and_grad(x, g) == Approx(loss.item<double>()).epsilon(1e-10));
  // The zero row's gradient is F.normalize's du / eps (≈1e12), the others O(1).
  CHECK(max_rel_diff(g, from_torch(tx.grad())) < 1e-9);
  // SpatialTokens: per sample the H·W positions are the points; one position all zero.
  const Index n = 2, c = 3, hw = 6;
  Matrix<double> f = random_matrix<double>(n, c * hw, 5).cwiseMax(0.0);
  for (Index k = 0; k < c; ++k) f(1, k * hw + 3) = 0;
  auto tf = to_torch(f, true);
  const auto tokens = tf.view({n, c, hw}).transpose(1, 2);  // N x HW x C
  const auto ref = (torch_uniformity(tokens[0]) + torch_uniformity(tokens[1])) / 2.0;
  ref.backward();
  mmkd::Uniformity<double>::Options o;
  o.mode = mmkd::UniformityMode::SpatialTokens;
  mmkd::Uniformity<double> unif_tokens(o);
  Matrix<double> gf = Matrix<double>::Zero(n, c * hw);
  CHECK(unif_tokens.value_and_grad(mmkd::ConstTensor4Ref<double>(f.data(), n, c, 2, 3),
                                   mmkd::Tensor4Ref<double>(gf.data(), n, c, 2, 3)) ==
        Approx(ref.item<double>()).epsilon(1e-10));
  CHECK(max_rel_diff(gf, from_torch(tf.grad())) < 1e-9);
}

TEST_CASE("InfoNCE equals open_clip's ClipLoss and one-directional cross-entropy in libtorch",
          "[torch][contrastive][infonce]") {
  mmkd::SplitMix64 rng(11);
  for (int rep = 0; rep < 6; ++rep) {
    const Index n = 1 + rng.next() % 20, extra = rng.next() % 5, d = 1 + rng.next() % 16;
    const double temp = rng.uniform(0.05, 1.0);
    const Matrix<double> q = random_matrix<double>(n, d, rep),
                         k = random_matrix<double>(n + extra, d, rep + 9);
    for (bool symmetric : {false, true}) {
      INFO("N " << n << " K " << n + extra << " D " << d << " symmetric " << symmetric);
      auto tq = to_torch(q, true), tk = to_torch(k, true);
      const auto loss = torch_clip(tq, tk, temp, symmetric, extra);
      loss.backward();
      mmkd::InfoNCE<double>::Options o;
      o.temperature = temp;
      o.symmetric = symmetric;
      o.offset = extra;
      mmkd::InfoNCE<double> nce(o);
      Matrix<double> dq = Matrix<double>::Zero(n, d), dk = Matrix<double>::Zero(n + extra, d);
      CHECK(nce.value_and_grad(q, k, dq, dk) == Approx(loss.item<double>()).epsilon(1e-10));
      CHECK(max_rel_diff(dq, from_torch(tq.grad())) < 1e-9);
      CHECK(max_rel_diff(dk, from_torch(tk.grad())) < 1e-9);
    }
  }
}

TEST_CASE("SimilarityDistillation equals SEED's forward and soft_cross_entropy in libtorch",
          "[torch][contrastive][seed]") {
  // Two training steps at SEED's temperatures, the queue updated in between; the student's
  // similarity to a queue row is made large enough that the teacher target is not one-hot.
  const Index n = 4, k = 8, d = 6;
  const Matrix<double> init = random_matrix<double>(k, d, 7);
  TorchSeed ref{F::normalize(to_torch(init), F::NormalizeFuncOptions().dim(1)).t().clone(), 0, 0.2,
                1e-4};
  mmkd::EmbeddingQueue<double> queue(k, d);
  queue.push(init);  // SEED starts from random unit vectors
  mmkd::SimilarityDistillation<double> seed;
  for (int step = 0; step < 2; ++step) {
    INFO("step " << step);
    const Matrix<double> s = random_matrix<double>(n, d, 10 + step);
    Matrix<double> t = random_matrix<double>(n, d, 20 + step);
    t.row(1) = init.row(2) + 1e-4 * t.row(1);  // near a queue row: P spreads over two columns
    auto ts = to_torch(s, true);
    const auto loss = ref.step(ts, to_torch(t));
    loss.backward();
    Matrix<double> g = Matrix<double>::Zero(n, d);
    CHECK(seed.value_and_grad(s, t, queue, g) == Approx(loss.item<double>()).epsilon(1e-9));
    CHECK(max_rel_diff(g, from_torch(ts.grad())) < 1e-9);
    queue.push(t);
  }
  // The batch-dictionary reading.
  const Matrix<double> s = random_matrix<double>(9, 12, 1), t = random_matrix<double>(9, 12, 2);
  const Matrix<double> extra = random_matrix<double>(7, 12, 3);
  auto ts = to_torch(s, true);
  const auto loss = torch_seed_batch(ts, to_torch(t), to_torch(extra), 0.2, 0.04);
  loss.backward();
  typename mmkd::SimilarityDistillation<double>::Options o{0.2, 0.04};
  o.dictionary = mmkd::SimilarityDictionary::BatchAndQueue;
  mmkd::SimilarityDistillation<double> batch(o);
  Matrix<double> g = Matrix<double>::Zero(9, 12);
  CHECK(batch.value_and_grad(s, t, extra, g) == Approx(loss.item<double>()).epsilon(1e-10));
  CHECK(max_rel_diff(g, from_torch(ts.grad())) < 1e-9);
}

TEST_CASE("SimilarityDistillation and Uniformity in float32 are as accurate as libtorch's",
          "[torch][contrastive][structure][float32]") {
  // SEED at its own tau_t = 1e-4 (teacher similarities ≈ 1e4), with a queue row close to a
  // teacher embedding so that the target is not one-hot; Uniformity with a zero row.
  const Index n = 16, k = 64, d = 32;
  const Matrix<double> s = random_matrix<double>(n, d, 1).cast<float>().cast<double>();
  const Matrix<double> t = random_matrix<double>(n, d, 2).cast<float>().cast<double>();
  Matrix<double> queue = random_matrix<double>(k, d, 3);
  queue.row(5) = t.row(3) + 1e-3 * queue.row(5);
  queue = queue.cast<float>().cast<double>();
  mmkd::EmbeddingQueue<double> q64(k, d);
  q64.push(queue);
  mmkd::EmbeddingQueue<float> q32(k, d);
  q32.push(queue.cast<float>());
  mmkd::SimilarityDistillation<double> seed64;
  mmkd::SimilarityDistillation<float> seed32;
  Matrix<double> g64 = Matrix<double>::Zero(n, d);
  Matrix<float> g32 = Matrix<float>::Zero(n, d);
  const double v64 = seed64.value_and_grad(s, t, q64, g64);
  const double v32 = seed32.value_and_grad(s.cast<float>(), t.cast<float>(), q32, g32);
  const FloatError ours = float_error(v32, v64, g32.cast<double>(), g64);
  const FloatError ref = torch_float_error(s, [&](const torch::Tensor& x, torch::Dtype dt) {
    return torch_seed(x, to_torch(t).to(dt), to_torch(queue).to(dt), 0.2, 1e-4);
  });
  INFO("SimilarityDistillation value error " << ours.value << " (libtorch " << ref.value
                                             << "), gradient " << ours.grad << " (libtorch "
                                             << ref.grad << ")");
  CHECK(within_torch(ours.value, ref.value));
  CHECK(within_torch(ours.grad, ref.grad));
  CHECK(ours.value <= 1e-5);

  Matrix<double> x = random_matrix<double>(24, 8, 4).cast<float>().cast<double>();
  x.row(7).setZero();
  mmkd::Uniformity<double> u64;
  mmkd::Uniformity<float> u32;
  Matrix<double> gx64 = Matrix<double>::Zero(24, 8);
  Matrix<float> gx32 = Matrix<float>::Zero(24, 8);
  const double w64 = u64.value_and_grad(x, gx64);
  const double w32 = u32.value_and_grad(x.cast<float>(), gx32);
  // Compare the gradient on the unit rows: the zero row's is du/eps (1e12) in both.
  Matrix<double> d32 = gx32.cast<double>(), d64 = gx64;
  d32.row(7).setZero();
  d64.row(7).setZero();
  const FloatError ours_u = float_error(w32, w64, d32, d64);
  FloatError ref_u;
  {
    auto x64 = to_torch(x, true);
    auto x32 = to_torch(x).to(torch::kFloat32).set_requires_grad(true);
    const auto l64 = torch_uniformity(x64), l32 = torch_uniformity(x32);
    l64.backward();
    l32.backward();
    Matrix<double> t32 = from_torch(x32.grad()), t64 = from_torch(x64.grad());
    t32.row(7).setZero();
    t64.row(7).setZero();
    ref_u = float_error(l32.item<double>(), l64.item<double>(), t32, t64);
  }
  INFO("Uniformity value error " << ours_u.value << " (libtorch " << ref_u.value << "), gradient "
                                 << ours_u.grad << " (libtorch " << ref_u.grad << ")");
  CHECK(within_torch(ours_u.value, ref_u.value));
  CHECK(within_torch(ours_u.grad, ref_u.grad));
  if (std::getenv("MMKD_REPORT")) {
    std::printf(
        "float32 SimilarityDistillation: value %.1e (libtorch %.1e), gradient %.1e "
        "(libtorch %.1e)\n",
        ours.value, ref.value, ours.grad, ref.grad);
    std::printf("float32 Uniformity: value %.1e (libtorch %.1e), gradient %.1e (libtorch %.1e)\n",
                ours_u.value, ref_u.value, ours_u.grad, ref_u.grad);
  }
}
