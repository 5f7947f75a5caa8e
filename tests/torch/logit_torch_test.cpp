// Cross-checks of the logit losses against the same losses written with libtorch ops and
// differentiated by libtorch's autograd, on random shapes.

#include <mmkd/logit/cross_entropy.hpp>
#include <mmkd/logit/decoupled_kd.hpp>
#include <mmkd/logit/fused_linear_kd.hpp>
#include <mmkd/logit/logit_divergence.hpp>
#include <mmkd/logit/logit_kd.hpp>
#include <mmkd/logit/sparse_logit_kd.hpp>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>

#include "torch/torch_losses.hpp"
#include "torch/torch_support.hpp"

using namespace mmkd_test;
using namespace torch_ref;
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

TEST_CASE("LogitDivergence equals TRL's and DistiLLM's formulas in libtorch on random shapes",
          "[torch][logit][divergence]") {
  for (const Case& k : random_cases(8, 515)) {
    const Matrix<double> s = random_matrix<double>(k.n, k.c, k.seed, 3.0);
    const Matrix<double> t = random_matrix<double>(k.n, k.c, k.seed + 1, 3.0);
    const mmkd::RowMask mask = random_mask(k.n, k.seed + 2);
    for (int kind = 0; kind < 6; ++kind) {
      for (double mix : {0.1, 0.5, 0.9}) {
        const auto d = static_cast<mmkd::Divergence>(kind);
        INFO("N " << k.n << " C " << k.c << " T " << k.temp << " kind " << kind << " mix " << mix);
        auto ts = to_torch(s, true), tt = to_torch(t, true);
        const auto m = to_torch(mask);
        const auto rows = torch_divergence_rows(d, mix, ts, tt, k.temp);
        const auto loss = 0.7 * k.temp * k.temp * (rows * m).sum() / m.sum();  // batchmean
        loss.backward();

        mmkd::LogitDivergence<double>::Options o;
        o.divergence = d;
        o.beta = mix;
        o.skew = mix;
        o.temperature = k.temp;
        o.scale_by_t2 = true;
        o.weight = 0.7;
        mmkd::LogitDivergence<double> loss_mmkd(o);
        Matrix<double> ds = Matrix<double>::Zero(k.n, k.c), dt = Matrix<double>::Zero(k.n, k.c);
        const double v = loss_mmkd.value_and_grad(s, t, mask, ds, dt);
        CHECK(v == Approx(loss.item<double>()).epsilon(1e-10));
        CHECK(max_rel_diff(ds, from_torch(ts.grad())) < 1e-10);
        CHECK(max_rel_diff(dt, from_torch(tt.grad())) < 1e-10);
      }
    }
  }
}

TEST_CASE("SparseLogitKD equals TRL's top-k KL (tail bucket, renormalised) in libtorch",
          "[torch][logit][sparse]") {
  for (const Case& k : random_cases(8, 616)) {
    const Index top = 1 + Index(k.seed % std::uint64_t(std::min<Index>(k.c - 1, 40)));
    const Matrix<double> s = random_matrix<double>(k.n, k.c, k.seed, 3.0);
    const Matrix<double> t = random_matrix<double>(k.n, k.c, k.seed + 1, 3.0);
    const mmkd::RowMask mask = random_mask(k.n, k.seed + 2);
    const mmkd::IndexMatrix idx = random_indices(k.n, k.c, top, k.seed + 3);
    // the teacher's log-softmax at the loss's temperature, at its k classes (a mass below 1,
    // k < C, so TRL's clamp of the log-mass at −1e-7 does not bind)
    const auto tidx =
        torch::from_blob(const_cast<int*>(idx.data()), {k.n, top}, torch::kInt).to(torch::kLong);
    const auto tlp = torch::log_softmax(to_torch(t) / k.temp, 1).gather(1, tidx);
    const Matrix<double> lp = from_torch(tlp);
    for (bool tail : {true, false}) {
      INFO("N " << k.n << " C " << k.c << " k " << top << " T " << k.temp << " tail " << tail);
      auto ts = to_torch(s, true);
      const auto m = to_torch(mask);
      const auto rows = torch_sparse_kd_rows(ts, tidx, tlp, k.temp, tail);
      const auto loss = 0.7 * k.temp * k.temp * (rows * m).sum() / m.sum();  // batchmean
      loss.backward();

      mmkd::SparseLogitKD<double>::Options o;
      o.support = tail ? mmkd::SparseSupport::TailBucket : mmkd::SparseSupport::Renormalized;
      o.temperature = k.temp;
      o.scale_by_t2 = true;
      o.weight = 0.7;
      mmkd::SparseLogitKD<double> sparse(o);
      Matrix<double> ds = Matrix<double>::Zero(k.n, k.c);
      const double v = sparse.value_and_grad(s, idx, lp, mask, ds);
      CHECK(v == Approx(loss.item<double>()).epsilon(1e-10));
      CHECK(max_rel_diff(ds, from_torch(ts.grad())) < 1e-10);
    }
  }
}

