#pragma once

// A finite-difference gradient checker for any function of a matrix, in double precision.
// mmkd's own tests use it for every loss and op; point it at your own code the same way.

#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <utility>

#include "mmkd/core/random.hpp"
#include "mmkd/core/types.hpp"

namespace mmkd {

/// Settings of a gradient check. An element passes when
/// |analytic − numeric| ≤ atol + rtol·|numeric| (the rule of `torch.autograd.gradcheck`).
struct GradcheckOptions {
  double step = 1e-6;      //!< central-difference step: h_i = step · max(1, |x_i|)
  double atol = 1e-5;      //!< absolute tolerance
  double rtol = 1e-3;      //!< relative tolerance
  std::uint64_t seed = 0;  //!< seeds the random cotangent (`check_vjp`) and buffer offsets
};

/// Outcome of a gradient check, with the worst element.
struct GradcheckReport {
  bool passed = true;      //!< whether every element is within tolerance
  Index worst_row = -1;    //!< row of the element with the largest error / tolerance ratio
  Index worst_col = -1;    //!< its column
  double analytic = 0;     //!< the analytic derivative at that element
  double numeric = 0;      //!< the central-difference derivative at that element
  double worst_ratio = 0;  //!< |analytic − numeric| / (atol + rtol·|numeric|); ≤ 1 passes
  double relative_error = 0;  //!< ‖a − n‖ / (‖a‖ + ‖n‖) over all elements (0 if both are 0)
  Index elements = 0;         //!< elements checked
  double atol = 0;            //!< the absolute tolerance used
  double rtol = 0;            //!< the relative tolerance used

  //! Whether the check passed.
  explicit operator bool() const { return passed; }

