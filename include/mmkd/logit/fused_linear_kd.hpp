#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/parallel.hpp"
#include "mmkd/core/reduction.hpp"
#include "mmkd/core/types.hpp"
#include "mmkd/detail/divergence.hpp"
#include "mmkd/detail/products.hpp"
#include "mmkd/detail/row_loss.hpp"
#include "mmkd/logit/logit_divergence.hpp"

namespace mmkd {

/**
 * The student's output head fused with token-level distillation, so that the N x V logits are
 * never stored whole: the rows go through the head `chunk_rows` at a time, and each chunk's
 * logits become its gradient in place before the next chunk (Liger-Kernel's
 * `LigerFusedLinearJSDLoss`, for C++). With student hidden states h_s (N x d), head weight w_s
 * (V x d, the `nn.Linear` layout) and optional bias b_s (V), and the teacher's h_t, w_t, b_t (or
 * its logits, N x V):
 *
 * @code
 * s_i = w_s h_s,i + b_s            t_i = w_t h_t,i + b_t     (logits, one chunk at a time)
 * R   = {i : labels_i ≠ −100},      D_i = the `divergence` option's row term of LogitDivergence
 *       (its kind, β, λ, temperature, T² and weight), CE_i = −log softmax(s_i)[labels_i] (T = 1)
 * L   = (hard_weight · Σ_{i∈R} CE_i + soft_weight · Σ_{i∈R} D_i) / |R|
 * dL/ds_i = g_i (rows outside R: 0);   dL/dh_s = g w_s,   dL/dw_s = gᵀ h_s,   dL/db_s = Σ_i g_i
 * @endcode
 *
 * As in Liger's distillation base, the hard term is the cross-entropy at temperature 1 and both
 * sums are divided by the number of labelled rows. Rows labelled −100 take no part in either
 * term (their gradient is 0); their hidden states still go through the head, so they must be
 * finite. The teacher gets no gradient.
 *
 * Memory: the extra storage is the chunk's student logits (`chunk_rows` x V, which then hold its
 * gradient), the teacher's (the same; none with precomputed teacher logits) and a few V-long rows
 * per thread, never O(N·V). The four products per chunk (two heads, two backward) run in Eigen's
 * GEMM (BLAS with `MMKD_BLAS`), over blocks of 4096 classes in a fixed grid of tiles on mmkd's
 * threads.
 *
 * bfloat16 storage: hidden states, heads, biases and teacher logits may be `mmkd::bfloat16`
 * (all of them), computed in Scalar: each chunk of hidden states and each block of head rows is
 * read into a Scalar buffer (chunk_rows x d, 4096 x d) just before its products, never the whole
 * head. Gradient buffers are Scalar or bfloat16; a bfloat16 one gets the float sums rounded to
 * nearest even: d_h_s and d_b_s once per call, d_w_s once per chunk of rows (as Liger adds each
 * chunk's weight gradient to a bfloat16 buffer).
 *
 * Everything that could fail is checked before anything is written, so the strong guarantee
 * holds without a copy of the gradients: shapes, labels (−100 or a class), non-finite hidden
 * states, weights and biases (InvalidArgument naming the element), and teacher logits (NaN and
 * +Inf are InvalidArgument; −Inf, which makes ReverseKL and the reverse skew at λ = 0 infinite,
 * is NumericalError for those). The logits are bounded by max‖h_i‖·max‖w_j‖ + max|b_j|; a bound
 * large enough for the loss or a gradient to overflow the scalar type (about 1e17 in float for
 * N = 1024 tokens) is NumericalError up front.
 *
 * \pre  h_s N x d, w_s V x d, h_t N x d_t, w_t V x d_t (or teacher logits N x V), labels N, each
 *       bias empty (no bias) or V long; N, d, d_t, V ≥ 1. Options: soft_weight, hard_weight ≥ 0,
 *       chunk_rows ≥ 1, the divergence's options valid for LogitDivergence with
 *       `Reduction::BatchMean`.
 * \post `value_and_grad` adds the gradients to d_h_s (N x d), d_w_s (V x d) and d_b_s (the size
 *       of b_s) and returns the same value as `value`. On any exception nothing has been written.
 *
 * **Example** (the student's last hidden states and LM head; a frozen teacher's likewise):
 * @code
 * mmkd::FusedLinearKD<float>::Options o;
 * o.divergence.divergence = mmkd::Divergence::GeneralizedJSD;  // β = 0.5
 * o.hard_weight = 0.5;                                          // plus half the CE
 * mmkd::FusedLinearKD<float> kd(o);
 * float loss = kd.value_and_grad(h_s, lm_head_s, h_t, lm_head_t, labels, d_h_s, d_lm_head_s);
 * @endcode
 */
template <class Scalar = float>
class FusedLinearKD : detail::FloatingScalar<Scalar> {
 public:
  //! The options; the defaults are Liger's (the divergence's are TRL's).
  struct Options {
    typename LogitDivergence<Scalar>::Options divergence;  //!< the soft term (BatchMean only)
    Scalar soft_weight = Scalar(1);                        //!< ≥ 0, the divergence's weight
    Scalar hard_weight = Scalar(0);                        //!< ≥ 0, the cross-entropy's weight
    Index chunk_rows = 1024;                               //!< rows through the head at a time
  };

