#include <mmkd/logit/cross_entropy.hpp>
#include <mmkd/logit/fused_linear_kd.hpp>
#include <mmkd/logit/logit_divergence.hpp>

#include "support.hpp"

using namespace mmkd_test;
using mmkd::Divergence;

namespace {

using Fused = mmkd::FusedLinearKD<double>;

// Labels with −100 at some rows.
mmkd::Labels labels_with_ignored(Index n, Index v, std::uint64_t seed) {
  mmkd::Labels y = random_labels(n, v, seed);
  for (Index i = 1; i < n; i += 3) y(i) = -100;
  return y;
}

// The unfused composition: both heads' logits in full, LogitDivergence and CrossEntropy over the
// labelled rows (each a batch mean over them), and the products of the chain rule.
struct Unfused {
  double value;
  Matrix<double> d_h, d_w;
  Eigen::VectorXd d_b;
};
Unfused unfused(const Fused::Options& o, const Matrix<double>& hs, const Matrix<double>& ws,
                const Eigen::VectorXd& bs, const Matrix<double>& t, const mmkd::Labels& y) {
  Matrix<double> s = hs * ws.transpose();
  if (bs.size()) s.rowwise() += bs.transpose();
  mmkd::RowMask mask(y.size());
  mmkd::Labels y0 = y;
  for (Index i = 0; i < y.size(); ++i) {
    mask(i) = y(i) != -100;
    if (!mask(i)) y0(i) = 0;
  }
  mmkd::LogitDivergence<double> div(o.divergence);
  div.options().weight *= o.soft_weight;
  mmkd::CrossEntropy<double> ce;
  ce.options().weight = o.hard_weight;
  Matrix<double> g = Matrix<double>::Zero(s.rows(), s.cols());
  Unfused u;
  u.value = div.value_and_grad(s, t, mask, g) + ce.value_and_grad(s, y0, mask, g);
  u.d_h = g * ws;
  u.d_w = g.transpose() * hs;
  u.d_b = g.colwise().sum().transpose();
  return u;
}

Fused::Options options(Divergence kind, double temp, double hard, Index chunk) {
  Fused::Options o;
  o.divergence.divergence = kind;
  o.divergence.temperature = temp;
  o.divergence.scale_by_t2 = true;
  o.divergence.beta = 0.3;
  o.divergence.skew = 0.2;
  o.soft_weight = 0.7;
  o.hard_weight = hard;
  o.chunk_rows = chunk;
  return o;
}

}  // namespace

TEST_CASE("FusedLinearKD equals the unfused head + LogitDivergence + CrossEntropy",
          "[logit][fused]") {
  const Index n = 11, d = 6, dt = 4, v = 13;
  const Matrix<double> hs = random_matrix<double>(n, d, 51), ws = random_matrix<double>(v, d, 52);
  const Matrix<double> ht = random_matrix<double>(n, dt, 53), wt = random_matrix<double>(v, dt, 54);
  const Eigen::VectorXd bs = random_matrix<double>(v, 1, 55), bt = random_matrix<double>(v, 1, 56);
  const mmkd::Labels y = labels_with_ignored(n, v, 57);
  for (int kind = 0; kind < 6; ++kind) {
    for (Index chunk : {1, 4, 11, 1024}) {
      for (bool bias : {false, true}) {
        const auto o = options(static_cast<Divergence>(kind), 1.5, 0.4, chunk);
        INFO("kind " << kind << " chunk " << chunk << " bias " << bias);
        const Eigen::VectorXd b_s = bias ? bs : Eigen::VectorXd(),
                              b_t = bias ? bt : Eigen::VectorXd();
        Matrix<double> t = ht * wt.transpose();
        if (bias) t.rowwise() += bt.transpose();
        const Unfused want = unfused(o, hs, ws, b_s, t, y);
        Fused kd(o);
        Matrix<double> dh = Matrix<double>::Zero(n, d), dw = Matrix<double>::Zero(v, d);
        Eigen::VectorXd db = Eigen::VectorXd::Zero(b_s.size());
        // the teacher's head, then its precomputed logits
        const double v1 = kd.value_and_grad(hs, ws, ht, wt, y, b_s, b_t, dh, dw, db);
        CHECK(v1 == Approx(want.value).epsilon(1e-12));
        CHECK(max_rel_diff(dh, want.d_h) < 1e-12);
        CHECK(max_rel_diff(dw, want.d_w) < 1e-12);
        if (bias) CHECK(max_rel_diff(db, want.d_b) < 1e-12);
        CHECK(kd.value(hs, ws, ht, wt, y, b_s, b_t) == Approx(v1).epsilon(1e-14));
        dh.setZero();
        dw.setZero();
        db.setZero();
        const double v2 = bias ? kd.value_and_grad(hs, ws, t, y, b_s, dh, dw, db)
                               : kd.value_and_grad(hs, ws, t, y, dh, dw);
        CHECK(v2 == Approx(want.value).epsilon(1e-12));
        CHECK(max_rel_diff(dh, want.d_h) < 1e-12);
        CHECK(max_rel_diff(dw, want.d_w) < 1e-12);
        if (bias) CHECK(max_rel_diff(db, want.d_b) < 1e-12);
      }
    }
  }
}

