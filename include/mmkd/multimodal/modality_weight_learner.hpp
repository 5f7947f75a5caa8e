#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/module.hpp"
#include "mmkd/core/parallel.hpp"
#include "mmkd/core/random.hpp"
#include "mmkd/core/types.hpp"
#include "mmkd/detail/relu.hpp"

namespace mmkd {

/**
 * Meta-learned auxiliary-loss weights for MSD: a small MLP g_φ that maps the features of each
 * (sample, modality) pair to a weight w = sigmoid(g_φ(u)), trained by the hypergradient of a
 * one-step SGD look-ahead on a held-out meta batch (Meta-Weight-Net style).
 *
 *     h = relu(u W1ᵀ + b1),  w = sigmoid(h W2ᵀ + b2)        default 1 → 100 → 1
 *
 * Features u of pair (i, m), row k = i·M + m of `make_features`: the auxiliary loss ℓ_im
 * (default), optionally its saliency s_im, optionally a one-hot of m. A module by mmkd's
 * protocol: `forward` caches what `backward` needs; `backward` *adds* the parameter gradients;
 * `parameters()` / `gradients()` are named writable views; initialisation is PyTorch's `Linear`
 * default (U(±1/√fan_in) for weights and biases) from an explicit seed.
 *
 * The look-ahead: the student takes θ' = θ − η ∇_θ[(1/B) Σ_k w_k ℓ_k(θ) + terms without w].
 * θ' is linear in w, so the hypergradient is exact:
 *
 *     ∂L_meta(θ')/∂w_k = −(η/B) ⟨∇_θ L_meta(θ'), ∇_θ ℓ_k(θ)⟩ (`hypergradient`)
 *
 * Restricted to the student's final linear layer z = W h (append a 1 to h for a bias),
 * ∇_W ℓ_k = g_k h_kᵀ with g_k = ∂ℓ_k/∂z, and for L_meta = (1/B_v) Σ_j ℓ^meta_j(W'):
 *
 *     ⟨∇_W L_meta(W'), ∇_W ℓ_k⟩ = (1/B_v) Σ_j (g'_j · g_k)(h'_j · h_k) (`hypergradient_linear`)
 *
 * Pass ∂L_meta/∂w to `backward` to get ∂L_meta/∂φ (features are constants, as in MW-Net). With
 * Adam in the inner step the formula holds only for the preconditioned SGD step.
 *
 * **Example**:
 * @code
 * mmkd::ModalityWeightLearner<float> learner({});             // 1 -> 100 -> 1, seed 0
 * learner.make_features(msd.auxiliary_losses(student_modal, teacher_modal), features);
 * const auto& w = learner.forward(features);                  // (N·M) x 1, row k = i·M + m
 * Eigen::Map<const mmkd::Matrix<float>> weights(w.data(), N, M);
 * @endcode
 */
template <class Scalar = float>
class ModalityWeightLearner : detail::FloatingScalar<Scalar> {
 public:
  //! The options; the defaults are those of the reference implementation.
  struct Options {
    Index hidden = 100;           //!< hidden units, ≥ 1
    bool use_saliency = false;    //!< add the saliency score to the features
    Index onehot_modalities = 0;  //!< > 0: add a one-hot of the modality (M entries)
    std::uint64_t seed = 0;       //!< initialisation seed
  };

  ModalityWeightLearner() : ModalityWeightLearner(Options{}) {}
  //! Throws InvalidArgument for an invalid option.
  explicit ModalityWeightLearner(const Options& options) : options_(options) {
    if (options_.hidden < 1) detail::throw_invalid(kName, "option hidden must be >= 1");
    if (options_.onehot_modalities < 0)
      detail::throw_invalid(kName, "option onehot_modalities must be >= 0");
    const Index f = feature_dim(), h = options_.hidden;
    w1_.resize(h, f);
    b1_.resize(1, h);
    w2_.resize(1, h);
    b2_.resize(1, 1);
    SplitMix64 rng(options_.seed);
    auto fill = [&](Matrix<Scalar>& m, Index fan_in) {
      const double bound = 1.0 / std::sqrt(double(fan_in));
      for (Index k = 0; k < m.size(); ++k) m.data()[k] = Scalar(rng.uniform(-bound, bound));
    };
    fill(w1_, f);
    fill(b1_, f);
    fill(w2_, h);
    fill(b2_, h);
    pgw1_.resize(h, f);
    zero_grad();
  }

  //! Read-only: the options fix the parameters' shapes.
  const Options& options() const { return options_; }