  FusedLinearKD() : FusedLinearKD(Options{}) {}
  //! Throws InvalidArgument for an invalid option.
  explicit FusedLinearKD(const Options& options) : options_(options) { validate(); }

  //! The options; may be changed between calls (validated at every call).
  Options& options() { return options_; }
  //! The options.
  const Options& options() const { return options_; }

  //! The loss, with the teacher's head.
  Scalar value(const ConstMatrixRef<Scalar>& h_s, const ConstMatrixRef<Scalar>& w_s,
               const ConstMatrixRef<Scalar>& h_t, const ConstMatrixRef<Scalar>& w_t,
               const ConstLabelsRef& labels) {
    return run({&h_s, &w_s, nullptr, &h_t, &w_t, nullptr, nullptr, &labels}, nullptr, nullptr,
               nullptr);
  }
  //! With head biases (an empty vector: that head has none).
  Scalar value(const ConstMatrixRef<Scalar>& h_s, const ConstMatrixRef<Scalar>& w_s,
               const ConstMatrixRef<Scalar>& h_t, const ConstMatrixRef<Scalar>& w_t,
               const ConstLabelsRef& labels, const ConstVectorRef<Scalar>& b_s,
               const ConstVectorRef<Scalar>& b_t) {
    return run({&h_s, &w_s, &b_s, &h_t, &w_t, &b_t, nullptr, &labels}, nullptr, nullptr, nullptr);
  }
  //! The loss, with precomputed teacher logits (N x V).
  Scalar value(const ConstMatrixRef<Scalar>& h_s, const ConstMatrixRef<Scalar>& w_s,
               const ConstMatrixRef<Scalar>& teacher_logits, const ConstLabelsRef& labels) {
    return run({&h_s, &w_s, nullptr, nullptr, nullptr, nullptr, &teacher_logits, &labels}, nullptr,
               nullptr, nullptr);
  }
  //! With precomputed teacher logits and the student head's bias.
  Scalar value(const ConstMatrixRef<Scalar>& h_s, const ConstMatrixRef<Scalar>& w_s,
               const ConstMatrixRef<Scalar>& teacher_logits, const ConstLabelsRef& labels,
               const ConstVectorRef<Scalar>& b_s) {
    return run({&h_s, &w_s, &b_s, nullptr, nullptr, nullptr, &teacher_logits, &labels}, nullptr,
               nullptr, nullptr);
  }

