#include <mmkd/structure/channel_decorrelation.hpp>
#include <mmkd/structure/uniformity.hpp>

#include "support.hpp"

using namespace mmkd_test;
using mmkd::ConstTensor4Ref;
using mmkd::Tensor4Ref;
using mmkd::UniformityMode;

namespace {

// Wang & Isola from the definition, long double, on the rows of x normalised as F.normalize does
// (x / max(‖x‖, 1e-12): a zero row stays 0).
long double ref_uniformity(const Matrix<double>& x, long double t) {
  const Index p = x.rows();
  long double sum = 0;
  for (Index i = 0; i < p; ++i) {
    for (Index j = i + 1; j < p; ++j) {
      const long double ni = std::max(1e-12L, (long double)x.row(i).norm()),
                        nj = std::max(1e-12L, (long double)x.row(j).norm());
      long double d2 = 0;
      for (Index k = 0; k < x.cols(); ++k) {
        const long double e = x(i, k) / ni - x(j, k) / nj;
        d2 += e * e;
      }
      sum += std::exp(-t * d2);
    }
  }
  return std::log(sum / (p * (p - 1) / 2.0L));
}

}  // namespace

TEST_CASE("Uniformity matches Wang & Isola's definition and finite differences",
          "[structure][uniformity]") {
  const Matrix<double> x = random_matrix<double>(7, 5, 1);
  mmkd::Uniformity<double> unif;
  CHECK(close<double>(unif.value(x), double(ref_uniformity(x, 2)), 1e-12));
  unif.options().t = 0.5;
  CHECK(close<double>(unif.value(x), double(ref_uniformity(x, 0.5)), 1e-12));
  auto f = [&](const Matrix<double>& xx, Matrix<double>& g) { return unif.value_and_grad(xx, g); };
  const auto r = mmkd::check_value_and_grad(f, x, tight());
  INFO(r.message());
  CHECK(r.passed);
}

TEST_CASE("Uniformity on feature maps: every mode against its definition and finite differences",
          "[structure][uniformity]") {
  const Index n = 3, c = 4, h = 2, w = 3;
  const Matrix<double> f = random_matrix<double>(n, c * h * w, 2);  // NCHW memory
  for (auto mode :
       {UniformityMode::Samples, UniformityMode::SpatialTokens, UniformityMode::SpatialEntropy}) {
    mmkd::Uniformity<double>::Options o;
    o.mode = mode;
    o.spatial_temperature = 0.6;
    o.weight = 1.3;
    mmkd::Uniformity<double> unif(o);
    long double ref = 0;
    if (mode == UniformityMode::Samples) ref = ref_uniformity(f, 2);
    for (Index i = 0; i < n && mode == UniformityMode::SpatialTokens; ++i) {
      // Points: the H·W positions of sample i, C channels each.
      const Eigen::Map<const Matrix<double>> maps(f.data() + i * c * h * w, c, h * w);
      ref += ref_uniformity(Matrix<double>(maps.transpose()), 2) / n;
    }
    for (Index k = 0; k < n * c && mode == UniformityMode::SpatialEntropy; ++k) {
      const Eigen::Map<const Matrix<double>> row(f.data() + k * h * w, 1, h * w);
      const Matrix<double> zero = Matrix<double>::Zero(1, h * w);
      ref += ref_kl(zero.row(0), row.row(0), 0.6L) / (n * c);
    }
    INFO("mode " << int(mode));
    CHECK(close<double>(unif.value(ConstTensor4Ref<double>(f.data(), n, c, h, w)),
                        1.3 * double(ref), 1e-12));
    auto fn = [&](const Matrix<double>& x, Matrix<double>& g) {
      return unif.value_and_grad(ConstTensor4Ref<double>(x.data(), n, c, h, w),
                                 Tensor4Ref<double>(g.data(), n, c, h, w));
    };
    const auto r = mmkd::check_value_and_grad(fn, f, tight());
    INFO(r.message());
    CHECK(r.passed);
  }
}

TEMPLATE_TEST_CASE("Uniformity invariants and degenerate input", "[structure][uniformity]", float,
                   double) {
  using T = TestType;
  mmkd::Uniformity<T> unif;
  SECTION("scaling a row does not change it; the range is [-4t, 0]") {
    const Matrix<T> x = random_matrix<T>(9, 4, 3);
    Matrix<T> x2 = x;
    x2.row(4) *= T(1e3);
    const T v = unif.value(x);
    CHECK(unif.value(x2) == Approx(v).epsilon(Tol<T>::rel * 100));
    CHECK(v <= T(0));
    CHECK(v >= T(-8));
  }
  SECTION("identical points: the maximum, 0; two antipodal points: the minimum, -4t") {
    Matrix<T> same = Matrix<T>::Ones(3, 2);
    CHECK(std::abs(unif.value(same)) < T(1e-6));
    Matrix<T> apart(2, 2);
    apart << 1, 0, -1, 0;
    CHECK(unif.value(apart) == Approx(-8));
  }
  SECTION("a constant map has zero spatial entropy loss; zero rows stay finite") {
    unif.options().mode = UniformityMode::SpatialEntropy;
    mmkd::Tensor4<T> f(2, 3, 2, 2);
    f.setConstant(T(5));
    CHECK(std::abs(unif.value(f)) < T(1e-6));
    unif.options().mode = UniformityMode::Samples;
    Matrix<T> x = random_matrix<T>(4, 3, 7);
    x.row(2).setZero();
    Matrix<T> g = Matrix<T>::Zero(4, 3);
    CHECK(std::isfinite(unif.value_and_grad(x, g)));
    CHECK(g.allFinite());
  }
}

