#include <mmkd/multimodal/modality_saliency.hpp>
#include <mmkd/multimodal/modality_weighting.hpp>

#include "support.hpp"

using namespace mmkd_test;
using mmkd::SaliencyKind;
using mmkd::Tensor3;

TEST_CASE("ModalitySaliency follows its three definitions", "[multimodal][saliency]") {
  const Index n = 5, c = 6;
  const Matrix<double> t = random_matrix<double>(n, c, 1, 2);
  const Tensor3<double> tm = random_stack<double>(2, n, c, 2, 2);
  mmkd::ModalitySaliency<double> sal({SaliencyKind::RemovalKL, 2.0});

  SECTION("removal KL: the other modality is the input without m") {
    const Matrix<double>& s = sal.compute(t, tm);
    for (Index i = 0; i < n; ++i) {
      CHECK(s(i, 0) == Approx(double(ref_kl(stack_row(tm, 1, i), t.row(i), 2.0L))));
      CHECK(s(i, 1) == Approx(double(ref_kl(stack_row(tm, 0, i), t.row(i), 2.0L))));
    }
    // Sample 3 lacks modality 1: removing modality 0 leaves nothing, a uniform prediction,
    // so s = KL(p ‖ uniform) = log C − H(p).
    mmkd::PresenceMask mask = mmkd::PresenceMask::Ones(n, 2);
    mask(3, 1) = 0;
    const Matrix<double>& sm = sal.compute(t, tm, mask);
    const Matrix<double> zero_row = Matrix<double>::Zero(1, c);
    CHECK(sm(3, 0) == Approx(double(ref_kl(zero_row.row(0), t.row(3), 2.0L))));
    CHECK(sm(3, 1) == 0);
  }
  SECTION("sufficiency and label probability") {
    sal.options().kind = SaliencyKind::Sufficiency;
    const Matrix<double> s = sal.compute(t, tm);
    CHECK(s(2, 1) == Approx(std::exp(-double(ref_kl(stack_row(tm, 1, 2), t.row(2), 2.0L)))));
    sal.options().kind = SaliencyKind::LabelProbability;
    const mmkd::Labels y = random_labels(n, c, 3);
    CHECK_THROWS_WITH(sal.compute(t, tm), "ModalitySaliency: LabelProbability needs labels");
    const Matrix<double> p = sal.compute(t, tm, y);
    const auto row = stack_row(tm, 0, 4);
    CHECK(p(4, 0) == Approx(std::exp(row(y(4)) / 2.0 - double(ref_lse(row, 0.5L)))));
  }
  SECTION("removal KL with three modalities needs the drop-one logits") {
    const Tensor3<double> tm3 = random_stack<double>(3, n, c, 4),
                          drop = random_stack<double>(3, n, c, 5);
    CHECK_THROWS_WITH(sal.compute(t, tm3),
                      "ModalitySaliency: RemovalKL with 3 modalities needs the teacher's drop-one "
                      "logits: use compute_removal()");
    const Matrix<double>& s = sal.compute_removal(t, drop);
    CHECK(s(1, 2) == Approx(double(ref_kl(stack_row(drop, 2, 1), t.row(1), 2.0L))));
  }
  SECTION("bad input") {
    const Tensor3<double> bad = random_stack<double>(2, n + 1, c, 6);
    CHECK_THROWS_WITH(
        sal.compute(t, bad),
        "ModalitySaliency: teacher_modal has shape 2x6x6, expected 2x5x6 (modalities x "
        "samples x classes of teacher)");
    Tensor3<double> nan = tm;
    nan(0, 2, 1) = std::numeric_limits<double>::quiet_NaN();
    CHECK_THROWS_AS(sal.compute(t, nan), mmkd::NumericalError);
  }
}