  /// One line: "gradcheck passed|FAILED: worst element [i,j]: analytic a, numeric n, ...".
  std::string message() const {
    std::ostringstream os;
    os.precision(6);
    os << "gradcheck " << (passed ? "passed" : "FAILED") << ": " << elements << " elements";
    if (worst_row >= 0) {
      os << ", worst [" << worst_row << "," << worst_col << "]: analytic " << analytic
         << ", numeric " << numeric << ", |diff| " << std::abs(analytic - numeric) << " vs tol "
         << atol + rtol * std::abs(numeric) << " (ratio " << worst_ratio << ")";
    }
    os << ", relative error " << relative_error;
    return os.str();
  }
};

namespace detail {

inline GradcheckReport compare_gradients(const Matrix<double>& analytic,
                                         const Matrix<double>& numeric,
                                         const GradcheckOptions& opt) {
  GradcheckReport r;
  r.atol = opt.atol;
  r.rtol = opt.rtol;
  r.elements = analytic.size();
  double worst = -1;
  for (Index i = 0; i < analytic.rows(); ++i) {
    for (Index j = 0; j < analytic.cols(); ++j) {
      const double a = analytic(i, j), n = numeric(i, j);
      double ratio = std::abs(a - n) / (opt.atol + opt.rtol * std::abs(n));
      if (detail::is_nan(ratio)) ratio = std::numeric_limits<double>::infinity();
      if (ratio > worst) {
        worst = ratio;
        r.worst_row = i;
        r.worst_col = j;
        r.analytic = a;
        r.numeric = n;
      }
    }
  }
  r.worst_ratio = worst < 0 ? 0 : worst;
  r.passed = r.worst_ratio <= 1.0;
  const double denom = analytic.norm() + numeric.norm();
  r.relative_error = denom > 0 ? (analytic - numeric).norm() / denom : 0.0;
  if (detail::is_nan(r.relative_error)) r.relative_error = std::numeric_limits<double>::infinity();
  return r;
}

}  // namespace detail

/// Central-difference gradient of a scalar function f at x:
/// n_ij = (f(x + h e_ij) − f(x − h e_ij)) / 2h. `f` is called as `double f(const Matrix<double>&)`.
template <class F>
Matrix<double> numeric_gradient(F&& f, const Eigen::Ref<const Matrix<double>>& x,
                                const GradcheckOptions& opt = GradcheckOptions()) {
  Matrix<double> xp = x;
  Matrix<double> g(x.rows(), x.cols());
  for (Index i = 0; i < x.rows(); ++i) {
    for (Index j = 0; j < x.cols(); ++j) {
      const double x0 = xp(i, j);
      const double h = opt.step * std::max(1.0, std::abs(x0));
      xp(i, j) = x0 + h;
      const double fp = f(static_cast<const Matrix<double>&>(xp));
      xp(i, j) = x0 - h;
      const double fm = f(static_cast<const Matrix<double>&>(xp));
      xp(i, j) = x0;
      g(i, j) = (fp - fm) / (2 * h);
    }
  }
  return g;
}

/// Checks an analytic gradient of the scalar function `f` at `x` against central differences.
///
/// **Example**:
/// @code
/// auto f = [&](const mmkd::Matrix<double>& s) { return kd.value(s, teacher); };
/// mmkd::Matrix<double> g = mmkd::Matrix<double>::Zero(s.rows(), s.cols());
/// kd.value_and_grad(s, teacher, g);
/// auto report = mmkd::check_gradient(f, s, g);
/// if (!report) std::cerr << report.message() << "\n";
/// @endcode
template <class F>
GradcheckReport check_gradient(F&& f, const Eigen::Ref<const Matrix<double>>& x,
                               const Eigen::Ref<const Matrix<double>>& analytic,
                               const GradcheckOptions& opt = GradcheckOptions()) {
  if (analytic.rows() != x.rows() || analytic.cols() != x.cols()) {
    GradcheckReport r;
    r.passed = false;
    r.relative_error = std::numeric_limits<double>::infinity();
    return r;
  }
  return detail::compare_gradients(analytic, numeric_gradient(std::forward<F>(f), x, opt), opt);
}

/// Checks a function that follows mmkd's loss protocol: `double f(const Matrix<double>& x,
/// Matrix<double>& grad)` returns the value and *adds* df/dx to `grad`. The gradient buffer is
/// pre-filled with a random offset, so a function that overwrites instead of adding fails, and
/// the value it returns must equal the value used for the differences.
template <class F>
GradcheckReport check_value_and_grad(F&& f, const Eigen::Ref<const Matrix<double>>& x,
                                     const GradcheckOptions& opt = GradcheckOptions()) {
  SplitMix64 rng(opt.seed ^ 0x5EEDull);
  Matrix<double> offset(x.rows(), x.cols());
  for (Index k = 0; k < offset.size(); ++k) offset.data()[k] = rng.uniform(-1, 1);
  Matrix<double> grad = offset;
  const Matrix<double> x0 = x;
  const double v = f(x0, grad);
  Matrix<double> scratch(x.rows(), x.cols());
  auto value_only = [&](const Matrix<double>& xx) {
    scratch.setZero();
    return f(xx, scratch);
  };
  GradcheckReport r =
      detail::compare_gradients(grad - offset, numeric_gradient(value_only, x0, opt), opt);
  scratch.setZero();
  const double v_again = f(x0, scratch);
  if (!(v == v_again)) r.passed = false;  // the value must be a deterministic function of x
  return r;
}

/// Vector–Jacobian check for an op with non-scalar output: draws a random cotangent u (seeded),
/// and compares `vjp(x, u)` (= Jᵀu) with central differences of the scalar ⟨u, forward(x)⟩.
/// `forward` is `Matrix<double>(const Matrix<double>&)`, `vjp` is
/// `Matrix<double>(const Matrix<double>& x, const Matrix<double>& u)`.
template <class Forward, class Vjp>
GradcheckReport check_vjp(Forward&& forward, Vjp&& vjp, const Eigen::Ref<const Matrix<double>>& x,
                          const GradcheckOptions& opt = GradcheckOptions()) {
  const Matrix<double> x0 = x;
  const Matrix<double> y0 = forward(x0);
  SplitMix64 rng(opt.seed);
  Matrix<double> u(y0.rows(), y0.cols());
  for (Index k = 0; k < u.size(); ++k) u.data()[k] = rng.uniform(-1, 1);
  const Matrix<double> analytic = vjp(x0, static_cast<const Matrix<double>&>(u));
  auto scalar = [&](const Matrix<double>& xx) {
    const Matrix<double> y = forward(xx);
    return (y.array() * u.array()).sum();
  };
  return check_gradient(scalar, x0, analytic, opt);
}

}  // namespace mmkd
