
#pragma once

#include <cmath>
#include <string>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/types.hpp"
#include "mmkd/detail/products.hpp"
#include "mmkd/detail/row_loss.hpp"

namespace mmkd {

/// The channel statistic whose off-diagonal part `ChannelDecorrelation` penalises.
enum class ChannelStatistic {
  Correlation,  //!< Pearson correlation over the batch (default)
  Covariance    //!< covariance over the batch (DeCov-like)
};

/// What the off-diagonal statistic is pulled towards.
enum class DecorrelationTarget {
  Identity,  //!< zero off-diagonal: channel-wise independent features (default)
  Teacher    //!< the teacher's statistic, computed the same way from its features
};

/**
 * Channel decorrelation of output features (the "channel-wise independent" half of the
 * dimensional-structure KD of Si, Dong et al. 2023): the squared off-diagonal entries of the
 * C x C channel statistic of a batch of features Z (N x C), estimated over the batch.
 *
 *     mu_c = mean_n Z_nc,   sigma_c = sqrt(var_n Z_nc + eps)   (biased variance)
 *     Correlation: H = (Z − mu) / sigma,  R = HᵀH / N;    Covariance: R = (Z − mu)ᵀ(Z − mu) / N
 *     L = weight · s · Σ_{a≠b} (R_ab − T_ab)²,  s = 1/(C(C−1)) (`mean_off_diagonal`, default) or 1
 *
 * T = 0 (identity target, default) or the teacher's R (`DecorrelationTarget::Teacher`, the
 * teacher's features passed as a second argument; same C, any N ≥ 2; a constant). DeCov is the
 * covariance statistic with the sum, times 1/2. The paper's exact functional could not be read;
 * this is the reference note's default. N = 1 is an error (the statistic is undefined); C = 1
 * has no off-diagonal entry and gives 0.
 *
 * Gradient: G_R = 2s(R − T) off the diagonal; Correlation: G_H = (2/N) H G_R, then the exact
 * standardisation backward dZ_c = (g − mean(g) − h·mean(g∘h)) / sigma_c; Covariance:
 * dZ = (2/N)(Z − mu) G_R. RᵀR-type products go through Eigen's GEMM (R by a rank-N update).
 *
 * **Example**:
 * @code
 * mmkd::ChannelDecorrelation<float> decor;                  // correlation, identity, mean
 * float loss = decor.value_and_grad(features, d_features);  // N x C
 * @endcode
 */
template <class Scalar = float>
class ChannelDecorrelation : detail::FloatingScalar<Scalar> {
 public:
  //! The options; the defaults are those of the reference implementation.
  struct Options {
    ChannelStatistic statistic = ChannelStatistic::Correlation;  //!< correlation or covariance of
                                                                 //!< the channels over the batch
    DecorrelationTarget target =
        DecorrelationTarget::Identity;  //!< the identity, or the teacher's statistic
    bool mean_off_diagonal = true;      //!< divide by C(C−1); false sums
    Scalar eps = Scalar(1e-5);          //!< variance guard, > 0
    Scalar weight = Scalar(1);          //!< ≥ 0
  };

  ChannelDecorrelation() : ChannelDecorrelation(Options{}) {}
  //! Throws InvalidArgument for an invalid option.
  explicit ChannelDecorrelation(const Options& options) : options_(options) { validate(); }

  //! The options; may be changed between calls (validated at every call).
  Options& options() { return options_; }
  //! The options.
  const Options& options() const { return options_; }

