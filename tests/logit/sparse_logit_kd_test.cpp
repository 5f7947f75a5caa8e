#include <mmkd/logit/logit_divergence.hpp>
#include <mmkd/logit/logit_kd.hpp>
#include <mmkd/logit/sparse_logit_kd.hpp>

#include <vector>

#include "support.hpp"

using namespace mmkd_test;
using mmkd::Reduction;
using mmkd::SparseSupport;

namespace {

using Support = mmkd::SparseSupport;
const Support kBoth[] = {Support::TailBucket, Support::Renormalized};

const char* name(Support s) {
  return s == Support::TailBucket ? "TailBucket" : "Renormalized";
}

// A teacher's log-probabilities at its chosen classes: log softmax(t/T) of random logits t,
// gathered at idx, in long double then rounded.
template <class T>
Matrix<T> teacher_logprobs(const Matrix<double>& t, const mmkd::IndexMatrix& idx, double temp) {
  Matrix<T> lp(idx.rows(), idx.cols());
  for (Index i = 0; i < idx.rows(); ++i) {
    const long double lse = ref_lse(t.row(i), 1 / (long double)temp);
    for (Index j = 0; j < idx.cols(); ++j) lp(i, j) = T((long double)t(i, idx(i, j)) / temp - lse);
  }
  return lp;
}

// The definition, in long double: the student's full softmax, the k support entries, the tail.
template <class LP>
long double ref_row(Support support, const Eigen::Ref<const Eigen::RowVectorXd>& s,
                    const mmkd::IndexMatrix& idx, const LP& lp, Index i, long double temp) {
  const long double lse = ref_lse(s, 1 / temp);
  const Index k = idx.cols();
  // p_R = 1 − Σ_S p; q_R summed over the classes outside S (1 − Σ_S q would round to 0 or below
  // for a support that holds all but e^-120 of the mass)
  long double pk = 0, qk = 0, q_tail = 0;
  std::vector<bool> in_support(std::size_t(s.size()), false);
  for (Index j = 0; j < k; ++j) {
    pk += std::exp((long double)lp(i, j));
    qk += std::exp(s(idx(i, j)) / temp - lse);
    in_support[std::size_t(idx(i, j))] = true;
  }
  for (Index c = 0; c < s.size(); ++c)
    if (!in_support[std::size_t(c)]) q_tail += std::exp(s(c) / temp - lse);
  long double d = 0;
  for (Index j = 0; j < k; ++j) {
    long double p = std::exp((long double)lp(i, j)), q = std::exp(s(idx(i, j)) / temp - lse);
    if (support == Support::Renormalized) {
      p /= pk;
      q /= qk;
    }
    if (p > 0) d += p * std::log(p / q);
  }
  if (support == Support::TailBucket && 1 - pk > 0) d += (1 - pk) * std::log((1 - pk) / q_tail);
  return d;
}

mmkd::SparseLogitKD<double>::Options options(Support support, double temp = 1.0) {
  mmkd::SparseLogitKD<double>::Options o;
  o.support = support;
  o.temperature = temp;
  return o;
}

}  // namespace

TEST_CASE("SparseLogitKD matches its definition for both supports, every reduction and mask",
          "[logit][sparse]") {
  const Index n = 8, v = 13, k = 4;
  const Matrix<double> s = random_matrix<double>(n, v, 21, 2.0),
                       t = random_matrix<double>(n, v, 22, 2.0);
  const mmkd::IndexMatrix idx = random_indices(n, v, k, 23);
  mmkd::RowMask mask(n);
  mask << 1, 0, 1, 1, 1, 0, 1, 1;
  for (Support support : kBoth) {
    for (double temp : {0.5, 2.0}) {
      const Matrix<double> lp = teacher_logprobs<double>(t, idx, temp);
      for (auto red : {Reduction::BatchMean, Reduction::Mean, Reduction::Sum}) {
        auto o = options(support, temp);
        o.reduction = red;
        o.scale_by_t2 = true;
        o.weight = 0.6;
        mmkd::SparseLogitKD<double> loss(o);
        INFO(name(support) << " T " << temp << " " << mmkd::to_string(red));
        long double sum = 0, sum_masked = 0;
        Index used = 0;
        for (Index i = 0; i < n; ++i) {
          const long double d = ref_row(support, s.row(i), idx, lp, i, temp);
          sum += d;
          if (mask(i)) {
            sum_masked += d;
            ++used;
          }
        }
        const double buckets = support == Support::TailBucket ? k + 1 : k;
        const double per = red == Reduction::Mean ? buckets : 1.0;
        const double scale = 0.6 * temp * temp / per;
        CHECK(loss.value(s, idx, lp) ==
              Approx(double(sum) * scale / (red == Reduction::Sum ? 1 : n)).epsilon(1e-12));
        CHECK(
            loss.value(s, idx, lp, mask) ==
            Approx(double(sum_masked) * scale / (red == Reduction::Sum ? 1 : used)).epsilon(1e-12));
        Matrix<double> g = Matrix<double>::Zero(n, v);
        CHECK(loss.value_and_grad(s, idx, lp, mask, g) == loss.value(s, idx, lp, mask));
        for (Index i = 0; i < n; ++i)
          if (!mask(i)) CHECK(g.row(i).isZero(0));
        CHECK(loss.row_values().sum() * (red == Reduction::Sum ? 1.0 : 1.0 / used) / per ==
              Approx(loss.value(s, idx, lp, mask)).epsilon(1e-12));
      }
    }
  }
}

