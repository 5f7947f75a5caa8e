#include <mmkd/logit/cross_entropy.hpp>
#include <mmkd/logit/decoupled_kd.hpp>
#include <mmkd/logit/logit_kd.hpp>

#include "support.hpp"

using namespace mmkd_test;
using mmkd::Reduction;

namespace {

// Independent reference: KL per row from the definition, in long double.
template <class T>
long double ref_kd(const Matrix<T>& s, const Matrix<T>& t, long double temp, bool t2, Reduction red,
                   const mmkd::RowMask* mask = nullptr) {
  long double sum = 0;
  Index used = 0;
  for (Index i = 0; i < s.rows(); ++i) {
    if (mask && (*mask)(i) == 0) continue;
    ++used;
    const long double ls = ref_lse(s.row(i), 1 / temp), lt = ref_lse(t.row(i), 1 / temp);
    for (Index k = 0; k < s.cols(); ++k) {
      const long double log_pt = t(i, k) / temp - lt, log_ps = s(i, k) / temp - ls;
      const long double pt = std::exp(log_pt);
      if (pt > 0) sum += pt * (log_pt - log_ps);
    }
  }
  if (used == 0) return 0;
  const long double scale = t2 ? temp * temp : 1;
  switch (red) {
    case Reduction::BatchMean:
      return scale * sum / used;
    case Reduction::Mean:
      return scale * sum / (used * s.cols());
    case Reduction::Sum:
      return scale * sum;
  }
  return 0;
}

}  // namespace

TEMPLATE_TEST_CASE("LogitKD matches a hand calculation", "[logit][kd]", float, double) {
  using T = TestType;
  // p_t = (3/4, 1/4), p_s = (1/2, 1/2): KL = 3/4 log(3/2) + 1/4 log(1/2).
  const double kl = 0.75 * std::log(1.5) + 0.25 * std::log(0.5);
  Matrix<T> s(1, 2), t(1, 2);
  s << 0, 0;
  t << std::log(T(3)), 0;
  mmkd::LogitKD<T> kd({T(1)});
  CHECK(kd.value(s, t) == Approx(kl).epsilon(Tol<T>::rel));
  // At T = 2 the same distributions come from doubled logits, and T² = 4 scales the value.
  t *= T(2);
  kd.options().temperature = T(2);
  CHECK(kd.value(s, t) == Approx(4 * kl).epsilon(Tol<T>::rel));
  kd.options().scale_by_t2 = false;
  CHECK(kd.value(s, t) == Approx(kl).epsilon(Tol<T>::rel));
  // The gradient is (T/N)(p_s − p_t) = 2·(1/2 − 3/4, 1/2 − 1/4) with T² scaling.
  kd.options().scale_by_t2 = true;
  Matrix<T> g = Matrix<T>::Zero(1, 2);
  kd.value_and_grad(s, t, g);
  CHECK(g(0, 0) == Approx(-0.5).epsilon(Tol<T>::rel));
  CHECK(g(0, 1) == Approx(0.5).epsilon(Tol<T>::rel));
}

TEMPLATE_TEST_CASE("LogitKD matches the definition for every reduction and mask", "[logit][kd]",
                   float, double) {
  using T = TestType;
  const Matrix<T> s = random_matrix<T>(13, 17, 1, 2.0), t = random_matrix<T>(13, 17, 2, 2.0);
  mmkd::RowMask mask(13);
  mask << 1, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1;
  for (auto red : {Reduction::BatchMean, Reduction::Mean, Reduction::Sum}) {
    for (bool t2 : {true, false}) {
      for (T temp : {T(0.5), T(4)}) {
        typename mmkd::LogitKD<T>::Options o;
        o.temperature = temp;
        o.scale_by_t2 = t2;
        o.reduction = red;
        mmkd::LogitKD<T> kd(o);
        INFO("reduction " << mmkd::to_string(red) << " t2 " << t2 << " T " << temp);
        CHECK(close<T>(kd.value(s, t), double(ref_kd(s, t, temp, t2, red)), Tol<T>::rel * 10));
        CHECK(close<T>(kd.value(s, t, mask), double(ref_kd(s, t, temp, t2, red, &mask)),
                       Tol<T>::rel * 10));
        Matrix<T> g = Matrix<T>::Zero(13, 17);
        CHECK(kd.value_and_grad(s, t, mask, g) == kd.value(s, t, mask));
      }
    }
  }
}

