#include <mmkd/logit/logit_divergence.hpp>
#include <mmkd/logit/logit_kd.hpp>

#include "support.hpp"

using namespace mmkd_test;
using mmkd::Divergence;
using mmkd::Reduction;

namespace {

const Divergence kAll[] = {Divergence::ForwardKL,      Divergence::ReverseKL,
                           Divergence::GeneralizedJSD, Divergence::SkewForwardKL,
                           Divergence::SkewReverseKL,  Divergence::TotalVariation};

const char* name(Divergence d) {
  switch (d) {
    case Divergence::ForwardKL:
      return "ForwardKL";
    case Divergence::ReverseKL:
      return "ReverseKL";
    case Divergence::GeneralizedJSD:
      return "GeneralizedJSD";
    case Divergence::SkewForwardKL:
      return "SkewForwardKL";
    case Divergence::SkewReverseKL:
      return "SkewReverseKL";
    case Divergence::TotalVariation:
      return "TotalVariation";
  }
  return "?";
}

// KL(x ‖ y) of two probability rows, 0·log 0 = 0.
long double ref_kl_prob(const std::vector<long double>& x, const std::vector<long double>& y) {
  long double d = 0;
  for (std::size_t k = 0; k < x.size(); ++k)
    if (x[k] > 0) d += x[k] * std::log(x[k] / y[k]);
  return d;
}

std::vector<long double> ref_softmax(const Eigen::Ref<const Eigen::RowVectorXd>& z,
                                     long double temp) {
  const long double lse = ref_lse(z, 1 / temp);
  std::vector<long double> p(std::size_t(z.size()));
  for (Index k = 0; k < z.size(); ++k) p[std::size_t(k)] = std::exp(z(k) / temp - lse);
  return p;
}

// Independent reference: each divergence of one row from its definition, in long double.
long double ref_divergence(Divergence kind, long double beta, long double skew,
                           const std::vector<long double>& p, const std::vector<long double>& q) {
  std::vector<long double> m(p.size());
  switch (kind) {
    case Divergence::ForwardKL:
      return ref_kl_prob(p, q);
    case Divergence::ReverseKL:
      return ref_kl_prob(q, p);
    case Divergence::GeneralizedJSD:
      for (std::size_t k = 0; k < p.size(); ++k) m[k] = beta * p[k] + (1 - beta) * q[k];
      return beta * ref_kl_prob(p, m) + (1 - beta) * ref_kl_prob(q, m);
    case Divergence::SkewForwardKL:
      for (std::size_t k = 0; k < p.size(); ++k) m[k] = skew * p[k] + (1 - skew) * q[k];
      return ref_kl_prob(p, m);
    case Divergence::SkewReverseKL:
      for (std::size_t k = 0; k < p.size(); ++k) m[k] = skew * q[k] + (1 - skew) * p[k];
      return ref_kl_prob(q, m);
    case Divergence::TotalVariation: {
      long double d = 0;
      for (std::size_t k = 0; k < p.size(); ++k) d += std::fabs(p[k] - q[k]);
      return d / 2;
    }
  }
  return 0;
}

mmkd::LogitDivergence<double>::Options options(Divergence kind, double temp = 1.0) {
  mmkd::LogitDivergence<double>::Options o;
  o.divergence = kind;
  o.temperature = temp;
  return o;
}

}  // namespace

