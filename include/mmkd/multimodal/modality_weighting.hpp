#pragma once

#include <algorithm>
#include <cmath>
#include <string>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/tensor.hpp"
#include "mmkd/core/types.hpp"
#include "mmkd/detail/row_loss.hpp"

namespace mmkd {

/// How the auxiliary-loss weights w_im of `ModalitySpecificKD` are formed.
enum class WeightScheme {
  Fixed,       //!< w_im = fixed_m: one weight per modality, given
  Population,  //!< from dataset-level mean saliencies S̄_m (given, or from `SaliencyRunningMean`)
  Instance     //!< from the sample's own saliencies s_im (default)
};

/// How saliency-based weights are normalised over the modalities (λ = `lambda`).
enum class WeightNormalization {
  MeanOne,  //!< mean weight λ over the (present) modalities (default)
  SumOne,   //!< weights sum to λ
  None      //!< λ · score, unnormalised
};

/**
 * The per-sample, per-modality weights w_im (N x M) of MSD's auxiliary losses, from saliency
 * scores (see `ModalitySaliency`). All weights are constants for the gradient (detached).
 *
 * - `Fixed`: w_im = fixed_m (the scores only give N and M).
 * - `Population`: w_im = λ·M·S̄_m / Σ_m' S̄_m' (MeanOne), λ·S̄_m / Σ S̄ (SumOne) or λ·S̄_m (None).
 * - `Instance` (default): a_im = s_im + eps, or a_im = softmax over the sample's present modalities
 *   of s_im / softmax_temperature when that is > 0; then w_im = λ·M_i·a_im / Σ a (MeanOne, M_i =
 *   number of present modalities), λ·a_im / Σ a (SumOne), or λ·a_im (None; for softmax weights
 *   None is SumOne).
 *
 * A missing modality (mask 0) gets weight 0; instance weights renormalise over the modalities
 * the sample has. The exact scheme of the paper could not be read; these are the reference
 * note's readings, with instance-wise mean-one weights as the default.
 *
 * **Example**:
 * @code
 * mmkd::ModalityWeighting<float> weighting;                    // instance-wise, mean one
 * const mmkd::Matrix<float>& w = weighting.compute(saliency.compute(teacher, teacher_modal));
 * @endcode
 */
template <class Scalar = float>
class ModalityWeighting : detail::FloatingScalar<Scalar> {
 public:
  //! The options; the defaults are those of the reference implementation.
  struct Options {
    WeightScheme scheme =
        WeightScheme::Instance;  //!< instance weights per sample, or one weight per modality
    WeightNormalization normalization =
        WeightNormalization::MeanOne;        //!< how the weights of a sample are normalised
    Scalar lambda = Scalar(1);               //!< auxiliary strength, ≥ 0
    Scalar softmax_temperature = Scalar(0);  //!< Instance: 0 = linear, > 0 = softmax of s / T_w
    Scalar eps = Scalar(1e-6);               //!< Instance, linear: added to each score, > 0
    Vector<Scalar> fixed;                    //!< Fixed: M weights ≥ 0
    Vector<Scalar> population;               //!< Population: M mean saliencies ≥ 0, sum > 0
  };

  ModalityWeighting() : ModalityWeighting(Options{}) {}
  //! Throws InvalidArgument for an invalid option.
  explicit ModalityWeighting(const Options& options) : options_(options) { validate(); }

  //! The options; may be changed between calls (validated at every call).
  Options& options() { return options_; }
  //! The options.
  const Options& options() const { return options_; }

  //! The N x M weights for N x M saliency scores.
  const Matrix<Scalar>& compute(const ConstMatrixRef<Scalar>& scores) {
    return run(scores, nullptr);
  }
  //! With a presence mask (weight 0 where a modality is missing).
  const Matrix<Scalar>& compute(const ConstMatrixRef<Scalar>& scores,
                                const ConstPresenceMaskRef& mask) {
    return run(scores, &mask);
  }
  //! The weights of the last call, N x M.
  const Matrix<Scalar>& weights() const { return w_; }

 private:
  static constexpr const char* kName = "ModalityWeighting";

  void validate() const {
    detail::check_enum(kName, "scheme", options_.scheme, 3);
    detail::check_enum(kName, "normalization", options_.normalization, 3);
    detail::check_nonnegative(kName, "lambda", options_.lambda);
    detail::check_nonnegative(kName, "softmax_temperature", options_.softmax_temperature);
    detail::check_positive(kName, "eps", options_.eps);
  }

  static void check_vector(const Vector<Scalar>& v, Index m, const char* name, bool positive_sum) {
    if (v.size() != m) {
      detail::throw_invalid(kName, std::string("option ") + name + " has " +
                                       std::to_string(v.size()) + " entries, expected " +
                                       std::to_string(m) + " (one per modality)");
    }
    for (Index k = 0; k < m; ++k) {
      if (!(v(k) >= 0) || !detail::is_finite(v(k))) {
        detail::throw_invalid(kName, std::string("option ") + name + "[" + std::to_string(k) +
                                         "] is " + std::to_string(v(k)) +
                                         ", expected finite and >= 0");
      }
    }
    if (positive_sum && !(v.sum() > 0)) {
      detail::throw_invalid(kName, std::string("option ") + name + " sums to 0");
    }
  }

  const Matrix<Scalar>& run(const ConstMatrixRef<Scalar>& s, const ConstPresenceMaskRef* mask);

