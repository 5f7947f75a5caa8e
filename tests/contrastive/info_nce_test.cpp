#include <mmkd/contrastive/info_nce.hpp>

#include "support.hpp"

using namespace mmkd_test;

namespace {

mmkd::InfoNCE<double> make(bool symmetric, Index offset = 0, bool stream = false, Index block = 256,
                           double temp = 0.3) {
  mmkd::InfoNCE<double>::Options o;
  o.temperature = temp;
  o.symmetric = symmetric;
  o.offset = offset;
  o.stream = stream;
  o.block_rows = block;
  return mmkd::InfoNCE<double>(o);
}

// One-directional InfoNCE from the definition, long double.
long double ref_nce(const Matrix<double>& q, const Matrix<double>& k, Index off, long double temp) {
  long double sum = 0;
  for (Index i = 0; i < q.rows(); ++i) {
    Eigen::Matrix<long double, 1, Eigen::Dynamic> s(k.rows());
    for (Index j = 0; j < k.rows(); ++j) {
      s(j) = (long double)(q.row(i).normalized().dot(k.row(j).normalized())) / temp;
    }
    sum += ref_lse(s, 1.0L) - s(i + off);
  }
  return sum / q.rows();
}

}  // namespace

TEST_CASE("InfoNCE matches its definition and finite differences", "[contrastive][infonce]") {
  const Matrix<double> q = random_matrix<double>(5, 4, 1), k = random_matrix<double>(8, 4, 2);
  auto one = make(false, 2);
  CHECK(close<double>(one.value(q, k), double(ref_nce(q, k, 2, 0.3)), 1e-12));
  // Symmetric on a square batch: the mean of the two directions.
  const Matrix<double> k5 = k.topRows(5);
  auto sym = make(true);
  CHECK(close<double>(sym.value(q, k5),
                      double(0.5 * (ref_nce(q, k5, 0, 0.3) + ref_nce(k5, q, 0, 0.3))), 1e-12));
  for (bool symmetric : {false, true}) {
    for (bool stream : {false, true}) {
      auto nce = make(symmetric, 3, stream, 2);
      auto fq = [&](const Matrix<double>& x, Matrix<double>& g) {
        return nce.value_and_grad(x, k, g);
      };
      auto fk = [&](const Matrix<double>& x, Matrix<double>& g) {
        Matrix<double> dq = Matrix<double>::Zero(5, 4);
        return nce.value_and_grad(q, x, dq, g);
      };
      const auto r1 = mmkd::check_value_and_grad(fq, q, tight()),
                 r2 = mmkd::check_value_and_grad(fk, k, tight());
      INFO("symmetric " << symmetric << " stream " << stream << "\n"
                        << r1.message() << "\n"
                        << r2.message());
      CHECK(r1.passed);
      CHECK(r2.passed);
    }
  }
  SECTION("without normalisation") {
    mmkd::InfoNCE<double>::Options o;
    o.normalize = false;
    o.temperature = 2;
    mmkd::InfoNCE<double> raw(o);
    auto f = [&](const Matrix<double>& x, Matrix<double>& g) {
      return raw.value_and_grad(x, k5, g);
    };
    const auto r = mmkd::check_value_and_grad(f, q, tight());
    INFO(r.message());
    CHECK(r.passed);
  }
}