TEST_CASE("LogitDivergence matches each definition for every reduction, mask and temperature",
          "[logit][divergence]") {
  const Matrix<double> s = random_matrix<double>(9, 11, 1, 2.0),
                       t = random_matrix<double>(9, 11, 2, 2.0);
  mmkd::RowMask mask(9);
  mask << 1, 0, 1, 1, 0, 1, 1, 1, 0;
  for (Divergence kind : kAll) {
    for (double temp : {0.5, 2.0}) {
      for (double mix : {0.1, 0.7}) {
        for (auto red : {Reduction::BatchMean, Reduction::Mean, Reduction::Sum}) {
          auto o = options(kind, temp);
          o.beta = mix;
          o.skew = mix;
          o.scale_by_t2 = true;
          o.reduction = red;
          o.weight = 0.8;
          mmkd::LogitDivergence<double> loss(o);
          INFO(name(kind) << " T " << temp << " mix " << mix << " " << mmkd::to_string(red));
          long double sum = 0, sum_masked = 0;
          Index used = 0;
          for (Index i = 0; i < s.rows(); ++i) {
            const long double d = ref_divergence(kind, mix, mix, ref_softmax(t.row(i), temp),
                                                 ref_softmax(s.row(i), temp));
            sum += d;
            if (mask(i)) {
              sum_masked += d;
              ++used;
            }
          }
          const double per = red == Reduction::Sum ? 1.0 : red == Reduction::Mean ? 11.0 : 1.0;
          const double scale = 0.8 * temp * temp / per;
          const double full = double(sum) * scale / (red == Reduction::Sum ? 1 : 9);
          const double masked = double(sum_masked) * scale / (red == Reduction::Sum ? 1 : used);
          CHECK(loss.value(s, t) == Approx(full).epsilon(1e-12));
          CHECK(loss.value(s, t, mask) == Approx(masked).epsilon(1e-12));
          Matrix<double> g = Matrix<double>::Zero(9, 11);
          CHECK(loss.value_and_grad(s, t, mask, g) == loss.value(s, t, mask));
          for (Index i = 0; i < 9; ++i)
            if (!mask(i)) CHECK(g.row(i).isZero(0));
        }
      }
    }
  }
}

TEST_CASE("LogitDivergence gradients match finite differences", "[logit][divergence][gradient]") {
  const Matrix<double> s = random_matrix<double>(5, 7, 3, 2.0),
                       t = random_matrix<double>(5, 7, 4, 2.0);
  mmkd::RowMask mask(5);
  mask << 1, 1, 0, 1, 0;
  for (Divergence kind : kAll) {
    for (double temp : {0.5, 1.0, 3.0}) {
      for (double mix : {0.05, 0.5, 0.95}) {
        auto o = options(kind, temp);
        o.beta = mix;
        o.skew = mix;
        o.weight = 0.7;
        mmkd::LogitDivergence<double> loss(o);
        INFO(name(kind) << " T " << temp << " mix " << mix);
        auto wrt_student = [&](const Matrix<double>& x, Matrix<double>& g) {
          return loss.value_and_grad(x, t, g);
        };
        auto wrt_student_masked = [&](const Matrix<double>& x, Matrix<double>& g) {
          return loss.value_and_grad(x, t, mask, g);
        };
        auto wrt_teacher = [&](const Matrix<double>& x, Matrix<double>& g) {
          Matrix<double> gs = Matrix<double>::Zero(5, 7);
          return loss.value_and_grad(s, x, gs, g);
        };
        auto wrt_teacher_masked = [&](const Matrix<double>& x, Matrix<double>& g) {
          Matrix<double> gs = Matrix<double>::Zero(5, 7);
          return loss.value_and_grad(s, x, mask, gs, g);
        };
        const auto r1 = mmkd::check_value_and_grad(wrt_student, s, tight());
        const auto r2 = mmkd::check_value_and_grad(wrt_student_masked, s, tight());
        const auto r3 = mmkd::check_value_and_grad(wrt_teacher, t, tight());
        const auto r4 = mmkd::check_value_and_grad(wrt_teacher_masked, t, tight());
        INFO(r1.message());
        CHECK(r1.passed);
        INFO(r2.message());
        CHECK(r2.passed);
        INFO(r3.message());
        CHECK(r3.passed);
        INFO(r4.message());
        CHECK(r4.passed);
      }
    }
  }
}

