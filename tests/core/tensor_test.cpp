// modality_block: block m of an M x N x D stack, viewed in place, read-only for const stacks.

#include <mmkd/core/tensor.hpp>

#include <type_traits>

#include "support.hpp"

using namespace mmkd_test;

TEST_CASE("modality_block views block m of a stack in place", "[core][tensor]") {
  mmkd::Tensor3<double> x(3, 2, 4);
  for (Index k = 0; k < x.size(); ++k) x.data()[k] = double(k);
  // Entry (m, i, d) of a row-major M x N x D stack is element m·N·D + i·D + d.
  const auto b1 = mmkd::modality_block(x, 1);
  CHECK(b1.rows() == 2);
  CHECK(b1.cols() == 4);
  CHECK(b1(1, 3) == double(1 * 8 + 1 * 4 + 3));
  CHECK(b1(1, 3) == x(1, 1, 3));
  mmkd::modality_block(x, 2).setConstant(-1.0);  // writes through
  CHECK(x(2, 0, 0) == -1.0);
  CHECK(x(2, 1, 3) == -1.0);
  CHECK(x(1, 1, 3) == 15.0);
  const mmkd::Tensor3<double>& cx = x;
  static_assert(std::is_same<decltype(mmkd::modality_block(cx, 0)),
                             Eigen::Map<const mmkd::Matrix<double>>>::value,
                "a const stack gives a read-only view");
  const mmkd::ConstTensor3Ref<double> view(x.data(), 3, 2, 4);
  CHECK(mmkd::modality_block(view, 0)(0, 1) == 1.0);
  CHECK_THROWS_WITH(mmkd::modality_block(x, 3),
                    "modality_block: modality 3 is out of range for a stack of 3 modalities");
  CHECK_THROWS_AS(mmkd::modality_block(x, -1), mmkd::InvalidArgument);
}
