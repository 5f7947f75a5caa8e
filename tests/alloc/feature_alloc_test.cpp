#include "alloc/alloc_support.hpp"

#include <mmkd/feature/hint_loss.hpp>

using namespace mmkd_test;

TEMPLATE_TEST_CASE("feature-map losses allocate nothing in steady state", "[feature][alloc]", float,
                   double) {
  using T = TestType;
  const Matrix<T> s = random_matrix<T>(16, 48, 1), t = random_matrix<T>(16, 48, 2);
  Matrix<T> ds = Matrix<T>::Zero(16, 48), dt = ds;
  mmkd::Tensor4<T> s4(4, 3, 2, 2), t4(4, 3, 2, 2), g4(4, 3, 2, 2);
  s4.setConstant(T(1));
  t4.setConstant(T(0.5));
  g4.setZero();
  mmkd::HintLoss<T> hint, hint4;
  for (int warm = 0; warm < 2; ++warm) {
    std::unique_ptr<NoMalloc> guard;
    if (warm == 1) guard = std::make_unique<NoMalloc>();
    CHECK_NOTHROW(hint.value_and_grad(s, t, ds, dt));
    CHECK_NOTHROW(hint.value(s, t));
    CHECK_NOTHROW(hint4.value_and_grad(s4, t4, g4));
  }
}
