// The optimisers against their update rules worked by hand, their errors (nothing written when a
// step throws), and the warm-up + cosine schedule against its closed form.

#include <mmkd/optim/adam.hpp>
#include <mmkd/optim/schedule.hpp>
#include <mmkd/optim/sgd.hpp>

#include <cmath>
#include <limits>

#include "support.hpp"

using namespace mmkd_test;

namespace {

struct One {  // one 1 x 2 parameter and its gradient
  Matrix<double> p = Matrix<double>(1, 2), g = Matrix<double>(1, 2);
  std::vector<mmkd::ParameterView<double>> pv{{"w", {p.data(), 1, 2}}};
  std::vector<mmkd::ParameterView<double>> gv{{"w", {g.data(), 1, 2}}};
  One(double p0, double p1) { p << p0, p1; }
};

}  // namespace

TEST_CASE("Sgd: plain, momentum, dampening, nesterov and weight decay by hand", "[optim]") {
  {
    One x(1.0, -2.0);
    mmkd::Sgd<double> sgd(x.pv, x.gv, {0.1, 0, 0, 0.5});  // lr 0.1, decay 0.5
    x.g << 2.0, 4.0;
    sgd.step();  // g + 0.5 p = (2.5, 3.0)
    CHECK(x.p(0, 0) == Approx(1.0 - 0.25).epsilon(1e-15));
    CHECK(x.p(0, 1) == Approx(-2.0 - 0.3).epsilon(1e-15));
  }
  {
    One x(0.0, 0.0);
    mmkd::Sgd<double> sgd(x.pv, x.gv, {0.1, 0.9, 0.5});  // momentum 0.9, dampening 0.5
    x.g << 1.0, -1.0;
    sgd.step();  // b = g = 1: p = -0.1
    x.g << 3.0, 1.0;
    sgd.step();  // b = 0.9 · 1 + 0.5 · 3 = 2.4: p = -0.1 − 0.24
    CHECK(x.p(0, 0) == Approx(-0.34).epsilon(1e-15));
    CHECK(x.p(0, 1) == Approx(0.1 - 0.1 * (-0.9 + 0.5)).epsilon(1e-15));
    CHECK(sgd.momentum_buffer()[0](0, 0) == Approx(2.4).epsilon(1e-15));
  }
  {
    One x(0.0, 0.0);
    mmkd::Sgd<double>::Options o;
    o.lr = 0.1;
    o.momentum = 0.5;
    o.nesterov = true;
    mmkd::Sgd<double> sgd(x.pv, x.gv, o);
    x.g << 2.0, 0.0;
    sgd.step();  // b = 2, step g + 0.5 b = 3: p = -0.3
    x.g << 2.0, 0.0;
    sgd.step();  // b = 1 + 2 = 3, step 2 + 1.5 = 3.5: p = -0.65
    CHECK(x.p(0, 0) == Approx(-0.65).epsilon(1e-15));
    CHECK(x.p(0, 1) == 0.0);
  }
}

TEST_CASE("Adam and AdamW: the first steps by hand", "[optim]") {
  {
    // Step 1: m̂ = g, v̂ = g², so the update is lr · g / (|g| + eps).
    One x(1.0, 1.0);
    mmkd::Adam<double> adam(x.pv, x.gv, {0.01});
    x.g << 4.0, -0.5;
    adam.step();
    CHECK(x.p(0, 0) == Approx(1.0 - 0.01 * 4.0 / (4.0 + 1e-8)).epsilon(1e-15));
    CHECK(x.p(0, 1) == Approx(1.0 + 0.01 * 0.5 / (0.5 + 1e-8)).epsilon(1e-15));
    // Step 2 with g = 0: m₁ = 0.1 · 4, v₁ = 0.001 · 16, so m₂ = 0.9 m₁, v₂ = 0.999 v₁.
    x.g << 0.0, 0.0;
    const double p1 = x.p(0, 0);
    adam.step();
    const double m2 = 0.9 * 0.4, v2 = 0.999 * 0.001 * 16.0;
    const double c1 = 1 - 0.81, c2 = 1 - 0.999 * 0.999;
    CHECK(x.p(0, 0) ==
          Approx(p1 - 0.01 / c1 * m2 / (std::sqrt(v2) / std::sqrt(c2) + 1e-8)).epsilon(1e-14));
    CHECK(adam.steps() == 2);
    CHECK(adam.exp_avg()[0](0, 0) == Approx(m2).epsilon(1e-15));
  }
  {
    // AdamW: θ(1 − lr · wd) before the same update; Adam with the same decay puts it in g.
    One x(2.0, 2.0), y(2.0, 2.0);
    mmkd::AdamW<double> adamw(x.pv, x.gv, [] {
      auto o = mmkd::AdamW<double>::defaults();
      o.lr = 0.1;
      o.weight_decay = 0.5;
      return o;
    }());
    x.g << 1.0, -1.0;
    adamw.step();
    CHECK(x.p(0, 0) == Approx(2.0 * (1 - 0.05) - 0.1 * 1.0 / (1.0 + 1e-8)).epsilon(1e-15));
    mmkd::Adam<double>::Options o;
    o.lr = 0.1;
    o.weight_decay = 0.5;
    mmkd::Adam<double> adam(y.pv, y.gv, o);
    y.g << 1.0, -1.0;  // g + 0.5 θ = (2, 0): the second entry's gradient is 0, it stays
    adam.step();
    CHECK(y.p(0, 0) == Approx(2.0 - 0.1 * 2.0 / (2.0 + 1e-8)).epsilon(1e-15));
    CHECK(y.p(0, 1) == 2.0);
  }
}

