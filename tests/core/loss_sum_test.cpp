// LossSum: the weighted sum of terms, against the terms computed on their own and against
// central differences; the loss objects' own weights are restored and compose; the README's
// quick example.

#include <mmkd/core/loss_sum.hpp>
#include <mmkd/logit/cross_entropy.hpp>
#include <mmkd/logit/logit_kd.hpp>

#include "support.hpp"

using namespace mmkd_test;

TEST_CASE("LossSum: value and gradient of the weighted sum", "[core][loss_sum]") {
  const Index n = 5, c = 4;
  const Matrix<double> s0 = random_matrix<double>(n, c, 1, 2),
                       t = random_matrix<double>(n, c, 2, 2);
  const mmkd::Labels labels = random_labels(n, c, 3);
  const Matrix<double> anchor = random_matrix<double>(n, c, 4);
  mmkd::LogitKD<double> kd;
  mmkd::CrossEntropy<double> ce;
  kd.options().weight = 2.0;  // composes with the term's weight: 2 · 0.25
  Matrix<double> s = s0, grad = Matrix<double>::Zero(n, c);
  mmkd::LossSum<double> total;
  total.add("kd", 0.25, kd, [&](auto& loss) { return loss.value_and_grad(s, t, grad); })
      .add("ce", 0.7, ce, [&](auto& loss) { return loss.value_and_grad(s, labels, grad); })
      .add("l2", 0.1, [&](double w) {  // a term of the caller's: w · ½‖s − anchor‖²
        grad += w * (s - anchor);
        return w * 0.5 * (s - anchor).squaredNorm();
      });
  const double v = total.value_and_grad();
  CHECK(kd.options().weight == 2.0);
  CHECK(ce.options().weight == 1.0);
  // The terms on their own, with fresh objects.
  mmkd::LogitKD<double> kd1;
  mmkd::CrossEntropy<double> ce1;
  auto reference = [&](const Matrix<double>& x) {
    return 0.5 * kd1.value(x, t) + 0.7 * ce1.value(x, labels) +
           0.1 * 0.5 * (x - anchor).squaredNorm();
  };
  CHECK(v == Approx(reference(s0)).epsilon(1e-14));
  CHECK(total.value("kd") == Approx(0.5 * kd1.value(s0, t)).epsilon(1e-14));
  CHECK(total.value("ce") == Approx(0.7 * ce1.value(s0, labels)).epsilon(1e-14));
  CHECK(total.terms().size() == 3);
  CHECK(total.terms()[2].name == "l2");
  const auto r = mmkd::check_gradient(reference, s0, grad, tight());
  INFO(r.message());
  CHECK(r.passed);
  // A schedule changes a weight between steps.
  total.weight("ce") = 0.0;
  grad.setZero();
  CHECK(total.value_and_grad() ==
        Approx(0.5 * kd1.value(s0, t) + 0.05 * (s0 - anchor).squaredNorm()).epsilon(1e-14));
  CHECK(total.value("ce") == 0.0);
}

TEST_CASE("LossSum: errors", "[core][loss_sum][errors]") {
  mmkd::LossSum<float> total;
  mmkd::LogitKD<float> kd;
  Matrix<float> s = random_matrix<float>(3, 4, 5), t = random_matrix<float>(3, 5, 6);
  Matrix<float> g = Matrix<float>::Zero(3, 4);
  auto call = [&](auto& loss) { return loss.value_and_grad(s, t, g); };
  CHECK_THROWS_WITH(total.add("kd", -1.0f, kd, call),
                    "LossSum: term \"kd\" has weight -1.000000, expected finite and >= 0");
  total.add("kd", 0.5f, kd, call);
  CHECK_THROWS_WITH(total.add("kd", 1.0f, kd, call), "LossSum: a term named \"kd\" exists");
  CHECK_THROWS_WITH(total.value("ce"), "LossSum: no term named \"ce\"");
  // The term throws (the teacher has 5 classes): the loss's weight is restored, nothing written.
  kd.options().weight = 3.0f;
  CHECK_THROWS_AS(total.value_and_grad(), mmkd::InvalidArgument);
  CHECK(kd.options().weight == 3.0f);
  CHECK(g.isZero(0));
}

TEST_CASE("LossSum: the README's quick example trains on the gradient of its loss",
          "[core][loss_sum]") {
  const Index n = 6, c = 5;
  const Matrix<double> student0 = random_matrix<double>(n, c, 7, 2),
                       teacher = random_matrix<double>(n, c, 8, 2);
  const mmkd::Labels labels = random_labels(n, c, 9);
  // The README's lines, in double.
  auto example = [&](const Matrix<double>& student, Matrix<double>& grad) {
    mmkd::LogitKD<double> kd;  // T = 4, value scaled by T²
    mmkd::CrossEntropy<double> ce;
    mmkd::LossSum<double> total;
    total.add("kd", 0.9, kd,
              [&](auto& loss) { return loss.value_and_grad(student, teacher, grad); });
    total.add("ce", 0.1, ce,
              [&](auto& loss) { return loss.value_and_grad(student, labels, grad); });
    return total.value_and_grad();
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
  mmkd::LogitKD<double> plain;
  mmkd::CrossEntropy<double> ce;
  CHECK(loss(student0) ==
        Approx(0.9 * plain.value(student0, teacher) + 0.1 * ce.value(student0, labels))
            .epsilon(1e-14));
}
