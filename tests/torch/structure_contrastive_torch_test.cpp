// Cross-checks of the dimensional-structure and contrastive losses against the same losses
// written with libtorch ops and differentiated by libtorch's autograd.

#include "torch/torch_losses.hpp"
#include "torch/torch_support.hpp"

using namespace mmkd_test;
using namespace mmkd_torch;
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

TEST_CASE("SimilarityDistillation equals SEED's soft cross-entropy in libtorch",
          "[torch][contrastive][seed]") {
  const Matrix<double> s = random_matrix<double>(9, 12, 1), t = random_matrix<double>(9, 12, 2);
  const Matrix<double> queue = random_matrix<double>(7, 12, 3);
  auto ts = to_torch(s, true);
  const auto loss = torch_seed(ts, to_torch(t), to_torch(queue), 0.2, 0.04);
  loss.backward();
  mmkd::SimilarityDistillation<double> seed({0.2, 0.04});
  Matrix<double> g = Matrix<double>::Zero(9, 12);
  CHECK(seed.value_and_grad(s, t, queue, g) == Approx(loss.item<double>()).epsilon(1e-10));
  CHECK(max_rel_diff(g, from_torch(ts.grad())) < 1e-9);
}