  //! Returns the loss and adds dL/dh_s to `d_h_s` (N x d) and dL/dw_s to `d_w_s` (V x d).
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& h_s, const ConstMatrixRef<Scalar>& w_s,
                        const ConstMatrixRef<Scalar>& h_t, const ConstMatrixRef<Scalar>& w_t,
                        const ConstLabelsRef& labels, MatrixRef<Scalar> d_h_s,
                        MatrixRef<Scalar> d_w_s) {
    return run({&h_s, &w_s, nullptr, &h_t, &w_t, nullptr, nullptr, &labels}, &d_h_s, &d_w_s,
               nullptr);
  }
  //! With head biases; also adds dL/db_s to `d_b_s` (the size of b_s).
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& h_s, const ConstMatrixRef<Scalar>& w_s,
                        const ConstMatrixRef<Scalar>& h_t, const ConstMatrixRef<Scalar>& w_t,
                        const ConstLabelsRef& labels, const ConstVectorRef<Scalar>& b_s,
                        const ConstVectorRef<Scalar>& b_t, MatrixRef<Scalar> d_h_s,
                        MatrixRef<Scalar> d_w_s, VectorRef<Scalar> d_b_s) {
    return run({&h_s, &w_s, &b_s, &h_t, &w_t, &b_t, nullptr, &labels}, &d_h_s, &d_w_s, &d_b_s);
  }
  //! With precomputed teacher logits (N x V).
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& h_s, const ConstMatrixRef<Scalar>& w_s,
                        const ConstMatrixRef<Scalar>& teacher_logits, const ConstLabelsRef& labels,
                        MatrixRef<Scalar> d_h_s, MatrixRef<Scalar> d_w_s) {
    return run({&h_s, &w_s, nullptr, nullptr, nullptr, nullptr, &teacher_logits, &labels}, &d_h_s,
               &d_w_s, nullptr);
  }
  //! With precomputed teacher logits and the student head's bias.
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& h_s, const ConstMatrixRef<Scalar>& w_s,
                        const ConstMatrixRef<Scalar>& teacher_logits, const ConstLabelsRef& labels,
                        const ConstVectorRef<Scalar>& b_s, MatrixRef<Scalar> d_h_s,
                        MatrixRef<Scalar> d_w_s, VectorRef<Scalar> d_b_s) {
    return run({&h_s, &w_s, &b_s, nullptr, nullptr, nullptr, &teacher_logits, &labels}, &d_h_s,
               &d_w_s, &d_b_s);
  }

  //! bfloat16 hidden states and heads (biases bfloat16 too, or empty), computed in Scalar.
  Scalar value(const ConstMatrixRef<bfloat16>& h_s, const ConstMatrixRef<bfloat16>& w_s,
               const ConstMatrixRef<bfloat16>& h_t, const ConstMatrixRef<bfloat16>& w_t,
               const ConstLabelsRef& labels) {
    return run(In16{&h_s, &w_s, nullptr, &h_t, &w_t, nullptr, nullptr, &labels}, kNoGrad, kNoGrad,
               kNoBias);
  }
  //! bfloat16, with head biases.
  Scalar value(const ConstMatrixRef<bfloat16>& h_s, const ConstMatrixRef<bfloat16>& w_s,
               const ConstMatrixRef<bfloat16>& h_t, const ConstMatrixRef<bfloat16>& w_t,
               const ConstLabelsRef& labels, const ConstVectorRef<bfloat16>& b_s,
               const ConstVectorRef<bfloat16>& b_t) {
    return run(In16{&h_s, &w_s, &b_s, &h_t, &w_t, &b_t, nullptr, &labels}, kNoGrad, kNoGrad,
               kNoBias);
  }
  //! bfloat16, with precomputed teacher logits.
  Scalar value(const ConstMatrixRef<bfloat16>& h_s, const ConstMatrixRef<bfloat16>& w_s,
               const ConstMatrixRef<bfloat16>& teacher_logits, const ConstLabelsRef& labels) {
    return run(In16{&h_s, &w_s, nullptr, nullptr, nullptr, nullptr, &teacher_logits, &labels},
               kNoGrad, kNoGrad, kNoBias);
  }
  //! bfloat16, with precomputed teacher logits and the student head's bias.
  Scalar value(const ConstMatrixRef<bfloat16>& h_s, const ConstMatrixRef<bfloat16>& w_s,
               const ConstMatrixRef<bfloat16>& teacher_logits, const ConstLabelsRef& labels,
               const ConstVectorRef<bfloat16>& b_s) {
    return run(In16{&h_s, &w_s, &b_s, nullptr, nullptr, nullptr, &teacher_logits, &labels}, kNoGrad,
               kNoGrad, kNoBias);
  }
  // bfloat16 inputs (as the float overloads: heads, biases or teacher logits), gradients in
  // Scalar or in bfloat16: each sum rounded to nearest even, d_h_s and d_b_s once per call,
  // d_w_s once per chunk of rows.
  //! bfloat16 (heads), Scalar gradients.
  Scalar value_and_grad(const ConstMatrixRef<bfloat16>& h_s, const ConstMatrixRef<bfloat16>& w_s,
                        const ConstMatrixRef<bfloat16>& h_t, const ConstMatrixRef<bfloat16>& w_t,
                        const ConstLabelsRef& labels, MatrixRef<Scalar> d_h_s,
                        MatrixRef<Scalar> d_w_s) {
    return run(In16{&h_s, &w_s, nullptr, &h_t, &w_t, nullptr, nullptr, &labels}, &d_h_s, &d_w_s,
               kNoBias);
  }
  //! bfloat16 (heads), bfloat16 gradients.
  Scalar value_and_grad(const ConstMatrixRef<bfloat16>& h_s, const ConstMatrixRef<bfloat16>& w_s,
                        const ConstMatrixRef<bfloat16>& h_t, const ConstMatrixRef<bfloat16>& w_t,
                        const ConstLabelsRef& labels, MatrixRef<bfloat16> d_h_s,
                        MatrixRef<bfloat16> d_w_s) {
    return run(In16{&h_s, &w_s, nullptr, &h_t, &w_t, nullptr, nullptr, &labels}, &d_h_s, &d_w_s,
               kNoBias16);
  }
  //! bfloat16 (heads, biases), Scalar gradients.
  Scalar value_and_grad(const ConstMatrixRef<bfloat16>& h_s, const ConstMatrixRef<bfloat16>& w_s,
                        const ConstMatrixRef<bfloat16>& h_t, const ConstMatrixRef<bfloat16>& w_t,
                        const ConstLabelsRef& labels, const ConstVectorRef<bfloat16>& b_s,
                        const ConstVectorRef<bfloat16>& b_t, MatrixRef<Scalar> d_h_s,
                        MatrixRef<Scalar> d_w_s, VectorRef<Scalar> d_b_s) {
    return run(In16{&h_s, &w_s, &b_s, &h_t, &w_t, &b_t, nullptr, &labels}, &d_h_s, &d_w_s, &d_b_s);
  }
  //! bfloat16 (heads, biases), bfloat16 gradients.
  Scalar value_and_grad(const ConstMatrixRef<bfloat16>& h_s, const ConstMatrixRef<bfloat16>& w_s,
                        const ConstMatrixRef<bfloat16>& h_t, const ConstMatrixRef<bfloat16>& w_t,
                        const ConstLabelsRef& labels, const ConstVectorRef<bfloat16>& b_s,
                        const ConstVectorRef<bfloat16>& b_t, MatrixRef<bfloat16> d_h_s,
                        MatrixRef<bfloat16> d_w_s, VectorRef<bfloat16> d_b_s) {
    return run(In16{&h_s, &w_s, &b_s, &h_t, &w_t, &b_t, nullptr, &labels}, &d_h_s, &d_w_s, &d_b_s);
  }
  //! bfloat16 (teacher logits), Scalar gradients.
  Scalar value_and_grad(const ConstMatrixRef<bfloat16>& h_s, const ConstMatrixRef<bfloat16>& w_s,
                        const ConstMatrixRef<bfloat16>& teacher_logits,
                        const ConstLabelsRef& labels, MatrixRef<Scalar> d_h_s,
                        MatrixRef<Scalar> d_w_s) {
    return run(In16{&h_s, &w_s, nullptr, nullptr, nullptr, nullptr, &teacher_logits, &labels},
               &d_h_s, &d_w_s, kNoBias);
  }
  //! bfloat16 (teacher logits), bfloat16 gradients.
  Scalar value_and_grad(const ConstMatrixRef<bfloat16>& h_s, const ConstMatrixRef<bfloat16>& w_s,
                        const ConstMatrixRef<bfloat16>& teacher_logits,
                        const ConstLabelsRef& labels, MatrixRef<bfloat16> d_h_s,
                        MatrixRef<bfloat16> d_w_s) {
    return run(In16{&h_s, &w_s, nullptr, nullptr, nullptr, nullptr, &teacher_logits, &labels},
               &d_h_s, &d_w_s, kNoBias16);
  }
  //! bfloat16 (teacher logits, bias), Scalar gradients.
  Scalar value_and_grad(const ConstMatrixRef<bfloat16>& h_s, const ConstMatrixRef<bfloat16>& w_s,
                        const ConstMatrixRef<bfloat16>& teacher_logits,
                        const ConstLabelsRef& labels, const ConstVectorRef<bfloat16>& b_s,
                        MatrixRef<Scalar> d_h_s, MatrixRef<Scalar> d_w_s, VectorRef<Scalar> d_b_s) {
    return run(In16{&h_s, &w_s, &b_s, nullptr, nullptr, nullptr, &teacher_logits, &labels}, &d_h_s,
               &d_w_s, &d_b_s);
  }
  //! bfloat16 (teacher logits, bias), bfloat16 gradients.
  Scalar value_and_grad(const ConstMatrixRef<bfloat16>& h_s, const ConstMatrixRef<bfloat16>& w_s,
                        const ConstMatrixRef<bfloat16>& teacher_logits,
                        const ConstLabelsRef& labels, const ConstVectorRef<bfloat16>& b_s,
                        MatrixRef<bfloat16> d_h_s, MatrixRef<bfloat16> d_w_s,
                        VectorRef<bfloat16> d_b_s) {
    return run(In16{&h_s, &w_s, &b_s, nullptr, nullptr, nullptr, &teacher_logits, &labels}, &d_h_s,
               &d_w_s, &d_b_s);
  }

  //! hard_weight·CE_i + soft_weight·D_i of each row of the last call (0 for rows labelled
  //! −100), before the division by the number of labelled rows.
  const Vector<Scalar>& row_values() const { return ws_.row_value; }

  //! Frees the scratch memory kept between calls (the next call allocates it again).
  void release_workspace() {
    ws_.release();
    logits_s_ = Matrix<Scalar>();
    logits_t_ = Matrix<Scalar>();
    ones_ = Vector<Scalar>();
  }

 private:
  static constexpr const char* kName = "FusedLinearKD";
  static constexpr int kBuffers = 6;  // the student's logits, then the divergence's five
  // Head rows (classes) per block of the products: a multiple of their 256-wide tiles, so the
  // tiles are those of one product over all V classes.
  static constexpr Index kBlock = 4096;

  template <class In>
  struct InputsOf {
    const ConstMatrixRef<In>* h_s;
    const ConstMatrixRef<In>* w_s;
    const ConstVectorRef<In>* b_s;  // nullptr or empty: none
    const ConstMatrixRef<In>* h_t;  // nullptr with precomputed teacher logits
    const ConstMatrixRef<In>* w_t;
    const ConstVectorRef<In>* b_t;
    const ConstMatrixRef<In>* logits_t;
    const ConstLabelsRef* labels;
  };
  using Inputs = InputsOf<Scalar>;
  using In16 = InputsOf<bfloat16>;
  static constexpr MatrixRef<Scalar>* kNoGrad = nullptr;
  static constexpr VectorRef<Scalar>* kNoBias = nullptr;
  static constexpr VectorRef<bfloat16>* kNoBias16 = nullptr;
  using Rows = Eigen::Map<const Matrix<Scalar>, 0, Eigen::OuterStride<>>;

  void validate() const {
    LogitDivergence<Scalar> check(options_.divergence);  // its options' checks
    (void)check;
    if (options_.divergence.reduction != Reduction::BatchMean)
      detail::throw_invalid(kName,
                            "option divergence.reduction must be BatchMean (the loss divides by "
                            "the number of labelled rows)");
    detail::check_nonnegative(kName, "soft_weight", options_.soft_weight);
    detail::check_nonnegative(kName, "hard_weight", options_.hard_weight);
    if (options_.chunk_rows < 1)
      detail::throw_invalid(
          kName, "option chunk_rows must be >= 1, got " + std::to_string(options_.chunk_rows));
  }

  /// Row i of x in Scalar: a view, or (bfloat16) read into row_ (one row at a time).
  template <class M>
  detail::ConstRowMap<Scalar> read_row(const M& x, Index i);
  /// Rows [r0, r0 + m) of x in Scalar: a view, or (bfloat16) read into `buf` in parallel.
  template <class In>
  Rows rows_of(const ConstMatrixRef<In>& x, Index r0, Index m, Matrix<Scalar>& buf);
  /// max_i ‖x_i‖ over the rows of a finite matrix; names the first non-finite entry otherwise.
  template <class M>
  double max_row_norm(const char* name, const M& x);
  /// The bias in Scalar (a view, or read into `buf`), nullptr for none; max |b_j| in `bound`
  /// (0 for none); names a non-finite entry.
  template <class In>
  const Scalar* bias_of(const char* name, const ConstVectorRef<In>* b, Vector<Scalar>& buf,
                        double& bound);
  /// The teacher logits' checks on the labelled rows; returns their largest finite |entry|.
  template <class M>
  double check_teacher_logits(const M& t, const ConstLabelsRef& labels);

  // One body (run_rows) for each storage type of the inputs and of the gradients.
  Scalar run(const Inputs& in, MatrixRef<Scalar>* d_h, MatrixRef<Scalar>* d_w,
             VectorRef<Scalar>* d_b);
  Scalar run(const In16& in, MatrixRef<Scalar>* d_h, MatrixRef<Scalar>* d_w,
             VectorRef<Scalar>* d_b);
  Scalar run(const In16& in, MatrixRef<bfloat16>* d_h, MatrixRef<bfloat16>* d_w,
             VectorRef<bfloat16>* d_b);
  template <class In, class G>
  Scalar run_rows(const InputsOf<In>& in, MatrixRef<G>* d_h, MatrixRef<G>* d_w, VectorRef<G>* d_b);

  Options options_;
  detail::RowWorkspace<Scalar> ws_;
  Matrix<Scalar> logits_s_, logits_t_;  // one chunk of each head's logits
  Vector<Scalar> ones_;                 // for the bias gradient, Σ_i g_i = gᵀ 1
  // bfloat16 inputs: the rows being checked, a chunk of each model's hidden states, a block of
  // head rows, the biases; bfloat16 gradients: their float sums before rounding.
  detail::RowArray<Scalar> row_;
  Matrix<Scalar> h_s16_, h_t16_, w16_, d_h16_, d_w16_;
  Vector<Scalar> b_s16_, b_t16_, d_b16_;
};