TEST_CASE("InfoNCE learnable temperature: gradient and the CLIP clamp", "[contrastive][infonce]") {
  const Matrix<double> q = random_matrix<double>(6, 3, 3), k = random_matrix<double>(6, 3, 4);
  mmkd::InfoNCE<double>::Options o;
  o.learn_temperature = true;
  o.temperature = 0.5;
  mmkd::InfoNCE<double> nce(o);
  CHECK(nce.parameters()[0].value(0, 0) == Approx(std::log(2.0)));
  CHECK(nce.temperature() == Approx(0.5));
  for (bool stream : {false, true}) {
    nce.options().stream = stream;
    nce.options().block_rows = 4;
    nce.parameters()[0].value(0, 0) = 1.7;
    nce.zero_grad();
    Matrix<double> dq = Matrix<double>::Zero(6, 3);
    nce.value_and_grad(q, k, dq);
    const Matrix<double> analytic = nce.gradients()[0].value;
    auto f = [&](const Matrix<double>& theta) {
      nce.parameters()[0].value(0, 0) = theta(0, 0);
      return nce.value(q, k);
    };
    Matrix<double> theta(1, 1);
    theta << 1.7;
    const auto r = mmkd::check_gradient(f, theta, analytic, tight());
    INFO(r.message());
    CHECK(r.passed);
  }
  nce.parameters()[0].value(0, 0) = 9;  // 1/τ = e^9 > 100: clamped to ln 100 at the next call
  nce.value(q, k);
  CHECK(nce.parameters()[0].value(0, 0) == Approx(std::log(100.0)));
  CHECK(nce.temperature() == Approx(0.01));
  // value() leaves θ's gradient alone; a call that throws leaves θ unclamped.
  nce.zero_grad();
  nce.value(q, k);
  CHECK(nce.gradients()[0].value(0, 0) == 0);
  nce.parameters()[0].value(0, 0) = 9;
  Matrix<double> bad = q;
  bad(2, 1) = std::numeric_limits<double>::quiet_NaN();
  Matrix<double> dq = Matrix<double>::Zero(6, 3);
  CHECK_THROWS_AS(nce.value_and_grad(bad, k, dq), mmkd::NumericalError);
  CHECK(nce.parameters()[0].value(0, 0) == 9);
  CHECK(nce.gradients()[0].value(0, 0) == 0);
  nce.parameters()[0].value(0, 0) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(nce.value_and_grad(q, k, dq), "InfoNCE: parameter log_scale[0,0] is NaN");
  CHECK(std::isnan(nce.parameters()[0].value(0, 0)));
  CHECK(nce.gradients()[0].value(0, 0) == 0);
}

TEST_CASE("InfoNCE invariants and extremes", "[contrastive][infonce]") {
  SECTION("constant similarities give log K") {
    const Matrix<double> same = Matrix<double>::Ones(6, 3);
    CHECK(make(false).value(same, same) == Approx(std::log(6.0)));
    CHECK(make(true).value(same, same) == Approx(std::log(6.0)));
  }
  SECTION("streamed and unstreamed agree to rounding, symmetric too") {
    const Matrix<float> q = random_matrix<float>(37, 16, 5), k = random_matrix<float>(45, 16, 6);
    for (bool symmetric : {false, true}) {
      mmkd::InfoNCE<float>::Options o;
      o.symmetric = symmetric;
      o.offset = 8;
      mmkd::InfoNCE<float> full(o);
      o.stream = true;
      o.block_rows = 5;
      mmkd::InfoNCE<float> blocked(o);
      Matrix<float> dq1 = Matrix<float>::Zero(37, 16), dk1 = Matrix<float>::Zero(45, 16);
      Matrix<float> dq2 = dq1, dk2 = dk1;
      const float v1 = full.value_and_grad(q, k, dq1, dk1),
                  v2 = blocked.value_and_grad(q, k, dq2, dk2);
      CHECK(v2 == Approx(v1).epsilon(1e-6));
      CHECK((dq1 - dq2).cwiseAbs().maxCoeff() < 1e-6f);
      CHECK((dk1 - dk2).cwiseAbs().maxCoeff() < 1e-6f);
    }
  }
  SECTION("large 1/tau and zero-norm rows stay finite") {
    Matrix<float> q = random_matrix<float>(8, 4, 7), k = random_matrix<float>(8, 4, 8);
    q.row(3).setZero();
    mmkd::InfoNCE<float>::Options o;
    o.temperature = 1e-3f;
    mmkd::InfoNCE<float> nce(o);
    Matrix<float> dq = Matrix<float>::Zero(8, 4), dk = Matrix<float>::Zero(8, 4);
    CHECK(std::isfinite(nce.value_and_grad(q, k, dq, dk)));
    CHECK(dq.allFinite());
    CHECK(dk.allFinite());
  }
}

