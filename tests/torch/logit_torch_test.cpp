// Cross-checks of the logit losses against the same losses written with libtorch ops and
// differentiated by libtorch's autograd, on random shapes.

#include "torch/torch_losses.hpp"
#include "torch/torch_support.hpp"

using namespace mmkd_test;
using namespace mmkd_torch;
using mmkd::Reduction;
namespace F = torch::nn::functional;

namespace {

struct Case {
  Index n, c;
  double temp;
  std::uint64_t seed;
};

std::vector<Case> random_cases(int count, std::uint64_t seed) {
  mmkd::SplitMix64 rng(seed);
  std::vector<Case> cases;
  for (int k = 0; k < count; ++k) {
    cases.push_back({Index(1 + rng.next() % 40), Index(2 + rng.next() % 300), rng.uniform(0.5, 8.0),
                     rng.next()});
  }
  return cases;
}

mmkd::RowMask random_mask(Index n, std::uint64_t seed) {
  mmkd::SplitMix64 rng(seed);
  mmkd::RowMask m(n);
  for (Index i = 0; i < n; ++i) m(i) = std::uint8_t(rng.uniform() < 0.7);
  m(0) = 1;
  return m;
}

}  // namespace

TEST_CASE("LogitKD equals libtorch kl_div + autograd on random shapes", "[torch][logit][kd]") {
  for (const Case& k : random_cases(12, 2024)) {
    const Matrix<double> s = random_matrix<double>(k.n, k.c, k.seed, 3.0);
    const Matrix<double> t = random_matrix<double>(k.n, k.c, k.seed + 1, 3.0);
    const mmkd::RowMask mask = random_mask(k.n, k.seed + 2);
    for (auto red : {Reduction::BatchMean, Reduction::Mean, Reduction::Sum}) {
      INFO("N " << k.n << " C " << k.c << " T " << k.temp << " " << mmkd::to_string(red));
      auto ts = to_torch(s, true), tt = to_torch(t, true);
      const auto loss = torch_kd(ts, tt, k.temp, red, to_torch(mask));
      loss.backward();

      typename mmkd::LogitKD<double>::Options o;
      o.temperature = k.temp;
      o.reduction = red;
      mmkd::LogitKD<double> kd(o);
      Matrix<double> ds = Matrix<double>::Zero(k.n, k.c), dt = Matrix<double>::Zero(k.n, k.c);
      const double v = kd.value_and_grad(s, t, mask, ds, dt);
      CHECK(v == Approx(loss.item<double>()).epsilon(1e-10));
      CHECK(max_rel_diff(ds, from_torch(ts.grad())) < 1e-10);
      CHECK(max_rel_diff(dt, from_torch(tt.grad())) < 1e-10);
    }
  }
}

TEST_CASE("DecoupledKD equals mdistiller's dkd_loss in libtorch on random shapes",
          "[torch][logit][dkd]") {
  for (const Case& k : random_cases(12, 77)) {
    const Matrix<double> s = random_matrix<double>(k.n, k.c, k.seed, 3.0);
    const Matrix<double> t = random_matrix<double>(k.n, k.c, k.seed + 1, 3.0);
    const mmkd::Labels y = random_labels(k.n, k.c, k.seed + 2);
    INFO("N " << k.n << " C " << k.c << " T " << k.temp);
    auto ts = to_torch(s, true), tt = to_torch(t);
    const auto loss = torch_dkd(ts, tt, to_torch(y), 1.0, 8.0, k.temp);
    loss.backward();

    typename mmkd::DecoupledKD<double>::Options o;
    o.temperature = k.temp;
    mmkd::DecoupledKD<double> dkd(o);
    Matrix<double> ds = Matrix<double>::Zero(k.n, k.c);
    const double v = dkd.value_and_grad(s, t, y, ds);
    CHECK(v == Approx(loss.item<double>()).epsilon(1e-9));
    CHECK(max_rel_diff(ds, from_torch(ts.grad())) < 1e-9);
  }
}

TEST_CASE("CrossEntropy equals libtorch cross_entropy with label smoothing and ignore_index",
          "[torch][logit][ce]") {
  for (const Case& k : random_cases(12, 99)) {
    const Matrix<double> z = random_matrix<double>(k.n, k.c, k.seed, 3.0);
    mmkd::Labels y = random_labels(k.n, k.c, k.seed + 1);
    const mmkd::RowMask mask = random_mask(k.n, k.seed + 2);
    mmkd::Labels y_ignore = y;
    for (Index i = 0; i < k.n; ++i) {
      if (!mask(i)) y_ignore(i) = -100;
    }
    for (double eps : {0.0, 0.15}) {
      INFO("N " << k.n << " C " << k.c << " smoothing " << eps);
      auto tz = to_torch(z, true);
      const auto loss =
          F::cross_entropy(tz, to_torch(y_ignore),
                           F::CrossEntropyFuncOptions().label_smoothing(eps).ignore_index(-100));
      loss.backward();
      mmkd::CrossEntropy<double> ce({eps});
      Matrix<double> dz = Matrix<double>::Zero(k.n, k.c);
      const double v = ce.value_and_grad(z, y_ignore, mask, dz);
      CHECK(v == Approx(loss.item<double>()).epsilon(1e-10));
      CHECK(max_rel_diff(dz, from_torch(tz.grad())) < 1e-10);
    }
  }
}