TEMPLATE_TEST_CASE("LogitDivergence invariants", "[logit][divergence]", float, double) {
  using T = TestType;
  const Matrix<T> s = random_matrix<T>(6, 9, 5, 3.0), t = random_matrix<T>(6, 9, 6, 3.0);
  for (Divergence kind : kAll) {
    INFO(name(kind));
    typename mmkd::LogitDivergence<T>::Options o;
    o.divergence = kind;
    mmkd::LogitDivergence<T> loss(o);
    // Equal distributions: zero divergence and zero gradient, also under a common row offset.
    // TotalVariation's gradient is the subgradient sign(p − q), ±1 on the offset's rounding
    // noise, so it gets identical logits (sign(0) = 0).
    const Matrix<T> shifted =
        kind == Divergence::TotalVariation ? s : Matrix<T>((s.array() + T(5)).matrix());
    Matrix<T> gs = Matrix<T>::Zero(6, 9), gt = Matrix<T>::Zero(6, 9);
    CHECK(std::abs(loss.value_and_grad(s, shifted, gs, gt)) < 10 * Tol<T>::rel);
    CHECK(gs.cwiseAbs().maxCoeff() < 10 * Tol<T>::rel);
    CHECK(gt.cwiseAbs().maxCoeff() < 10 * Tol<T>::rel);
    // The logits' gradient rows sum to zero (softmax is invariant to a common shift), and the
    // divergence is non-negative.
    gs.setZero();
    gt.setZero();
    CHECK(loss.value_and_grad(s, t, gs, gt) > 0);
    CHECK(gs.rowwise().sum().cwiseAbs().maxCoeff() < 10 * Tol<T>::rel);
    CHECK(gt.rowwise().sum().cwiseAbs().maxCoeff() < 10 * Tol<T>::rel);
  }
}

TEST_CASE("LogitDivergence: ForwardKL is LogitKD; JSD at beta near 0 and 1 approaches the KLs",
          "[logit][divergence]") {
  const Matrix<double> s = random_matrix<double>(7, 10, 7, 2.0),
                       t = random_matrix<double>(7, 10, 8, 2.0);
  auto o = options(Divergence::ForwardKL, 3.0);
  o.scale_by_t2 = true;
  mmkd::LogitDivergence<double> fkl(o);
  mmkd::LogitKD<double> kd({3.0});
  Matrix<double> g1 = Matrix<double>::Zero(7, 10), g2 = g1;
  CHECK(fkl.value_and_grad(s, t, g1) == kd.value_and_grad(s, t, g2));
  CHECK(bit_identical(g1, g2));

  // At β → 0, m → q and KL(q‖m) = O(β²), so the value / β → KL(p‖q); at β → 1, likewise the
  // value / (1 − β) → KL(q‖p).
  auto j = options(Divergence::GeneralizedJSD);
  mmkd::LogitDivergence<double> fwd(options(Divergence::ForwardKL)),
      rev(options(Divergence::ReverseKL));
  j.beta = 1e-7;
  mmkd::LogitDivergence<double> near0(j);
  CHECK(near0.value(s, t) / 1e-7 == Approx(fwd.value(s, t)).epsilon(1e-5));
  j.beta = 1 - 1e-7;
  mmkd::LogitDivergence<double> near1(j);
  CHECK(near1.value(s, t) / 1e-7 == Approx(rev.value(s, t)).epsilon(1e-5));
  // Skew λ = 0 is the plain KL of its direction; λ = 1 is 0.
  auto k = options(Divergence::SkewForwardKL);
  k.skew = 0;
  CHECK(mmkd::LogitDivergence<double>(k).value(s, t) == Approx(fwd.value(s, t)).epsilon(1e-13));
  k.divergence = Divergence::SkewReverseKL;
  CHECK(mmkd::LogitDivergence<double>(k).value(s, t) == Approx(rev.value(s, t)).epsilon(1e-13));
  k.skew = 1;
  CHECK(mmkd::LogitDivergence<double>(k).value(s, t) == Approx(0.0).margin(1e-15));
}

