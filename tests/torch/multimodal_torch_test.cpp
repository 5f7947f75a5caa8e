// Cross-checks of the multimodal losses against the same losses written with libtorch ops and
// differentiated by libtorch's autograd, on random shapes and masks.

#include <mmkd/multimodal/modality_gram_kd.hpp>
#include <mmkd/multimodal/modality_saliency.hpp>
#include <mmkd/multimodal/modality_specific_kd.hpp>
#include <mmkd/multimodal/modality_weight_learner.hpp>

#include "torch/torch_losses.hpp"
#include "torch/torch_support.hpp"

using namespace mmkd_test;
using namespace torch_ref;
using mmkd::GramNormalization;
using mmkd::GramScope;
using mmkd::Tensor3;
namespace F = torch::nn::functional;

namespace {

torch::Tensor to_torch3(const Tensor3<double>& x, bool requires_grad = false) {
  auto t = torch::from_blob(const_cast<double*>(x.data()),
                            {x.dimension(0), x.dimension(1), x.dimension(2)}, torch::kFloat64)
               .clone();
  return t.set_requires_grad(requires_grad);
}

Matrix<double> from_torch3(const torch::Tensor& t) {
  return from_torch(t.reshape({-1, t.size(2)}));
}

mmkd::PresenceMask random_presence(Index n, Index m, std::uint64_t seed) {
  mmkd::SplitMix64 rng(seed);
  mmkd::PresenceMask mask(n, m);
  for (Index k = 0; k < mask.size(); ++k) mask.data()[k] = std::uint8_t(rng.uniform() < 0.75);
  return mask;
}

torch::Tensor to_torch(const mmkd::PresenceMask& m) {
  return torch::from_blob(const_cast<std::uint8_t*>(m.data()), {m.rows(), m.cols()}, torch::kUInt8)
      .to(torch::kFloat64);
}

}  // namespace

TEST_CASE("ModalitySpecificKD equals libtorch on random shapes", "[torch][multimodal][msd]") {
  mmkd::SplitMix64 rng(31);
  for (int rep = 0; rep < 8; ++rep) {
    const Index n = 1 + rng.next() % 20, c = 2 + rng.next() % 50, m = 1 + rng.next() % 4;
    const double temp = rng.uniform(0.5, 6), beta = rng.uniform(0, 2);
    INFO("N " << n << " C " << c << " M " << m);
    const Matrix<double> s = random_matrix<double>(n, c, rep, 2),
                         t = random_matrix<double>(n, c, rep + 100, 2);
    const Tensor3<double> zs = random_stack<double>(m, n, c, rep + 200, 2),
                          zt = random_stack<double>(m, n, c, rep + 300, 2);
    const Matrix<double> w = random_matrix<double>(n, m, rep + 400).cwiseAbs();
    const mmkd::PresenceMask mask = random_presence(n, m, rep + 500);

    auto ts = to_torch(s, true);
    auto tzs = to_torch3(zs, true);
    const auto loss =
        torch_msd(ts, to_torch(t), tzs, to_torch3(zt), to_torch(w) * to_torch(mask), temp, beta);
    loss.backward();

    mmkd::ModalitySpecificKD<double> msd({temp, beta});
    Matrix<double> ds = Matrix<double>::Zero(n, c);
    Tensor3<double> dzs(m, n, c);
    dzs.setZero();
    const double v = msd.value_and_grad(s, t, zs, zt, w, mask, ds, dzs);
    CHECK(v == Approx(loss.item<double>()).epsilon(1e-10));
    CHECK(max_rel_diff(ds, from_torch(ts.grad())) < 1e-10);
    CHECK(max_rel_diff(flat(dzs), from_torch3(tzs.grad())) < 1e-10);
  }
}

TEST_CASE("ModalitySaliency removal KL equals libtorch kl_div", "[torch][multimodal][saliency]") {
  const Matrix<double> t = random_matrix<double>(9, 7, 1, 2);
  const Tensor3<double> tm = random_stack<double>(2, 9, 7, 2, 2);
  const auto tt = to_torch(t), ttm = to_torch3(tm);
  const auto ref =
      torch::stack({kd_rows(ttm[1], tt, 1.5), kd_rows(ttm[0], tt, 1.5)}, 1) / (1.5 * 1.5);
  mmkd::ModalitySaliency<double> sal({mmkd::SaliencyKind::RemovalKL, 1.5});
  CHECK(max_rel_diff(sal.compute(t, tm), from_torch(ref)) < 1e-12);
}