template <class Scalar>
template <class M>
detail::ConstRowMap<Scalar> FusedLinearKD<Scalar>::read_row(const M& x, Index i) {
  if constexpr (std::is_same<typename M::Scalar, Scalar>::value) {
    return detail::const_row_map(x, i);
  } else {
    if (row_.size() < x.cols()) row_.resize(x.cols());
    detail::load_bf16(x.data() + i * x.outerStride(), row_.data(), x.cols());
    return detail::ConstRowMap<Scalar>(row_.data(), x.cols());
  }
}

template <class Scalar>
template <class In>
typename FusedLinearKD<Scalar>::Rows FusedLinearKD<Scalar>::rows_of(const ConstMatrixRef<In>& x,
                                                                    Index r0, Index m,
                                                                    Matrix<Scalar>& buf) {
  if constexpr (std::is_same<In, Scalar>::value) {
    (void)buf;
    return Rows(x.data() + r0 * x.outerStride(), m, x.cols(),
                Eigen::OuterStride<>(x.outerStride()));
  } else {
    detail::parallel_for(m, x.cols(), [&](Index r, int) {
      detail::load_bf16(x.data() + (r0 + r) * x.outerStride(), buf.data() + r * buf.cols(),
                        x.cols());
    });
    return Rows(buf.data(), m, x.cols(), Eigen::OuterStride<>(buf.cols()));
  }
}