TEST_CASE("LogitKD gradients match finite differences", "[logit][kd][gradient]") {
  const Matrix<double> s = random_matrix<double>(5, 7, 3, 2.0),
                       t = random_matrix<double>(5, 7, 4, 2.0);
  mmkd::RowMask mask(5);
  mask << 1, 1, 0, 1, 0;
  for (auto red : {Reduction::BatchMean, Reduction::Mean, Reduction::Sum}) {
    for (double temp : {0.5, 1.0, 4.0}) {
      typename mmkd::LogitKD<double>::Options o;
      o.temperature = temp;
      o.reduction = red;
      o.weight = 0.7;
      mmkd::LogitKD<double> kd(o);
      INFO("reduction " << mmkd::to_string(red) << " T " << temp);
      auto wrt_student = [&](const Matrix<double>& x, Matrix<double>& g) {
        return kd.value_and_grad(x, t, g);
      };
      auto wrt_student_masked = [&](const Matrix<double>& x, Matrix<double>& g) {
        return kd.value_and_grad(x, t, mask, g);
      };
      auto wrt_teacher = [&](const Matrix<double>& x, Matrix<double>& g) {
        Matrix<double> ds = Matrix<double>::Zero(5, 7);
        return kd.value_and_grad(s, x, ds, g);
      };
      auto wrt_teacher_masked = [&](const Matrix<double>& x, Matrix<double>& g) {
        Matrix<double> ds = Matrix<double>::Zero(5, 7);
        return kd.value_and_grad(s, x, mask, ds, g);
      };
      const auto rs = mmkd::check_value_and_grad(wrt_student, s, tight());
      INFO(rs.message());
      CHECK(rs.passed);
      const auto rsm = mmkd::check_value_and_grad(wrt_student_masked, s, tight());
      INFO(rsm.message());
      CHECK(rsm.passed);
      const auto rt = mmkd::check_value_and_grad(wrt_teacher, t, tight());
      INFO(rt.message());
      CHECK(rt.passed);
      const auto rtm = mmkd::check_value_and_grad(wrt_teacher_masked, t, tight());
      INFO(rtm.message());
      CHECK(rtm.passed);
    }
  }
}

TEMPLATE_TEST_CASE("LogitKD invariants", "[logit][kd]", float, double) {
  using T = TestType;
  const Matrix<T> s = random_matrix<T>(8, 10, 5, 3.0), t = random_matrix<T>(8, 10, 6, 3.0);
  mmkd::LogitKD<T> kd;

  SECTION("student == teacher gives exactly zero loss and gradient") {
    Matrix<T> ds = Matrix<T>::Zero(8, 10), dt = Matrix<T>::Zero(8, 10);
    CHECK(kd.value_and_grad(s, s, ds, dt) == T(0));
    CHECK(ds.isZero(0));
    CHECK(dt.isZero(0));
  }
  SECTION("student gradient rows sum to zero; KL is non-negative") {
    Matrix<T> g = Matrix<T>::Zero(8, 10);
    CHECK(kd.value_and_grad(s, t, g) > T(0));
    CHECK(g.rowwise().sum().cwiseAbs().maxCoeff() < T(Tol<T>::rel));
  }
  SECTION("adding a constant to a row changes nothing") {
    Matrix<T> s2 = s, t2 = t;
    s2.row(3).array() += T(50);
    t2.row(5).array() -= T(20);
    CHECK(kd.value(s2, t2) == Approx(kd.value(s, t)).epsilon(Tol<T>::rel * 100));
  }
  SECTION("value_and_grad adds to the buffer and weight scales value and gradient") {
    Matrix<T> g1 = Matrix<T>::Zero(8, 10), g2 = Matrix<T>::Zero(8, 10);
    const T v1 = kd.value_and_grad(s, t, g1);
    kd.value_and_grad(s, t, g2);
    kd.value_and_grad(s, t, g2);
    CHECK(g2.isApprox(2 * g1));
    kd.options().weight = T(0.25);
    Matrix<T> g3 = Matrix<T>::Zero(8, 10);
    CHECK(kd.value_and_grad(s, t, g3) == Approx(0.25 * v1));
    CHECK(g3.isApprox(T(0.25) * g1));
    kd.options().weight = T(0);
    Matrix<T> g4 = Matrix<T>::Zero(8, 10);
    CHECK(kd.value_and_grad(s, t, g4) == T(0));
    CHECK(g4.isZero(0));
  }
}

