#include <mmkd/feature/hint_loss.hpp>

#include "support.hpp"

using namespace mmkd_test;

TEST_CASE("HintLoss: a two-element case by hand", "[feature][hint]") {
  // s = (1, 3), t = (2, 1): d = (−1, 2), L = (1 + 4)/2 = 2.5; dL/ds = 2 d / 2 = (−1, 2).
  Matrix<double> s(1, 2), t(1, 2);
  s << 1, 3;
  t << 2, 1;
  mmkd::HintLoss<double> hint({0.5});
  Matrix<double> ds = Matrix<double>::Zero(1, 2), dt = Matrix<double>::Constant(1, 2, 1.0);
  CHECK(hint.value_and_grad(s, t, ds, dt) == 0.5 * 2.5);
  CHECK(ds(0, 0) == -0.5);
  CHECK(ds(0, 1) == 1.0);
  CHECK(dt(0, 0) == 1.5);  // added to 1
  CHECK(dt(0, 1) == 0.0);
}

TEST_CASE("HintLoss gradients match finite differences", "[feature][hint][gradient]") {
  const Matrix<double> s0 = random_matrix<double>(4, 9, 1, 2.0),
                       t0 = random_matrix<double>(4, 9, 2);
  mmkd::HintLoss<double> hint({1.7});
  Matrix<double> ds = Matrix<double>::Zero(4, 9), dt = ds;
  hint.value_and_grad(s0, t0, ds, dt);
  const auto rs = mmkd::check_gradient([&](const Matrix<double>& s) { return hint.value(s, t0); },
                                       s0, ds, tight());
  INFO(rs.message());
  CHECK(rs.passed);
  const auto rt = mmkd::check_gradient([&](const Matrix<double>& t) { return hint.value(s0, t); },
                                       t0, dt, tight());
  INFO(rt.message());
  CHECK(rt.passed);
}

TEMPLATE_TEST_CASE("HintLoss on feature maps is the loss of their N x CHW view", "[feature][hint]",
                   float, double) {
  using T = TestType;
  mmkd::Tensor4<T> s(3, 2, 4, 5), t(3, 2, 4, 5), ds(3, 2, 4, 5), dt(3, 2, 4, 5);
  const Matrix<T> sm = random_matrix<T>(3, 40, 3), tm = random_matrix<T>(3, 40, 4);
  std::copy(sm.data(), sm.data() + sm.size(), s.data());
  std::copy(tm.data(), tm.data() + tm.size(), t.data());
  ds.setZero();
  dt.setZero();
  mmkd::HintLoss<T> hint;
  Matrix<T> gs = Matrix<T>::Zero(3, 40), gt = gs;
  const T v = hint.value_and_grad(sm, tm, gs, gt);
  CHECK(hint.value_and_grad(s, t, ds, dt) == v);
  CHECK(hint.value(s, t) == v);
  CHECK(std::equal(gs.data(), gs.data() + gs.size(), ds.data()));
  CHECK(std::equal(gt.data(), gt.data() + gt.size(), dt.data()));
  // the mean of squares, from the definition in long double
  long double ref = 0;
  for (Index k = 0; k < sm.size(); ++k) {
    const long double d = (long double)sm.data()[k] - (long double)tm.data()[k];
    ref += d * d;
  }
  CHECK(double(v) ==
        Approx(double(ref / 120)).epsilon(std::is_same<T, float>::value ? 1e-6 : 1e-14));
  // student == teacher: 0 and a zero gradient
  Matrix<T> z = Matrix<T>::Zero(3, 40);
  CHECK(hint.value_and_grad(sm, sm, z) == T(0));
  CHECK(z.isZero(0));
}

TEST_CASE("HintLoss errors leave the buffers untouched", "[feature][hint][errors]") {
  const Matrix<double> s = random_matrix<double>(3, 4, 5), t = random_matrix<double>(3, 4, 6);
  Matrix<double> ds = Matrix<double>::Constant(3, 4, 0.5);
  mmkd::HintLoss<double> hint;
  CHECK_THROWS_WITH(hint.value_and_grad(s, random_matrix<double>(3, 5, 1), ds),
                    Catch::Contains("HintLoss: teacher has shape 3x5, expected 3x4"));
  Matrix<double> bad = t;
  bad(2, 1) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_AS(hint.value_and_grad(s, bad, ds), mmkd::NumericalError);
  CHECK_THROWS_WITH(hint.value_and_grad(s, bad, ds), Catch::Contains("teacher[2,1] is NaN"));
  Matrix<double> big = s;
  big(0, 0) = 1e200;
  CHECK_THROWS_WITH(hint.value_and_grad(big, t, ds), Catch::Contains("overflows"));
  CHECK(ds.isConstant(0.5, 0));
  mmkd::Tensor4<double> a(2, 3, 2, 2), b(2, 3, 2, 1);
  a.setZero();
  b.setZero();
  CHECK_THROWS_WITH(hint.value(a, b), Catch::Contains("HintLoss: teacher has shape 2x3x2x1"));
  CHECK_THROWS_WITH(mmkd::HintLoss<double>({-1.0}), Catch::Contains("weight"));
  CHECK_THROWS_WITH(hint.value(Matrix<double>(0, 4), Matrix<double>(0, 4)),
                    Catch::Contains("student"));
}