TEST_CASE("FusedLinearKD gradients match finite differences (hidden, weight, bias)",
          "[logit][fused][gradient]") {
  const Index n = 7, d = 4, v = 9;
  const Matrix<double> hs = random_matrix<double>(n, d, 58), ws = random_matrix<double>(v, d, 59);
  const Matrix<double> ht = random_matrix<double>(n, 3, 60), wt = random_matrix<double>(v, 3, 61);
  const Matrix<double> bs = random_matrix<double>(1, v, 62), bt = random_matrix<double>(1, v, 63);
  const mmkd::Labels y = labels_with_ignored(n, v, 64);
  for (int kind = 0; kind < 6; ++kind) {
    for (double hard : {0.0, 0.5}) {
      const auto o = options(static_cast<Divergence>(kind), 2.0, hard, 3);
      INFO("kind " << kind << " hard " << hard);
      Fused kd(o);
      auto at = [&](const Matrix<double>& h, const Matrix<double>& w, const Matrix<double>& b,
                    Matrix<double>* gh, Matrix<double>* gw, Matrix<double>* gb) {
        Matrix<double> dh = Matrix<double>::Zero(n, d), dw = Matrix<double>::Zero(v, d);
        Eigen::VectorXd db = Eigen::VectorXd::Zero(v);
        const double val =
            kd.value_and_grad(h, w, ht, wt, y, b.transpose(), bt.transpose(), dh, dw, db);
        if (gh) *gh = dh;
        if (gw) *gw = dw;
        if (gb) *gb = db.transpose();
        return val;
      };
      const auto r1 = mmkd::check_value_and_grad(
          [&](const Matrix<double>& x, Matrix<double>& g) {
            Matrix<double> gh;
            const double val = at(x, ws, bs, &gh, nullptr, nullptr);
            g += gh;
            return val;
          },
          hs, tight());
      const auto r2 = mmkd::check_value_and_grad(
          [&](const Matrix<double>& x, Matrix<double>& g) {
            Matrix<double> gw;
            const double val = at(hs, x, bs, nullptr, &gw, nullptr);
            g += gw;
            return val;
          },
          ws, tight());
      const auto r3 = mmkd::check_value_and_grad(
          [&](const Matrix<double>& x, Matrix<double>& g) {
            Matrix<double> gb;
            const double val = at(hs, ws, x, nullptr, nullptr, &gb);
            g += gb;
            return val;
          },
          bs, tight());
      INFO(r1.message());
      CHECK(r1.passed);
      INFO(r2.message());
      CHECK(r2.passed);
      INFO(r3.message());
      CHECK(r3.passed);
    }
  }
}