TEMPLATE_TEST_CASE("LogitKD degenerate and extreme input", "[logit][kd]", float, double) {
  using T = TestType;
  const T inf = std::numeric_limits<T>::infinity();

  SECTION("logits of +-1e4 at temperatures from 0.05 to 100 stay finite and exact") {
    Matrix<T> s(2, 3), t(2, 3);
    s << T(1e4), T(-1e4), T(0), T(-1e4), T(1e4), T(1e4);
    t << T(-1e4), T(1e4), T(0), T(1e4), T(1e4), T(-1e4);
    for (T temp : {T(0.05), T(1), T(4), T(100)}) {
      mmkd::LogitKD<T> kd({temp});
      Matrix<T> ds = Matrix<T>::Zero(2, 3), dt = Matrix<T>::Zero(2, 3);
      const T v = kd.value_and_grad(s, t, ds, dt);
      INFO("T = " << temp);
      CHECK(std::isfinite(v));
      CHECK(ds.allFinite());
      CHECK(dt.allFinite());
      CHECK(close<T>(v, double(ref_kd(s, t, temp, true, Reduction::BatchMean)), 1e-4));
    }
  }
  SECTION("a -inf teacher logit is a ruled-out class") {
    Matrix<T> s(1, 3), t(1, 3), t_small(1, 2), s_small(1, 2);
    s << 1, 2, 3;
    t << 0, -inf, 1;
    s_small << 1, 3;
    t_small << 0, 1;
    mmkd::LogitKD<T> kd({T(1)});
    // KL over the two live classes, plus the student mass on the dead class: log(p_s restricted).
    const double expect = double(ref_kd(s, t, 1, true, Reduction::BatchMean));
    Matrix<T> g = Matrix<T>::Zero(1, 3);
    CHECK(kd.value_and_grad(s, t, g) == Approx(expect).epsilon(Tol<T>::rel * 10));
    CHECK(std::isfinite(expect));
    CHECK(g.allFinite());
    CHECK(g(0, 1) > 0);  // the student is pushed away from the ruled-out class
    // The student also ruling it out is fine too.
    s(0, 1) = -inf;
    CHECK(std::isfinite(kd.value(s, t)));
    CHECK(kd.value(s, t) == Approx(kd.value(s_small, t_small)).epsilon(Tol<T>::rel * 10));
  }
  SECTION("one class, one row") {
    Matrix<T> s(1, 1), t(1, 1), g = Matrix<T>::Zero(1, 1);
    s << 3;
    t << -2;
    mmkd::LogitKD<T> kd;
    CHECK(kd.value_and_grad(s, t, g) == T(0));
    CHECK(g(0, 0) == T(0));
  }
  SECTION("all rows masked: zero loss, buffers untouched") {
    const Matrix<T> s = random_matrix<T>(3, 4, 1), t = random_matrix<T>(3, 4, 2);
    mmkd::RowMask mask = mmkd::RowMask::Zero(3);
    Matrix<T> g = Matrix<T>::Constant(3, 4, T(7));
    mmkd::LogitKD<T> kd;
    CHECK(kd.value_and_grad(s, t, mask, g) == T(0));
    CHECK((g.array() == T(7)).all());
  }
  SECTION("masked rows are never read and get no gradient") {
    Matrix<T> s = random_matrix<T>(4, 5, 1), t = random_matrix<T>(4, 5, 2);
    mmkd::RowMask mask(4);
    mask << 1, 0, 1, 0;
    s(1, 2) = std::numeric_limits<T>::quiet_NaN();
    t(3, 0) = inf;
    Matrix<T> s_used(2, 5), t_used(2, 5);
    s_used << s.row(0), s.row(2);
    t_used << t.row(0), t.row(2);
    mmkd::LogitKD<T> kd;
    Matrix<T> g = Matrix<T>::Zero(4, 5), g_used = Matrix<T>::Zero(2, 5);
    CHECK(kd.value_and_grad(s, t, mask, g) == Approx(kd.value_and_grad(s_used, t_used, g_used)));
    CHECK(g.row(1).isZero(0));
    CHECK(g.row(3).isZero(0));
    CHECK(g.row(2).isApprox(g_used.row(1)));
  }
}