  Options options_;
  Matrix<Scalar> w_;
};

template <class Scalar>
const Matrix<Scalar>& ModalityWeighting<Scalar>::run(const ConstMatrixRef<Scalar>& s,
                                                     const ConstPresenceMaskRef* mask) {
  validate();
  const Index n = s.rows(), m = s.cols();
  detail::check_nonempty(kName, "scores", n, m);
  if (mask) detail::check_presence(kName, *mask, n, m);
  const auto present = detail::presence(mask);
  const Scalar lambda = options_.lambda;
  const WeightNormalization norm = options_.normalization;
  if (options_.scheme == WeightScheme::Fixed) check_vector(options_.fixed, m, "fixed", false);
  if (options_.scheme == WeightScheme::Population)
    check_vector(options_.population, m, "population", true);
  if (options_.scheme == WeightScheme::Instance) {
    for (Index i = 0; i < n; ++i) {
      for (Index k = 0; k < m; ++k) {
        if (present(i, k) && (!(s(i, k) >= 0) || !detail::is_finite(s(i, k)))) {
          detail::throw_invalid(kName, "scores[" + std::to_string(i) + "," + std::to_string(k) +
                                           "] is " + std::to_string(s(i, k)) +
                                           ", expected finite and >= 0");
        }
      }
    }
  }

  w_.resize(n, m);
  for (Index i = 0; i < n; ++i) {
    Index count = 0;
    for (Index k = 0; k < m; ++k) count += present(i, k) ? 1 : 0;
    for (Index k = 0; k < m; ++k) w_(i, k) = Scalar(0);
    if (count == 0) continue;
    switch (options_.scheme) {
      case WeightScheme::Fixed:
        for (Index k = 0; k < m; ++k) w_(i, k) = present(i, k) ? options_.fixed(k) : Scalar(0);
        break;
      case WeightScheme::Population: {
        const auto& pop = options_.population;
        const Scalar scale = norm == WeightNormalization::MeanOne  ? lambda * Scalar(m) / pop.sum()
                             : norm == WeightNormalization::SumOne ? lambda / pop.sum()
                                                                   : lambda;
        for (Index k = 0; k < m; ++k) w_(i, k) = present(i, k) ? scale * pop(k) : Scalar(0);
        break;
      }
      case WeightScheme::Instance: {
        const bool soft = options_.softmax_temperature > 0;
        Scalar top = -std::numeric_limits<Scalar>::infinity();
        for (Index k = 0; k < m; ++k) {
          if (present(i, k)) top = std::max(top, s(i, k));
        }
        Scalar total = 0;
        for (Index k = 0; k < m; ++k) {
          if (!present(i, k)) continue;
          w_(i, k) = soft ? std::exp((s(i, k) - top) / options_.softmax_temperature)
                          : s(i, k) + options_.eps;
          total += w_(i, k);
        }
        const Scalar scale = norm == WeightNormalization::MeanOne ? lambda * Scalar(count) / total
                             : (norm == WeightNormalization::SumOne || soft) ? lambda / total
                                                                             : lambda;
        w_.row(i) *= scale;
        break;
      }
    }
  }
  if (!detail::all_finite(w_))
    detail::throw_numerical(kName,
                            "the weights overflow (scores, lambda or temperature out of range)");
  return w_;
}

/// Running per-modality mean of saliency scores over the samples seen (present entries only),
/// for `WeightScheme::Population`: call `update` on each batch, then copy `mean()` into
/// `ModalityWeighting::Options::population`. Explicit state; `reset()` starts over.
template <class Scalar = float>
class SaliencyRunningMean : detail::FloatingScalar<Scalar> {
 public:
  //! Adds a batch of N x M scores to the mean.
  void update(const ConstMatrixRef<Scalar>& scores) { run(scores, nullptr); }
  //! Adds the scores of the present modalities only.
  void update(const ConstMatrixRef<Scalar>& scores, const ConstPresenceMaskRef& mask) {
    run(scores, &mask);
  }
  //! Mean score of each modality over the present entries seen (0 where none was seen).
  Vector<Scalar> mean() const {
    Vector<Scalar> out(sum_.size());
    for (Index k = 0; k < sum_.size(); ++k)
      out(k) = count_(k) ? Scalar(sum_(k) / double(count_(k))) : Scalar(0);
    return out;
  }
  //! Number of present entries seen per modality.
  const Eigen::Matrix<Index, Eigen::Dynamic, 1>& count() const { return count_; }
  //! Forgets every batch.
  void reset() {
    sum_ = Eigen::VectorXd();
    count_ = Eigen::Matrix<Index, Eigen::Dynamic, 1>();
  }

 private:
  static constexpr const char* kName = "SaliencyRunningMean";

  void run(const ConstMatrixRef<Scalar>& s, const ConstPresenceMaskRef* mask);

  Eigen::VectorXd sum_;
  Eigen::Matrix<Index, Eigen::Dynamic, 1> count_;
};

template <class Scalar>
void SaliencyRunningMean<Scalar>::run(const ConstMatrixRef<Scalar>& s,
                                      const ConstPresenceMaskRef* mask) {
  const Index n = s.rows(), m = s.cols();
  if (sum_.size() != 0 && m != sum_.size()) {
    detail::throw_invalid(kName, "scores has " + std::to_string(m) + " modalities, expected " +
                                     std::to_string(sum_.size()) + " (as in earlier updates)");
  }
  if (mask) detail::check_presence(kName, *mask, n, m);
  if (!detail::all_finite(s)) detail::throw_invalid(kName, "scores hold a non-finite value");
  const auto present = detail::presence(mask);
  if (sum_.size() == 0) {
    sum_.setZero(m);
    count_.setZero(m);
  }
  for (Index i = 0; i < n; ++i) {
    for (Index k = 0; k < m; ++k) {
      if (present(i, k)) {
        sum_(k) += double(s(i, k));
        count_(k) += 1;
      }
    }
  }
}

MMKD_EXTERN_TEMPLATE(ModalityWeighting)
MMKD_EXTERN_TEMPLATE(SaliencyRunningMean)

}  // namespace mmkd