TEST_CASE("ModalityGramKD equals libtorch normalize + bmm + masked MSE",
          "[torch][multimodal][gram]") {
  mmkd::SplitMix64 rng(77);
  for (int rep = 0; rep < 6; ++rep) {
    const Index n = 1 + rng.next() % 12, m = 1 + rng.next() % 4, ds_w = 1 + rng.next() % 20,
                dt_w = 1 + rng.next() % 20;
    const Tensor3<double> s = random_stack<double>(m, n, ds_w, rep, 2),
                          t = random_stack<double>(m, n, dt_w, rep + 9, 2);
    mmkd::PresenceMask mask = random_presence(n, m, rep + 17);
    mask(0, 0) = 1;  // at least one entry compared
    for (auto norm :
         {GramNormalization::Cosine, GramNormalization::Raw, GramNormalization::Frobenius}) {
      for (auto scope : {GramScope::PerSample, GramScope::Batch}) {
        INFO("N " << n << " M " << m << " Ds " << ds_w << " Dt " << dt_w << " norm " << int(norm)
                  << " scope " << int(scope));
        auto ts = to_torch3(s, true), tt = to_torch3(t, true);
        const auto pm = to_torch(mask);                        // N x M
        const auto pairs = pm.unsqueeze(2) * pm.unsqueeze(1);  // N x M x M
        auto gram_of = [&](const torch::Tensor& f) {
          auto x = f.permute({1, 0, 2});  // N x M x D
          if (norm == GramNormalization::Cosine)
            x = F::normalize(x, F::NormalizeFuncOptions().dim(2).eps(1e-12));
          auto g = torch::bmm(x, x.transpose(1, 2)) * pairs;
          if (norm == GramNormalization::Raw) g = g / double(f.size(2));
          if (scope == GramScope::Batch) {
            const auto cnt = pairs.sum(0);
            g = g.sum(0) / cnt.clamp_min(1);
            if (norm == GramNormalization::Frobenius) g = g / g.norm().clamp_min(1e-12);
          } else if (norm == GramNormalization::Frobenius) {
            g = g / g.flatten(1).norm(2, {1}).clamp_min(1e-12).view(
                        {-1, 1, 1});  // guarded as F.normalize
          }
          return g;
        };
        const auto diff2 = (gram_of(ts) - gram_of(tt)).pow(2);
        const auto count = scope == GramScope::Batch ? (pairs.sum(0) > 0).sum() : pairs.sum();
        const auto loss = diff2.sum() / count;
        loss.backward();

        mmkd::ModalityGramKD<double>::Options o;
        o.normalization = norm;
        o.scope = scope;
        mmkd::ModalityGramKD<double> gram(o);
        Tensor3<double> gs(m, n, ds_w), gt(m, n, dt_w);
        gs.setZero();
        gt.setZero();
        const double v = gram.value_and_grad(s, t, mask, gs, gt);
        CHECK(v == Approx(loss.item<double>()).epsilon(1e-10).margin(1e-14));
        CHECK(max_rel_diff(flat(gs), from_torch3(ts.grad())) < 1e-9);
        CHECK(max_rel_diff(flat(gt), from_torch3(tt.grad())) < 1e-9);
      }
    }
  }
}

TEST_CASE("ModalityWeightLearner equals the same MLP in libtorch", "[torch][multimodal][learner]") {
  mmkd::ModalityWeightLearner<double>::Options o;
  o.hidden = 11;
  o.use_saliency = true;
  mmkd::ModalityWeightLearner<double> net(o);
  const Matrix<double> x = random_matrix<double>(8, 2, 5).cwiseAbs(),
                       dw = random_matrix<double>(8, 1, 6);
  const Matrix<double> w = net.forward(x);
  net.backward(dw);
  auto params = net.parameters();
  auto w1 = to_torch(Matrix<double>(params[0].value), true),
       b1 = to_torch(Matrix<double>(params[1].value), true);
  auto w2 = to_torch(Matrix<double>(params[2].value), true),
       b2 = to_torch(Matrix<double>(params[3].value), true);
  const auto h = torch::relu(F::linear(to_torch(x), w1, b1.view({-1})));
  const auto out = torch::sigmoid(F::linear(h, w2, b2.view({-1})));
  (out * to_torch(dw)).sum().backward();
  CHECK(max_rel_diff(w, from_torch(out)) < 1e-12);
  auto grads = net.gradients();
  CHECK(max_rel_diff(Matrix<double>(grads[0].value), from_torch(w1.grad())) < 1e-12);
  CHECK(max_rel_diff(Matrix<double>(grads[1].value), from_torch(b1.grad())) < 1e-12);
  CHECK(max_rel_diff(Matrix<double>(grads[2].value), from_torch(w2.grad())) < 1e-12);
  CHECK(max_rel_diff(Matrix<double>(grads[3].value), from_torch(b2.grad())) < 1e-12);
}