TEMPLATE_TEST_CASE("FusedLinearKD invariants and float against double", "[logit][fused]", float,
                   double) {
  using T = TestType;
  const Index n = 9, d = 5, v = 12;
  const Matrix<double> hsd = random_matrix<double>(n, d, 65, 2),
                       wsd = random_matrix<double>(v, d, 66, 2);
  const Matrix<T> hs = hsd.cast<T>(), ws = wsd.cast<T>();
  const mmkd::Labels y = labels_with_ignored(n, v, 67);
  for (int kind = 0; kind < 6; ++kind) {
    INFO("kind " << kind);
    typename mmkd::FusedLinearKD<T>::Options o;
    o.divergence.divergence = static_cast<Divergence>(kind);
    o.chunk_rows = 4;
    mmkd::FusedLinearKD<T> kd(o);
    // The teacher's head is the student's: zero loss and zero gradients without the hard term.
    Matrix<T> dh = Matrix<T>::Zero(n, d), dw = Matrix<T>::Zero(v, d);
    CHECK(std::abs(double(kd.value_and_grad(hs, ws, hs, ws, y, dh, dw))) < 10 * Tol<T>::rel);
    CHECK(dh.cwiseAbs().maxCoeff() < 10 * Tol<T>::rel);
    CHECK(dw.cwiseAbs().maxCoeff() < 10 * Tol<T>::rel);
    // Another teacher: float within its precision of double on the same rounded inputs.
    const Matrix<double> ht = random_matrix<double>(n, 3, 68, 2),
                         wt = random_matrix<double>(v, 3, 69, 2);
    typename mmkd::FusedLinearKD<double>::Options od;
    od.divergence.divergence = o.divergence.divergence;
    od.chunk_rows = 4;
    mmkd::FusedLinearKD<double> ref(od);
    Matrix<double> rh = Matrix<double>::Zero(n, d), rw = Matrix<double>::Zero(v, d);
    const double want = ref.value_and_grad(hs.template cast<double>(), ws.template cast<double>(),
                                           ht.cast<T>().template cast<double>(),
                                           wt.cast<T>().template cast<double>(), y, rh, rw);
    dh.setZero();
    dw.setZero();
    const T got = kd.value_and_grad(hs, ws, ht.cast<T>(), wt.cast<T>(), y, dh, dw);
    CHECK(double(got) == Approx(want).epsilon(20 * Tol<T>::rel));
    CHECK(max_rel_diff(dh.template cast<double>(), rh) < 50 * Tol<T>::rel);
    CHECK(max_rel_diff(dw.template cast<double>(), rw) < 50 * Tol<T>::rel);
    // Rows labelled −100 have no part: changing their teacher changes nothing.
    Matrix<T> ht2 = ht.cast<T>();
    ht2.row(1).setConstant(T(7));
    CHECK(kd.value(hs, ws, ht2, wt.cast<T>(), y) ==
          kd.value(hs, ws, ht.cast<T>(), wt.cast<T>(), y));
  }
}

TEST_CASE("FusedLinearKD: a two-token, two-class case by hand", "[logit][fused]") {
  // d = 1: s_i = w h_i. h = (1, 2), w = (1, −1)ᵀ: s_0 = (1, −1), s_1 = (2, −2). Teacher logits
  // zero: p = (1/2, 1/2). Labels (0, −100): only row 0 counts.
  Matrix<double> hs(2, 1), ws(2, 1), t = Matrix<double>::Zero(2, 2);
  hs << 1, 2;
  ws << 1, -1;
  mmkd::Labels y(2);
  y << 0, -100;
  Fused::Options o;
  o.hard_weight = 0.5;
  Fused kd(o);
  // q_0 = softmax(1, −1) = (σ(2), σ(−2)); KL(p ‖ q_0) = −log 2 − ½(log σ(2) + log σ(−2)), and
  // CE = −log σ(2).
  const double sig = 1 / (1 + std::exp(-2.0));
  const double kl = -std::log(2.0) - 0.5 * (std::log(sig) + std::log(1 - sig));
  const double ce = -std::log(sig);
  Matrix<double> dh = Matrix<double>::Zero(2, 1), dw = Matrix<double>::Zero(2, 1);
  CHECK(kd.value_and_grad(hs, ws, t, y, dh, dw) == Approx(kl + 0.5 * ce).epsilon(1e-14));
  // g_0 = (q − p) + ½ (q − e_0) = (σ − ½ + ½(σ − 1), (1 − σ) − ½ + ½(1 − σ)); g_1 = 0.
  const double g0 = sig - 0.5 + 0.5 * (sig - 1), g1 = (1 - sig) - 0.5 + 0.5 * (1 - sig);
  CHECK(dh(0, 0) == Approx(g0 * 1 + g1 * -1).epsilon(1e-14));
  CHECK(dh(1, 0) == 0);
  CHECK(dw(0, 0) == Approx(g0 * 1).epsilon(1e-14));
  CHECK(dw(1, 0) == Approx(g1 * 1).epsilon(1e-14));
}