TEST_CASE("InfoNCE shards: local queries with all keys sum to the whole batch",
          "[contrastive][infonce]") {
  const Index n = 12, d = 5, shards = 3, local = n / shards;
  const Matrix<double> q = random_matrix<double>(n, d, 9), k = random_matrix<double>(n, d, 10);

  SECTION("one-directional") {
    auto whole = make(false);
    Matrix<double> dq = Matrix<double>::Zero(n, d), dk = Matrix<double>::Zero(n, d);
    const double v = whole.value_and_grad(q, k, dq, dk);
    double v_sum = 0;
    Matrix<double> dq_sh = Matrix<double>::Zero(n, d), dk_sum = Matrix<double>::Zero(n, d);
    for (Index r = 0; r < shards; ++r) {
      auto shard = make(false, r * local);
      shard.options().global_batch = n;
      Matrix<double> dq_local = Matrix<double>::Zero(local, d);
      v_sum += shard.value_and_grad(q.middleRows(r * local, local), k, dq_local, dk_sum);
      dq_sh.middleRows(r * local, local) = dq_local;
    }
    CHECK(v_sum == Approx(v).epsilon(1e-12));
    CHECK(dq_sh.isApprox(dq, 1e-12));
    CHECK(dk_sum.isApprox(dk, 1e-12));
  }
  SECTION("symmetric, as two one-directional calls per shard with weight 1/2") {
    auto whole = make(true);
    Matrix<double> dq = Matrix<double>::Zero(n, d), dk = Matrix<double>::Zero(n, d);
    const double v = whole.value_and_grad(q, k, dq, dk);
    double v_sum = 0;
    Matrix<double> dq_sum = Matrix<double>::Zero(n, d), dk_sum = Matrix<double>::Zero(n, d);
    for (Index r = 0; r < shards; ++r) {
      auto shard = make(false, r * local);
      shard.options().global_batch = n;
      shard.options().weight = 0.5;
      Matrix<double> dq_local = Matrix<double>::Zero(local, d),
                     dk_local = Matrix<double>::Zero(local, d);
      v_sum += shard.value_and_grad(q.middleRows(r * local, local), k, dq_local, dk_sum);
      v_sum += shard.value_and_grad(k.middleRows(r * local, local), q, dk_local, dq_sum);
      dq_sum.middleRows(r * local, local) += dq_local;
      dk_sum.middleRows(r * local, local) += dk_local;
    }
    CHECK(v_sum == Approx(v).epsilon(1e-12));
    CHECK(dq_sum.isApprox(dq, 1e-12));
    CHECK(dk_sum.isApprox(dk, 1e-12));
  }
}

TEST_CASE("InfoNCE rejects bad input and writes nothing", "[contrastive][infonce][errors]") {
  const Matrix<double> q = random_matrix<double>(4, 3, 1), k = random_matrix<double>(5, 3, 2);
  Matrix<double> g = random_matrix<double>(4, 3, 3);
  const Matrix<double> g0 = g;
  auto nce = make(false, 2);
  CHECK_THROWS_WITH(nce.value_and_grad(q, k, g),
                    "InfoNCE: offset 2 puts the positive of query 3 at key 5, but keys has 5 rows");
  CHECK_THROWS_WITH(
      make(false).value(q, random_matrix<double>(5, 4, 4)),
      "InfoNCE: keys has shape 5x4, expected K'x3 with K' >= 1 (same width as queries)");
  mmkd::InfoNCE<double>::Options o;
  o.stream = true;
  o.block_rows = 0;
  CHECK_THROWS_WITH(mmkd::InfoNCE<double>(o), "InfoNCE: option block_rows must be >= 1, got 0");
  o.block_rows = 4;
  o.temperature = 0;
  CHECK_THROWS_AS(mmkd::InfoNCE<double>(o), mmkd::InvalidArgument);
  Matrix<double> bad = q;
  bad(2, 0) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(make(false).value_and_grad(bad, k, g), "InfoNCE: queries[2,0] is NaN");
  CHECK(bit_identical(g, g0));
}