template <class Scalar>
template <class M>
double FusedLinearKD<Scalar>::max_row_norm(const char* name, const M& x) {
  Scalar m = 0;
  for (Index i = 0; i < x.rows(); ++i)
    m = detail::max_nan(m, read_row(x, i).matrix().squaredNorm());
  if (detail::is_finite(m)) return std::sqrt(double(m));
  const std::string why = detail::bad_element(name, x, false);
  if (!why.empty()) detail::throw_invalid(kName, why);
  double big = 0;  // finite entries whose squares overflow
  for (Index i = 0; i < x.rows(); ++i)
    big = std::max(big, double(read_row(x, i).matrix().stableNorm()));
  return big;
}

template <class Scalar>
template <class In>
const Scalar* FusedLinearKD<Scalar>::bias_of(const char* name, const ConstVectorRef<In>* b,
                                             Vector<Scalar>& buf, double& bound) {
  bound = 0;
  if (!b || b->size() == 0) return nullptr;
  const Scalar* data;
  if constexpr (std::is_same<In, Scalar>::value) {
    (void)buf;
    data = b->data();
  } else {
    buf.resize(b->size());
    detail::load_bf16(b->data(), buf.data(), b->size());
    data = buf.data();
  }
  const Eigen::Map<const Vector<Scalar>> v(data, b->size());
  const Scalar m = v.cwiseAbs().template maxCoeff<Eigen::PropagateNaN>();
  if (!detail::is_finite(m)) detail::throw_invalid(kName, detail::bad_element(name, v, false));
  bound = double(m);
  return data;
}

