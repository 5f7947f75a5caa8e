// The feature-map losses against the same formula written with libtorch ops and its autograd.

#include <mmkd/feature/hint_loss.hpp>

#include "torch/torch_support.hpp"

using namespace mmkd_test;

TEST_CASE("HintLoss equals libtorch's mse_loss, value and both gradients", "[torch][feature]") {
  // RepDistiller's HintLoss: nn.MSELoss() (mean over every element) of student and teacher.
  const Matrix<double> s = random_matrix<double>(8, 3 * 4 * 4, 21, 2.0),
                       t = random_matrix<double>(8, 3 * 4 * 4, 22);
  auto ts = to_torch(s, true), tt = to_torch(t, true);
  const auto ref = 2.5 * torch::mse_loss(ts.view({8, 3, 4, 4}), tt.view({8, 3, 4, 4}));
  ref.backward();
  mmkd::HintLoss<double> hint({2.5});
  Matrix<double> ds = Matrix<double>::Zero(8, 48), dt = ds;
  CHECK(hint.value_and_grad(s, t, ds, dt) == Approx(ref.item<double>()).epsilon(1e-14));
  CHECK(max_rel_diff(ds, from_torch(ts.grad())) < 1e-14);
  CHECK(max_rel_diff(dt, from_torch(tt.grad())) < 1e-14);
}
