#include "support.hpp"

using namespace mmkd_test;

TEMPLATE_TEST_CASE("l2_normalize_rows gives unit rows and leaves zero rows at zero",
                   "[core][normalize]", float, double) {
  using T = TestType;
  Matrix<T> x = random_matrix<T>(4, 5, 3);
  x.row(2).setZero();
  Matrix<T> u(4, 5);
  mmkd::Vector<T> norms(4);
  mmkd::l2_normalize_rows(x, u, norms);
  for (Index i : {0, 1, 3}) {
    CHECK(u.row(i).norm() == Approx(1).epsilon(Tol<T>::rel));
    CHECK(norms(i) == Approx(x.row(i).norm()));
  }
  CHECK(norms(2) == 0);
  CHECK(u.row(2).isZero());
  CHECK(u.allFinite());

  // Scaling a row does not change its direction.
  Matrix<T> y = x;
  y.row(0) *= T(1e3);
  Matrix<T> v(4, 5);
  mmkd::l2_normalize_rows(y, v, norms);
  CHECK(v.row(0).isApprox(u.row(0), T(Tol<T>::rel * 10)));
}

TEST_CASE("l2_normalize_rows_backward is the vector-Jacobian product", "[core][normalize]") {
  const double eps = 1e-12;
  auto forward = [&](const Matrix<double>& x) {
    Matrix<double> u(x.rows(), x.cols());
    mmkd::Vector<double> n(x.rows());
    mmkd::l2_normalize_rows(x, u, n, eps);
    return u;
  };
  auto vjp = [&](const Matrix<double>& x, const Matrix<double>& du) {
    Matrix<double> u(x.rows(), x.cols());
    mmkd::Vector<double> n(x.rows());
    mmkd::l2_normalize_rows(x, u, n, eps);
    Matrix<double> dx = Matrix<double>::Zero(x.rows(), x.cols());
    mmkd::l2_normalize_rows_backward(u, n, du, dx, eps);
    return dx;
  };
  for (std::uint64_t seed : {1u, 2u, 3u}) {
    const Matrix<double> x = random_matrix<double>(3, 6, seed);
    auto o = tight();
    o.seed = seed;
    const auto r = mmkd::check_vjp(forward, vjp, x, o);
    INFO(r.message());
    CHECK(r.passed);
  }
}

TEST_CASE("l2_normalize_rows_backward is finite at a zero row", "[core][normalize]") {
  Matrix<double> x = Matrix<double>::Zero(1, 3), u(1, 3), du(1, 3), dx = Matrix<double>::Zero(1, 3);
  mmkd::Vector<double> n(1);
  du << 1, 2, 3;
  mmkd::l2_normalize_rows(x, u, n, 1e-8);
  mmkd::l2_normalize_rows_backward(u, n, du, dx, 1e-8);
  CHECK(dx.allFinite());
  CHECK(dx(0, 2) == Approx(3e8));  // u = x / eps near zero, so du/dx = 1/eps
}