TEST_CASE("optimisers: bad options, mismatched views and NaN gradients", "[optim][errors]") {
  One x(1.0, 2.0);
  Matrix<double> wrong(2, 2);
  std::vector<mmkd::ParameterView<double>> bad{{"w.grad", {wrong.data(), 2, 2}}};
  CHECK_THROWS_WITH(mmkd::Sgd<double>(x.pv, bad),
                    "Sgd: w.grad has shape 2x2, expected 1x2 (the gradient of the parameter at "
                    "the same position)");
  CHECK_THROWS_WITH(mmkd::Adam<double>(x.pv, {}),
                    "Adam: 1 parameters but 0 gradients (one per "
                    "parameter)");
  mmkd::Sgd<double>::Options so;
  so.nesterov = true;
  CHECK_THROWS_WITH(mmkd::Sgd<double>(x.pv, x.gv, so),
                    "Sgd: option nesterov needs momentum > 0 and dampening 0");
  mmkd::Adam<double>::Options ao;
  ao.beta2 = 1.0;
  CHECK_THROWS_WITH(mmkd::Adam<double>(x.pv, x.gv, ao),
                    "Adam: option beta2 must be in [0, 1), got 1.000000");
  // A NaN gradient: the step throws and changes neither the parameter nor the state.
  mmkd::Adam<double> adam(x.pv, x.gv, {0.1});
  x.g << 1.0, 1.0;
  adam.step();
  const Matrix<double> p1 = x.p, m1 = adam.exp_avg()[0];
  x.g(0, 1) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(adam.step(), "Adam: gradient w[0,1] is NaN");
  CHECK(x.p == p1);
  CHECK(adam.exp_avg()[0] == m1);
  CHECK(adam.steps() == 1);
  adam.options().lr = -1;
  x.g(0, 1) = 0;
  CHECK_THROWS_WITH(adam.step(), "Adam: option lr must be finite and > 0, got -1.000000");
  adam.options().lr = 0.1;
  adam.options().amsgrad = true;
  CHECK_THROWS_WITH(adam.step(), "Adam: option amsgrad cannot change after construction");
  CHECK(x.p == p1);
  // zero_grad zeroes the gradient views.
  adam.zero_grad();
  CHECK(x.g.isZero(0));
}

TEST_CASE("warmup_cosine: the closed form", "[optim][schedule]") {
  // base 1, 10 warm-up steps, 110 in all: linear to 1, then half a cosine over 100 steps.
  CHECK(mmkd::warmup_cosine(0, 10, 110, 1.0) == 0.0);
  CHECK(mmkd::warmup_cosine(5, 10, 110, 1.0) == Approx(0.5).epsilon(1e-15));
  CHECK(mmkd::warmup_cosine(10, 10, 110, 1.0) == Approx(1.0).epsilon(1e-15));
  CHECK(mmkd::warmup_cosine(60, 10, 110, 1.0) == Approx(0.5).epsilon(1e-15));
  CHECK(mmkd::warmup_cosine(35, 10, 110, 1.0) ==
        Approx(0.5 * (1 + std::cos(3.14159265358979323846 / 4))).epsilon(1e-15));
  CHECK(mmkd::warmup_cosine(110, 10, 110, 1.0) == Approx(0.0).margin(1e-16));
  CHECK(mmkd::warmup_cosine(500, 10, 110, 2.0, 0.1) == Approx(0.1).epsilon(1e-15));
  CHECK(mmkd::warmup_cosine(60, 10, 110, 2.0, 0.1) == Approx(1.05).epsilon(1e-15));
  CHECK(mmkd::warmup_cosine(3, 0, 0, 1.0) == Approx(0.0).margin(1e-16));  // no warm-up, no span
  CHECK_THROWS_AS(mmkd::warmup_cosine(-1, 10, 110, 1.0), mmkd::InvalidArgument);
  CHECK_THROWS_AS(mmkd::warmup_cosine(0, 20, 10, 1.0), mmkd::InvalidArgument);
  CHECK_THROWS_AS(mmkd::warmup_cosine(0, 0, 10, 1.0, 2.0), mmkd::InvalidArgument);
}
