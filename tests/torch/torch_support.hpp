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

}  // namespace mmkd_test

namespace mmkd_test {

/// The float32 error of a loss against its float64 value on the same (float-rounded) inputs:
/// |v32 − v64| / |v64|, and the largest gradient difference relative to the largest gradient.
struct FloatError {
  double value = 0, grad = 0;
};

inline FloatError float_error(double v32, double v64, const Matrix<double>& g32,
                              const Matrix<double>& g64) {
  const double gmax = std::max(g64.cwiseAbs().maxCoeff(), std::numeric_limits<double>::min());
  return {std::abs(v32 - v64) / std::max(std::abs(v64), std::numeric_limits<double>::min()),
          (g32 - g64).cwiseAbs().maxCoeff() / gmax};
}

/// The float32 error of a libtorch formulation: `loss(x)` is evaluated on x in float32 and in
/// float64 (x holds float-representable values), with autograd's gradient.
template <class Loss>
FloatError torch_float_error(const Matrix<double>& x, Loss&& loss) {
  auto x64 = to_torch(x, true);
  auto x32 = to_torch(x).to(torch::kFloat32).set_requires_grad(true);
  const auto l64 = loss(x64, torch::kFloat64), l32 = loss(x32, torch::kFloat32);
  l64.backward();
  l32.backward();
  return float_error(l32.template item<double>(), l64.template item<double>(),
                     from_torch(x32.grad()), from_torch(x64.grad()));
}

/// mmkd's float error must stay within 10x libtorch's, or within 10 float ulps where libtorch's
/// rounding happens to be smaller than one or its float32 result is NaN (the reference formula
/// failing, e.g. log of an underflowed probability).
inline bool within_torch(double mmkd_err, double torch_err) {
  if (std::isnan(torch_err)) torch_err = 0;
  return mmkd_err <= 10 * std::max(torch_err, 1.2e-7);
}

}  // namespace mmkd_test
