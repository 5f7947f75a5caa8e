#include <mmkd/logit/decoupled_kd.hpp>
#include <mmkd/logit/logit_kd.hpp>

#include "support.hpp"

#include <vector>

using namespace mmkd_test;
using mmkd::Reduction;

namespace {

struct RefDkd {
  long double tckd = 0, nckd = 0, q_other = 0;
};

// Independent reference from the paper's definitions, one row, long double, explicit masses.
template <class T>
RefDkd ref_dkd_row(const Matrix<T>& s, const Matrix<T>& t, Index i, int g, long double temp) {
  const Index c = s.cols();
  const long double ls = ref_lse(s.row(i), 1 / temp), lt = ref_lse(t.row(i), 1 / temp);
  std::vector<long double> p(static_cast<std::size_t>(c)), q(static_cast<std::size_t>(c));
  long double po = 0, qo = 0;
  for (Index k = 0; k < c; ++k) {
    p[std::size_t(k)] = std::exp(s(i, k) / temp - ls);
    q[std::size_t(k)] = std::exp(t(i, k) / temp - lt);
    if (k != g) po += p[std::size_t(k)], qo += q[std::size_t(k)];
  }
  const long double pg = p[std::size_t(g)], qg = q[std::size_t(g)];
  RefDkd r;
  r.tckd = qg * std::log(qg / pg) + qo * std::log(qo / po);
  for (Index k = 0; k < c; ++k) {
    if (k == g) continue;
    const long double ph = p[std::size_t(k)] / po, qh = q[std::size_t(k)] / qo;
    r.nckd += qh * std::log(qh / ph);
  }
  r.q_other = qo;
  return r;
}

template <class T>
long double ref_dkd(const Matrix<T>& s, const Matrix<T>& t, const mmkd::Labels& y, long double temp,
                    long double alpha, long double beta, Reduction red,
                    const mmkd::RowMask* mask = nullptr) {
  long double sum = 0;
  Index used = 0;
  for (Index i = 0; i < s.rows(); ++i) {
    if (mask && (*mask)(i) == 0) continue;
    ++used;
    const RefDkd r = ref_dkd_row(s, t, i, y(i), temp);
    sum += alpha * r.tckd + beta * r.nckd;
  }
  if (used == 0) return 0;
  return temp * temp * sum / (red == Reduction::Sum ? 1 : used);
}

}  // namespace

TEMPLATE_TEST_CASE("DecoupledKD matches the paper's definition", "[logit][dkd]", float, double) {
  using T = TestType;
  const Matrix<T> s = random_matrix<T>(9, 6, 21, 2.0), t = random_matrix<T>(9, 6, 22, 2.0);
  const mmkd::Labels y = random_labels(9, 6, 23);
  mmkd::RowMask mask(9);
  mask << 1, 1, 0, 1, 0, 1, 1, 1, 0;
  for (auto red : {Reduction::BatchMean, Reduction::Sum}) {
    for (T temp : {T(1), T(4)}) {
      typename mmkd::DecoupledKD<T>::Options o;
      o.alpha = T(0.5);
      o.beta = T(2);
      o.temperature = temp;
      o.reduction = red;
      mmkd::DecoupledKD<T> dkd(o);
      INFO("reduction " << mmkd::to_string(red) << " T " << temp);
      CHECK(close<T>(dkd.value(s, t, y), double(ref_dkd(s, t, y, temp, 0.5, 2, red)),
                     Tol<T>::rel * 10));
      CHECK(close<T>(dkd.value(s, t, y, mask), double(ref_dkd(s, t, y, temp, 0.5, 2, red, &mask)),
                     Tol<T>::rel * 10));
    }
  }
}

TEMPLATE_TEST_CASE("DecoupledKD decomposes KD: KL = TCKD + q_other * NCKD", "[logit][dkd]", float,
                   double) {
  using T = TestType;
  const Matrix<T> s = random_matrix<T>(1, 8, 31, 2.0), t = random_matrix<T>(1, 8, 32, 2.0);
  mmkd::Labels y(1);
  y << 3;
  const T q_other = T(ref_dkd_row(s, t, 0, 3, 4.0L).q_other);
  typename mmkd::DecoupledKD<T>::Options o;
  o.alpha = 1;
  o.beta = q_other;
  mmkd::DecoupledKD<T> dkd(o);
  mmkd::LogitKD<T> kd;
  CHECK(dkd.value(s, t, y) == Approx(kd.value(s, t)).epsilon(Tol<T>::rel * 10));
  // Same identity for the gradients.
  Matrix<T> g_dkd = Matrix<T>::Zero(1, 8), g_kd = Matrix<T>::Zero(1, 8);
  dkd.value_and_grad(s, t, y, g_dkd);
  kd.value_and_grad(s, t, g_kd);
  CHECK((g_dkd - g_kd).cwiseAbs().maxCoeff() < T(Tol<T>::rel * 10));
}

TEST_CASE("DecoupledKD gradient matches finite differences", "[logit][dkd][gradient]") {
  const Matrix<double> s = random_matrix<double>(6, 5, 41, 2.0),
                       t = random_matrix<double>(6, 5, 42, 2.0);
  const mmkd::Labels y = random_labels(6, 5, 43);
  mmkd::RowMask mask(6);
  mask << 1, 0, 1, 1, 0, 1;
  for (auto red : {Reduction::BatchMean, Reduction::Sum}) {
    for (double temp : {0.5, 4.0}) {
      typename mmkd::DecoupledKD<double>::Options o;
      o.alpha = 1.5;
      o.beta = 3;
      o.temperature = temp;
      o.reduction = red;
      o.weight = 0.8;
      mmkd::DecoupledKD<double> dkd(o);
      auto f = [&](const Matrix<double>& x, Matrix<double>& g) {
        return dkd.value_and_grad(x, t, y, g);
      };
      auto fm = [&](const Matrix<double>& x, Matrix<double>& g) {
        return dkd.value_and_grad(x, t, y, mask, g);
      };
      const auto r = mmkd::check_value_and_grad(f, s, tight());
      const auto rm = mmkd::check_value_and_grad(fm, s, tight());
      INFO(r.message() << "\n" << rm.message());
      CHECK(r.passed);
      CHECK(rm.passed);
    }
  }
}

