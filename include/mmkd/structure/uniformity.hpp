#pragma once

#include <cmath>
#include <limits>
#include <string>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/normalize.hpp"
#include "mmkd/core/tensor.hpp"
#include "mmkd/core/types.hpp"
#include "mmkd/detail/kl.hpp"
#include "mmkd/detail/products.hpp"

namespace mmkd {

/// Which points `Uniformity` spreads out.
enum class UniformityMode {
  Samples,        //!< the N samples (flattened), L2-normalised: Wang & Isola (default)
  SpatialTokens,  //!< per sample, its H·W position vectors (C channels each), averaged over N
  SpatialEntropy  //!< per sample and channel, KL(spatial softmax ‖ uniform), averaged over N·C
};

/**
 * Uniformity of intermediate features (the "uniformly distributed" half of the
 * dimensional-structure KD of Si, Dong et al. 2023).
 *
 *     Samples / SpatialTokens (Wang & Isola 2020), on L2-normalised points u_1..u_P:
 *       L = log( (2/(P(P−1))) Σ_{i<j} exp(−t ‖u_i − u_j‖²) ),   t = 2;   L ∈ [−4t, 0]
 *     SpatialEntropy: L = (1/(N·C)) Σ_{n,c} KL( softmax(F_nc / T_s) ‖ uniform over H·W )
 *
 * Embeddings are N x D rows (Samples mode); feature maps are N x C x H x W (any mode; Samples
 * flattens each sample). Lower is more uniform; scaling a point does not change L. The paper's
 * exact functional could not be read: Samples is the reference note's default. Needs at least
 * two points (N ≥ 2, or H·W ≥ 2 for SpatialTokens).
 *
 * Points are normalised as PyTorch's `F.normalize` does (x / max(‖x‖, eps)), so a zero row (an
 * all-zero position after a ReLU, in SpatialTokens mode) stays 0 and the distance is taken as
 * ‖u_i − u_j‖² = ‖u_i‖² + ‖u_j‖² − 2 u_i·u_j, not 2 − 2 u_i·u_j: L equals Wang & Isola's
 * `lunif` on `F.normalize`d inputs, zero rows included.
 *
 * Gradient (Samples): with w the softmax over pairs of −t‖u_i − u_j‖²,
 * dL/dU = 2t (W − diag(W·1)) U (W symmetric, zero diagonal), then through the row normalisation.
 * The Gram U Uᵀ is a rank-k update and W U a GEMM, both through Eigen.
 *
 * Reference:
 * @code
 * @inproceedings{wang2020uniformity,
 *   title     = {Understanding Contrastive Representation Learning through Alignment and
 *                Uniformity on the Hypersphere},
 *   author    = {Wang, Tongzhou and Isola, Phillip}, booktitle = {ICML}, year = {2020}}
 * @endcode
 *
 * **Example**:
 * @code
 * mmkd::Uniformity<float> unif;                            // samples, t = 2
 * float loss = unif.value_and_grad(embeddings, d_embeddings);
 * @endcode
 */
template <class Scalar = float>
class Uniformity : detail::FloatingScalar<Scalar> {
 public:
  //! The options; the defaults are those of the reference implementation.
  struct Options {
    UniformityMode mode =
        UniformityMode::Samples;  //!< samples (rows) or the spatial positions of feature maps
    Scalar t = Scalar(2);         //!< > 0
    Scalar spatial_temperature = Scalar(1);  //!< T_s > 0 (SpatialEntropy)
    Scalar eps = Scalar(1e-12);              //!< norm guard, > 0
    Scalar weight = Scalar(1);               //!< ≥ 0
  };

  Uniformity() : Uniformity(Options{}) {}
  //! Throws InvalidArgument for an invalid option.
  explicit Uniformity(const Options& options) : options_(options) { validate(); }

  //! The options; may be changed between calls (validated at every call).
  Options& options() { return options_; }
  //! The options.
  const Options& options() const { return options_; }

  //! N x D embeddings (Samples mode).
  Scalar value(const ConstMatrixRef<Scalar>& x) { return run_rows(x, nullptr); }
  //! The loss of N x D embeddings; adds dL/dx to `dx`.
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> dx) {
    return run_rows(x, &dx);
  }
  //! N x C x H x W feature maps (every mode).
  Scalar value(const ConstTensor4Ref<Scalar>& f) { return run_maps(f, nullptr); }
  //! The loss of N x C x H x W feature maps; adds dL/df to `df`.
  Scalar value_and_grad(const ConstTensor4Ref<Scalar>& f, Tensor4Ref<Scalar> df) {
    return run_maps(f, &df);
  }