TEST_CASE("SparseLogitKD gradients match finite differences", "[logit][sparse][gradient]") {
  const Index n = 5, v = 9;
  const Matrix<double> s = random_matrix<double>(n, v, 24, 2.0),
                       t = random_matrix<double>(n, v, 25, 2.0);
  mmkd::RowMask mask(n);
  mask << 1, 0, 1, 1, 0;
  for (Support support : kBoth) {
    for (Index k : {1, 3, 9}) {
      for (double temp : {0.5, 1.0, 3.0}) {
        const mmkd::IndexMatrix idx = random_indices(n, v, k, 26 + std::uint64_t(k));
        const Matrix<double> lp = teacher_logprobs<double>(t, idx, temp);
        auto o = options(support, temp);
        o.weight = 0.7;
        mmkd::SparseLogitKD<double> loss(o);
        INFO(name(support) << " k " << k << " T " << temp);
        auto plain = [&](const Matrix<double>& x, Matrix<double>& g) {
          return loss.value_and_grad(x, idx, lp, g);
        };
        auto masked = [&](const Matrix<double>& x, Matrix<double>& g) {
          return loss.value_and_grad(x, idx, lp, mask, g);
        };
        const auto r1 = mmkd::check_value_and_grad(plain, s, tight());
        const auto r2 = mmkd::check_value_and_grad(masked, s, tight());
        INFO(r1.message());
        CHECK(r1.passed);
        INFO(r2.message());
        CHECK(r2.passed);
      }
    }
  }
}

TEMPLATE_TEST_CASE("SparseLogitKD invariants", "[logit][sparse]", float, double) {
  using T = TestType;
  const Index n = 6, v = 11, k = 4;
  const Matrix<double> sd = random_matrix<double>(n, v, 27, 2.0);
  const Matrix<T> s = sd.cast<T>();
  const mmkd::IndexMatrix idx = random_indices(n, v, k, 28);
  for (Support support : kBoth) {
    INFO(name(support));
    typename mmkd::SparseLogitKD<T>::Options o;
    o.support = support;
    mmkd::SparseLogitKD<T> loss(o);
    // The student's own top-k: zero divergence and zero gradient.
    const Matrix<T> own = teacher_logprobs<T>(sd, idx, 1.0);
    Matrix<T> g = Matrix<T>::Zero(n, v);
    CHECK(std::abs(loss.value_and_grad(s, idx, own, g)) < 10 * Tol<T>::rel);
    CHECK(g.cwiseAbs().maxCoeff() < 10 * Tol<T>::rel);
    // Another teacher: positive, gradient rows sum to zero; Renormalized leaves every class
    // outside the support untouched.
    const Matrix<T> lp = teacher_logprobs<T>(random_matrix<double>(n, v, 29, 2.0), idx, 1.0);
    g.setZero();
    CHECK(loss.value_and_grad(s, idx, lp, g) > 0);
    CHECK(g.rowwise().sum().cwiseAbs().maxCoeff() < 10 * Tol<T>::rel);
    if (support == Support::Renormalized) {
      Matrix<T> outside = g;
      for (Index i = 0; i < n; ++i)
        for (Index j = 0; j < k; ++j) outside(i, idx(i, j)) = 0;
      CHECK(outside.isZero(0));
    } else {
      CHECK((g.array() != T(0)).count() == n * v);
    }
  }
}

