#include <mmkd/logit/cross_entropy.hpp>

#include "support.hpp"

using namespace mmkd_test;
using mmkd::Reduction;

TEMPLATE_TEST_CASE("CrossEntropy matches a hand calculation", "[logit][ce]", float, double) {
  using T = TestType;
  // logits (0, log 3): p = (1/4, 3/4).
  Matrix<T> z(1, 2);
  z << 0, std::log(T(3));
  mmkd::Labels y(1);
  y << 1;
  mmkd::CrossEntropy<T> ce;
  CHECK(ce.value(z, y) == Approx(-std::log(0.75)).epsilon(Tol<T>::rel));
  // Smoothing 0.2 over 2 classes: target (0.1, 0.9).
  ce.options().label_smoothing = T(0.2);
  CHECK(ce.value(z, y) ==
        Approx(-(0.1 * std::log(0.25) + 0.9 * std::log(0.75))).epsilon(Tol<T>::rel));
  Matrix<T> g = Matrix<T>::Zero(1, 2);
  ce.value_and_grad(z, y, g);
  CHECK(g(0, 0) == Approx(0.25 - 0.1).epsilon(Tol<T>::rel));
  CHECK(g(0, 1) == Approx(0.75 - 0.9).epsilon(Tol<T>::rel));
}

TEST_CASE("CrossEntropy gradient matches finite differences", "[logit][ce][gradient]") {
  const Matrix<double> z = random_matrix<double>(7, 5, 71, 2.0);
  const mmkd::Labels y = random_labels(7, 5, 72);
  mmkd::RowMask mask(7);
  mask << 1, 1, 0, 1, 0, 1, 1;
  for (auto red : {Reduction::Mean, Reduction::Sum}) {
    for (double eps : {0.0, 0.1}) {
      typename mmkd::CrossEntropy<double>::Options o;
      o.label_smoothing = eps;
      o.reduction = red;
      o.weight = 1.3;
      mmkd::CrossEntropy<double> ce(o);
      auto f = [&](const Matrix<double>& x, Matrix<double>& g) {
        return ce.value_and_grad(x, y, g);
      };
      auto fm = [&](const Matrix<double>& x, Matrix<double>& g) {
        return ce.value_and_grad(x, y, mask, g);
      };
      const auto r = mmkd::check_value_and_grad(f, z, tight());
      const auto rm = mmkd::check_value_and_grad(fm, z, tight());
      INFO(r.message() << "\n" << rm.message());
      CHECK(r.passed);
      CHECK(rm.passed);
    }
  }
}

TEMPLATE_TEST_CASE("CrossEntropy invariants, masks and extremes", "[logit][ce]", float, double) {
  using T = TestType;
  const T inf = std::numeric_limits<T>::infinity();
  const Matrix<T> z = random_matrix<T>(6, 4, 81, 2.0);
  const mmkd::Labels y = random_labels(6, 4, 82);
  mmkd::CrossEntropy<T> ce({T(0.1)});

  SECTION("gradient rows sum to zero; BatchMean is Mean; Sum is N times Mean") {
    Matrix<T> g = Matrix<T>::Zero(6, 4);
    const T v = ce.value_and_grad(z, y, g);
    CHECK(g.rowwise().sum().cwiseAbs().maxCoeff() < T(Tol<T>::rel));
    ce.options().reduction = Reduction::BatchMean;
    CHECK(ce.value(z, y) == v);
    ce.options().reduction = Reduction::Sum;
    CHECK(ce.value(z, y) == Approx(6 * v).epsilon(Tol<T>::rel));
  }
  SECTION("a mask acts like ignore_index: mean over the rows that take part") {
    mmkd::RowMask mask(6);
    mask << 0, 1, 1, 0, 1, 1;
    mmkd::Labels y_pad = y;
    y_pad(0) = -100;  // labels of masked rows are not checked
    Matrix<T> z_used(4, 4);
    mmkd::Labels y_used(4);
    z_used << z.row(1), z.row(2), z.row(4), z.row(5);
    y_used << y(1), y(2), y(4), y(5);
    CHECK(ce.value(z, y_pad, mask) == Approx(ce.value(z_used, y_used)).epsilon(Tol<T>::rel));
  }
  SECTION("logits of +-1e4 and a -inf class away from the label") {
    Matrix<T> big(2, 3);
    big << T(1e4), T(-1e4), T(0), T(-1e4), T(-1e4), T(1e4);
    mmkd::Labels yb(2);
    yb << 1, 2;
    Matrix<T> g = Matrix<T>::Zero(2, 3);
    const T v = ce.value_and_grad(big, yb, g);
    CHECK(std::isfinite(v));
    CHECK(g.allFinite());
    ce.options().label_smoothing = 0;
    Matrix<T> z2(1, 3);
    z2 << 1, -inf, 2;
    mmkd::Labels y2(1);
    y2 << 2;
    CHECK(ce.value(z2, y2) == Approx(std::log(1 + std::exp(-1.0))).epsilon(Tol<T>::rel));
  }
}