TEST_CASE("LogitKD float agrees with double", "[logit][kd]") {
  const Matrix<double> s = random_matrix<double>(16, 50, 7, 4.0),
                       t = random_matrix<double>(16, 50, 8, 4.0);
  mmkd::LogitKD<double> kd_d;
  mmkd::LogitKD<float> kd_f;
  Matrix<double> gd = Matrix<double>::Zero(16, 50);
  Matrix<float> gf = Matrix<float>::Zero(16, 50);
  const double vd = kd_d.value_and_grad(s, t, gd);
  const float vf = kd_f.value_and_grad(s.cast<float>(), t.cast<float>(), gf);
  CHECK(vf == Approx(vd).epsilon(1e-5));
  CHECK((gf.cast<double>() - gd).cwiseAbs().maxCoeff() < 1e-6);
}

TEMPLATE_TEST_CASE("LogitKD rejects bad input with a clear message and writes nothing",
                   "[logit][kd][errors]", float, double) {
  using T = TestType;
  const T inf = std::numeric_limits<T>::infinity();
  Matrix<T> s = random_matrix<T>(4, 3, 1), t = random_matrix<T>(4, 3, 2);
  Matrix<T> g = random_matrix<T>(4, 3, 3);
  const Matrix<T> g0 = g;
  mmkd::LogitKD<T> kd;

  CHECK_THROWS_WITH(kd.value_and_grad(s, Matrix<T>(4, 5), g),
                    "LogitKD: teacher has shape 4x5, expected 4x3 (same as student)");
  Matrix<T> g_wrong(3, 3);
  CHECK_THROWS_WITH(kd.value_and_grad(s, t, g_wrong),
                    "LogitKD: d_student has shape 3x3, expected 4x3 (same as student)");
  CHECK_THROWS_WITH(kd.value(Matrix<T>(0, 3), Matrix<T>(0, 3)),
                    "LogitKD: student is empty (shape 0x3); need at least one row and one column");
  mmkd::RowMask short_mask = mmkd::RowMask::Ones(3), bad_mask = mmkd::RowMask::Ones(4);
  bad_mask(2) = 2;
  CHECK_THROWS_WITH(kd.value_and_grad(s, t, short_mask, g),
                    "LogitKD: mask has length 3, expected 4 (one entry per row)");
  CHECK_THROWS_WITH(kd.value_and_grad(s, t, bad_mask, g), "LogitKD: mask[2] is 2, expected 0 or 1");

  typename mmkd::LogitKD<T>::Options o;
  o.temperature = 0;
  CHECK_THROWS_AS(mmkd::LogitKD<T>(o), mmkd::InvalidArgument);
  kd.options().temperature = T(-1);
  CHECK_THROWS_WITH(kd.value_and_grad(s, t, g),
                    "LogitKD: option temperature must be finite and > 0, got -1.000000");
  kd.options().temperature = T(4);
  kd.options().weight = T(-0.5);
  CHECK_THROWS_WITH(kd.value(s, t),
                    "LogitKD: option weight must be finite and >= 0, got -0.500000");
  kd.options().weight = T(1);

  SECTION("NaN and +Inf are named") {
    Matrix<T> s2 = s, t2 = t;
    s2(1, 2) = std::numeric_limits<T>::quiet_NaN();
    CHECK_THROWS_WITH(kd.value_and_grad(s2, t, g), "LogitKD: student[1,2] is NaN");
    t2(3, 0) = inf;
    CHECK_THROWS_WITH(kd.value_and_grad(s, t2, g), "LogitKD: teacher[3,0] is +Inf");
    Matrix<T> dt = g;
    CHECK_THROWS_AS(kd.value_and_grad(s, t2, g, dt), mmkd::NumericalError);
    CHECK(bit_identical(dt, g0));
  }
  SECTION("an infinite KL is a NumericalError") {
    Matrix<T> s2 = s;
    s2(2, 1) = -inf;
    CHECK_THROWS_WITH(kd.value_and_grad(s2, t, g),
                      "LogitKD: student[2,1] is -Inf where the teacher's probability is positive: "
                      "the KL divergence is infinite");
    Matrix<T> t2 = t;
    t2.row(0).setConstant(-inf);
    CHECK_THROWS_WITH(
        kd.value(s, t2),
        "LogitKD: teacher row 0 is entirely -Inf (no class has positive probability)");
  }
  CHECK(bit_identical(g, g0));  // the strong guarantee, after every failed call above
}

