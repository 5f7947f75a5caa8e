#include <mmkd/logit/cross_entropy.hpp>

#include "support.hpp"

using namespace mmkd_test;

TEMPLATE_TEST_CASE("log_sum_exp is exact for huge logits and -inf rows", "[core][softmax]", float,
                   double) {
  using T = TestType;
  const T inf = std::numeric_limits<T>::infinity();
  Matrix<T> x(4, 3);
  x << T(1e4), T(1e4), -inf,       // log(2 e^1e4) = 1e4 + log 2
      T(-1e4), T(-1e4), T(-1e4),   // -1e4 + log 3
      -inf, -inf, -inf,            // empty mass
      T(0), std::log(T(3)), -inf;  // log(1 + 3) = log 4
  mmkd::Vector<T> out(4);
  mmkd::log_sum_exp(x, out);
  CHECK(out(0) == Approx(T(1e4) + std::log(T(2))).epsilon(Tol<T>::rel));
  CHECK(out(1) == Approx(T(-1e4) + std::log(T(3))).epsilon(Tol<T>::rel));
  CHECK(out(2) == -inf);
  CHECK(out(3) == Approx(std::log(T(4))).epsilon(Tol<T>::rel));

  mmkd::log_sum_exp(x, out, T(2));  // at T = 2: 5e3 + log 2, ...
  CHECK(out(0) == Approx(T(5e3) + std::log(T(2))).epsilon(Tol<T>::rel));
  CHECK(out(3) == Approx(std::log(T(1) + std::sqrt(T(3)))).epsilon(Tol<T>::rel));
}

TEMPLATE_TEST_CASE("softmax and log_softmax agree with the definition", "[core][softmax]", float,
                   double) {
  using T = TestType;
  const Matrix<T> x = random_matrix<T>(6, 9, 11, 3.0);
  for (T temp : {T(0.5), T(1), T(4)}) {
    Matrix<T> p(6, 9), lp(6, 9);
    mmkd::softmax(x, p, temp);
    mmkd::log_softmax(x, lp, temp);
    for (Index i = 0; i < 6; ++i) {
      const long double lse = ref_lse(x.row(i), 1.0L / temp);
      CHECK(p.row(i).sum() == Approx(1).epsilon(Tol<T>::rel));
      for (Index k = 0; k < 9; ++k) {
        const long double ref = (long double)x(i, k) / temp - lse;
        CHECK(close<T>(lp(i, k), double(ref), Tol<T>::rel * 10));
        CHECK(close<T>(p(i, k), double(std::exp(ref)), Tol<T>::rel * 10));
      }
    }
  }
}

TEMPLATE_TEST_CASE("softmax stays finite from T = 0.05 to 100 at logits of 1e4", "[core][softmax]",
                   float, double) {
  using T = TestType;
  Matrix<T> x(2, 4);
  x << T(1e4), T(-1e4), T(0), T(1e4), T(-1e4), T(-1e4), T(-1e4), T(-1e4);
  for (T temp : {T(0.05), T(1), T(100)}) {
    Matrix<T> p(2, 4), lp(2, 4);
    mmkd::softmax(x, p, temp);
    mmkd::log_softmax(x, lp, temp);
    CHECK(p.allFinite());
    CHECK(lp.allFinite());
    CHECK(p(0, 0) == Approx(p(0, 3)));
    CHECK(p.row(1).sum() == Approx(1));
    CHECK(p(1, 2) == Approx(0.25));
  }
}

TEMPLATE_TEST_CASE("xlogy treats 0 log 0 as 0", "[core][softmax]", float, double) {
  using T = TestType;
  const T inf = std::numeric_limits<T>::infinity();
  CHECK(mmkd::xlogy(T(0), T(0)) == T(0));
  CHECK(mmkd::xlogy(T(0), inf) == T(0));
  CHECK(mmkd::xlogy(T(2), T(3)) == Approx(2 * std::log(T(3))));
  CHECK(mmkd::xlogy(T(1), T(0)) == -inf);
  CHECK(std::isnan(mmkd::xlogy(T(0), std::numeric_limits<T>::quiet_NaN())));
}

TEST_CASE("softmax kernels reject a bad temperature or output shape", "[core][softmax]") {
  Matrix<double> x = Matrix<double>::Zero(2, 3), out(2, 3), bad(3, 2);
  mmkd::Vector<double> v(2);
  CHECK_THROWS_WITH(mmkd::softmax(x, out, 0.0),
                    "softmax: option temperature must be finite and > 0, got 0.000000");
  CHECK_THROWS_AS(mmkd::log_sum_exp(x, v, -1.0), mmkd::InvalidArgument);
  CHECK_THROWS_WITH(mmkd::log_softmax(x, bad),
                    "log_softmax: out has shape 3x2, expected 2x3 (same as logits)");
}

TEMPLATE_TEST_CASE("all_finite finds NaN and +-Inf and accepts huge finite values", "[core]", float,
                   double) {
  using T = TestType;
  Matrix<T> x = Matrix<T>::Constant(5, 7, std::numeric_limits<T>::max());
  CHECK(mmkd::detail::all_finite(x));
  x(4, 6) = std::numeric_limits<T>::infinity();
  CHECK_FALSE(mmkd::detail::all_finite(x));
  x(4, 6) = -std::numeric_limits<T>::infinity();
  CHECK_FALSE(mmkd::detail::all_finite(x));
  x(4, 6) = std::numeric_limits<T>::quiet_NaN();
  CHECK_FALSE(mmkd::detail::all_finite(x));
  CHECK(mmkd::detail::all_finite(Matrix<T>(0, 3)));
}

TEST_CASE("log_softmax in float is exact to rounding at logits of 1e4", "[core][softmax]") {
  // [1e4, 1e4 − 5] has the log-softmax of [0, −5]: −log(1 + e^−5) and −5 − log(1 + e^−5).
  Matrix<float> x(1, 2), lp(1, 2);
  x << 1e4f, 1e4f - 5;
  mmkd::log_softmax(x, lp);
  const double l0 = -std::log1p(std::exp(-5.0));
  CHECK(std::abs(lp(0, 0) - l0) <= 1e-6 * std::abs(l0));
  CHECK(std::abs(lp(0, 1) - (l0 - 5)) <= 1e-6 * 5);
  mmkd::CrossEntropy<float> ce;
  mmkd::Labels y(1);
  y << 0;
  CHECK(std::abs(ce.value(x, y) + l0) <= 1e-6 * std::abs(l0));
}
