// Misuse the types must reject at compile time. Built once as is (it must compile: the control),
// and once per MMKD_MISUSE case, whose build must fail with the error named in CMakeLists.txt.

#if MMKD_MISUSE == 7
#define MMKD_STRICT_VIEWS
#endif
#include <mmkd/mmkd.hpp>

int main() {
  const mmkd::Matrix<float> s = mmkd::Matrix<float>::Zero(4, 3), t = s;
  mmkd::Matrix<float> grad = mmkd::Matrix<float>::Zero(4, 3);
  mmkd::LogitKD<float> kd;
  float v = kd.value_and_grad(s, t, grad);  // the correct call
#if MMKD_MISUSE == 1
  // An integer scalar type for a loss.
  mmkd::LogitKD<int> integer_loss;
#elif MMKD_MISUSE == 2
  // Integer logits into a float loss (would need an implicit numeric conversion).
  const Eigen::Matrix<int, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> logits(4, 3);
  v += kd.value(logits, t);
#elif MMKD_MISUSE == 3
  // A column-major gradient buffer (would be written through a temporary copy).
  Eigen::MatrixXf col_major = Eigen::MatrixXf::Zero(4, 3);
  v += kd.value_and_grad(s, t, col_major);
#elif MMKD_MISUSE == 4
  // A read-only gradient buffer.
  const mmkd::Matrix<float> frozen = grad;
  v += kd.value_and_grad(s, t, frozen);
#elif MMKD_MISUSE == 5
  // A double gradient buffer for a float loss.
  mmkd::Matrix<double> wide = mmkd::Matrix<double>::Zero(4, 3);
  v += kd.value_and_grad(s, t, wide);
#elif MMKD_MISUSE == 6
  // A read-only stack as the gradient of the per-modality logits.
  mmkd::Tensor3<float> stack(2, 4, 3);
  const mmkd::Tensor3<float>& frozen_stack = stack;
  const mmkd::Matrix<float> w = mmkd::Matrix<float>::Ones(4, 2);
  mmkd::ModalitySpecificKD<float> msd;
  v += msd.value_and_grad(s, t, stack, stack, w, grad, frozen_stack);
#elif MMKD_MISUSE == 7
  // Under MMKD_STRICT_VIEWS, a column-major input (Eigen would copy it into a temporary).
  const Eigen::MatrixXf col_major = Eigen::MatrixXf::Zero(4, 3);
  v += kd.value(col_major, t);
#elif MMKD_MISUSE == 8
  // int64 labels (a torch::kLong tensor mapped as is).
  const Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1> labels =
      Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1>::Zero(4);
  mmkd::CrossEntropy<float> ce;
  v += ce.value(s, labels);
#elif MMKD_MISUSE == 9
  // A matrix where a stack of per-modality matrices is expected.
  mmkd::ModalityGramKD<float> gram;
  v += gram.value(s, t);
#elif MMKD_MISUSE == 10
  // An expression as the gradient buffer (it has no memory to write to).
  v += kd.value_and_grad(s, t, 2 * grad);
#endif
  return v > 0 ? 0 : 1;
}