TEST_CASE("SparseLogitKD: a three-class row by hand", "[logit][sparse]") {
  // s = (0, 0, 0): q = (1/3, 1/3, 1/3). The teacher keeps class 2 with p = 1/2 and class 0 with
  // p = 1/4.
  Matrix<double> s = Matrix<double>::Zero(1, 3);
  mmkd::IndexMatrix idx(1, 2);
  idx << 2, 0;
  Matrix<double> lp(1, 2);
  lp << std::log(0.5), std::log(0.25);
  const double third = 1.0 / 3;
  // TailBucket: buckets (1/2, 1/4, 1/4) against (1/3, 1/3, 1/3).
  const double tail = 0.5 * std::log(0.5 / third) + 2 * 0.25 * std::log(0.25 / third);
  CHECK(mmkd::SparseLogitKD<double>(options(Support::TailBucket)).value(s, idx, lp) ==
        Approx(tail).epsilon(1e-14));
  // Renormalized: (2/3, 1/3) against (1/2, 1/2).
  const double ren = 2 * third * std::log(4 * third) + third * std::log(2 * third);
  CHECK(mmkd::SparseLogitKD<double>(options(Support::Renormalized)).value(s, idx, lp) ==
        Approx(ren).epsilon(1e-14));
  // Gradients: TailBucket q − p on the support (class 2: 1/3 − 1/2, class 0: 1/3 − 1/4) and
  // q_1·(1 − p_R/q_R) = 1/3·(1 − 3/4) outside; Renormalized q̂ − p̂ = (1/2 − 1/3, 1/2 − 2/3).
  Matrix<double> g = Matrix<double>::Zero(1, 3);
  mmkd::SparseLogitKD<double>(options(Support::TailBucket)).value_and_grad(s, idx, lp, g);
  CHECK(g(0, 2) == Approx(third - 0.5).epsilon(1e-14));
  CHECK(g(0, 0) == Approx(third - 0.25).epsilon(1e-14));
  CHECK(g(0, 1) == Approx(third * 0.25).epsilon(1e-14));
  g.setZero();
  mmkd::SparseLogitKD<double>(options(Support::Renormalized)).value_and_grad(s, idx, lp, g);
  CHECK(g(0, 2) == Approx(0.5 - 2 * third).epsilon(1e-14));
  CHECK(g(0, 0) == Approx(0.5 - third).epsilon(1e-14));
  CHECK(g(0, 1) == 0);
}

TEMPLATE_TEST_CASE("SparseLogitKD with k = V is LogitKD for both supports", "[logit][sparse]",
                   float, double) {
  using T = TestType;
  const Index n = 5, v = 7;
  const Matrix<double> sd = random_matrix<double>(n, v, 30, 2.0),
                       td = random_matrix<double>(n, v, 31, 2.0);
  const mmkd::IndexMatrix idx = random_indices(n, v, v, 32);  // every class, shuffled
  const Matrix<T> s = sd.cast<T>(), t = td.cast<T>();
  mmkd::LogitKD<T> kd({T(2)});
  Matrix<T> g_kd = Matrix<T>::Zero(n, v);
  const double want = kd.value_and_grad(s, t, g_kd);
  // the teacher's log-softmax at T = 2, rounded to T: its mass is 1 up to rounding
  const Matrix<T> lp = teacher_logprobs<T>(td, idx, 2.0);
  for (Support support : kBoth) {
    INFO(name(support));
    typename mmkd::SparseLogitKD<T>::Options o;
    o.support = support;
    o.temperature = T(2);
    o.scale_by_t2 = true;
    mmkd::SparseLogitKD<T> loss(o);
    Matrix<T> g = Matrix<T>::Zero(n, v);
    CHECK(double(loss.value_and_grad(s, idx, lp, g)) == Approx(want).epsilon(20 * Tol<T>::rel));
    CHECK((g - g_kd).cwiseAbs().maxCoeff() < 20 * Tol<T>::rel);
  }
}