  //! Frees the scratch memory kept between calls.
  void release_workspace() {
    u_ = s_ = w_ = du_ = dx_ = x_ = Matrix<Scalar>();
    row_max_ = row_sum_ = sq_norms_ = Vector<Scalar>();
    ws_.release();
  }

 private:
  static constexpr const char* kName = "Uniformity";

  void validate() const {
    detail::check_enum(kName, "mode", options_.mode, 3);
    detail::check_positive(kName, "t", options_.t);
    detail::check_positive(kName, "spatial_temperature", options_.spatial_temperature);
    detail::check_positive(kName, "eps", options_.eps);
    detail::check_nonnegative(kName, "weight", options_.weight);
  }

  // Wang & Isola on the rows of x (P x D). Writes dL/dx · grad_scale into dx_ when asked.
  template <class X>
  Scalar points(const X& x, bool grad, Scalar grad_scale) {
    const Index p = x.rows();
    const Scalar t = options_.t;
    u_.resize(p, x.cols());
    norms_.resize(p);
    l2_normalize_rows(x, u_, norms_, options_.eps);
    s_.setZero(p, p);
    detail::tiled_rank_update(s_, u_, Scalar(1));
    // r_ij = −t ‖u_i − u_j‖² = 2t u_i·u_j − t ‖u_i‖² − t ‖u_j‖², the norms from the Gram's
    // diagonal: a zero row (normalised to 0, as F.normalize does) is at distance 1 from a unit
    // row, not 2. The pairs i > j are row i's first i entries, contiguous: rows in parallel, their
    // maxima and sums combined in row order.
    constexpr Scalar ninf = -std::numeric_limits<Scalar>::infinity();
    sq_norms_ = s_.diagonal();
    row_max_.resize(p);
    row_sum_.resize(p);
    w_.resize(p, p);
    detail::parallel_for(p, p, [&](Index i, int) {
      auto wi = w_.row(i);
      wi.head(i) = (2 * t * s_.row(i).head(i).array() - t * s_(i, i) -
                    t * sq_norms_.head(i).transpose().array())
                       .matrix();
      wi.tail(p - i).setZero();
      row_max_(i) = i > 0 ? wi.head(i).array().template maxCoeff<Eigen::PropagateNaN>() : ninf;
    });
    Scalar m = ninf;
    for (Index i = 1; i < p; ++i) m = detail::max_nan(m, row_max_(i));
    detail::parallel_for(p, p, [&](Index i, int) {
      auto wi = w_.row(i);
      wi.head(i) = (wi.head(i).array() - m).unaryExpr(detail::ExpShifted<Scalar>()).matrix();
      row_sum_(i) = wi.head(i).sum();
    });
    Scalar z = 0;
    for (Index i = 1; i < p; ++i) z += row_sum_(i);
    const Scalar pairs = Scalar(p) * Scalar(p - 1) / 2;
    const Scalar value = m + std::log(z) - std::log(pairs);
    if (grad && detail::is_finite(value)) {
      // W symmetric with w_ij = softmax weight of pair (i, j); dL/dU = 2t (W − diag(W·1)) U.
      w_ /= z;  // lower triangle only; the product reads it as symmetric
      du_.resize(p, x.cols());
      detail::tiled_symmetric_product(du_, w_, u_, 2 * t * grad_scale, false);
      sq_norms_ = w_.rowwise().sum() + w_.colwise().sum().transpose();  // W·1, W symmetric
      du_ -= (2 * t * grad_scale) * (sq_norms_.asDiagonal() * u_);
      dx_.setZero(p, x.cols());
      l2_normalize_rows_backward(u_, norms_, du_, dx_, options_.eps);
    }
    return value;
  }

  Scalar run_rows(const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar>* dx);

  Scalar run_maps(const ConstTensor4Ref<Scalar>& f, Tensor4Ref<Scalar>* df);

  // The value, and the gradient dx_ of this call when it computed one (never a stale one).
  template <class X>
  void check(Scalar v, const X& x, bool grad) const {
    if (detail::is_finite(v) && (!grad || detail::all_finite(dx_))) return;
    const std::string why = detail::bad_element("x", x, false);
    if (!why.empty()) detail::throw_numerical(kName, why);
    detail::throw_numerical(kName,
                            detail::is_finite(v) ? "the gradient overflows" : "the loss overflows");
  }

  Options options_;
  Matrix<Scalar> u_, s_, w_, du_, dx_, x_, grad_;
  // row_*: per-row pair maxima and sums; sq_norms_: ‖u_i‖², then the row sums of W
  Vector<Scalar> norms_, zeros_, row_max_, row_sum_, sq_norms_;
  detail::RowWorkspace<Scalar> ws_;
};