TEST_CASE("ModalitySpecificKD and ModalityGramKD in float32 are as accurate as libtorch's",
          "[torch][multimodal][float32]") {
  // MSD at logit offsets of ±1e4 (its KD terms share LogitKD's kernel) and T = 1 (its default)
  // and 4; the Gram loss on embeddings of magnitude 1e4. Gradients with respect to the full
  // student logits / the student embeddings.
  const Index n = 12, c = 40, m = 3, d = 16;
  const Matrix<double> w = random_matrix<double>(n, m, 9).cwiseAbs();
  const Matrix<float> wf = w.cast<float>();
  const Matrix<double> wr = wf.cast<double>();
  for (double offset : {0.0, 1e4, -1e4}) {
    for (double temp : {1.0, 4.0}) {
      INFO("offset " << offset << " T " << temp);
      auto logits = [&](std::uint64_t seed) {
        return Matrix<double>(
            (random_matrix<double>(n, c, seed, 3.0).array() + offset).cast<float>().cast<double>());
      };
      auto stack = [&](std::uint64_t seed) {
        Tensor3<double> x = random_stack<double>(m, n, c, seed, 3.0);
        for (Index k = 0; k < x.size(); ++k) x.data()[k] = double(float(x.data()[k] + offset));
        return x;
      };
      const Matrix<double> s = logits(1), t = logits(2);
      const Tensor3<double> zs = stack(3), zt = stack(4);
      const Tensor3<float> zsf = zs.cast<float>(), ztf = zt.cast<float>();
      mmkd::ModalitySpecificKD<double> msd64({temp, 1.0});
      mmkd::ModalitySpecificKD<float> msd32({float(temp), 1.0f});
      Matrix<double> g64 = Matrix<double>::Zero(n, c);
      Matrix<float> g32 = Matrix<float>::Zero(n, c);
      Tensor3<double> dz64(m, n, c);
      Tensor3<float> dz32(m, n, c);
      dz64.setZero();
      dz32.setZero();
      const double v64 = msd64.value_and_grad(s, t, zs, zt, wr, g64, dz64);
      const double v32 =
          msd32.value_and_grad(s.cast<float>(), t.cast<float>(), zsf, ztf, wf, g32, dz32);
      const FloatError ours = float_error(v32, v64, g32.cast<double>(), g64);
      const FloatError ref = torch_float_error(s, [&](const torch::Tensor& x, torch::Dtype dt) {
        return torch_msd(x, to_torch(t).to(dt), to_torch3(zs).to(dt), to_torch3(zt).to(dt),
                         to_torch(wr).to(dt), temp, 1.0);
      });
      INFO("MSD value error " << ours.value << " (libtorch " << ref.value << "), gradient "
                              << ours.grad << " (libtorch " << ref.grad << ")");
      CHECK(within_torch(ours.value, ref.value));
      CHECK(within_torch(ours.grad, ref.grad));
    }
  }
  const Tensor3<double> es = random_stack<double>(m, n, d, 5, 1e4),
                        et = random_stack<double>(m, n, d, 6, 1e4);
  Tensor3<double> es_r = es.cast<float>().cast<double>(), et_r = et.cast<float>().cast<double>();
  mmkd::ModalityGramKD<double> gram64;
  mmkd::ModalityGramKD<float> gram32;
  Tensor3<double> gs64(m, n, d);
  Tensor3<float> gs32(m, n, d);
  gs64.setZero();
  gs32.setZero();
  const double v64 = gram64.value_and_grad(es_r, et_r, gs64);
  const Tensor3<float> esf = es_r.cast<float>(), etf = et_r.cast<float>();
  const double v32 = gram32.value_and_grad(esf, etf, gs32);
  const Tensor3<double> gs32d = gs32.cast<double>();
  const FloatError ours = float_error(v32, v64, flat(gs32d), flat(gs64));
  FloatError ref;
  {
    auto x64 = to_torch3(es_r, true);
    auto x32 = to_torch3(es_r).to(torch::kFloat32).set_requires_grad(true);
    const auto l64 = torch_gram(x64, to_torch3(et_r));
    const auto l32 = torch_gram(x32, to_torch3(et_r).to(torch::kFloat32));
    l64.backward();
    l32.backward();
    ref = float_error(l32.item<double>(), l64.item<double>(), from_torch3(x32.grad()),
                      from_torch3(x64.grad()));
  }
  INFO("ModalityGramKD value error " << ours.value << " (libtorch " << ref.value << "), gradient "
                                     << ours.grad << " (libtorch " << ref.grad << ")");
  CHECK(within_torch(ours.value, ref.value));
  CHECK(within_torch(ours.grad, ref.grad));
}