TEST_CASE("ModalityWeighting schemes", "[multimodal][weighting]") {
  Matrix<double> s(3, 2);
  s << 1, 3, 0, 0, 2, 2;
  mmkd::PresenceMask mask = mmkd::PresenceMask::Ones(3, 2);
  mask(2, 1) = 0;
  mmkd::ModalityWeighting<double>::Options o;
  o.lambda = 2;
  o.eps = 1e-6;

  SECTION("instance, linear, mean one: w = λ M (s + eps) / Σ(s + eps)") {
    mmkd::ModalityWeighting<double> w(o);
    const Matrix<double> out = w.compute(s);
    CHECK(out(0, 0) == Approx(2 * 2 * (1 + 1e-6) / (4 + 2e-6)));
    CHECK(out(1, 0) == Approx(2.0));  // equal (zero) scores: the mean weight
    CHECK(out.row(0).sum() == Approx(4.0));
    // Missing modality: weight 0, the sample's other weight renormalises to λ·1.
    const Matrix<double> masked = w.compute(s, mask);
    CHECK(masked(2, 1) == 0);
    CHECK(masked(2, 0) == Approx(2.0));
  }
  SECTION("instance, softmax, sum one") {
    o.softmax_temperature = 0.5;
    o.normalization = mmkd::WeightNormalization::SumOne;
    const Matrix<double> out = mmkd::ModalityWeighting<double>(o).compute(s);
    CHECK(out(0, 1) == Approx(2 * std::exp(6.0) / (std::exp(2.0) + std::exp(6.0))));
    CHECK(out.row(1).sum() == Approx(2.0));
  }
  SECTION("population and fixed") {
    o.scheme = mmkd::WeightScheme::Population;
    o.population = Eigen::Vector2d(1, 3);
    const Matrix<double> pop = mmkd::ModalityWeighting<double>(o).compute(s, mask);
    CHECK(pop(0, 0) == Approx(2 * 2 * 0.25));
    CHECK(pop(1, 1) == Approx(2 * 2 * 0.75));
    CHECK(pop(2, 1) == 0);
    o.scheme = mmkd::WeightScheme::Fixed;
    o.fixed = Eigen::Vector2d(0.3, 0.7);
    const Matrix<double> fixed = mmkd::ModalityWeighting<double>(o).compute(s);
    CHECK(fixed(1, 1) == 0.7);
    o.fixed = Eigen::Vector3d(1, 1, 1);
    CHECK_THROWS_WITH(
        mmkd::ModalityWeighting<double>(o).compute(s),
        "ModalityWeighting: option fixed has 3 entries, expected 2 (one per modality)");
    o.fixed = Eigen::Vector2d(1, -1);
    CHECK_THROWS_WITH(mmkd::ModalityWeighting<double>(o).compute(s),
                      "ModalityWeighting: option fixed[1] is -1.000000, expected finite and >= 0");
  }
  SECTION("negative or NaN scores are rejected") {
    Matrix<double> bad = s;
    bad(1, 1) = -1;
    CHECK_THROWS_WITH(mmkd::ModalityWeighting<double>(o).compute(bad),
                      "ModalityWeighting: scores[1,1] is -1.000000, expected finite and >= 0");
  }
}

TEST_CASE("SaliencyRunningMean averages present entries", "[multimodal][weighting]") {
  mmkd::SaliencyRunningMean<double> mean;
  Matrix<double> a(2, 2), b(1, 2);
  a << 1, 10, 3, 20;
  b << 5, 99;
  mmkd::PresenceMask mb = mmkd::PresenceMask::Ones(1, 2);
  mb(0, 1) = 0;
  mean.update(a);
  mean.update(b, mb);
  CHECK(mean.mean()(0) == Approx(3.0));
  CHECK(mean.mean()(1) == Approx(15.0));
  CHECK(mean.count()(1) == 2);
  CHECK_THROWS_AS(mean.update(Matrix<double>::Ones(1, 3)), mmkd::InvalidArgument);
  CHECK(mean.count()(0) == 3);  // the failed update changed nothing
}
