// A downstream libtorch program: the installed bridge, a masked LogitKD and a cross-entropy with
// PyTorch's -100 labels, back-propagated by libtorch.
#include <mmkd/torch.hpp>

#include <cstdio>

int main() {
  torch::manual_seed(0);
  const auto student = torch::randn({4, 3}, torch::kFloat).requires_grad_();
  const auto teacher = torch::randn({4, 3}, torch::kFloat);
  const auto mask = torch::tensor({1, 1, 0, 1}, torch::kBool);
  const auto labels = torch::tensor({0, -100, 2, 1}, torch::kLong);
  mmkd::LogitKD<float> kd;
  mmkd::CrossEntropy<float> ce;
  const auto loss = mmkd_torch::logit_kd(kd, student, teacher, mask) +
                    mmkd_torch::cross_entropy(ce, student, labels);
  loss.backward();
  // Row 2 is masked out of the KD term and row 1 out of the CE term; every gradient is finite.
  const bool ok = student.grad().defined() && student.grad().isfinite().all().item<bool>();
  std::printf("mmkd_torch: loss %g\n", loss.item<double>());
  return ok ? 0 : 1;
}