TEMPLATE_TEST_CASE("SparseLogitKD extreme input: logits of 1e4, a support with all the mass",
                   "[logit][sparse]", float, double) {
  using T = TestType;
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  const Index n = 4, v = 50, k = 5;
  const double tol = std::is_same<T, float>::value ? 2e-5 : 1e-12;
  const mmkd::IndexMatrix idx = random_indices(n, v, k, 33);
  const Matrix<double> td = random_matrix<double>(n, v, 34, 1.5);
  const Matrix<T> lp = teacher_logprobs<T>(td, idx, 1.0);
  // Logits around 1e4 with O(1) differences: the result is that of the rounded inputs, to the
  // scalar type's accuracy.
  Matrix<double> big = random_matrix<double>(n, v, 35, 1.5);
  big.array() += 1e4;
  const Matrix<T> s = big.cast<T>();
  // A student whose support classes sit 120 above the rest: its tail, e^-120 relative, is below
  // float's smallest normal number when summed at the row's max.
  Matrix<double> peaked = random_matrix<double>(n, v, 36, 1.0);
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < k; ++j) peaked(i, idx(i, j)) += 120;
  const Matrix<T> sp = peaked.cast<T>();
  for (Support support : kBoth) {
    INFO(name(support));
    typename mmkd::SparseLogitKD<T>::Options o;
    o.support = support;
    mmkd::SparseLogitKD<T> loss(o);
    for (const Matrix<T>* x : {&s, &sp}) {
      long double want = 0;
      for (Index i = 0; i < n; ++i)
        want += ref_row(support, x->template cast<double>().row(i), idx, lp, i, 1.0);
      want /= n;
      Matrix<T> g = Matrix<T>::Zero(n, v);
      const T got = loss.value_and_grad(*x, idx, lp, g);
      CHECK(double(got) == Approx(double(want)).epsilon(tol));
      CHECK(g.allFinite());
      CHECK(g.rowwise().sum().cwiseAbs().maxCoeff() < 10 * Tol<T>::rel);
    }
  }
  // A student that rules out every class outside the support, against a teacher that leaves
  // mass there: infinite, and said so. With the teacher's whole mass on the support it is
  // finite.
  Matrix<T> closed = Matrix<T>::Constant(1, 4, ninf);
  closed(0, 0) = 1;
  closed(0, 2) = 0;
  mmkd::IndexMatrix two(1, 2);
  two << 2, 0;
  Matrix<T> half(1, 2);
  half << std::log(T(0.25)), std::log(T(0.5));
  Matrix<T> g = Matrix<T>::Constant(1, 4, T(0.5));
  mmkd::SparseLogitKD<T> tail;
  CHECK_THROWS_WITH(tail.value_and_grad(closed, two, half, g),
                    Catch::Contains("row 0: the teacher leaves probability mass 0.25") &&
                        Catch::Contains("the KL divergence is infinite"));
  CHECK(g.isConstant(T(0.5), 0));
  Matrix<T> whole(1, 2);
  whole << std::log(T(0.25)), std::log(T(0.75));
  CHECK(std::isfinite(double(tail.value_and_grad(closed, two, whole, g))));
  // A student -inf at a class the teacher gives mass: infinite for both supports.
  Matrix<T> hole = random_matrix<T>(1, 4, 37);
  hole(0, 2) = ninf;
  for (Support support : kBoth) {
    typename mmkd::SparseLogitKD<T>::Options o;
    o.support = support;
    CHECK_THROWS_WITH(mmkd::SparseLogitKD<T>(o).value(hole, two, half),
                      Catch::Contains("student[0,2] is -Inf where the teacher's probability "
                                      "(teacher_logprobs[0,0]) is positive"));
  }
  // A candidate of probability 0 (−inf log-probability) is allowed anywhere.
  Matrix<T> zero_p = half;
  zero_p(0, 0) = ninf;
  CHECK(std::isfinite(double(tail.value(hole, two, zero_p))));
}

