#pragma once

#include <cmath>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/types.hpp"

namespace mmkd {

/// Row L2 normalisation, as PyTorch's `F.normalize(x, dim=1, eps)`:
/// u_i = x_i / max(‖x_i‖, eps). Writes u into `out` (may alias `x`) and ‖x_i‖ into `norms`.
/// A zero row gives a zero row (no NaN).
template <class D1, class D2, class D3>
void l2_normalize_rows(const Eigen::MatrixBase<D1>& x, const Eigen::MatrixBase<D2>& out_,
                       const Eigen::MatrixBase<D3>& norms_, typename D1::Scalar eps = 1e-12) {
  using T = typename D1::Scalar;
  auto& out = const_cast<Eigen::MatrixBase<D2>&>(out_);
  auto& norms = const_cast<Eigen::MatrixBase<D3>&>(norms_);
  detail::check_nonnegative("l2_normalize_rows", "eps", eps);
  detail::check_shape("l2_normalize_rows", "out", out, x.rows(), x.cols(), "same as x");
  detail::check_length("l2_normalize_rows", "norms", norms, x.rows(), "one entry per row of x");
  for (Index i = 0; i < x.rows(); ++i) {
    const T n = x.row(i).norm();
    norms(i) = n;
    out.row(i) = x.row(i) / std::max(n, eps);
  }
}

/// Backward of `l2_normalize_rows`; *adds* dL/dx to `dx`.
/// With n = ‖x_i‖ > eps: dx_i += (du_i − u_i (u_i·du_i)) / n. Otherwise u_i = x_i/eps and
/// dx_i += du_i / eps. `u` and `norms` are the forward outputs.
template <class D1, class D2, class D3, class D4>
void l2_normalize_rows_backward(const Eigen::MatrixBase<D1>& u, const Eigen::MatrixBase<D2>& norms,
                                const Eigen::MatrixBase<D3>& du, const Eigen::MatrixBase<D4>& dx_,
                                typename D1::Scalar eps = 1e-12) {
  using T = typename D1::Scalar;
  auto& dx = const_cast<Eigen::MatrixBase<D4>&>(dx_);
  detail::check_shape("l2_normalize_rows_backward", "du", du, u.rows(), u.cols(), "same as u");
  detail::check_shape("l2_normalize_rows_backward", "dx", dx, u.rows(), u.cols(), "same as u");
  detail::check_length("l2_normalize_rows_backward", "norms", norms, u.rows(),
                       "one entry per row of u");
  for (Index i = 0; i < u.rows(); ++i) {
    const T n = norms(i);
    if (n > eps) {
      const T proj = u.row(i).dot(du.row(i));
      dx.row(i) += (du.row(i) - proj * u.row(i)) / n;
    } else {
      dx.row(i) += du.row(i) / eps;
    }
  }
}

}  // namespace mmkd