TEST_CASE("LogitKD and DecoupledKD in float at a common logit offset of 1e4",
          "[logit][kd][dkd][float32]") {
  // A row's KL does not depend on a common offset, and the float result must not either: the
  // kernel works on max-shifted logits, so the only error left is the inputs' own rounding
  // (the comparison with libtorch's float32 error is in tests/torch/logit_torch_test.cpp).
  const Index n = 32, c = 100;
  const mmkd::Labels y = random_labels(n, c, 5);
  for (double offset : {1e4, -1e4}) {
    INFO("offset " << offset);
    const Matrix<float> sf = (random_matrix<double>(n, c, 1, 3.0).array() + offset).cast<float>();
    const Matrix<float> tf = (random_matrix<double>(n, c, 2, 3.0).array() + offset).cast<float>();
    const Matrix<double> s = sf.cast<double>(), t = tf.cast<double>();
    mmkd::LogitKD<float> kd32;
    mmkd::LogitKD<double> kd64;
    const double v64 = kd64.value(s, t);
    CHECK(std::abs(kd32.value(sf, tf) - v64) <= 1e-5 * v64);
    mmkd::DecoupledKD<float> dkd32;
    mmkd::DecoupledKD<double> dkd64;
    const double d64 = dkd64.value(s, t, y);
    CHECK(std::abs(dkd32.value(sf, tf, y) - d64) <= 1e-5 * d64);
    // The same rows one float ulp apart: the KL is tiny and must not come out negative.
    Matrix<float> near = tf;
    for (Index i = 0; i < n; ++i) near(i, i % c) = std::nextafter(near(i, i % c), 1e30f);
    CHECK(kd32.value(near, tf) >= 0);
  }
}