TEMPLATE_TEST_CASE("LogitDivergence: the skew KLs at 0 and 1 where a probability underflows",
                   "[logit][divergence]", float, double) {
  using T = TestType;
  // Teacher logits spread by 1e4: most of p underflows to exactly 0, while its logs stay finite.
  // At λ = 0 the skew KLs are the plain KLs, value and gradient (their λ·x²/m term vanishes
  // although x²/m alone is +inf); at λ = 1 they are 0 with a zero gradient (to rounding).
  const Matrix<T> s = random_matrix<double>(6, 9, 17, 3.0).cast<T>(),
                  t = random_matrix<double>(6, 9, 18, 1e4).cast<T>();
  const T tol = std::is_same<T, float>::value ? T(2e-5) : T(1e-12);
  for (const auto [skew_kind, plain_kind] :
       {std::pair{Divergence::SkewForwardKL, Divergence::ForwardKL},
        std::pair{Divergence::SkewReverseKL, Divergence::ReverseKL}}) {
    INFO(name(skew_kind));
    typename mmkd::LogitDivergence<T>::Options o;
    o.divergence = skew_kind;
    o.skew = 0;
    Matrix<T> g = Matrix<T>::Zero(6, 9), g_plain = g, gt = g, gt_plain = g;
    const T v = mmkd::LogitDivergence<T>(o).value_and_grad(s, t, g, gt);
    o.divergence = plain_kind;
    const T v_plain = mmkd::LogitDivergence<T>(o).value_and_grad(s, t, g_plain, gt_plain);
    CHECK(v == Approx(v_plain).epsilon(tol));
    CHECK(max_rel_diff(g, g_plain) < tol);
    CHECK(max_rel_diff(gt, gt_plain) < tol);
    o.divergence = skew_kind;
    o.skew = 1;
    g.setZero();
    gt.setZero();
    CHECK(mmkd::LogitDivergence<T>(o).value_and_grad(s, t, g, gt) == T(0));
    // m = x through exp(log x): a few ulps of 1 per class.
    const T ulps = 16 * std::numeric_limits<T>::epsilon();
    CHECK(g.cwiseAbs().maxCoeff() < ulps);
    CHECK(gt.cwiseAbs().maxCoeff() < ulps);
  }
}

TEST_CASE("LogitDivergence: a two-class row by hand", "[logit][divergence]") {
  // s = (0, 0): q = (1/2, 1/2); t = (log 3, 0): p = (3/4, 1/4).
  Matrix<double> s(1, 2), t(1, 2);
  s << 0, 0;
  t << std::log(3.0), 0;
  const double p0 = 0.75, p1 = 0.25;
  auto value = [&](Divergence kind, double mix) {
    auto o = options(kind);
    o.beta = mix;
    o.skew = mix;
    return mmkd::LogitDivergence<double>(o).value(s, t);
  };
  CHECK(value(Divergence::ForwardKL, 0.5) ==
        Approx(p0 * std::log(p0 / 0.5) + p1 * std::log(p1 / 0.5)).epsilon(1e-14));
  CHECK(value(Divergence::ReverseKL, 0.5) ==
        Approx(0.5 * std::log(0.5 / p0) + 0.5 * std::log(0.5 / p1)).epsilon(1e-14));
  CHECK(value(Divergence::TotalVariation, 0.5) == Approx(0.25).epsilon(1e-14));
  // JSD at β = 1/2: m = (5/8, 3/8).
  const double jsd = 0.5 * (p0 * std::log(p0 / 0.625) + p1 * std::log(p1 / 0.375)) +
                     0.5 * (0.5 * std::log(0.5 / 0.625) + 0.5 * std::log(0.5 / 0.375));
  CHECK(value(Divergence::GeneralizedJSD, 0.5) == Approx(jsd).epsilon(1e-14));
  // Skew forward at λ = 0.1: m = 0.1 p + 0.9 q = (0.525, 0.475).
  CHECK(value(Divergence::SkewForwardKL, 0.1) ==
        Approx(p0 * std::log(p0 / 0.525) + p1 * std::log(p1 / 0.475)).epsilon(1e-14));
  // Skew reverse at λ = 0.1: m = 0.1 q + 0.9 p = (0.725, 0.275).
  CHECK(value(Divergence::SkewReverseKL, 0.1) ==
        Approx(0.5 * std::log(0.5 / 0.725) + 0.5 * std::log(0.5 / 0.275)).epsilon(1e-14));
}