  //! Number of input features: 1 (aux loss) + use_saliency + onehot_modalities.
  Index feature_dim() const {
    return 1 + (options_.use_saliency ? 1 : 0) + options_.onehot_modalities;
  }

  //! Features from the N x M auxiliary losses (and saliencies when `use_saliency`); row k = i·M +
  //! m.
  void make_features(const ConstMatrixRef<Scalar>& aux_losses, Matrix<Scalar>& out) const {
    if (options_.use_saliency)
      detail::throw_invalid(kName, "use_saliency is set: pass the saliency scores too");
    build(aux_losses, nullptr, out);
  }
  //! The features with the saliency scores (N x M) as a second block.
  void make_features(const ConstMatrixRef<Scalar>& aux_losses,
                     const ConstMatrixRef<Scalar>& saliency, Matrix<Scalar>& out) const {
    if (!options_.use_saliency)
      detail::throw_invalid(kName, "use_saliency is not set: pass only the auxiliary losses");
    detail::check_shape(kName, "saliency", saliency, aux_losses.rows(), aux_losses.cols(),
                        "same as aux_losses");
    build(aux_losses, &saliency, out);
  }

  //! Weights for a K x F feature matrix: a K x 1 matrix (reshape to N x M for MSD).
  const Matrix<Scalar>& forward(const ConstMatrixRef<Scalar>& features);

  //! Adds dL/dφ for dL/dw (K x 1, K = rows of the last `forward`) to the parameter gradients.
  void backward(const ConstMatrixRef<Scalar>& d_weights);

  //! Sets the parameter gradients to zero.
  void zero_grad() {
    gw1_.setZero(w1_.rows(), w1_.cols());
    gb1_.setZero(1, b1_.cols());
    gw2_.setZero(1, w2_.cols());
    gb2_.setZero(1, 1);
  }

  //! Named views: fc1.weight (H x F), fc1.bias (1 x H), fc2.weight (1 x H), fc2.bias (1 x 1).
  std::vector<ParameterView<Scalar>> parameters() { return views(w1_, b1_, w2_, b2_); }
  //! The parameter gradients, paired by position with parameters().
  std::vector<ParameterView<Scalar>> gradients() { return views(gw1_, gb1_, gw2_, gb2_); }

  //! ∂L_meta/∂w_k = −(lr/batch) · dots_k, added to `out`; dots_k = ⟨∇L_meta(θ'), ∇ℓ_k(θ)⟩.
  static void hypergradient(const ConstMatrixRef<Scalar>& dots, Scalar lr, Index batch,
                            MatrixRef<Scalar> out);

  //! The closed form for a look-ahead on the final linear layer, added to `out` (K x 1).
  //! g: K x C = ∂ℓ_k/∂z at θ; h: K x D inputs of the layer; g_meta: B_v x C = ∂ℓ^meta_j/∂z at
  //! θ'; h_meta: B_v x D.
  static void hypergradient_linear(const ConstMatrixRef<Scalar>& g, const ConstMatrixRef<Scalar>& h,
                                   const ConstMatrixRef<Scalar>& g_meta,
                                   const ConstMatrixRef<Scalar>& h_meta, Scalar lr, Index batch,
                                   MatrixRef<Scalar> out);

 private:
  static constexpr const char* kName = "ModalityWeightLearner";

  static void check_lr_batch(Scalar lr, Index batch) {
    detail::check_nonnegative(kName, "lr", lr);
    if (batch < 1) detail::throw_invalid(kName, "batch must be >= 1, got " + std::to_string(batch));
  }

  void build(const ConstMatrixRef<Scalar>& aux, const ConstMatrixRef<Scalar>* sal,
             Matrix<Scalar>& out) const;

  static std::vector<ParameterView<Scalar>> views(Matrix<Scalar>& a, Matrix<Scalar>& b,
                                                  Matrix<Scalar>& c, Matrix<Scalar>& d) {
    auto v = [](const char* name, Matrix<Scalar>& m) {
      return ParameterView<Scalar>{name, Eigen::Map<Matrix<Scalar>>(m.data(), m.rows(), m.cols())};
    };
    return {v("fc1.weight", a), v("fc1.bias", b), v("fc2.weight", c), v("fc2.bias", d)};
  }

  Options options_;
  Matrix<Scalar> w1_, b1_, w2_, b2_;      // parameters
  Matrix<Scalar> gw1_, gb1_, gw2_, gb2_;  // their gradients
  static constexpr Index kChunk = 256;    // rows per partial sum of the backward pass

