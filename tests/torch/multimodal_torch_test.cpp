// Cross-checks of the multimodal losses against the same losses written with libtorch ops and
// differentiated by libtorch's autograd, on random shapes and masks.

#include "torch/torch_losses.hpp"
#include "torch/torch_support.hpp"

using namespace mmkd_test;
using namespace mmkd_torch;
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