TEMPLATE_TEST_CASE("LogitDivergence extreme input: logits of 1e4, one-hot teachers, float",
                   "[logit][divergence]", float, double) {
  using T = TestType;
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  // Logits around ±1e4 with O(1) differences: float and double agree to float accuracy.
  const Matrix<double> sd = random_matrix<double>(4, 8, 9, 1.5),
                       td = random_matrix<double>(4, 8, 10, 1.5);
  Matrix<double> sbig = sd, tbig = td;
  sbig.array() += 1e4;
  tbig.array() -= 1e4;
  const Matrix<T> s = sbig.cast<T>(), t = tbig.cast<T>();
  for (Divergence kind : kAll) {
    INFO(name(kind));
    auto od = options(kind, 1.0);
    typename mmkd::LogitDivergence<T>::Options o;
    o.divergence = kind;
    mmkd::LogitDivergence<T> loss(o);
    mmkd::LogitDivergence<double> ref(od);
    // the reference on the same (rounded) inputs, in double
    const double want = ref.value(s.template cast<double>(), t.template cast<double>());
    Matrix<T> g = Matrix<T>::Zero(4, 8);
    const T got = loss.value_and_grad(s, t, g);
    CHECK(std::isfinite(double(got)));
    CHECK(double(got) == Approx(want).epsilon(std::is_same<T, float>::value ? 2e-5 : 1e-12));
    CHECK(g.allFinite());
  }
  // One-hot teacher (−inf elsewhere): finite for every divergence but ReverseKL and the
  // reverse skew at λ = 0, which are infinite and say where.
  Matrix<T> oh = Matrix<T>::Constant(2, 5, ninf);
  oh(0, 1) = 0;
  oh(1, 4) = 3;
  const Matrix<T> st = random_matrix<T>(2, 5, 11);
  for (Divergence kind : kAll) {
    INFO(name(kind));
    typename mmkd::LogitDivergence<T>::Options o;
    o.divergence = kind;
    mmkd::LogitDivergence<T> loss(o);
    Matrix<T> g = Matrix<T>::Constant(2, 5, T(0.25));
    const Matrix<T> before = g;
    if (kind == Divergence::ReverseKL) {
      CHECK_THROWS_WITH(loss.value_and_grad(st, oh, g),
                        Catch::Contains("teacher[0,0] is -Inf where the student's probability is "
                                        "positive"));
      CHECK(bit_identical(g, before));
    } else {
      const T v = loss.value_and_grad(st, oh, g);
      CHECK(std::isfinite(double(v)));
      CHECK(g.allFinite());
    }
  }
  typename mmkd::LogitDivergence<T>::Options o;
  o.divergence = Divergence::SkewReverseKL;
  o.skew = 0;
  CHECK_THROWS_AS(mmkd::LogitDivergence<T>(o).value(st, oh), mmkd::NumericalError);
  o.skew = T(1e-6);
  CHECK(std::isfinite(double(mmkd::LogitDivergence<T>(o).value(st, oh))));
}

TEST_CASE("LogitDivergence errors leave the buffers untouched", "[logit][divergence][errors]") {
  auto o = options(Divergence::GeneralizedJSD);
  o.beta = 0;
  CHECK_THROWS_WITH(mmkd::LogitDivergence<double>(o),
                    Catch::Contains("option beta must be in (0, 1), got 0"));
  o.beta = 0.5;
  o.skew = 1.5;
  CHECK_THROWS_WITH(mmkd::LogitDivergence<double>(o),
                    Catch::Contains("option skew must be in [0, 1], got 1.5"));
  o.skew = 0.1;
  mmkd::LogitDivergence<double> loss(o);
  const Matrix<double> s = random_matrix<double>(3, 4, 12), t = random_matrix<double>(3, 5, 13);
  Matrix<double> g = Matrix<double>::Constant(3, 4, 0.5);
  CHECK_THROWS_WITH(loss.value_and_grad(s, t, g),
                    Catch::Contains("LogitDivergence: teacher has shape 3x5, expected 3x4"));
  CHECK(g.isConstant(0.5, 0));
  Matrix<double> nan = random_matrix<double>(3, 4, 14);
  nan(1, 2) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(loss.value_and_grad(nan, s, g), Catch::Contains("student[1,2] is NaN"));
  CHECK(g.isConstant(0.5, 0));
  loss.options().divergence = static_cast<Divergence>(17);
  CHECK_THROWS_AS(loss.value(s, s), mmkd::InvalidArgument);
}
