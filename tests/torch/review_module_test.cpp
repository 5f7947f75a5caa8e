// mmkd_torch::ReviewFusionModule in a libtorch graph: a torch layer in front, a libtorch loss
// behind, and every gradient (input, parameters) and running statistic equal to the same chain
// written with libtorch's own ops; the parameters are shared with the mmkd module, and a backward
// of a stale forward is refused.

#include <mmkd/torch.hpp>

#include <catch2/catch.hpp>

#include "review_reference.hpp"

namespace {

mmkd::ReviewFusion<double>::Options options() {
  mmkd::ReviewFusion<double>::Options o;
  o.in_channels = {4, 6};
  o.out_channels = {5, 7};
  o.shapes = {6, 3};
  o.mid_channels = 4;
  o.seed = 3;
  return o;
}

}  // namespace

TEST_CASE("ReviewFusionModule: a libtorch graph through it gets libtorch's gradients",
          "[torch][bridge]") {
  torch::manual_seed(5);
  for (bool train : {true, false}) {
    INFO((train ? "train mode" : "eval mode"));
    auto module = std::make_shared<mmkd_torch::ReviewFusionModule<double>>(options());
    if (!train) {
      // Move the running statistics away from (0, 1) with one train-mode pass first.
      module->forward({torch::randn({3, 4, 6, 6}, torch::kFloat64),
                       torch::randn({3, 6, 3, 3}, torch::kFloat64)});
      module->eval();
    }
    REQUIRE(module->fusion().is_training() == train);
    torch_ref::TorchReview ref(module->fusion(), torch::kFloat64);

    // A graph in front: the features are a differentiable function of x.
    const auto x0 = torch::randn({3, 4, 6, 6}, torch::kFloat64);
    const auto x1 = torch::randn({3, 6, 3, 3}, torch::kFloat64);
    const auto t0 = torch::randn({3, 5, 6, 6}, torch::kFloat64);
    const auto t1 = torch::randn({3, 7, 3, 3}, torch::kFloat64);
    auto a0 = x0.clone().set_requires_grad(true), a1 = x1.clone().set_requires_grad(true);
    auto b0 = x0.clone().set_requires_grad(true), b1 = x1.clone().set_requires_grad(true);

    const auto out = module->forward({torch::tanh(a0), 2 * a1});
    const auto ref_out = ref.forward({torch::tanh(b0), 2 * b1});
    REQUIRE(out.size() == 2);
    const auto loss = torch_ref::torch_hcl(out, {t0, t1}) + 0.5 * out[1].pow(2).sum();
    const auto ref_loss = torch_ref::torch_hcl(ref_out, {t0, t1}) + 0.5 * ref_out[1].pow(2).sum();
    (3.0 * loss).backward();
    (3.0 * ref_loss).backward();

    CHECK(loss.item<double>() == Approx(ref_loss.item<double>()).epsilon(1e-11));
    for (std::size_t k = 0; k < 2; ++k) CHECK(torch::allclose(out[k], ref_out[k], 1e-10, 1e-12));
    CHECK(torch::allclose(a0.grad(), b0.grad(), 1e-9, 1e-12));
    CHECK(torch::allclose(a1.grad(), b1.grad(), 1e-9, 1e-12));
    const auto named = module->named_parameters();
    REQUIRE(named.size() == ref.params.size());
    for (const auto& p : named) {
      INFO(p.key());
      REQUIRE(p.value().grad().defined());
      CHECK(p.value().sizes() == ref.params.at(p.key()).sizes());
      CHECK(torch::allclose(p.value().grad(), ref.params.at(p.key()).grad(), 1e-9, 1e-12));
    }
    for (const auto& b : module->named_buffers()) {
      INFO(b.key());
      CHECK(
          torch::allclose(b.value(), ref.buffers.at(b.key()).to(b.value().dtype()), 1e-12, 1e-12));
    }
  }
}

TEST_CASE("ReviewFusionModule: a torch optimiser updates the mmkd module in place",
          "[torch][bridge]") {
  auto module = std::make_shared<mmkd_torch::ReviewFusionModule<double>>(options());
  torch::optim::SGD opt(module->parameters(), torch::optim::SGDOptions(0.1));
  const auto w_before = module->fusion().parameters()[0].value;
  const mmkd::Matrix<double> before = w_before;
  const auto out = module->forward(
      {torch::randn({2, 4, 6, 6}, torch::kFloat64), torch::randn({2, 6, 3, 3}, torch::kFloat64)});
  (out[0].sum() + out[1].pow(2).sum()).backward();
  const auto grad = module->parameters()[0].grad().clone();
  opt.step();
  // θ ← θ − 0.1·g, in the mmkd module's own memory.
  const auto view = module->fusion().parameters()[0].value;
  const Eigen::Map<const mmkd::Matrix<double>> g(grad.data_ptr<double>(), view.rows(), view.cols());
  CHECK((view - (before - 0.1 * g)).cwiseAbs().maxCoeff() < 1e-15);
  CHECK(g.cwiseAbs().maxCoeff() > 0);
}

TEST_CASE("ReviewFusionModule: a backward of a stale forward is refused", "[torch][bridge]") {
  auto module = std::make_shared<mmkd_torch::ReviewFusionModule<double>>(options());
  const std::vector<torch::Tensor> f{torch::randn({2, 4, 6, 6}, torch::kFloat64),
                                     torch::randn({2, 6, 3, 3}, torch::kFloat64)};
  const auto first = module->forward(f);
  const auto second = module->forward(f);
  CHECK_THROWS_WITH(first[0].sum().backward(), Catch::Contains("backward of an earlier forward"));
  CHECK_NOTHROW(second[0].sum().backward());
  // A second step on the same batch adds the same gradient to .grad, as libtorch accumulates
  // (each backward hands autograd that call's gradient only).
  const auto w = module->parameters()[0];
  const auto once = w.grad().clone();
  module->forward(f)[0].sum().backward();
  CHECK(torch::allclose(w.grad(), 2 * once, 1e-12, 1e-14));
  CHECK_THROWS_WITH(module->forward({f[0]}), Catch::Contains("got 1 features, expected 2"));
  CHECK_THROWS_WITH(module->forward({f[0].to(torch::kFloat32), f[1]}),
                    Catch::Contains("features[0] has dtype Float"));
}
