#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/types.hpp"
#include "mmkd/detail/softmax_kernels.hpp"

namespace mmkd {

/// `x · log(y)` with `0 · log(y) = 0` for every y (including 0 and +inf), as PyTorch's `xlogy`.
template <class T>
T xlogy(T x, T y) {
  if (x == T(0) && !detail::is_nan(y)) return T(0);
  return x * std::log(y);
}

/// Row-wise `log Σ_k exp(x_ik / T)`, max-subtracted: exact for logits of any magnitude, -inf for
/// a row of -inf. `out` must have one entry per row of `logits`.
template <class D1, class D2>
void log_sum_exp(const Eigen::MatrixBase<D1>& logits, const Eigen::MatrixBase<D2>& out_,
                 typename D1::Scalar temperature = 1) {
  using T = typename D1::Scalar;
  detail::check_temperature("log_sum_exp", temperature);
  auto& out = const_cast<Eigen::MatrixBase<D2>&>(out_);
  detail::check_length("log_sum_exp", "out", out, logits.rows(), "one entry per row of logits");
  const T inv_t = T(1) / temperature;
  for (Index i = 0; i < logits.rows(); ++i)
    out(i) = detail::log_sum_exp_row(logits.row(i).array(), inv_t);
}

/// Row-wise softmax at a temperature: out_i = softmax(x_i / T), max-subtracted.
template <class D1, class D2>
void softmax(const Eigen::MatrixBase<D1>& logits, const Eigen::MatrixBase<D2>& out_,
             typename D1::Scalar temperature = 1) {
  using T = typename D1::Scalar;
  detail::check_temperature("softmax", temperature);
  auto& out = const_cast<Eigen::MatrixBase<D2>&>(out_);
  detail::check_shape("softmax", "out", out, logits.rows(), logits.cols(), "same as logits");
  const T inv_t = T(1) / temperature;
  for (Index i = 0; i < logits.rows(); ++i) {
    auto e = out.row(i).array();
    const auto st = detail::shifted_exp(logits.row(i).array(), inv_t, e);
    e /= st.sum;
  }
}

/// Row-wise log-softmax at a temperature, fused: out_ik = x_ik/T - log Σ_j exp(x_ij/T), computed
/// as (x_ik − max x_i)/T − log Σ_j exp((x_ij − max x_i)/T), so logits around ±1e4 lose nothing.
template <class D1, class D2>
void log_softmax(const Eigen::MatrixBase<D1>& logits, const Eigen::MatrixBase<D2>& out_,
                 typename D1::Scalar temperature = 1) {
  using T = typename D1::Scalar;
  detail::check_temperature("log_softmax", temperature);
  auto& out = const_cast<Eigen::MatrixBase<D2>&>(out_);
  detail::check_shape("log_softmax", "out", out, logits.rows(), logits.cols(), "same as logits");
  const T inv_t = T(1) / temperature;
  for (Index i = 0; i < logits.rows(); ++i) {
    const T xm = detail::row_max(logits.row(i).array());
    const T rel = detail::log_sum_exp_row((logits.row(i).array() - xm), inv_t);  // max is 0
    out.row(i) = ((logits.row(i).array() - xm) * inv_t - rel).matrix();
  }
}

}  // namespace mmkd
