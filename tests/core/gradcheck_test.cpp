#include "support.hpp"

using namespace mmkd_test;

// f(x) = Σ x_ij³, df/dx = 3 x².
static double cubic(const Matrix<double>& x) {
  return x.array().cube().sum();
}

TEST_CASE("check_gradient passes a correct gradient", "[gradcheck]") {
  const Matrix<double> x = random_matrix<double>(3, 4, 5);
  const Matrix<double> g = 3 * x.array().square();
  const auto r = mmkd::check_gradient(cubic, x, g, tight());
  INFO(r.message());
  CHECK(r.passed);
  CHECK(r.relative_error < 1e-8);
  CHECK(r.elements == 12);
}

TEST_CASE("check_gradient names the worst element of a wrong gradient", "[gradcheck]") {
  const Matrix<double> x = random_matrix<double>(3, 4, 5);
  Matrix<double> g = 3 * x.array().square();
  g(2, 1) += 1e-2;
  const auto r = mmkd::check_gradient(cubic, x, g);
  CHECK_FALSE(r.passed);
  CHECK(r.worst_row == 2);
  CHECK(r.worst_col == 1);
  CHECK(r.analytic - r.numeric == Approx(1e-2).epsilon(1e-4));
  CHECK_THAT(r.message(), Catch::Contains("FAILED") && Catch::Contains("worst [2,1]"));
}

TEST_CASE("check_value_and_grad rejects a function that overwrites instead of adding",
          "[gradcheck]") {
  const Matrix<double> x = random_matrix<double>(2, 3, 9);
  auto adds = [](const Matrix<double>& xx, Matrix<double>& g) {
    g += 3 * xx.array().square().matrix();
    return cubic(xx);
  };
  auto overwrites = [](const Matrix<double>& xx, Matrix<double>& g) {
    g = 3 * xx.array().square().matrix();
    return cubic(xx);
  };
  CHECK(mmkd::check_value_and_grad(adds, x, tight()).passed);
  CHECK_FALSE(mmkd::check_value_and_grad(overwrites, x, tight()).passed);
}

TEST_CASE("check_vjp catches a transposed Jacobian", "[gradcheck]") {
  // y = A x with A 3x3 not symmetric; the VJP is Aᵀ u.
  Matrix<double> a(3, 3);
  a << 1, 2, 0, 0, 1, 5, 3, 0, 1;
  auto forward = [&](const Matrix<double>& x) { return Matrix<double>(a * x); };
  auto right = [&](const Matrix<double>&, const Matrix<double>& u) {
    return Matrix<double>(a.transpose() * u);
  };
  auto wrong = [&](const Matrix<double>&, const Matrix<double>& u) {
    return Matrix<double>(a * u);
  };
  const Matrix<double> x = random_matrix<double>(3, 2, 4);
  CHECK(mmkd::check_vjp(forward, right, x, tight()).passed);
  CHECK_FALSE(mmkd::check_vjp(forward, wrong, x, tight()).passed);
}