TEST_CASE("SparseLogitKD errors name the row and column and leave the buffer untouched",
          "[logit][sparse][errors]") {
  const Index n = 3, v = 6, k = 2;
  const Matrix<double> s = random_matrix<double>(n, v, 38);
  mmkd::IndexMatrix idx(n, k);
  idx << 0, 1, 2, 3, 4, 5;
  Matrix<double> lp(n, k);
  lp << std::log(0.3), std::log(0.2), std::log(0.1), std::log(0.1), std::log(0.5), std::log(0.4);
  Matrix<double> g = Matrix<double>::Constant(n, v, 0.5);
  mmkd::SparseLogitKD<double> loss;
  auto rejects = [&](const mmkd::IndexMatrix& i, const Matrix<double>& l, const char* what) {
    CHECK_THROWS_WITH(loss.value_and_grad(s, i, l, g), Catch::Contains(what));
    CHECK(g.isConstant(0.5, 0));
  };
  mmkd::IndexMatrix bad = idx;
  bad(1, 1) = 6;
  rejects(bad, lp, "SparseLogitKD: teacher_indices[1,1] is 6, expected a class in [0, 6)");
  bad(1, 1) = -1;
  rejects(bad, lp, "teacher_indices[1,1] is -1");
  bad(1, 1) = 2;
  rejects(bad, lp, "teacher_indices[1,1] is 2, which row 1 already holds at column 0");
  Matrix<double> badp = lp;
  badp(2, 0) = std::numeric_limits<double>::quiet_NaN();
  rejects(idx, badp, "teacher_logprobs[2,0] is NaN");
  badp(2, 0) = 0.2;
  rejects(idx, badp, "teacher_logprobs[2,0] is 0.2");
  badp(2, 0) = std::log(0.7);
  rejects(idx, badp, "teacher_logprobs row 2 holds probability mass 1.1");
  rejects(mmkd::IndexMatrix(n, 0), Matrix<double>(n, 0), "teacher_indices has shape 3x0");
  rejects(mmkd::IndexMatrix::Zero(n, 7), Matrix<double>::Zero(n, 7),
          "teacher_indices has shape 3x7, expected 3xk with 1 <= k <= 6");
  rejects(idx, Matrix<double>::Zero(n, 3), "teacher_logprobs has shape 3x3, expected 3x2");
  Matrix<double> none = lp;
  none.row(1).setConstant(-std::numeric_limits<double>::infinity());
  CHECK_NOTHROW(loss.value(s, idx, none));  // TailBucket: the tail holds the whole mass
  mmkd::SparseLogitKD<double> ren(options(Support::Renormalized));
  CHECK_THROWS_WITH(ren.value_and_grad(s, idx, none, g),
                    Catch::Contains("teacher_logprobs row 1 is entirely -Inf"));
  CHECK(g.isConstant(0.5, 0));
  // A masked row is not read: padding may hold anything.
  mmkd::RowMask mask(n);
  mask << 1, 0, 1;
  bad = idx;
  bad(1, 0) = -100;
  bad(1, 1) = -100;
  badp = lp;
  badp.row(1).setConstant(std::numeric_limits<double>::quiet_NaN());
  CHECK(loss.value(s, bad, badp, mask) == Approx(loss.value(s, idx, lp, mask)).epsilon(0));
  // A repeated call with the same classes is not mistaken for a duplicate.
  CHECK(loss.value(s, idx, lp) == loss.value(s, idx, lp));
  mmkd::SparseLogitKD<double>::Options o;
  o.support = static_cast<Support>(5);
  CHECK_THROWS_AS(mmkd::SparseLogitKD<double>(o), mmkd::InvalidArgument);
}

TEST_CASE("The README's token-level lines train on the gradient of their sum",
          "[logit][sparse][divergence]") {
  const Index b = 2, len = 4, v = 10, k = 3;  // two sequences of four tokens
  const Matrix<double> student0 = random_matrix<double>(b * len, v, 39, 2),
                       teacher_logits = random_matrix<double>(b * len, v, 40, 2);
  mmkd::RowMask mask(b * len);
  mask << 1, 1, 1, 0, 1, 1, 0, 0;  // padding at the ends
  const mmkd::IndexMatrix ids = random_indices(b * len, v, k, 41);
  const Matrix<double> logprobs = teacher_logprobs<double>(teacher_logits, ids, 1.0);
  // The README's lines, in double.
  auto example = [&](const Matrix<double>& student_logits, Matrix<double>& d_student) {
    mmkd::LogitDivergence<double>::Options o;
    o.divergence = mmkd::Divergence::GeneralizedJSD;
    mmkd::LogitDivergence<double> jsd(o);
    double l1 = jsd.value_and_grad(student_logits, teacher_logits, mask, d_student);
    mmkd::SparseLogitKD<double> topk;
    double l2 = topk.value_and_grad(student_logits, ids, logprobs, mask, d_student);
    return l1 + l2;
  };
  Matrix<double> grad = Matrix<double>::Zero(b * len, v);
  const double value = example(student0, grad);
  auto loss = [&](const Matrix<double>& s) {
    Matrix<double> scratch = Matrix<double>::Zero(b * len, v);
    return example(s, scratch);
  };
  const auto r = mmkd::check_gradient(loss, student0, grad, tight());
  INFO(r.message());
  CHECK(r.passed);
  // the mean over the 5 real tokens of each term, from the definitions
  long double jsd = 0, topk = 0;
  for (Index i = 0; i < b * len; ++i) {
    if (!mask(i)) continue;
    long double lp = ref_lse(teacher_logits.row(i), 1), lq = ref_lse(student0.row(i), 1), m = 0;
    for (Index c = 0; c < v; ++c) {
      const long double p = std::exp(teacher_logits(i, c) - lp), q = std::exp(student0(i, c) - lq);
      m = (p + q) / 2;
      jsd += (p * std::log(p / m) + q * std::log(q / m)) / 2;
    }
    topk += ref_row(Support::TailBucket, student0.row(i), ids, logprobs, i, 1);
  }
  CHECK(value == Approx(double((jsd + topk) / 5)).epsilon(1e-12));
}