TEMPLATE_TEST_CASE("CrossEntropy rejects bad input and writes nothing", "[logit][ce][errors]",
                   float, double) {
  using T = TestType;
  const T inf = std::numeric_limits<T>::infinity();
  Matrix<T> z = random_matrix<T>(3, 4, 1);
  Matrix<T> g = random_matrix<T>(3, 4, 2);
  const Matrix<T> g0 = g;
  mmkd::Labels y(3);
  y << 0, 3, 1;
  mmkd::CrossEntropy<T> ce;
  CHECK_THROWS_WITH(mmkd::CrossEntropy<T>({T(1.5)}),
                    "CrossEntropy: option label_smoothing must be in [0, 1], got 1.500000");
  Matrix<T> g_wrong(3, 5);
  CHECK_THROWS_WITH(ce.value_and_grad(z, y, g_wrong),
                    "CrossEntropy: d_logits has shape 3x5, expected 3x4 (same as logits)");
  y(2) = -1;
  CHECK_THROWS_WITH(ce.value_and_grad(z, y, g),
                    "CrossEntropy: labels[2] is -1, expected a class in [0, 4)");
  y(2) = 1;
  z(1, 3) = -inf;
  CHECK_THROWS_WITH(ce.value_and_grad(z, y, g),
                    "CrossEntropy: logits[1,3] is -Inf at the label: the loss is infinite");
  z(1, 3) = 0;
  z(0, 2) = -inf;
  CHECK(std::isfinite(ce.value(z, y)));
  ce.options().label_smoothing = T(0.1);
  CHECK_THROWS_WITH(
      ce.value_and_grad(z, y, g),
      "CrossEntropy: logits[0,2] is -Inf and label smoothing gives every class positive "
      "probability");
  z(0, 2) = inf;
  CHECK_THROWS_WITH(ce.value_and_grad(z, y, g), "CrossEntropy: logits[0,2] is +Inf");
  CHECK(bit_identical(g, g0));
}

TEMPLATE_TEST_CASE("CrossEntropy with class weights and soft targets matches hand calculations",
                   "[logit][ce]", float, double) {
  using T = TestType;
  // Both rows have logits (0, log 3): p = (1/4, 3/4).
  Matrix<T> z(2, 2);
  z << 0, std::log(T(3)), 0, std::log(T(3));
  mmkd::Labels y(2);
  y << 0, 1;
  typename mmkd::CrossEntropy<T>::Options o;
  o.class_weights.resize(2);
  o.class_weights << 2, 3;
  mmkd::CrossEntropy<T> ce(o);
  // PyTorch's weighted mean: (2·(−log 1/4) + 3·(−log 3/4)) / (2 + 3).
  const double l0 = -2 * std::log(0.25), l1 = -3 * std::log(0.75);
  CHECK(ce.value(z, y) == Approx((l0 + l1) / 5).epsilon(Tol<T>::rel));
  CHECK(ce.row_values()(0) == Approx(l0).epsilon(Tol<T>::rel));
  CHECK(ce.row_values()(1) == Approx(l1).epsilon(Tol<T>::rel));
  // Soft targets (0.3, 0.7) and (1, 0), weighted: mean over the 2 rows, not over the weights.
  Matrix<T> soft(2, 2);
  soft << T(0.3), T(0.7), 1, 0;
  const double s0 = -(0.3 * 2 * std::log(0.25) + 0.7 * 3 * std::log(0.75));
  const double s1 = -2 * std::log(0.25);
  Matrix<T> g = Matrix<T>::Zero(2, 2);
  CHECK(ce.value_and_grad(z, soft, g) == Approx((s0 + s1) / 2).epsilon(Tol<T>::rel));
  // dℓ/dz = (Σ ỹ) p − ỹ, ỹ = w ⊙ y; halved by the mean.
  CHECK(g(0, 0) == Approx((2.7 * 0.25 - 0.6) / 2).epsilon(Tol<T>::rel));
  CHECK(g(0, 1) == Approx((2.7 * 0.75 - 2.1) / 2).epsilon(Tol<T>::rel));
  CHECK(g(1, 0) == Approx((2 * 0.25 - 2) / 2).epsilon(Tol<T>::rel));
}

