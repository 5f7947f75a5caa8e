#include <mmkd/structure/channel_decorrelation.hpp>

#include "support.hpp"

using namespace mmkd_test;
using mmkd::ChannelStatistic;
using mmkd::DecorrelationTarget;

namespace {

using LMat = Eigen::Matrix<long double, Eigen::Dynamic, Eigen::Dynamic>;

// The channel statistic from its definition, long double.
LMat ref_stat(const Matrix<double>& z, ChannelStatistic stat, long double eps) {
  const Index n = z.rows(), c = z.cols();
  LMat h(n, c);
  for (Index j = 0; j < c; ++j) {
    long double mu = 0, var = 0;
    for (Index i = 0; i < n; ++i) mu += z(i, j);
    mu /= n;
    for (Index i = 0; i < n; ++i) var += (z(i, j) - mu) * (z(i, j) - mu);
    var /= n;
    const long double sd = stat == ChannelStatistic::Correlation ? std::sqrt(var + eps) : 1.0L;
    for (Index i = 0; i < n; ++i) h(i, j) = (z(i, j) - mu) / sd;
  }
  return h.transpose() * h / (long double)n;
}

long double ref_loss(const Matrix<double>& z, const Matrix<double>* t, ChannelStatistic stat,
                     bool mean) {
  const LMat r = ref_stat(z, stat, 1e-5L);
  const LMat rt = t ? ref_stat(*t, stat, 1e-5L) : LMat::Zero(r.rows(), r.cols());
  long double sum = 0;
  const Index c = r.rows();
  for (Index a = 0; a < c; ++a) {
    for (Index b = 0; b < c; ++b) {
      if (a != b) sum += (r(a, b) - rt(a, b)) * (r(a, b) - rt(a, b));
    }
  }
  return mean ? sum / (c * (c - 1)) : sum;
}

}  // namespace

TEST_CASE("ChannelDecorrelation matches its definition and finite differences",
          "[structure][decor]") {
  const Matrix<double> z = random_matrix<double>(9, 6, 1), t = random_matrix<double>(11, 6, 2);
  for (auto stat : {ChannelStatistic::Correlation, ChannelStatistic::Covariance}) {
    for (bool with_teacher : {false, true}) {
      for (bool mean : {true, false}) {
        mmkd::ChannelDecorrelation<double>::Options o;
        o.statistic = stat;
        o.target = with_teacher ? DecorrelationTarget::Teacher : DecorrelationTarget::Identity;
        o.mean_off_diagonal = mean;
        o.weight = 0.8;
        mmkd::ChannelDecorrelation<double> decor(o);
        INFO("stat " << int(stat) << " teacher " << with_teacher << " mean " << mean);
        const double v = with_teacher ? decor.value(z, t) : decor.value(z);
        CHECK(close<double>(v, 0.8 * double(ref_loss(z, with_teacher ? &t : nullptr, stat, mean)),
                            1e-12));
        auto f = [&](const Matrix<double>& x, Matrix<double>& g) {
          return with_teacher ? decor.value_and_grad(x, t, g) : decor.value_and_grad(x, g);
        };
        const auto r = mmkd::check_value_and_grad(f, z, tight());
        INFO(r.message());
        CHECK(r.passed);
      }
    }
  }
}

TEMPLATE_TEST_CASE("ChannelDecorrelation invariants and degenerate input", "[structure][decor]",
                   float, double) {
  using T = TestType;
  mmkd::ChannelDecorrelation<T> decor;
  SECTION("uncorrelated (orthogonal centred) channels give 0") {
    Matrix<T> z(4, 2);
    z << 1, 1, -1, 1, 1, -1, -1, -1;
    Matrix<T> g = Matrix<T>::Zero(4, 2);
    CHECK(decor.value_and_grad(z, g) == T(0));
    CHECK(g.isZero(0));
  }
  SECTION("correlation ignores the scale and shift of a channel") {
    const Matrix<T> z = random_matrix<T>(16, 5, 3);
    Matrix<T> z2 = z;
    z2.col(2) = z2.col(2) * T(30) + Matrix<T>::Constant(16, 1, T(7));
    CHECK(decor.value(z2) == Approx(decor.value(z)).epsilon(1e-3));
  }
  SECTION("teacher == student gives 0; one channel gives 0") {
    decor.options().target = DecorrelationTarget::Teacher;
    const Matrix<T> z = random_matrix<T>(8, 4, 4);
    CHECK(decor.value(z, z) == T(0));
    decor.options().target = DecorrelationTarget::Identity;
    CHECK(decor.value(random_matrix<T>(5, 1, 5)) == T(0));
  }
  SECTION("constant channels stay finite (eps guard)") {
    Matrix<T> z = random_matrix<T>(6, 3, 6);
    z.col(1).setConstant(T(2));
    Matrix<T> g = Matrix<T>::Zero(6, 3);
    CHECK(std::isfinite(decor.value_and_grad(z, g)));
    CHECK(g.allFinite());
  }
}

TEST_CASE("ChannelDecorrelation rejects bad input and writes nothing",
          "[structure][decor][errors]") {
  mmkd::ChannelDecorrelation<double> decor;
  Matrix<double> g = random_matrix<double>(5, 3, 1);
  const Matrix<double> g0 = g;
  CHECK_THROWS_WITH(decor.value(random_matrix<double>(1, 3, 2)),
                    "ChannelDecorrelation: features has 1 row; the channel statistic needs a batch "
                    "of at least 2");
  Matrix<double> z = random_matrix<double>(5, 3, 3);
  CHECK_THROWS_WITH(decor.value(z, z),
                    "ChannelDecorrelation: teacher features given but target is Identity");
  decor.options().target = DecorrelationTarget::Teacher;
  CHECK_THROWS_WITH(decor.value(z),
                    "ChannelDecorrelation: target Teacher needs the teacher's features");
  CHECK_THROWS_WITH(
      decor.value(z, random_matrix<double>(5, 4, 4)),
      "ChannelDecorrelation: teacher has shape 5x4, expected at least 2 rows and 3 columns");
  decor.options().target = DecorrelationTarget::Identity;
  z(3, 1) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(decor.value_and_grad(z, g), "ChannelDecorrelation: features[3,1] is NaN");
  decor.options().eps = 0;
  CHECK_THROWS_AS(decor.value(random_matrix<double>(5, 3, 5)), mmkd::InvalidArgument);
  CHECK(bit_identical(g, g0));
}
