// BatchNorm2d: a hand-computed example, finite differences in train and eval mode, errors and the
// strong guarantee.

#include "support.hpp"

using namespace mmkd_test;

namespace {

// <u, BN(x)> for the module's current parameters and mode.
double scalar(mmkd::BatchNorm2d<double>& bn, const Matrix<double>& x, const Matrix<double>& u,
              Index n, Index c, Index h, Index w) {
  const auto& y = bn.forward(map4(x, n, c, h, w));
  return (Eigen::Map<const Matrix<double>>(y.data(), n * c, h * w).array() * u.array()).sum();
}

}  // namespace

TEST_CASE("BatchNorm2d train mode: hand-computed output and running statistics",
          "[review][batchnorm]") {
  // One channel, values 1, 2, 3, 6: mean 3, biased variance 3.5, unbiased 14/3.
  Matrix<double> x(2, 2);
  x << 1, 2, 3, 6;
  mmkd::BatchNorm2d<double> bn({1});
  const auto& y = bn.forward(map4(x, 2, 1, 1, 2));
  for (Index k = 0; k < 4; ++k)
    CHECK(y.data()[k] == Approx((x.data()[k] - 3.0) / std::sqrt(3.5 + 1e-5)).epsilon(1e-14));
  auto buf = bn.buffers();
  CHECK(std::string(buf[0].name) == "running_mean");
  CHECK(buf[0].value(0, 0) == Approx(0.1 * 3.0).epsilon(1e-15));
  CHECK(buf[1].value(0, 0) == Approx(0.9 + 0.1 * 14.0 / 3.0).epsilon(1e-15));
  // Eval mode uses them: y = (x − 0.3)/√(1.36667 + ε).
  bn.eval();
  const auto& ye = bn.forward(map4(x, 2, 1, 1, 2));
  CHECK(ye.data()[3] == Approx((6.0 - 0.3) / std::sqrt(0.9 + 1.4 / 3.0 + 1e-5)).epsilon(1e-14));
  CHECK(buf[0].value(0, 0) == Approx(0.3).epsilon(1e-15));  // unchanged in eval mode
}

TEST_CASE("BatchNorm2d backward matches finite differences in train and eval mode",
          "[review][batchnorm]") {
  const Index n = 3, c = 2, h = 2, w = 3;
  const Matrix<double> x = random_matrix<double>(n * c, h * w, 1, 2.0);
  const Matrix<double> u = random_matrix<double>(n * c, h * w, 2);
  for (bool train : {true, false}) {
    INFO("train " << train);
    mmkd::BatchNorm2d<double> bn({c});
    auto params = bn.parameters();
    params[0].value = random_matrix<double>(1, c, 3);
    params[1].value = random_matrix<double>(1, c, 4);
    if (!train) {
      bn.buffers()[0].value << 0.5, -1.0;
      bn.buffers()[1].value << 2.0, 0.3;
      bn.eval();
    }
    bn.forward(map4(x, n, c, h, w));
    Matrix<double> dx = Matrix<double>::Ones(n * c, h * w);
    bn.backward(map4(u, n, c, h, w), out4(dx, n, c, h, w));
    dx.array() -= 1.0;
    auto fx = [&](const Matrix<double>& v) { return scalar(bn, v, u, n, c, h, w); };
    CHECK(mmkd::check_gradient(fx, x, dx, tight()));
    const auto grads = bn.gradients();
    for (int p = 0; p < 2; ++p) {
      INFO(params[std::size_t(p)].name);
      const Matrix<double> p0 = params[std::size_t(p)].value;
      auto fp = [&](const Matrix<double>& v) {
        params[std::size_t(p)].value = v;
        const double r = scalar(bn, x, u, n, c, h, w);
        params[std::size_t(p)].value = p0;
        return r;
      };
      CHECK(mmkd::check_gradient(fp, p0, grads[std::size_t(p)].value, tight()));
    }
  }
}

TEST_CASE("BatchNorm2d errors leave the module unchanged", "[review][batchnorm]") {
  mmkd::BatchNorm2d<double> bn({2});
  Matrix<double> x = random_matrix<double>(2, 1, 5), dx = Matrix<double>::Zero(2, 1);
  CHECK_THROWS_WITH(bn.backward(map4(x, 1, 2, 1, 1), out4(dx, 1, 2, 1, 1)),
                    Catch::Contains("backward called before forward"));
  CHECK_THROWS_WITH(bn.forward(map4(x, 1, 2, 1, 1)),
                    Catch::Contains("BatchNorm2d: x has one value per channel"));
  bn.eval();
  CHECK_NOTHROW(bn.forward(map4(x, 1, 2, 1, 1)));  // eval mode accepts a single value
  bn.train();
  Matrix<double> x2 = random_matrix<double>(4, 3, 6);
  x2(3, 1) = std::numeric_limits<double>::quiet_NaN();
  const Matrix<double> rm = bn.buffers()[0].value, rv = bn.buffers()[1].value;
  CHECK_THROWS_WITH(bn.forward(map4(x2, 2, 2, 1, 3)), Catch::Contains("x[1,1,0,1] is NaN"));
  CHECK(bit_identical(Matrix<double>(bn.buffers()[0].value), rm));
  CHECK(bit_identical(Matrix<double>(bn.buffers()[1].value), rv));
  CHECK_THROWS_WITH(mmkd::BatchNorm2d<double>({0}), Catch::Contains("channels must be >= 1"));
  CHECK_THROWS_WITH(bn.forward(map4(x2, 3, 4, 1, 1)),
                    Catch::Contains("x has 4 channels, expected 2"));
}