  Matrix<Scalar> w1t_, x_, h_, out_;  // forward cache (w1t_ = fc1.weightᵀ)
  Matrix<Scalar> dpre_, partial_;     // backward scratch: one dpre row per thread, chunk sums
  Eigen::Matrix<Scalar, 1, Eigen::Dynamic> pending_;  // the chunk sums, added up
  Matrix<Scalar> pgw1_, pgb1_, pgw2_;                 // pending gradient increments
};

template <class Scalar>
const Matrix<Scalar>& ModalityWeightLearner<Scalar>::forward(
    const ConstMatrixRef<Scalar>& features) {
  const Index f = feature_dim();
  if (features.cols() != f) {
    detail::throw_invalid(kName, "features has " + std::to_string(features.cols()) +
                                     " columns, expected " + std::to_string(f) +
                                     " (feature_dim())");
  }
  if (!detail::all_finite(features))
    detail::throw_invalid(kName, "features hold a non-finite value");
  // Checked first: the relu could hide a NaN weight (max(NaN, 0) may be 0).
  if (!detail::all_finite(w1_) || !detail::all_finite(b1_) || !detail::all_finite(w2_) ||
      !detail::all_finite(b2_)) {
    out_.resize(0, 1);
    std::string why = detail::bad_entry("parameter", "fc1.weight", w1_);
    if (why.empty()) why = detail::bad_entry("parameter", "fc1.bias", b1_);
    if (why.empty()) why = detail::bad_entry("parameter", "fc2.weight", w2_);
    if (why.empty()) why = detail::bad_entry("parameter", "fc2.bias", b2_);
    detail::throw_numerical(kName, why);
  }
  const Index k = features.rows(), hid = options_.hidden;
  x_ = features;
  w1t_ = w1_.transpose();  // F x H: each feature's weights contiguous
  h_.resize(k, hid);
  out_.resize(k, 1);
  // Row by row, in cache: h = relu(b1 + Σ_f x_f W1[:, f]), w = sigmoid(h · w2 + b2).
  detail::parallel_for(k, 2 * hid * (f + 1), [&](Index i, int) {
    auto hi = h_.row(i);
    hi = b1_.row(0);
    for (Index q = 0; q < f; ++q) hi += x_(i, q) * w1t_.row(q);
    hi = hi.cwiseMax(Scalar(0));
    out_(i, 0) = Scalar(1) / (Scalar(1) + std::exp(-(hi.dot(w2_.row(0)) + b2_(0, 0))));
  });
  if (!detail::all_finite(out_)) {
    out_.resize(0, 1);  // refuse a backward through this failed forward
    detail::throw_numerical(kName, "the features overflow the hidden layer");
  }
  return out_;
}

template <class Scalar>
void ModalityWeightLearner<Scalar>::backward(const ConstMatrixRef<Scalar>& d_weights) {
  detail::check_shape(kName, "d_weights", d_weights, out_.rows(), 1,
                      "one per row of the last forward");
  if (!detail::all_finite(d_weights))
    detail::throw_invalid(kName, "d_weights hold a non-finite value");
  const Index k = out_.rows(), f = feature_dim(), hid = options_.hidden;
  if (k == 0) return;  // no samples: nothing to add
  // Per row: da = dw · w(1 − w) through the sigmoid, dpre = da · w2 ⊙ [h > 0] through the relu;
  // then dW2 += da h, db1 += dpre, dW1 += dpre ⊗ x, db2 += da. Rows are summed in fixed chunks
  // of kChunk (any number of threads gives the same sums), the chunks in order. Row c of
  // partial_ is [dW2 | db1 | dW1ᵀ (F·H) | db2] of chunk c.
  const Index chunks = (k + kChunk - 1) / kChunk, width = (2 + f) * hid + 1;
  partial_.resize(chunks, width);
  if (dpre_.rows() < max_threads() || dpre_.cols() != hid) dpre_.resize(max_threads(), hid);
  detail::parallel_for(chunks, kChunk * hid * (f + 2), [&](Index c, int thread) {
    auto acc = partial_.row(c);
    acc.setZero();
    auto dpre = dpre_.row(thread);
    for (Index i = c * kChunk; i < std::min(k, (c + 1) * kChunk); ++i) {
      const Scalar w = out_(i, 0), da = d_weights(i, 0) * w * (Scalar(1) - w);
      const auto hi = h_.row(i);
      dpre = hi.binaryExpr(da * w2_.row(0), detail::ReluBackward<Scalar>());
      acc.segment(0, hid) += da * hi;
      acc.segment(hid, hid) += dpre;
      for (Index q = 0; q < f; ++q) acc.segment((2 + q) * hid, hid) += x_(i, q) * dpre;
      acc(width - 1) += da;
    }
  });
  pending_ = partial_.row(0);
  for (Index c = 1; c < chunks; ++c) pending_ += partial_.row(c);
  // Into scratch first: the gradients change only if every sum stays finite.
  pgw2_ = pending_.segment(0, hid);
  pgb1_ = pending_.segment(hid, hid);
  for (Index q = 0; q < f; ++q) pgw1_.col(q) = pending_.segment((2 + q) * hid, hid).transpose();
  const Scalar pgb2 = pending_(width - 1);
  if (!detail::all_finite(gw2_ + pgw2_) || !detail::all_finite(gw1_ + pgw1_) ||
      !detail::all_finite(gb1_ + pgb1_) || !detail::is_finite(gb2_(0, 0) + pgb2))
    detail::throw_numerical(kName, "the parameter gradients overflow");
  gw2_ += pgw2_;
  gw1_ += pgw1_;
  gb1_ += pgb1_;
  gb2_(0, 0) += pgb2;
}

template <class Scalar>
void ModalityWeightLearner<Scalar>::hypergradient(const ConstMatrixRef<Scalar>& dots, Scalar lr,
                                                  Index batch, MatrixRef<Scalar> out) {
  check_lr_batch(lr, batch);
  detail::check_shape(kName, "out", out, dots.rows(), dots.cols(), "same as dots");
  if (!detail::all_finite(out - (lr / Scalar(batch)) * dots))
    detail::throw_numerical(kName, "the hypergradient is not finite (dots or out)");
  out -= (lr / Scalar(batch)) * dots;
}

template <class Scalar>
void ModalityWeightLearner<Scalar>::hypergradient_linear(const ConstMatrixRef<Scalar>& g,
                                                         const ConstMatrixRef<Scalar>& h,
                                                         const ConstMatrixRef<Scalar>& g_meta,
                                                         const ConstMatrixRef<Scalar>& h_meta,
                                                         Scalar lr, Index batch,
                                                         MatrixRef<Scalar> out) {
  check_lr_batch(lr, batch);
  detail::check_shape(kName, "h", h, g.rows(), h.cols(), "one row per row of g");
  detail::check_shape(kName, "g_meta", g_meta, g_meta.rows(), g.cols(), "same classes as g");
  detail::check_shape(kName, "h_meta", h_meta, g_meta.rows(), h.cols(),
                      "rows of g_meta, width of h");
  detail::check_shape(kName, "out", out, g.rows(), 1, "one per row of g");
  if (g_meta.rows() == 0) detail::throw_invalid(kName, "g_meta is empty (no meta samples)");
  // Σ_j (g_k·g'_j)(h_k·h'_j) row by row: no K x B_v temporaries, so no allocation.
  const Scalar scale = lr / (Scalar(batch) * Scalar(g_meta.rows()));
  auto term = [&](Index k) {
    Scalar sum = 0;
    for (Index j = 0; j < g_meta.rows(); ++j)
      sum += g.row(k).dot(g_meta.row(j)) * h.row(k).dot(h_meta.row(j));
    return scale * sum;
  };
  // Two passes (the second recomputes): `out` changes only if every entry stays finite.
  for (Index k = 0; k < g.rows(); ++k) {
    if (!detail::is_finite(out(k, 0) - term(k)))
      detail::throw_numerical(kName, "the hypergradient of row " + std::to_string(k) +
                                         " is not finite (inputs non-finite or too large)");
  }
  for (Index k = 0; k < g.rows(); ++k) out(k, 0) -= term(k);
}

template <class Scalar>
void ModalityWeightLearner<Scalar>::build(const ConstMatrixRef<Scalar>& aux,
                                          const ConstMatrixRef<Scalar>* sal,
                                          Matrix<Scalar>& out) const {
  const Index n = aux.rows(), m = aux.cols();
  if (options_.onehot_modalities > 0 && options_.onehot_modalities != m) {
    detail::throw_invalid(kName, "aux_losses has " + std::to_string(m) + " modalities, expected " +
                                     std::to_string(options_.onehot_modalities) +
                                     " (onehot_modalities)");
  }
  out.setZero(n * m, feature_dim());
  for (Index i = 0; i < n; ++i) {
    for (Index k = 0; k < m; ++k) {
      Index col = 0;
      out(i * m + k, col++) = aux(i, k);
      if (sal) out(i * m + k, col++) = (*sal)(i, k);
      if (options_.onehot_modalities > 0) out(i * m + k, col + k) = Scalar(1);
    }
  }
}

MMKD_EXTERN_TEMPLATE(ModalityWeightLearner)

}  // namespace mmkd