template <class Scalar>
template <class M>
double FusedLinearKD<Scalar>::check_teacher_logits(const M& t, const ConstLabelsRef& labels) {
  constexpr Scalar ninf = -std::numeric_limits<Scalar>::infinity();
  const Divergence kind = options_.divergence.divergence;
  const bool reverse = kind == Divergence::ReverseKL ||
                       (kind == Divergence::SkewReverseKL && options_.divergence.skew == Scalar(0));
  double bound = 0;
  for (Index i = 0; i < t.rows(); ++i) {
    if (labels(i) == -100) continue;
    const auto row = read_row(t, i);
    const Scalar m = row.template maxCoeff<Eigen::PropagateNaN>();
    const Scalar lo = row.minCoeff();
    if (!detail::is_finite(m) || !detail::is_finite(lo)) {
      std::string why = detail::bad_element_in_row("teacher_logits", t, i, true);
      if (!why.empty()) detail::throw_invalid(kName, why);
      if (m == ninf)
        detail::throw_numerical(kName, detail::all_neg_inf_row("teacher_logits", t, i));
      if (reverse) {
        for (Index j = 0; j < t.cols(); ++j)
          if (row(j) == ninf)
            detail::throw_numerical(kName,
                                    detail::element_str("teacher_logits", i, j, double(ninf)) +
                                        " where the student's probability is positive: the "
                                        "divergence is infinite");
      }
      bound = std::max(bound, double((row > ninf).select(row.abs(), Scalar(0)).maxCoeff()));
    } else {
      bound = std::max(bound, std::max(double(m), -double(lo)));
    }
  }
  return bound;
}

template <class Scalar>
Scalar FusedLinearKD<Scalar>::run(const Inputs& in, MatrixRef<Scalar>* d_h, MatrixRef<Scalar>* d_w,
                                  VectorRef<Scalar>* d_b) {
  return run_rows(in, d_h, d_w, d_b);
}
template <class Scalar>
Scalar FusedLinearKD<Scalar>::run(const In16& in, MatrixRef<Scalar>* d_h, MatrixRef<Scalar>* d_w,
                                  VectorRef<Scalar>* d_b) {
  return run_rows(in, d_h, d_w, d_b);
}
template <class Scalar>
Scalar FusedLinearKD<Scalar>::run(const In16& in, MatrixRef<bfloat16>* d_h,
                                  MatrixRef<bfloat16>* d_w, VectorRef<bfloat16>* d_b) {
  return run_rows(in, d_h, d_w, d_b);
}

