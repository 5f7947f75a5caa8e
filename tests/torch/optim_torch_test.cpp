// The optimisers step by step against libtorch's torch::optim::SGD, Adam and AdamW: the same
// initial parameters and the same sequence of gradients, compared after every step, in double
// and in float, over the options that change the rule.

#include <mmkd/optim/adam.hpp>
#include <mmkd/optim/sgd.hpp>

#include <string>

#include "torch/torch_support.hpp"

using namespace mmkd_test;

namespace {

// Two parameters of different shapes; `grads(step, k)` is the gradient of parameter k at a step.
template <class S>
struct Problem {
  std::vector<Matrix<S>> params, grads;
  std::vector<mmkd::ParameterView<S>> pv, gv;
  Problem() {
    params = {random_matrix<double>(3, 4, 1).template cast<S>(),
              random_matrix<double>(1, 5, 2).template cast<S>()};
    for (const auto& p : params) grads.push_back(Matrix<S>::Zero(p.rows(), p.cols()));
    for (std::size_t k = 0; k < params.size(); ++k) {
      pv.push_back({"p", {params[k].data(), params[k].rows(), params[k].cols()}});
      gv.push_back({"p", {grads[k].data(), grads[k].rows(), grads[k].cols()}});
    }
  }
};

template <class S>
Matrix<S> gradient(int step, std::size_t k, Index rows, Index cols) {
  // Varying signs and scales, so that momentum and the moments matter.
  return (random_matrix<double>(rows, cols, 100 + std::uint64_t(step) * 7 + k, 1.0 + step % 3))
      .template cast<S>();
}

torch::Dtype dtype_of(float) {
  return torch::kFloat32;
}
torch::Dtype dtype_of(double) {
  return torch::kFloat64;
}

// Runs `steps` steps of mmkd's optimiser (made by make(pv, gv)) and of libtorch's (made by
// make_torch(tensors)) and returns the largest relative difference of the parameters over all
// steps.
template <class S, class Make, class MakeTorch>
double run(int steps, Make&& make, MakeTorch&& make_torch) {
  Problem<S> pr;
  std::vector<torch::Tensor> tp;
  for (const auto& p : pr.params)
    tp.push_back(to_torch(Matrix<double>(p.template cast<double>()))
                     .to(dtype_of(S()))
                     .set_requires_grad(true));
  auto ours = make(pr.pv, pr.gv);
  auto theirs = make_torch(tp);
  double worst = 0;
  for (int step = 0; step < steps; ++step) {
    for (std::size_t k = 0; k < pr.params.size(); ++k) {
      const Matrix<S> g = gradient<S>(step, k, pr.params[k].rows(), pr.params[k].cols());
      pr.grads[k] = g;
      tp[k].mutable_grad() = to_torch(Matrix<double>(g.template cast<double>())).to(dtype_of(S()));
    }
    ours.step();
    theirs.step();
    for (std::size_t k = 0; k < pr.params.size(); ++k)
      worst =
          std::max(worst, max_rel_diff(pr.params[k].template cast<double>(), from_torch(tp[k])));
  }
  return worst;
}

template <class S>
void sgd_cases(double tol) {
  struct C {
    double lr, momentum, dampening, wd;
    bool nesterov;
  };
  for (C c : {C{0.1, 0, 0, 0, false}, C{0.05, 0.9, 0, 0, false}, C{0.05, 0.9, 0.3, 1e-2, false},
              C{0.02, 0.8, 0, 5e-2, true}}) {
    INFO("lr " << c.lr << " momentum " << c.momentum << " dampening " << c.dampening << " wd "
               << c.wd << " nesterov " << c.nesterov);
    const double d = run<S>(
        12,
        [&](auto& p, auto& g) {
          return mmkd::Sgd<S>(p, g, {c.lr, c.momentum, c.dampening, c.wd, c.nesterov});
        },
        [&](std::vector<torch::Tensor>& t) {
          return torch::optim::SGD(t, torch::optim::SGDOptions(c.lr)
                                          .momentum(c.momentum)
                                          .dampening(c.dampening)
                                          .weight_decay(c.wd)
                                          .nesterov(c.nesterov));
        });
    CHECK(d < tol);
  }
}

template <class S>
void adam_cases(double tol) {
  struct C {
    double lr, beta1, beta2, eps, wd;
    bool amsgrad;
  };
  for (C c : {C{1e-2, 0.9, 0.999, 1e-8, 0, false}, C{3e-2, 0.8, 0.99, 1e-6, 1e-2, false},
              C{1e-2, 0.9, 0.999, 1e-8, 5e-2, true}, C{5e-2, 0.0, 0.9, 1e-3, 0, true}}) {
    for (bool decoupled : {false, true}) {
      INFO("lr " << c.lr << " betas " << c.beta1 << ", " << c.beta2 << " eps " << c.eps << " wd "
                 << c.wd << " amsgrad " << c.amsgrad << " AdamW " << decoupled);
      typename mmkd::Adam<S>::Options o;
      o.lr = c.lr;
      o.beta1 = c.beta1;
      o.beta2 = c.beta2;
      o.eps = c.eps;
      o.weight_decay = c.wd;
      o.amsgrad = c.amsgrad;
      o.decoupled_weight_decay = decoupled;
      auto ours = [&](auto& p, auto& g) { return mmkd::Adam<S>(p, g, o); };
      const auto betas = std::make_tuple(c.beta1, c.beta2);
      const double d = decoupled
                           ? run<S>(12, ours,
                                    [&](std::vector<torch::Tensor>& t) {
                                      return torch::optim::AdamW(t, torch::optim::AdamWOptions(c.lr)
                                                                        .betas(betas)
                                                                        .eps(c.eps)
                                                                        .weight_decay(c.wd)
                                                                        .amsgrad(c.amsgrad));
                                    })
                           : run<S>(12, ours, [&](std::vector<torch::Tensor>& t) {
                               return torch::optim::Adam(t, torch::optim::AdamOptions(c.lr)
                                                                .betas(betas)
                                                                .eps(c.eps)
                                                                .weight_decay(c.wd)
                                                                .amsgrad(c.amsgrad));
                             });
      CHECK(d < tol);
    }
  }
}

}  // namespace

TEST_CASE("torch: Sgd matches torch::optim::SGD step by step", "[torch][optim]") {
  sgd_cases<double>(1e-14);
  sgd_cases<float>(1e-6);
}

TEST_CASE("torch: Adam and AdamW match torch::optim::Adam and AdamW step by step",
          "[torch][optim]") {
  adam_cases<double>(1e-13);
  adam_cases<float>(1e-6);
}

TEST_CASE("torch: AdamW's defaults are libtorch's", "[torch][optim]") {
  const auto d = run<double>(
      5, [](auto& p, auto& g) { return mmkd::AdamW<double>(p, g); },
      [](std::vector<torch::Tensor>& t) { return torch::optim::AdamW(t); });
  CHECK(d < 1e-13);
}
