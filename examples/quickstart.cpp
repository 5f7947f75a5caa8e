// mmkd quickstart: each loss in a few lines, on a toy batch, with its gradient checked against
// finite differences by mmkd's public gradient checker.

#include <mmkd/mmkd.hpp>

#include <cstdio>

int main() {
  const mmkd::Index n = 4, c = 5;  // 4 samples, 5 classes
  mmkd::SplitMix64 rng(42);
  mmkd::Matrix<double> student(n, c), teacher(n, c);
  for (mmkd::Index k = 0; k < student.size(); ++k) {
    student.data()[k] = 2 * rng.normal();
    teacher.data()[k] = 2 * rng.normal();
  }
  mmkd::Labels labels(n);
  labels << 0, 3, 1, 4;

  std::printf("mmkd %s quickstart: N = %ld samples, C = %ld classes\n\n", mmkd::version_string,
              long(n), long(c));

  // The protocol: value() is forward only; value_and_grad() returns the same value and ADDS the
  // gradient to the buffer, so several terms on the same logits share one buffer.
  mmkd::Matrix<double> grad = mmkd::Matrix<double>::Zero(n, c);

  mmkd::LogitKD<double> kd({/*temperature=*/4.0});
  const double l_kd = kd.value_and_grad(student, teacher, grad);

  mmkd::DecoupledKD<double> dkd;  // alpha 1, beta 8, T 4
  dkd.options().beta = 2.0;
  const double l_dkd = dkd.value_and_grad(student, teacher, labels, grad);

  mmkd::CrossEntropy<double> ce({/*label_smoothing=*/0.1});
  const double l_ce = ce.value_and_grad(student, labels, grad);

  std::printf("  %-13s %10.6f   T^2 * KL(teacher || student), batch mean\n", "LogitKD", l_kd);
  std::printf("  %-13s %10.6f   alpha * TCKD + beta * NCKD\n", "DecoupledKD", l_dkd);
  std::printf("  %-13s %10.6f   hard labels, smoothing 0.1\n", "CrossEntropy", l_ce);
  std::printf("  %-13s %10.6f\n\n", "total", l_kd + l_dkd + l_ce);

  // Token-level use: rows = batch x positions, mask = 0 at padding; the mean is over real tokens.
  mmkd::RowMask mask(n);
  mask << 1, 1, 1, 0;
  std::printf("  LogitKD over 3 unmasked rows: %.6f\n\n", kd.value(student, teacher, mask));

  // Check the summed gradient against central differences.
  auto total = [&](const mmkd::Matrix<double>& s) {
    return kd.value(s, teacher) + dkd.value(s, teacher, labels) + ce.value(s, labels);
  };
  const mmkd::GradcheckReport report = mmkd::check_gradient(total, student, grad);
  std::printf("  %s\n", report.message().c_str());

  // Bad input is an exception that names the argument; nothing is written.
  try {
    mmkd::Matrix<double> wrong(n, c + 1);
    kd.value(student, wrong);
  } catch (const mmkd::InvalidArgument& e) {
    std::printf("  caught: %s\n", e.what());
  }
  return report.passed ? 0 : 1;
}