TEST_CASE("FusedLinearKD errors are found before anything is written", "[logit][fused][errors]") {
  const Index n = 5, d = 3, v = 6;
  const Matrix<double> hs = random_matrix<double>(n, d, 70), ws = random_matrix<double>(v, d, 71);
  const Matrix<double> t = random_matrix<double>(n, v, 72);
  mmkd::Labels y = random_labels(n, v, 73);
  Matrix<double> dh = Matrix<double>::Constant(n, d, 0.5), dw = Matrix<double>::Constant(v, d, 0.5);
  Fused kd;
  auto rejects = [&](Fused& loss, const Matrix<double>& h, const Matrix<double>& w,
                     const Matrix<double>& tl, const mmkd::Labels& l, const char* what) {
    CHECK_THROWS_WITH(loss.value_and_grad(h, w, tl, l, dh, dw), Catch::Contains(what));
    CHECK(dh.isConstant(0.5, 0));
    CHECK(dw.isConstant(0.5, 0));
  };
  rejects(kd, hs, random_matrix<double>(v, d + 1, 1), t, y, "FusedLinearKD: w_s has shape 6x4");
  rejects(kd, hs, ws, random_matrix<double>(n, v + 1, 1), y, "teacher_logits has shape 5x7");
  mmkd::Labels bad = y;
  bad(2) = 6;
  rejects(kd, hs, ws, t, bad, "labels[2] is 6, expected -100 or a class in [0, 6)");
  Matrix<double> nan = ws;
  nan(4, 1) = std::numeric_limits<double>::quiet_NaN();
  rejects(kd, hs, nan, t, y, "w_s[4,1] is NaN");
  Matrix<double> tinf = t;
  tinf(3, 2) = std::numeric_limits<double>::infinity();
  rejects(kd, hs, ws, tinf, y, "teacher_logits[3,2] is +Inf");
  tinf(3, 2) = -std::numeric_limits<double>::infinity();
  CHECK_NOTHROW(kd.value(hs, ws, tinf, y));  // ForwardKL: probability 0
  Fused::Options o;
  o.divergence.divergence = Divergence::ReverseKL;
  Fused reverse(o);
  rejects(reverse, hs, ws, tinf, y, "teacher_logits[3,2] is -Inf where the student's probability");
  rejects(kd, hs * 1e200, ws * 1e200, t, y, "could overflow the scalar type");
  o = Fused::Options();
  o.chunk_rows = 0;
  CHECK_THROWS_WITH(Fused(o), Catch::Contains("option chunk_rows must be >= 1, got 0"));
  o.chunk_rows = 8;
  o.divergence.reduction = mmkd::Reduction::Sum;
  CHECK_THROWS_WITH(Fused(o), Catch::Contains("option divergence.reduction must be BatchMean"));
  o.divergence.reduction = mmkd::Reduction::BatchMean;
  o.divergence.beta = 1;
  CHECK_THROWS_WITH(Fused(o), Catch::Contains("option beta must be in (0, 1)"));
  // Every row ignored: 0 and nothing written.
  const mmkd::Labels none = mmkd::Labels::Constant(n, -100);
  CHECK(kd.value_and_grad(hs, ws, t, none, dh, dw) == 0);
  CHECK(dh.isConstant(0.5, 0));
  CHECK(dw.isConstant(0.5, 0));
}