  //! The loss against the identity target.
  Scalar value(const ConstMatrixRef<Scalar>& features) { return run(features, nullptr, nullptr); }
  //! With `DecorrelationTarget::Teacher`: the teacher's features (N_t x C) give the target.
  Scalar value(const ConstMatrixRef<Scalar>& features, const ConstMatrixRef<Scalar>& teacher) {
    return run(features, &teacher, nullptr);
  }
  //! The loss; adds dL/d(features) to `d_features`.
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& features, MatrixRef<Scalar> d_features) {
    return run(features, nullptr, &d_features);
  }
  //! The loss against the teacher's statistic; adds dL/d(features).
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& features,
                        const ConstMatrixRef<Scalar>& teacher, MatrixRef<Scalar> d_features) {
    return run(features, &teacher, &d_features);
  }

  //! Frees the scratch memory kept between calls.
  void release_workspace() { h_ = r_ = rt_ = g_ = grad_ = Matrix<Scalar>(); }

 private:
  static constexpr const char* kName = "ChannelDecorrelation";

  void validate() const {
    detail::check_enum(kName, "statistic", options_.statistic, 2);
    detail::check_enum(kName, "target", options_.target, 2);
    detail::check_positive(kName, "eps", options_.eps);
    detail::check_nonnegative(kName, "weight", options_.weight);
  }

  // Standardised (or centred) features into h, their statistic into r; sigma per channel.
  void statistic(const ConstMatrixRef<Scalar>& z, Matrix<Scalar>& h, Matrix<Scalar>& r,
                 Vector<Scalar>& sigma) {
    const Index n = z.rows();
    row_a_.noalias() = z.colwise().sum() / Scalar(n);
    h = z.rowwise() - row_a_;
    if (options_.statistic == ChannelStatistic::Correlation) {
      sigma = ((h.array().square().colwise().sum() / Scalar(n)) + options_.eps).sqrt().transpose();
      h.array().rowwise() /= sigma.transpose().array();
    }
    // Only the lower triangle is formed (the upper stays 0): R is symmetric.
    r.setZero(z.cols(), z.cols());
    detail::tiled_rank_update(r, h.transpose(), Scalar(1) / Scalar(n));
  }

  Scalar run(const ConstMatrixRef<Scalar>& z, const ConstMatrixRef<Scalar>* teacher,
             MatrixRef<Scalar>* dz);

  [[noreturn]] void diagnose(const ConstMatrixRef<Scalar>& z,
                             const ConstMatrixRef<Scalar>* teacher) const {
    std::string why = detail::bad_element("features", z, false);
    if (why.empty() && teacher) why = detail::bad_element("teacher", *teacher, false);
    if (!why.empty()) detail::throw_numerical(kName, why);
    detail::throw_numerical(kName,
                            "the statistic overflows (features too large for the scalar type)");
  }

  Options options_;
  Matrix<Scalar> h_, r_, rt_, g_, grad_;
  Eigen::Matrix<Scalar, 1, Eigen::Dynamic> row_a_, row_b_;  // per-channel means
  Vector<Scalar> sigma_, sigma_t_;
};

template <class Scalar>
Scalar ChannelDecorrelation<Scalar>::run(const ConstMatrixRef<Scalar>& z,
                                         const ConstMatrixRef<Scalar>* teacher,
                                         MatrixRef<Scalar>* dz) {
  validate();
  const Index n = z.rows(), c = z.cols();
  detail::check_nonempty(kName, "features", n, c);
  if (n < 2) {
    detail::throw_invalid(kName,
                          "features has 1 row; the channel statistic needs a batch of at least 2");
  }
  const bool use_teacher = options_.target == DecorrelationTarget::Teacher;
  if (use_teacher && !teacher)
    detail::throw_invalid(kName, "target Teacher needs the teacher's features");
  if (!use_teacher && teacher)
    detail::throw_invalid(kName, "teacher features given but target is Identity");
  if (teacher) {
    if (teacher->cols() != c || teacher->rows() < 2) {
      detail::throw_invalid(
          kName, "teacher has shape " + detail::shape_str(teacher->rows(), teacher->cols()) +
                     ", expected at least 2 rows and " + std::to_string(c) + " columns");
    }
  }
  if (dz) detail::check_shape(kName, "d_features", *dz, n, c, "same as features");

  statistic(z, h_, r_, sigma_);
  if (teacher) {
    statistic(*teacher, g_, rt_, sigma_t_);  // g_ is scratch here
    r_ -= rt_;
  }
  r_.diagonal().setZero();  // r_ now holds R − T below the diagonal, 0 elsewhere
  const Scalar scale = options_.mean_off_diagonal
                           ? (c > 1 ? Scalar(1) / (Scalar(c) * Scalar(c - 1)) : Scalar(0))
                           : Scalar(1);
  const Scalar raw = 2 * r_.squaredNorm();  // both triangles
  if (!detail::is_finite(raw)) diagnose(z, teacher);
  const Scalar value = detail::scaled_value(kName, options_.weight * scale, raw, Scalar(0));
  if (!dz) return value;

  // G_R = 2 s (R − T) off-diagonal; G_H = (2/N) H G_R.
  // H · sym(R − T), computed as its transpose sym(R − T) · Hᵀ.
  grad_.resize(n, c);
  detail::tiled_symmetric_product(grad_.transpose(), r_, h_.transpose(),
                                  Scalar(4) * options_.weight * scale / Scalar(n), false);
  if (options_.statistic == ChannelStatistic::Correlation) {
    // Standardisation backward, per channel: (g − mean g − h · mean(g∘h)) / sigma.
    row_a_.noalias() = grad_.colwise().sum() / Scalar(n);
    row_b_.noalias() = (grad_.array() * h_.array()).matrix().colwise().sum() / Scalar(n);
    grad_.array() =
        (grad_.array().rowwise() - row_a_.array() - h_.array().rowwise() * row_b_.array())
            .rowwise() /
        sigma_.transpose().array();
  }
  if (!detail::all_finite(grad_)) diagnose(z, teacher);
  *dz += grad_;
  return value;
}

MMKD_EXTERN_TEMPLATE(ChannelDecorrelation)

}  // namespace mmkd
