// A downstream program: includes the umbrella header and computes one loss with its gradient.
#include <mmkd/mmkd.hpp>

#include <cmath>
#include <cstdio>

int main() {
  mmkd::Matrix<float> student(2, 3), teacher(2, 3);
  student << 1, 2, 3, 0, 0, 0;
  teacher << 1, 2, 3, 0, 0, 0;
  mmkd::Matrix<float> grad = mmkd::Matrix<float>::Zero(2, 3);
  mmkd::LogitKD<float> kd;
  const float loss = kd.value_and_grad(student, teacher, grad);
  std::printf("mmkd %s: loss %g\n", mmkd::version_string, loss);
  return (loss == 0.0f && grad.isZero()) ? 0 : 1;  // identical logits: zero loss and gradient
}