TEST_CASE("LogitKD and DecoupledKD row_values are the per-row terms of the last call",
          "[logit][kd][dkd]") {
  const Matrix<double> s = random_matrix<double>(5, 7, 1), t = random_matrix<double>(5, 7, 2);
  const mmkd::Labels y = random_labels(5, 7, 3);
  mmkd::RowMask mask(5);
  mask << 1, 0, 1, 1, 0;
  mmkd::LogitKD<double> kd({3.0});
  kd.options().weight = 0.7;
  mmkd::DecoupledKD<double> dkd;
  Matrix<double> g = Matrix<double>::Zero(5, 7);
  const double v = kd.value_and_grad(s, t, mask, g);
  const mmkd::Vector<double> rows = kd.row_values();
  const double vd = dkd.value(s, t, y, mask);
  const mmkd::Vector<double> rows_d = dkd.row_values();
  for (Index i = 0; i < 5; ++i) {
    INFO("row " << i);
    // A one-row batch mean is that row's term.
    const double one = mask(i) ? kd.value(s.row(i), t.row(i)) : 0.0;
    CHECK(rows(i) == Approx(one).epsilon(1e-14));
    const mmkd::Labels yi = y.segment(i, 1);
    const double one_d = mask(i) ? dkd.value(s.row(i), t.row(i), yi) : 0.0;
    CHECK(rows_d(i) == Approx(one_d).epsilon(1e-14));
  }
  CHECK(rows.sum() / 3 == Approx(v).epsilon(1e-14));
  CHECK(rows_d.sum() / 3 == Approx(vd).epsilon(1e-14));
}

TEST_CASE("LogitKD: the overflow example of docs/protocol.md throws", "[logit][kd][errors]") {
  // weight 1e37 · T² = 16 · (1/N) · KL: the value 1.6e38 · KL is past float's 3.4e38 for KL > 2.1,
  // and the gradient bound 2 · weight · T / N is 4e37 (finite), so the value decides. Rows whose KL
  // is large: the student puts its mass on the teacher's least likely class.
  Matrix<float> s(2, 3), t(2, 3);
  s << 10, 0, -10, -10, 0, 10;
  t << -10, 0, 10, 10, 0, -10;
  mmkd::LogitKD<float> kd;
  kd.options().weight = 1e37f;
  Matrix<float> g = Matrix<float>::Zero(2, 3);
  CHECK_THROWS_WITH(kd.value_and_grad(s, t, g), Catch::Contains("the loss overflows"));
  CHECK(g.isZero(0));
}

TEST_CASE(
    "LogitKD: the README's by-hand weighting (options().weight, values added) trains on "
    "the gradient of its loss",
    "[logit][kd]") {
  const Index n = 5, c = 4;
  const Matrix<double> student0 = random_matrix<double>(n, c, 1, 2),
                       teacher = random_matrix<double>(n, c, 2, 2);
  const mmkd::Labels labels = random_labels(n, c, 3);
  // The by-hand form the README gives beside LossSum, in double.
  auto example = [&](const Matrix<double>& student, Matrix<double>& grad) {
    mmkd::LogitKD<double> kd;
    kd.options().weight = 0.9;
    mmkd::CrossEntropy<double> ce;
    double loss =
        kd.value_and_grad(student, teacher, grad) + ce.value_and_grad(student, labels, grad);
    return loss;
  };
  Matrix<double> grad = Matrix<double>::Zero(n, c);
  example(student0, grad);
  auto loss = [&](const Matrix<double>& s) {
    Matrix<double> scratch = Matrix<double>::Zero(n, c);
    return example(s, scratch);
  };
  const auto r = mmkd::check_gradient(loss, student0, grad, tight());
  INFO(r.message());
  CHECK(r.passed);
  // Independently: the weight really is 0.9 of the default loss.
  mmkd::LogitKD<double> plain;
  mmkd::CrossEntropy<double> ce;
  CHECK(loss(student0) ==
        Approx(0.9 * plain.value(student0, teacher) + ce.value(student0, labels)).epsilon(1e-14));
}