TEST_CASE("Uniformity rejects bad input and writes nothing", "[structure][uniformity][errors]") {
  mmkd::Uniformity<double> unif;
  Matrix<double> g = random_matrix<double>(1, 3, 1);
  const Matrix<double> g0 = g;
  CHECK_THROWS_WITH(unif.value_and_grad(random_matrix<double>(1, 3, 2), g),
                    "Uniformity: x has 1 row; uniformity needs at least 2 samples");
  unif.options().mode = UniformityMode::SpatialTokens;
  CHECK_THROWS_WITH(unif.value(random_matrix<double>(4, 3, 3)),
                    "Uniformity: SpatialTokens and SpatialEntropy need N x C x H x W feature maps");
  mmkd::Tensor4<double> one_pixel(2, 3, 1, 1);
  one_pixel.setRandom();
  CHECK_THROWS_WITH(unif.value(one_pixel),
                    "Uniformity: SpatialTokens needs at least 2 positions (H·W >= 2)");
  unif.options().mode = UniformityMode::Samples;
  Matrix<double> x = random_matrix<double>(4, 3, 4);
  x(1, 1) = std::numeric_limits<double>::infinity();
  Matrix<double> gx = Matrix<double>::Zero(4, 3);
  CHECK_THROWS_WITH(unif.value_and_grad(x, gx), "Uniformity: x[1,1] is +Inf");
  CHECK(gx.isZero(0));
  unif.options().t = -1;
  CHECK_THROWS_AS(unif.value(random_matrix<double>(3, 3, 5)), mmkd::InvalidArgument);
  CHECK(bit_identical(g, g0));
}

TEST_CASE("Uniformity on zero rows is lunif on F.normalize'd points", "[structure][uniformity]") {
  // Hand calculation: u = (1, 0), (0, 0), (0, 1) have squared distances 1, 1 and 2, so with
  // t = 2, L = log((e^{−2} + e^{−2} + e^{−4}) / 3) (2 − 2u·u' would give 2, 2 and 2).
  Matrix<double> x(3, 2);
  x << 1, 0, 0, 0, 0, 1;
  mmkd::Uniformity<double> unif;
  CHECK(unif.value(x) ==
        Approx(std::log((2 * std::exp(-2.0) + std::exp(-4.0)) / 3)).epsilon(1e-14));
  // Two zero rows: distance 0 between them.
  Matrix<double> z = random_matrix<double>(6, 4, 9);
  z.row(1).setZero();
  z.row(4).setZero();
  CHECK(close<double>(unif.value(z), double(ref_uniformity(z, 2)), 1e-12));
  // SpatialTokens: all-zero positions, as after a ReLU.
  const Index n = 2, c = 3, h = 2, w = 3;
  Matrix<double> f = random_matrix<double>(n, c * h * w, 4).cwiseMax(0.0);
  for (Index k = 0; k < c; ++k) f(0, k * h * w + 4) = 0;  // sample 0, position 4: all channels 0
  mmkd::Uniformity<double>::Options o;
  o.mode = UniformityMode::SpatialTokens;
  mmkd::Uniformity<double> tokens(o);
  long double ref = 0;
  for (Index i = 0; i < n; ++i) {
    const Eigen::Map<const Matrix<double>> maps(f.data() + i * c * h * w, c, h * w);
    ref += ref_uniformity(Matrix<double>(maps.transpose()), 2) / n;
  }
  CHECK(close<double>(tokens.value(ConstTensor4Ref<double>(f.data(), n, c, h, w)), double(ref),
                      1e-12));
}

TEST_CASE("Structure enum options out of range are rejected; value() ignores stale gradients",
          "[structure][errors]") {
  mmkd::Uniformity<double>::Options u;
  u.mode = UniformityMode(7);
  CHECK_THROWS_WITH(mmkd::Uniformity<double>(u),
                    "Uniformity: option mode holds no valid value (7)");
  mmkd::ChannelDecorrelation<double>::Options c;
  c.statistic = mmkd::ChannelStatistic(7);
  CHECK_THROWS_WITH(mmkd::ChannelDecorrelation<double>(c),
                    "ChannelDecorrelation: option statistic holds no valid value (7)");
  c = {};
  c.target = mmkd::DecorrelationTarget(7);
  CHECK_THROWS_WITH(mmkd::ChannelDecorrelation<double>(c),
                    "ChannelDecorrelation: option target holds no valid value (7)");
  // A gradient that overflows makes value_and_grad throw; a later value() of the same object
  // must not consult that call's gradient.
  mmkd::Uniformity<float> unif;
  unif.options().weight = 3e38f;
  Matrix<float> x = random_matrix<float>(5, 3, 1);
  Matrix<float> g = Matrix<float>::Zero(5, 3);
  CHECK_THROWS_AS(unif.value_and_grad(x, g), mmkd::NumericalError);
  CHECK(g.isZero(0));
  unif.options().weight = 1;
  const float v = unif.value(x);
  CHECK(std::isfinite(v));
  CHECK(v == Approx(double(ref_uniformity(x.cast<double>(), 2))).epsilon(1e-5));
}

TEST_CASE("ChannelDecorrelation value() throws instead of returning inf", "[structure][errors]") {
  // Covariances of features of size 1e4 are about 1e7; their squares (1e14, finite) times a
  // weight of 1e30 are not.
  const Matrix<float> z = random_matrix<float>(8, 4, 3, 1e4);
  mmkd::ChannelDecorrelation<float> decor;
  decor.options().statistic = mmkd::ChannelStatistic::Covariance;
  REQUIRE(decor.value(z) > 1e8f);
  decor.options().weight = 1e30f;
  CHECK_THROWS_WITH(decor.value(z), Catch::Contains("the loss overflows"));
}
