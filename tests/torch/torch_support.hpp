#pragma once

// Conversions between mmkd matrices and libtorch tensors for the cross-checks (double only).

#include <torch/torch.h>

#include "support.hpp"

namespace mmkd_test {

inline torch::Tensor to_torch(const Matrix<double>& m, bool requires_grad = false) {
  auto t = torch::from_blob(const_cast<double*>(m.data()), {m.rows(), m.cols()}, torch::kFloat64)
               .clone();
  return t.set_requires_grad(requires_grad);
}

inline torch::Tensor to_torch(const mmkd::Labels& y) {
  return torch::from_blob(const_cast<int*>(y.data()), {y.size()}, torch::kInt32).to(torch::kLong);
}

inline torch::Tensor to_torch(const mmkd::RowMask& m) {
  return torch::from_blob(const_cast<std::uint8_t*>(m.data()), {m.size()}, torch::kUInt8)
      .to(torch::kFloat64);
}

inline Matrix<double> from_torch(const torch::Tensor& t) {
  const auto c = t.detach().to(torch::kFloat64).contiguous();
  return Eigen::Map<const Matrix<double>>(c.data_ptr<double>(), c.size(0), c.size(1));
}

/// Largest |a - b| relative to max(1, |b|).
inline double max_rel_diff(const Matrix<double>& a, const Matrix<double>& b) {
  return ((a - b).array().abs() / b.array().abs().max(1.0)).maxCoeff();
}

}  // namespace mmkd_test