template <class Scalar>
template <class In, class G>
Scalar FusedLinearKD<Scalar>::run_rows(const InputsOf<In>& in, MatrixRef<G>* d_h, MatrixRef<G>* d_w,
                                       VectorRef<G>* d_b) {
  constexpr bool staged = !std::is_same<In, Scalar>::value;
  constexpr bool round = std::is_same<G, bfloat16>::value;
  validate();
  const ConstMatrixRef<In>& hs = *in.h_s;
  const ConstMatrixRef<In>& ws = *in.w_s;
  const ConstLabelsRef& labels = *in.labels;
  const Index n = hs.rows(), d = hs.cols(), v = ws.rows();
  detail::check_nonempty(kName, "h_s", n, d);
  detail::check_nonempty(kName, "w_s", v, ws.cols());
  detail::check_shape(kName, "w_s", ws, v, d, "V x d, the nn.Linear layout");
  const bool heads = in.logits_t == nullptr;
  if (heads) {
    detail::check_nonempty(kName, "h_t", in.h_t->rows(), in.h_t->cols());
    detail::check_shape(kName, "h_t", *in.h_t, n, in.h_t->cols(), "one row per row of h_s");
    detail::check_shape(kName, "w_t", *in.w_t, v, in.h_t->cols(), "V x d_t");
  } else {
    detail::check_shape(kName, "teacher_logits", *in.logits_t, n, v, "N x V");
  }
  const bool bias_s = in.b_s && in.b_s->size() > 0, bias_t = in.b_t && in.b_t->size() > 0;
  if (bias_s) detail::check_length(kName, "b_s", *in.b_s, v, "one per class, or empty");
  if (bias_t) detail::check_length(kName, "b_t", *in.b_t, v, "one per class, or empty");
  if (d_h) detail::check_shape(kName, "d_h_s", *d_h, n, d, "same as h_s");
  if (d_w) detail::check_shape(kName, "d_w_s", *d_w, v, d, "same as w_s");
  if (d_b) detail::check_length(kName, "d_b_s", *d_b, in.b_s->size(), "same as b_s");
  detail::check_length(kName, "labels", labels, n, "one label per row");
  Index used = 0;
  for (Index i = 0; i < n; ++i) {
    if (labels(i) == -100) continue;
    if (labels(i) < 0 || labels(i) >= v)
      detail::throw_invalid(kName, "labels[" + std::to_string(i) + "] is " +
                                       std::to_string(labels(i)) +
                                       ", expected -100 or a class in "
                                       "[0, " +
                                       std::to_string(v) + ")");
    ++used;
  }

  // |s_ij| ≤ ‖h_s,i‖·‖w_s,j‖ + |b_j| (Cauchy–Schwarz), likewise for the teacher.
  double bias_bound_s = 0, bias_bound_t = 0;
  const Scalar* b_s = bias_of("b_s", bias_s ? in.b_s : nullptr, b_s16_, bias_bound_s);
  const Scalar* b_t = bias_of("b_t", bias_t ? in.b_t : nullptr, b_t16_, bias_bound_t);
  const double hs_norm = max_row_norm("h_s", hs), ws_norm = max_row_norm("w_s", ws);
  const double bound_s = hs_norm * ws_norm + bias_bound_s;
  const double bound_t =
      heads ? max_row_norm("h_t", *in.h_t) * max_row_norm("w_t", *in.w_t) + bias_bound_t
            : check_teacher_logits(*in.logits_t, labels);
  if (used == 0) {
    ws_.row_value.setZero(n);
    return Scalar(0);
  }

  const auto& div = options_.divergence;
  const Scalar temp = div.temperature, inv_t = Scalar(1) / temp;
  const Scalar t2 = div.scale_by_t2 ? temp * temp : Scalar(1);
  const Scalar soft = options_.soft_weight * div.weight * t2, hard = options_.hard_weight;
  const Scalar soft_g = soft * inv_t / Scalar(used), hard_g = hard / Scalar(used);
  {
    // Each row's term is at most its logits' range over T plus log V (both the divergences and
    // the cross-entropy). A row's gradient has an L1 norm of at most a few times its scale,
    // except where it carries log(q/p): the reverse KL's q ⊙ (log q − log p − D) reaches the
    // range itself (and the reverse skew's, whose mixture bounds the log by log(1/λ)).
    const double top = double(std::numeric_limits<Scalar>::max()) / 16;
    const double range = 2 * (bound_s + bound_t) * std::max(1.0, double(inv_t));
    const double per_row = (double(soft) + double(hard)) * (range + std::log(double(v)) + 1);
    double log_ratio = 0;
    if (div.divergence == Divergence::ReverseKL) log_ratio = range;
    if (div.divergence == Divergence::SkewReverseKL)
      log_ratio = div.skew > Scalar(0) ? std::min(range, -std::log(double(div.skew))) : range;
    const double g_row = (8 + 4 * log_ratio) * (double(soft_g) + double(hard_g));
    const double g_max = g_row * std::max({ws_norm, double(n) * hs_norm, double(n)});
    if (!(range < top && per_row * double(n) < top && g_max < top))
      detail::throw_numerical(kName,
                              "the logits, the loss or a gradient could overflow the scalar type: "
                              "max|logit| is bounded only by " +
                                  std::to_string(std::max(bound_s, bound_t)) +
                                  " (max row norm of the hidden states times that of the head "
                                  "weights) with these options' scales");
  }

  const Index chunk = std::min(options_.chunk_rows, n);
  const Index d_t = heads ? in.h_t->cols() : 0;
  logits_s_.resize(chunk, v);
  if (heads) logits_t_.resize(chunk, v);
  if (d_b && bias_s) ones_.setOnes(chunk);
  ws_.prepare(n, v, 0, kBuffers, heads ? 0 : detail::staged_rows<Scalar, In>(1));
  if (staged) {
    h_s16_.resize(chunk, d);
    if (heads) h_t16_.resize(chunk, d_t);
    w16_.resize(std::min(kBlock, v), std::max(d, d_t));
  }
  if (round && d_h) {
    d_h16_.resize(chunk, d);
    d_w16_.resize(std::min(kBlock, v), d);
    if (d_b && bias_s) d_b16_.setZero(v);
  }
  const Divergence kind = div.divergence;
  const Scalar mix = kind == Divergence::GeneralizedJSD ? div.beta : div.skew;
  const Scalar soft_row = soft, hard_row = hard;
  using BiasRow = Eigen::Map<const detail::RowArray<Scalar>>;

  // The products go over blocks of kBlock head rows, the rows of a bfloat16 head read into w16_
  // block by block (twice per chunk for the student's: forward, then backward).
  auto head_product = [&](auto& out, const Rows& h, const ConstMatrixRef<In>& w) {
    for (Index v0 = 0; v0 < v; v0 += kBlock) {
      const Index vb = std::min(kBlock, v - v0);
      const Rows wb = rows_of(w, v0, vb, w16_);
      detail::tiled_product(out.middleCols(v0, vb), h, wb.transpose(), Scalar(1), false);
    }
  };
  for (Index r0 = 0; r0 < n; r0 += chunk) {
    const Index m = std::min(chunk, n - r0);
    auto s = logits_s_.topRows(m);
    const Rows h = rows_of(hs, r0, m, h_s16_);  // kept in h_s16_ for the backward products
    head_product(s, h, ws);
    if (bias_s) s.array().rowwise() += BiasRow(b_s, v);
    if (heads) {
      auto t = logits_t_.topRows(m);
      head_product(t, rows_of(*in.h_t, r0, m, h_t16_), *in.w_t);
      if (bias_t) t.array().rowwise() += BiasRow(b_t, v);
    }
    // Each row's logits become its gradient dL/ds_i in place (the logits copied to a buffer).
    detail::parallel_for(m, 16 * v, [&](Index r, int thread) {
      const Index i = r0 + r;
      detail::RowMap<Scalar> g = detail::row_map(logits_s_, r);
      if (labels(i) == -100) {
        ws_.row_value(i) = Scalar(0);
        g.setZero();
        return;
      }
      detail::RowMap<Scalar> x = ws_.buffer(thread, kBuffers, 0);
      x = g;
      detail::DivergenceBuffers<Scalar> b{
          ws_.buffer(thread, kBuffers, 1), ws_.buffer(thread, kBuffers, 2),
          ws_.buffer(thread, kBuffers, 3), ws_.buffer(thread, kBuffers, 4),
          ws_.buffer(thread, kBuffers, 5)};
      const auto t = heads ? detail::const_row_map(logits_t_, r)
                           : detail::input_row(*in.logits_t, i, ws_, thread, 0);
      const Scalar dv = detail::divergence_row_student(kind, mix, x, t, inv_t, b, g, soft_g);
      Scalar ce = 0;
      if (hard_row > Scalar(0)) {
        const int y = labels(i);
        const detail::ShiftedExp<Scalar> z = detail::shifted_exp(x, Scalar(1), b.q);
        ce = (z.x_max - x(y)) + std::log(z.sum);
        g += b.q * (hard_g / z.sum);
        g(y) -= hard_g;
      }
      ws_.row_value(i) = soft_row * dv + hard_row * ce;
    });
    if (!d_h) continue;
    // dL/dh_s = Σ_blocks g_block w_block, dL/dw_s,block = g_blockᵀ h; bfloat16 buffers get
    // the float sums rounded: d_h's chunk rows once, d_w's block rows once per chunk.
    for (Index v0 = 0; v0 < v; v0 += kBlock) {
      const Index vb = std::min(kBlock, v - v0);
      const Rows wb = rows_of(ws, v0, vb, w16_);
      const auto gb = s.middleCols(v0, vb);
      if constexpr (round) {
        detail::tiled_product(d_h16_.topRows(m), gb, wb, Scalar(1), v0 > 0);
        detail::tiled_product(d_w16_.topRows(vb), gb.transpose(), h, Scalar(1), false);
        detail::parallel_for(vb, d, [&](Index j, int) {
          detail::add_to_bf16(&(*d_w)(v0 + j, 0), d_w16_.data() + j * d, d);
        });
      } else {
        detail::tiled_product(d_h->middleRows(r0, m), gb, wb, Scalar(1), true);
        detail::tiled_product(d_w->middleRows(v0, vb), gb.transpose(), h, Scalar(1), true);
      }
    }
    if constexpr (round) {
      detail::parallel_for(m, d, [&](Index r, int) {
        detail::add_to_bf16(&(*d_h)(r0 + r, 0), d_h16_.data() + r * d, d);
      });
      if (d_b && bias_s) d_b16_.noalias() += s.transpose() * ones_.head(m);
    } else {
      if (d_b && bias_s) d_b->noalias() += s.transpose() * ones_.head(m);
    }
  }
  if constexpr (round) {
    if (d_h && d_b && bias_s) detail::add_to_bf16(d_b->data(), d_b16_.data(), v);
  }
  return ws_.row_value.sum() / Scalar(used);
}

MMKD_EXTERN_TEMPLATE(FusedLinearKD)

}  // namespace mmkd