template <class Scalar>
Scalar Uniformity<Scalar>::run_rows(const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar>* dx) {
  validate();
  if (options_.mode != UniformityMode::Samples) {
    detail::throw_invalid(kName,
                          "SpatialTokens and SpatialEntropy need N x C x H x W feature maps");
  }
  detail::check_nonempty(kName, "x", x.rows(), x.cols());
  if (x.rows() < 2)
    detail::throw_invalid(kName, "x has 1 row; uniformity needs at least 2 samples");
  if (dx) detail::check_shape(kName, "dx", *dx, x.rows(), x.cols(), "same as x");
  const Scalar v = points(x, dx != nullptr, options_.weight);
  check(v, x, dx != nullptr);
  const Scalar value = detail::scaled_value(kName, options_.weight, v, Scalar(0));
  if (dx) *dx += dx_;
  return value;
}

template <class Scalar>
Scalar Uniformity<Scalar>::run_maps(const ConstTensor4Ref<Scalar>& f, Tensor4Ref<Scalar>* df) {
  validate();
  const Index n = f.dimension(0), c = f.dimension(1), hw = f.dimension(2) * f.dimension(3);
  if (n == 0 || c == 0 || hw == 0) detail::throw_invalid(kName, "feature maps are empty");
  if (df && (df->dimension(0) != n || df->dimension(1) != c || df->dimension(2) != f.dimension(2) ||
             df->dimension(3) != f.dimension(3))) {
    detail::throw_invalid(kName, "df has a different shape from the feature maps");
  }
  const Eigen::Map<const Matrix<Scalar>> rows(f.data(), n * c,
                                              hw);  // row (n, c) = one channel map
  const Scalar w = options_.weight;
  Scalar value = 0;
  switch (options_.mode) {
    case UniformityMode::Samples: {
      if (n < 2)
        detail::throw_invalid(kName, "feature maps have 1 sample; uniformity needs at least 2");
      const Eigen::Map<const Matrix<Scalar>> flat(f.data(), n, c * hw);
      value = points(flat, df != nullptr, w);
      check(value, flat, df != nullptr);
      const Scalar scaled = detail::scaled_value(kName, w, value, Scalar(0));
      if (df) Eigen::Map<Matrix<Scalar>>(df->data(), n, c * hw) += dx_;
      return scaled;
    }
    case UniformityMode::SpatialTokens: {
      if (hw < 2)
        detail::throw_invalid(kName, "SpatialTokens needs at least 2 positions (H·W >= 2)");
      if (df) grad_.resize(n * c, hw);
      for (Index i = 0; i < n; ++i) {
        x_ = rows.middleRows(i * c, c).transpose();  // the H·W points of sample i, C each
        const Scalar v = points(x_, df != nullptr, w / Scalar(n));
        value += v;
        // A non-finite term leaves dx_ unset; check() below then throws.
        if (df && detail::is_finite(v)) grad_.middleRows(i * c, c) = dx_.transpose();
      }
      value /= Scalar(n);
      check(value, rows, false);  // the gradient is checked below
      if (df && !detail::all_finite(grad_))
        detail::throw_numerical(kName, "the gradient overflows");
      const Scalar scaled = detail::scaled_value(kName, w, value, Scalar(0));
      if (df) Eigen::Map<Matrix<Scalar>>(df->data(), n * c, hw) += grad_;
      return scaled;
    }
    case UniformityMode::SpatialEntropy: {
      // KL(softmax(F/T) ‖ uniform) per row: the shared KL rows kernel against zero logits.
      zeros_.setZero(hw);
      const Eigen::Map<const Matrix<Scalar>, 0, Eigen::OuterStride<>> uniform(
          zeros_.data(), n * c, hw, Eigen::OuterStride<>(0));
      const Scalar inv_t = Scalar(1) / options_.spatial_temperature;
      const Scalar g = w / (Scalar(n) * Scalar(c)) * inv_t;
      ws_.prepare(n * c, hw, df ? 1 : 0, 2);
      detail::kd_rows(
          uniform, rows, inv_t, [](Index) { return true; }, ws_, -1, df ? 0 : -1,
          [g](Index) { return g; });
      value = ws_.row_value.sum() / (Scalar(n) * Scalar(c));
      check(value, rows, false);  // the gradient is checked below
      if (df && !detail::all_finite(ws_.grad_matrix(0)))
        detail::throw_numerical(kName, "the gradient overflows");
      const Scalar scaled = detail::scaled_value(kName, w, value, Scalar(0));
      if (df) {
        Eigen::Map<Matrix<Scalar>> out(df->data(), n * c, hw);
        MatrixRef<Scalar> ref(out);
        ws_.commit(0, ref, [](Index) { return true; });
      }
      return scaled;
    }
  }
  return value;
}

MMKD_EXTERN_TEMPLATE(Uniformity)

}  // namespace mmkd
