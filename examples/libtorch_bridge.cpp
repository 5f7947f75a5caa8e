// mmkd inside a libtorch training loop: the losses as torch::autograd functions
// (mmkd/torch.hpp), on the UCI digits.
//
// A torch::nn teacher learns from all training labels of the full 8x8 image; a smaller student
// sees only the bottom half, with 50 labels, plus every training image unlabelled. The student is
// trained twice from the same initialisation: with mmkd's CrossEntropy on the 50 labels, and with
// mmkd's LogitKD against the teacher on the unlabelled images added. libtorch computes everything
// else (the networks, their backward pass, Adam); mmkd's value_and_grad runs inside forward() on
// the tensors' memory.

#include <cstdio>

#include <mmkd/torch.hpp>
#include "digits_data.hpp"

namespace {

constexpr int64_t kTrain = 1297, kLabels = 50, kClasses = 10;

torch::nn::Sequential mlp(int64_t in, int64_t hidden) {
  return torch::nn::Sequential(torch::nn::Linear(in, hidden), torch::nn::ReLU(),
                               torch::nn::Linear(hidden, kClasses));
}

double accuracy(torch::nn::Sequential& net, const torch::Tensor& x, const torch::Tensor& y) {
  torch::NoGradGuard no_grad;
  return 100.0 * net->forward(x).argmax(1).eq(y).to(torch::kDouble).mean().item<double>();
}

}  // namespace

int main() try {
  torch::manual_seed(0);
  digits::Images images = digits::read_csv();
  const int64_t n = images.pixels.rows();
  // Views of the Eigen buffers (no copy), shuffled into a fixed train / test split.
  const auto perm = torch::randperm(n, torch::kLong);
  const auto x_all = torch::from_blob(images.pixels.data(), {n, 64}).index_select(0, perm);
  const auto y_all = torch::from_blob(images.labels.data(), {n}, torch::kInt)
                         .to(torch::kLong)
                         .index_select(0, perm);
  const auto x_train = x_all.narrow(0, 0, kTrain), y_train = y_all.narrow(0, 0, kTrain);
  const auto x_test = x_all.narrow(0, kTrain, n - kTrain),
             y_test = y_all.narrow(0, kTrain, n - kTrain);
  const auto bottom = [](const torch::Tensor& x) { return x.narrow(1, 32, 32).contiguous(); };

  // Teacher: full image, all labels, mmkd's CrossEntropy through the bridge.
  mmkd::CrossEntropy<float> ce;
  auto teacher = mlp(64, 128);
  torch::optim::Adam teacher_opt(teacher->parameters(), torch::optim::AdamOptions(3e-3));
  for (int epoch = 0; epoch < 30; ++epoch) {
    const auto order = torch::randperm(kTrain, torch::kLong);
    for (int64_t s = 0; s + 64 <= kTrain; s += 64) {
      const auto idx = order.narrow(0, s, 64);
      teacher_opt.zero_grad();
      mmkd_torch::cross_entropy(ce, teacher->forward(x_train.index_select(0, idx)),
                                y_train.index_select(0, idx))
          .backward();
      teacher_opt.step();
    }
  }
  std::printf("teacher (full image, %ld labels): test accuracy %.1f%%\n", long(kTrain),
              accuracy(teacher, x_test, y_test));
  torch::Tensor teacher_logits;
  {
    torch::NoGradGuard no_grad;
    teacher_logits = teacher->forward(x_train);
  }

  // Student: bottom half, 50 labels (the first 50 training images) + all images unlabelled.
  const auto xb_train = bottom(x_train), xb_test = bottom(x_test);
  const auto x_lab = xb_train.narrow(0, 0, kLabels), y_lab = y_train.narrow(0, 0, kLabels);
  auto init = mlp(32, 32);
  mmkd::LogitKD<float> kd;  // T = 4
  for (bool distil : {false, true}) {
    auto student = mlp(32, 32);
    {
      torch::NoGradGuard no_grad;  // the same initialisation for both runs
      for (std::size_t k = 0; k < student->parameters().size(); ++k)
        student->parameters()[k].copy_(init->parameters()[k]);
    }
    torch::optim::Adam opt(student->parameters(), torch::optim::AdamOptions(3e-3));
    torch::Tensor loss;
    for (int step = 0; step < 600; ++step) {
      const auto idx = torch::randint(kTrain, {128}, torch::kLong);
      opt.zero_grad();
      // One forward pass over [labelled; unlabelled]; row slices are contiguous views.
      const auto z = student->forward(torch::cat({x_lab, xb_train.index_select(0, idx)}));
      loss = mmkd_torch::cross_entropy(ce, z.narrow(0, 0, kLabels), y_lab);
      if (distil)
        loss = loss + mmkd_torch::logit_kd(kd, z.narrow(0, kLabels, 128),
                                           teacher_logits.index_select(0, idx));
      loss.backward();
      opt.step();
    }
    std::printf("student (bottom half, %ld labels)%s: loss %.4f, test accuracy %.1f%%\n",
                long(kLabels), distil ? " + LogitKD on the unlabelled images" : ", CE only",
                loss.item<double>(), accuracy(student, xb_test, y_test));
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "libtorch_bridge: %s\n", e.what());
  return 1;
}