TEMPLATE_TEST_CASE("DecoupledKD is finite for two classes and certain teachers", "[logit][dkd]",
                   float, double) {
  using T = TestType;
  const T inf = std::numeric_limits<T>::infinity();
  mmkd::DecoupledKD<T> dkd;

  SECTION("two classes: NCKD is 0, the loss is alpha * T^2 * TCKD") {
    const Matrix<T> s = random_matrix<T>(4, 2, 51, 3.0), t = random_matrix<T>(4, 2, 52, 3.0);
    const mmkd::Labels y = random_labels(4, 2, 53);
    Matrix<T> g = Matrix<T>::Zero(4, 2);
    const T v = dkd.value_and_grad(s, t, y, g);
    CHECK(g.allFinite());
    CHECK(close<T>(v, double(ref_dkd(s, t, y, 4, 1, 0, Reduction::BatchMean)), Tol<T>::rel * 10));
    CHECK(g.rowwise().sum().cwiseAbs().maxCoeff() < T(Tol<T>::rel));
  }
  SECTION("a teacher certain to +-1e4 and a student at the other extreme") {
    Matrix<T> s(2, 4), t(2, 4);
    t << T(1e4), T(-1e4), T(-1e4), T(-1e4), T(-1e4), T(-1e4), T(1e4), T(0);
    s << T(-1e4), T(1e4), T(0), T(0), T(1e4), T(1e4), T(-1e4), T(-1e4);
    mmkd::Labels y(2);
    y << 0, 2;
    for (T temp : {T(0.05), T(1), T(4), T(100)}) {
      dkd.options().temperature = temp;
      Matrix<T> g = Matrix<T>::Zero(2, 4);
      const T v = dkd.value_and_grad(s, t, y, g);
      INFO("T = " << temp);
      CHECK(std::isfinite(v));
      CHECK(g.allFinite());
    }
  }
  SECTION("a teacher that rules out every non-target class (-inf): NCKD is 0") {
    Matrix<T> s(1, 3), t(1, 3);
    s << 0, 1, 2;
    t << 5, -inf, -inf;
    mmkd::Labels y(1);
    y << 0;
    dkd.options().temperature = 1;
    Matrix<T> g = Matrix<T>::Zero(1, 3);
    // q_g = 1: TCKD = -log p_g, NCKD = 0.
    const double expect = -(0.0 - double(ref_lse(s.row(0), 1.0L)));
    CHECK(dkd.value_and_grad(s, t, y, g) == Approx(expect).epsilon(Tol<T>::rel * 10));
    CHECK(g.allFinite());
  }
  SECTION("student == teacher gives zero loss and gradient") {
    const Matrix<T> s = random_matrix<T>(5, 7, 61, 2.0);
    const mmkd::Labels y = random_labels(5, 7, 62);
    Matrix<T> g = Matrix<T>::Zero(5, 7);
    CHECK(dkd.value_and_grad(s, s, y, g) == T(0));
    CHECK(g.isZero(0));
  }
}

TEMPLATE_TEST_CASE("DecoupledKD rejects bad input and writes nothing", "[logit][dkd][errors]",
                   float, double) {
  using T = TestType;
  const Matrix<T> s = random_matrix<T>(3, 4, 1), t = random_matrix<T>(3, 4, 2);
  Matrix<T> g = random_matrix<T>(3, 4, 3);
  const Matrix<T> g0 = g;
  mmkd::Labels y(3);
  y << 0, 4, 1;
  mmkd::DecoupledKD<T> dkd;
  CHECK_THROWS_WITH(dkd.value_and_grad(s, t, y, g),
                    "DecoupledKD: labels[1] is 4, expected a class in [0, 4)");
  mmkd::RowMask mask(3);
  mask << 1, 0, 1;  // the bad label is in a masked row: fine
  CHECK(std::isfinite(dkd.value(s, t, y, mask)));
  y(1) = 1;
  CHECK_THROWS_WITH(dkd.value(s, t, mmkd::Labels::Zero(2)),
                    "DecoupledKD: labels has length 2, expected 3 (one label per row)");
  CHECK_THROWS_WITH(
      dkd.value(Matrix<T>(3, 1), Matrix<T>(3, 1), y),
      "DecoupledKD: student has 1 class, expected at least 2 (target and non-target)");
  typename mmkd::DecoupledKD<T>::Options o;
  o.reduction = Reduction::Mean;
  CHECK_THROWS_AS(mmkd::DecoupledKD<T>(o), mmkd::InvalidArgument);
  o.reduction = Reduction::BatchMean;
  o.beta = T(-1);
  CHECK_THROWS_WITH(mmkd::DecoupledKD<T>(o),
                    "DecoupledKD: option beta must be finite and >= 0, got -1.000000");
  Matrix<T> s2 = s;
  s2(2, y(2)) = -std::numeric_limits<T>::infinity();
  CHECK_THROWS_AS(dkd.value_and_grad(s2, t, y, g), mmkd::NumericalError);
  s2 = s;
  s2(0, 3) = std::numeric_limits<T>::quiet_NaN();
  CHECK_THROWS_WITH(dkd.value_and_grad(s2, t, y, g), "DecoupledKD: student[0,3] is NaN");
  CHECK(bit_identical(g, g0));
}