TEST_CASE("FusedLinearKD: the reverse KL's log-ratio gradient is in the overflow bound",
          "[logit][fused][errors]") {
  // Teacher logits about ±5e33 (a gap of 8e33 in float): the reverse KL's student gradient
  // q ⊙ (log q − log p − D) is about 4e33 per class, and d_h = g w_s with |w_s| = 2e30 passes
  // float's 3.4e38. The forward KL's gradient q − p stays below 1 per row: its d_h is finite.
  Matrix<float> hs(2, 2), ws = Matrix<float>::Constant(2, 2, -1.625e30f);
  Matrix<float> ht = Matrix<float>::Constant(2, 2, -1625.0f), wt(2, 2);
  hs << 0.00353125f, -0.001625f, -0.001625f, -0.001625f;
  wt << 3.53125e30f, -1.625e30f, -1.625e30f, -1.625e30f;
  mmkd::Labels y(2);
  y << 1, 0;
  mmkd::FusedLinearKD<float>::Options o;
  o.hard_weight = 0.5;
  Matrix<float> dh = Matrix<float>::Zero(2, 2), dw = Matrix<float>::Zero(2, 2);
  const float forward = mmkd::FusedLinearKD<float>(o).value_and_grad(hs, ws, ht, wt, y, dh, dw);
  CHECK(std::isfinite(forward));
  CHECK(dh.allFinite());
  CHECK(dw.allFinite());
  o.divergence.divergence = Divergence::ReverseKL;
  dh.setConstant(0.5f);
  dw.setConstant(0.5f);
  mmkd::FusedLinearKD<float> reverse(o);
  CHECK_THROWS_AS(reverse.value_and_grad(hs, ws, ht, wt, y, dh, dw), mmkd::NumericalError);
  CHECK(dh.isConstant(0.5f, 0));
  CHECK(dw.isConstant(0.5f, 0));
  // The reverse skew with λ = 0.1 bounds the log ratio by log 10: finite again.
  o.divergence.divergence = Divergence::SkewReverseKL;
  dh.setZero();
  dw.setZero();
  CHECK(std::isfinite(mmkd::FusedLinearKD<float>(o).value_and_grad(hs, ws, ht, wt, y, dh, dw)));
  CHECK(dh.allFinite());
  CHECK(dw.allFinite());
}

TEST_CASE("The README's fused-head lines train on the gradient of their loss", "[logit][fused]") {
  const Index n = 8, d = 5, v = 11;
  const Matrix<double> h0 = random_matrix<double>(n, d, 74), w_s = random_matrix<double>(v, d, 75);
  const Matrix<double> h_t = random_matrix<double>(n, 4, 76), w_t = random_matrix<double>(v, 4, 77);
  mmkd::Labels labels = random_labels(n, v, 78);
  labels(6) = labels(7) = -100;  // padding
  // The README's lines, in double.
  auto example = [&](const Matrix<double>& h_s, Matrix<double>& d_h_s, Matrix<double>& d_w_s) {
    mmkd::FusedLinearKD<double>::Options fo;
    fo.divergence.divergence = mmkd::Divergence::GeneralizedJSD;
    fo.hard_weight = 0.5;
    mmkd::FusedLinearKD<double> fused(fo);
    double l3 = fused.value_and_grad(h_s, w_s, h_t, w_t, labels, d_h_s, d_w_s);
    return l3;
  };
  Matrix<double> gh = Matrix<double>::Zero(n, d), gw = Matrix<double>::Zero(v, d);
  const double value = example(h0, gh, gw);
  const auto r = mmkd::check_gradient(
      [&](const Matrix<double>& x) {
        Matrix<double> a = Matrix<double>::Zero(n, d), b = Matrix<double>::Zero(v, d);
        return example(x, a, b);
      },
      h0, gh, tight());
  INFO(r.message());
  CHECK(r.passed);
  Fused::Options o;
  o.divergence.divergence = Divergence::GeneralizedJSD;
  o.hard_weight = 0.5;
  CHECK(value == Approx(unfused(o, h0, w_s, Eigen::VectorXd(), h_t * w_t.transpose(), labels).value)
                     .epsilon(1e-12));
}