TEST_CASE("FusedLinearKD equals Liger's fused linear distillation written with libtorch ops",
          "[torch][logit][fused]") {
  // Liger's base: logits = h wᵀ + b per head, the cross-entropy (T = 1) summed over the labelled
  // tokens, the divergence summed over them, both divided by their count.
  for (const Case& k : random_cases(6, 717)) {
    const Index d = 1 + Index(k.seed % 9), dt = 1 + Index((k.seed >> 8) % 7);
    const Matrix<double> h = random_matrix<double>(k.n, d, k.seed),
                         w = random_matrix<double>(k.c, d, k.seed + 1),
                         ht = random_matrix<double>(k.n, dt, k.seed + 2),
                         wt = random_matrix<double>(k.c, dt, k.seed + 3),
                         b = random_matrix<double>(k.c, 1, k.seed + 4),
                         bt = random_matrix<double>(k.c, 1, k.seed + 5);
    mmkd::Labels y = random_labels(k.n, k.c, k.seed + 6);
    const mmkd::RowMask keep = random_mask(k.n, k.seed + 7);
    for (Index i = 0; i < k.n; ++i)
      if (!keep(i)) y(i) = -100;
    for (int kind = 0; kind < 6; ++kind) {
      const auto div = static_cast<mmkd::Divergence>(kind);
      INFO("N " << k.n << " V " << k.c << " d " << d << " T " << k.temp << " kind " << kind);
      auto th = to_torch(h, true), tw = to_torch(w, true),
           tb = to_torch(b).view({-1}).detach().requires_grad_(true);
      const auto s = torch::matmul(th, tw.t()) + tb;
      const auto t = torch::matmul(to_torch(ht), to_torch(wt).t()) + to_torch(bt).view({-1});
      const auto ty = to_torch(y).to(torch::kLong);
      const auto m = (ty != -100).to(torch::kFloat64);
      const double mix = div == mmkd::Divergence::GeneralizedJSD ? 0.3 : 0.2;
      const auto soft = (torch_divergence_rows(div, mix, s, t, k.temp) * m).sum();
      const auto hard = F::cross_entropy(
          s, ty, F::CrossEntropyFuncOptions().reduction(torch::kSum).ignore_index(-100));
      const auto loss = (0.4 * hard + 0.7 * 0.9 * k.temp * k.temp * soft) / m.sum();
      loss.backward();

      mmkd::FusedLinearKD<double>::Options o;
      o.divergence.divergence = div;
      o.divergence.beta = 0.3;
      o.divergence.skew = 0.2;
      o.divergence.temperature = k.temp;
      o.divergence.scale_by_t2 = true;
      o.divergence.weight = 0.9;
      o.soft_weight = 0.7;
      o.hard_weight = 0.4;
      o.chunk_rows = 1 + Index(k.seed % 16);
      mmkd::FusedLinearKD<double> fused(o);
      Matrix<double> dh = Matrix<double>::Zero(k.n, d), dw = Matrix<double>::Zero(k.c, d);
      Eigen::VectorXd db = Eigen::VectorXd::Zero(k.c);
      const Eigen::VectorXd bv = b, btv = bt;
      const double v = fused.value_and_grad(h, w, ht, wt, y, bv, btv, dh, dw, db);
      CHECK(v == Approx(loss.item<double>()).epsilon(1e-10));
      CHECK(max_rel_diff(dh, from_torch(th.grad())) < 1e-10);
      CHECK(max_rel_diff(dw, from_torch(tw.grad())) < 1e-10);
      CHECK(max_rel_diff(Matrix<double>(db), from_torch(tb.grad().view({-1, 1}))) < 1e-10);
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

TEST_CASE("CrossEntropy equals libtorch cross_entropy with class weights and probability targets",
          "[torch][logit][ce]") {
  for (const Case& k : random_cases(10, 123)) {
    const Matrix<double> z = random_matrix<double>(k.n, k.c, k.seed, 3.0);
    const mmkd::Labels y = random_labels(k.n, k.c, k.seed + 1);
    const Matrix<double> w = random_matrix<double>(k.c, 1, k.seed + 2).array().abs() + 0.1;
    Matrix<double> p = random_matrix<double>(k.n, k.c, k.seed + 3).array().exp();
    p.array().colwise() /= p.rowwise().sum().array();
    for (double eps : {0.0, 0.2}) {
      INFO("N " << k.n << " C " << k.c << " smoothing " << eps);
      const auto opts =
          F::CrossEntropyFuncOptions().label_smoothing(eps).weight(to_torch(w).flatten());
      typename mmkd::CrossEntropy<double>::Options o;
      o.label_smoothing = eps;
      o.class_weights = w;
      mmkd::CrossEntropy<double> ce(o);
      auto tz = to_torch(z, true);
      const auto hard = F::cross_entropy(tz, to_torch(y), opts);
      hard.backward();
      Matrix<double> dz = Matrix<double>::Zero(k.n, k.c);
      CHECK(ce.value_and_grad(z, y, dz) == Approx(hard.item<double>()).epsilon(1e-10));
      CHECK(max_rel_diff(dz, from_torch(tz.grad())) < 1e-10);
      // reduction="none" is row_values().
      const auto rows = F::cross_entropy(to_torch(z), to_torch(y),
                                         F::CrossEntropyFuncOptions(opts).reduction(torch::kNone));
      CHECK(max_rel_diff(ce.row_values(), from_torch(rows.unsqueeze(1))) < 1e-10);
      auto tz2 = to_torch(z, true);
      const auto soft = F::cross_entropy(tz2, to_torch(p), opts);
      soft.backward();
      dz.setZero();
      CHECK(ce.value_and_grad(z, p, dz) == Approx(soft.item<double>()).epsilon(1e-10));
      CHECK(max_rel_diff(dz, from_torch(tz2.grad())) < 1e-10);
    }
  }
}

TEST_CASE("LogitKD, DecoupledKD and CrossEntropy in float32 are as accurate as libtorch's",
          "[torch][logit][float32]") {
  // DESIGN.md's extreme inputs: common logit offsets of ±1e4, temperatures 0.05–100, one-hot
  // (−inf) teachers. Errors are of float32 against float64 on the same float-rounded inputs.
  const Index n = 16, c = 50;
  const double ninf = -std::numeric_limits<double>::infinity();
  const mmkd::Labels y = random_labels(n, c, 3);
  // Largest errors over the cases, {mmkd value, libtorch value, mmkd gradient, libtorch
  // gradient}, printed with MMKD_REPORT=1 (the README's table of float32 errors).
  std::map<std::string, std::array<double, 4>> worst;
  auto note = [&](const std::string& name, const FloatError& ours, const FloatError& ref) {
    auto& w = worst[name];
    const double v[4] = {ours.value, ref.value, ours.grad, ref.grad};
    for (int k = 0; k < 4; ++k)
      if (!(w[k] >= v[k])) w[k] = std::isnan(v[k]) ? w[k] : v[k];
  };
  for (double offset : {0.0, 1e4, -1e4}) {
    for (double temp : {0.05, 1.0, 4.0, 100.0}) {
      for (bool one_hot : {false, true}) {
        INFO("offset " << offset << " T " << temp << " one-hot teacher " << one_hot);
        Matrix<double> s = (random_matrix<double>(n, c, 1, 3.0).array() + offset).matrix();
        Matrix<double> t = (random_matrix<double>(n, c, 2, 3.0).array() + offset).matrix();
        if (one_hot) {
          for (Index i = 0; i < n; ++i)
            for (Index k = 0; k < c; ++k)
              if (k != y(i)) t(i, k) = ninf;
        }
        s = s.cast<float>().cast<double>();
        t = t.cast<float>().cast<double>();
        const Matrix<float> sf = s.cast<float>(), tf = t.cast<float>();
        const auto tt = [&](torch::Dtype dt) { return to_torch(t).to(dt); };
        const auto ones = [&](torch::Dtype dt) { return torch::ones({n}, dt); };

        mmkd::LogitKD<double> kd64({temp});
        mmkd::LogitKD<float> kd32({float(temp)});
        Matrix<double> g64 = Matrix<double>::Zero(n, c);
        Matrix<float> g32 = Matrix<float>::Zero(n, c);
        const double v64 = kd64.value_and_grad(s, t, g64);
        const double v32 = kd32.value_and_grad(sf, tf, g32);
        const FloatError ours = float_error(v32, v64, g32.cast<double>(), g64);
        const FloatError ref = torch_float_error(s, [&](const torch::Tensor& x, torch::Dtype dt) {
          return torch_kd(x, tt(dt), temp, Reduction::BatchMean, ones(dt));
        });
        INFO("LogitKD value error " << ours.value << " (libtorch " << ref.value << "), gradient "
                                    << ours.grad << " (libtorch " << ref.grad << ")");
        CHECK(within_torch(ours.value, ref.value));
        CHECK(within_torch(ours.grad, ref.grad));
        if (offset != 0 && temp == 4.0 && !one_hot) CHECK(ours.value <= 1e-5);
        note("LogitKD", ours, ref);

        if (one_hot) continue;  // DKD of a one-hot teacher has no non-target part
        mmkd::DecoupledKD<double> dkd64({1.0, 8.0, temp});
        mmkd::DecoupledKD<float> dkd32({1.0f, 8.0f, float(temp)});
        g64.setZero();
        g32.setZero();
        const double d64 = dkd64.value_and_grad(s, t, y, g64);
        const double d32 = dkd32.value_and_grad(sf, tf, y, g32);
        const FloatError ours_d = float_error(d32, d64, g32.cast<double>(), g64);
        const FloatError ref_d = torch_float_error(s, [&](const torch::Tensor& x, torch::Dtype dt) {
          return torch_dkd(x, tt(dt), to_torch(y), 1.0, 8.0, temp);
        });
        INFO("DecoupledKD value error " << ours_d.value << " (libtorch " << ref_d.value
                                        << "), gradient " << ours_d.grad << " (libtorch "
                                        << ref_d.grad << ")");
        CHECK(within_torch(ours_d.value, ref_d.value));
        CHECK(within_torch(ours_d.grad, ref_d.grad));
        if (offset != 0 && temp == 4.0) CHECK(ours_d.value <= 1e-5);
        note("DecoupledKD", ours_d, ref_d);

        mmkd::CrossEntropy<double> ce64;
        mmkd::CrossEntropy<float> ce32;
        g64.setZero();
        g32.setZero();
        const Matrix<double> z = s / temp;  // the logits at the temperature's scale
        const Matrix<float> zf = z.cast<float>();
        const Matrix<double> zr = zf.cast<double>();
        const double c64 = ce64.value_and_grad(zr, y, g64);
        const double c32 = ce32.value_and_grad(zf, y, g32);
        const FloatError ours_c = float_error(c32, c64, g32.cast<double>(), g64);
        const FloatError ref_c = torch_float_error(zr, [&](const torch::Tensor& x, torch::Dtype) {
          return F::cross_entropy(x, to_torch(y));
        });
        INFO("CrossEntropy value error " << ours_c.value << " (libtorch " << ref_c.value
                                         << "), gradient " << ours_c.grad << " (libtorch "
                                         << ref_c.grad << ")");
        CHECK(within_torch(ours_c.value, ref_c.value));
        CHECK(within_torch(ours_c.grad, ref_c.grad));
        note("CrossEntropy", ours_c, ref_c);
      }
    }
  }
  if (std::getenv("MMKD_REPORT")) {
    for (const auto& [name, w] : worst)
      std::printf("float32 %s: value %.1e (libtorch %.1e), gradient %.1e (libtorch %.1e)\n",
                  name.c_str(), w[0], w[1], w[2], w[3]);
  }
}