TEST_CASE("CrossEntropy soft targets and class weights match finite differences",
          "[logit][ce][gradient]") {
  const Matrix<double> z = random_matrix<double>(6, 5, 91, 2.0);
  Matrix<double> y = random_matrix<double>(6, 5, 92).array().abs();
  y.col(2).setZero();
  const mmkd::Labels labels = random_labels(6, 5, 93);
  mmkd::RowMask mask(6);
  mask << 1, 0, 1, 1, 1, 0;
  for (bool weighted : {false, true}) {
    for (double eps : {0.0, 0.2}) {
      typename mmkd::CrossEntropy<double>::Options o;
      o.label_smoothing = eps;
      if (weighted) o.class_weights = random_matrix<double>(5, 1, 94).array().abs();
      mmkd::CrossEntropy<double> ce(o);
      auto fs = [&](const Matrix<double>& x, Matrix<double>& g) {
        return ce.value_and_grad(x, y, mask, g);
      };
      auto fh = [&](const Matrix<double>& x, Matrix<double>& g) {
        return ce.value_and_grad(x, labels, g);
      };
      const auto rs = mmkd::check_value_and_grad(fs, z, tight());
      const auto rh = mmkd::check_value_and_grad(fh, z, tight());
      INFO("weighted " << weighted << " eps " << eps << "\n"
                       << rs.message() << "\n"
                       << rh.message());
      CHECK(rs.passed);
      CHECK(rh.passed);
    }
  }
}

TEST_CASE("CrossEntropy rejects bad soft targets and class weights", "[logit][ce][errors]") {
  const Matrix<double> z = random_matrix<double>(3, 4, 1);
  Matrix<double> y = Matrix<double>::Constant(3, 4, 0.25);
  Matrix<double> g = random_matrix<double>(3, 4, 2);
  const Matrix<double> g0 = g;
  mmkd::CrossEntropy<double> ce;
  y(1, 2) = -0.5;
  CHECK_THROWS_WITH(ce.value_and_grad(z, y, g),
                    "CrossEntropy: targets[1,2] is -0.500000, expected finite and >= 0");
  y(1, 2) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(ce.value_and_grad(z, y, g),
                    "CrossEntropy: targets[1,2] is NaN, expected finite and >= 0");
  y(1, 2) = 0.25;
  CHECK_THROWS_WITH(ce.value_and_grad(z, Matrix<double>(3, 5), g),
                    "CrossEntropy: targets has shape 3x5, expected 3x4 (same as logits)");
  ce.options().class_weights = Eigen::VectorXd::Ones(3);
  CHECK_THROWS_WITH(ce.value_and_grad(z, y, g),
                    "CrossEntropy: option class_weights has 3 entries, expected 0 or 4 (one per "
                    "class)");
  ce.options().class_weights = Eigen::VectorXd::Ones(4);
  ce.options().class_weights(3) = -1;
  CHECK_THROWS_WITH(ce.value_and_grad(z, y, g),
                    "CrossEntropy: option class_weights[3] is -1.000000, expected finite and >= 0");
  ce.options().class_weights(3) = 0;
  Matrix<double> zinf = z;
  zinf(0, 1) = -std::numeric_limits<double>::infinity();
  CHECK_THROWS_WITH(ce.value_and_grad(zinf, y, g),
                    "CrossEntropy: logits[0,1] is -Inf where the target is positive: the loss is "
                    "infinite");
  CHECK(bit_identical(g, g0));
  y(0, 1) = 0;  // a ruled-out class with zero target is fine
  CHECK(std::isfinite(ce.value(zinf, y)));
}
