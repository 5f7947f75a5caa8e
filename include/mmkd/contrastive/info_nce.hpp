#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/module.hpp"
#include "mmkd/core/normalize.hpp"
#include "mmkd/core/types.hpp"
#include "mmkd/detail/products.hpp"
#include "mmkd/detail/row_loss.hpp"
#include "mmkd/detail/softmax_kernels.hpp"

namespace mmkd {

/**
 * InfoNCE between student queries and teacher keys (the CMC loss of cross-modality contrastive
 * distillation): each query must pick out its positive key among all keys. Symmetric by default
 * (CLIP: the mean of the query→key and key→query directions).
 *
 * @code
 * U = normalize(Q) (N x D),   V = normalize(K) (K' x D),   S = U Vᵀ / τ
 * positive of query i: key p(i) = i + offset
 * L_q→k = Σ_i ( lse_j S_ij − S_i,p(i) )
 * L_k→q = Σ_i ( lse_r S_r,p(i) − S_i,p(i) )
 * L     = weight / G · L_q→k,   or weight / G · (L_q→k + L_k→q) / 2 when symmetric
 * G     = global_batch, or N when it is 0
 * @endcode
 *
 * Matches open_clip `ClipLoss` (symmetric) and the one-directional InfoNCE of the reference note;
 * τ = 0.07 (CLIP's initial value). With `learn_temperature`, 1/τ = exp(θ) with θ a parameter of
 * this object (initialised to log(1/temperature), exposed by `parameters()` / `gradients()`,
 * dL/dθ = Σ dL/dS ∘ S) and clamped to [0, ln 100] at the start of every call, as CLIP clamps after
 * each step.
 *
 * Data-parallel: a worker passes its local queries and the all-gathered keys with
 * `offset` = its first global index and `global_batch` = the total number of queries; summed
 * over workers, the one-directional losses and the key gradients are those of the whole batch.
 * The symmetric loss shards as two one-directional calls (queries→all keys, and local keys→all
 * queries), each with weight 1/2.
 *
 * Memory: `stream` computes S in blocks of `block_rows` query rows (online column
 * log-sum-exp for the symmetric term; blocks are recomputed in the backward pass), so memory is
 * O((N + K')·D + block·K') instead of O(N·K'). Blocked and unblocked agree to rounding.
 *
 * Gradients: dL/dS = c_r (rowsoftmax(S) − I⁺) + c_c (colsoftmax(S) − I⁺) on the positive
 * columns; dL/dU = (1/τ) dS V, dL/dV = (1/τ) dSᵀ U, then through the normalisation. S, dU and
 * dV are GEMMs. Keys get a gradient only through the overload with `d_keys`.
 *
 * Reference:
 * @code
 * @article{lin2024cmcd,
 *   title   = {A Generalization Theory of Cross-Modality Distillation with Contrastive Learning},
 *   author  = {Lin, Hangyu and Liu, Chen and Xu, Chengming and Gao, Zhengqi and Fu, Yanwei and
 *              Yao, Yuan}, journal = {arXiv preprint arXiv:2405.03355}, year = {2024}}
 * @endcode
 *
 * **Example**:
 * @code
 * mmkd::InfoNCE<float> nce;                                 // symmetric, τ = 0.07, normalised
 * float loss = nce.value_and_grad(student_emb, teacher_emb, d_student_emb);
 * @endcode
 */
template <class Scalar = float>
class InfoNCE : detail::FloatingScalar<Scalar> {
 public:
  //! The options; the defaults are those of the reference implementation.
  struct Options {
    Scalar temperature = Scalar(0.07);  //!< τ > 0, or the initial τ when learned
    bool learn_temperature = false;     //!< learn θ = log(1/τ) (CLIP)
    bool normalize = true;              //!< L2-normalise queries and keys
    bool symmetric = true;              //!< CLIP's two directions; false: query→key only
    Index offset = 0;                   //!< the positive of query i is key i + offset
    Index global_batch = 0;             //!< divisor G: queries over all workers (0: N)
    bool stream = false;                //!< stream S in row blocks (memory O(block·K'))
    Index block_rows = 256;             //!< rows per block when streaming, ≥ 1
    Scalar eps = Scalar(1e-12);         //!< norm guard, > 0
    Scalar weight = Scalar(1);          //!< ≥ 0
  };

  InfoNCE() : InfoNCE(Options{}) {}
  //! Throws InvalidArgument for an invalid option.
  explicit InfoNCE(const Options& options) : options_(options) {
    validate();
    log_scale_(0, 0) = std::log(Scalar(1) / options_.temperature);
    log_scale_grad_(0, 0) = 0;
  }

  //! The options; may be changed between calls (validated at every call).
  Options& options() { return options_; }
  //! The options.
  const Options& options() const { return options_; }

  //! The loss of N queries against K keys.
  Scalar value(const ConstMatrixRef<Scalar>& queries, const ConstMatrixRef<Scalar>& keys) {
    return run(queries, keys, nullptr, nullptr);
  }
  //! The loss; adds dL/d(queries) to `d_queries` (and to the learned temperature's gradient).
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& queries, const ConstMatrixRef<Scalar>& keys,
                        MatrixRef<Scalar> d_queries) {
    return run(queries, keys, &d_queries, nullptr);
  }
  //! Also adds dL/d(keys) to `d_keys`.
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& queries, const ConstMatrixRef<Scalar>& keys,
                        MatrixRef<Scalar> d_queries, MatrixRef<Scalar> d_keys) {
    return run(queries, keys, &d_queries, &d_keys);
  }

  //! The temperature in use: 1/exp(θ) when learned, else the option.
  Scalar temperature() const {
    return options_.learn_temperature ? std::exp(-log_scale_(0, 0)) : options_.temperature;
  }
  //! "log_scale" (θ = log 1/τ, 1 x 1); its gradient accumulates in `gradients()`.
  std::vector<ParameterView<Scalar>> parameters() { return {view("log_scale", log_scale_)}; }
  //! The parameter gradients, paired by position with parameters().
  std::vector<ParameterView<Scalar>> gradients() { return {view("log_scale", log_scale_grad_)}; }
  //! Sets the parameter gradients to zero.
  void zero_grad() { log_scale_grad_(0, 0) = 0; }

  //! Frees the scratch memory kept between calls.
  void release_workspace() {
    u_ = v_ = s_ = s_copy_ = du_ = dv_ = dq_ = dk_ = Matrix<Scalar>();
    qn_ = kn_ = row_lse_ = col_max_ = col_sum_ = Vector<Scalar>();
    col_lse_ = blk_max_ = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>();
  }

 private:
  static constexpr const char* kName = "InfoNCE";

  static ParameterView<Scalar> view(const char* name, Eigen::Matrix<Scalar, 1, 1>& m) {
    return {name, Eigen::Map<Matrix<Scalar>>(m.data(), 1, 1)};
  }

  void validate() const {
    detail::check_positive(kName, "temperature", options_.temperature);
    detail::check_positive(kName, "eps", options_.eps);
    detail::check_nonnegative(kName, "weight", options_.weight);
    if (options_.offset < 0) detail::throw_invalid(kName, "option offset must be >= 0");
    if (options_.global_batch < 0) detail::throw_invalid(kName, "option global_batch must be >= 0");
    if (options_.block_rows < 1) {
      detail::throw_invalid(
          kName, "option block_rows must be >= 1, got " + std::to_string(options_.block_rows));
    }
  }

  // S for query rows [r0, r0 + b) into the top b rows of s_ (sized for a full block).
  auto similarities(Index r0, Index b, Scalar scale) {
    auto s = s_.topRows(b);
    detail::tiled_product(s, u_.middleRows(r0, b), v_.transpose(), scale, false);
    return s;
  }

  Scalar run(const ConstMatrixRef<Scalar>& q, const ConstMatrixRef<Scalar>& k,
             MatrixRef<Scalar>* dq, MatrixRef<Scalar>* dk);

  [[noreturn]] void diagnose(const ConstMatrixRef<Scalar>& q,
                             const ConstMatrixRef<Scalar>& k) const {
    std::string why = detail::bad_element("queries", q, false);
    if (why.empty()) why = detail::bad_element("keys", k, false);
    if (!why.empty()) detail::throw_numerical(kName, why);
    detail::throw_numerical(kName,
                            "the loss overflows (similarities too large for the scalar type)");
  }

  Options options_;
  Eigen::Matrix<Scalar, 1, 1> log_scale_, log_scale_grad_;
  Matrix<Scalar> u_, v_, s_, s_copy_, du_, dv_, dq_, dk_;
  Vector<Scalar> qn_, kn_, row_lse_, col_max_, col_sum_;
  Eigen::Matrix<Scalar, 1, Eigen::Dynamic> blk_max_, col_lse_;
};

template <class Scalar>
Scalar InfoNCE<Scalar>::run(const ConstMatrixRef<Scalar>& q, const ConstMatrixRef<Scalar>& k,
                            MatrixRef<Scalar>* dq, MatrixRef<Scalar>* dk) {
  validate();
  const Index n = q.rows(), d = q.cols(), kk = k.rows(), off = options_.offset;
  detail::check_nonempty(kName, "queries", n, d);
  if (k.cols() != d || kk == 0) {
    detail::throw_invalid(kName, "keys has shape " + detail::shape_str(kk, k.cols()) +
                                     ", expected K'x" + std::to_string(d) +
                                     " with K' >= 1 (same width as queries)");
  }
  if (n + off > kk) {
    detail::throw_invalid(kName, "offset " + std::to_string(off) + " puts the positive of query " +
                                     std::to_string(n - 1) + " at key " +
                                     std::to_string(n - 1 + off) + ", but keys has " +
                                     std::to_string(kk) + " rows");
  }
  if (options_.global_batch > 0 && options_.global_batch < n) {
    detail::throw_invalid(kName, "option global_batch is " + std::to_string(options_.global_batch) +
                                     ", smaller than the " + std::to_string(n) +
                                     " queries of this call");
  }
  if (dq) detail::check_shape(kName, "d_queries", *dq, n, d, "same as queries");
  if (dk) detail::check_shape(kName, "d_keys", *dk, kk, d, "same as keys");
  if (options_.learn_temperature && !detail::is_finite(log_scale_(0, 0)))
    detail::throw_numerical(kName, detail::bad_entry("parameter", "log_scale", log_scale_));
  // θ clamped for this call; stored back only when the call succeeds (strong guarantee).
  const Scalar theta = options_.learn_temperature
                           ? std::min(std::max(log_scale_(0, 0), Scalar(0)), std::log(Scalar(100)))
                           : Scalar(0);
  const Scalar scale =
      options_.learn_temperature ? std::exp(theta) : Scalar(1) / options_.temperature;

  // Normalised (or copied) inputs: rows of u_ and v_.
  qn_.resize(n);
  kn_.resize(kk);
  u_.resize(n, d);
  v_.resize(kk, d);
  if (options_.normalize) {
    l2_normalize_rows(q, u_, qn_, options_.eps);
    l2_normalize_rows(k, v_, kn_, options_.eps);
  } else {
    u_ = q;
    v_ = k;
  }

  const bool sym = options_.symmetric;
  const Index block = options_.stream ? std::min(options_.block_rows, n) : n;
  const Index blocks = (n + block - 1) / block;
  constexpr Scalar ninf = -std::numeric_limits<Scalar>::infinity();
  row_lse_.resize(n);
  col_max_.setConstant(n, ninf);
  col_sum_.setZero(n);
  Scalar row_raw = 0, col_raw = 0;
  s_.resize(block, kk);
  if (sym || options_.learn_temperature) s_copy_.resize(block, kk);
  for (Index bi = 0; bi < blocks; ++bi) {
    const Index r0 = bi * block, b = std::min(block, n - r0);
    const auto s = similarities(r0, b, scale);
    for (Index i = 0; i < b; ++i) {
      row_lse_(r0 + i) = detail::log_sum_exp_row(s.row(i).array(), Scalar(1));
      row_raw += row_lse_(r0 + i) - s(i, r0 + i + off);
      if (sym) col_raw -= s(i, r0 + i + off);
    }
    if (sym) {
      // Online log-sum-exp down the positive columns, a row at a time (rows are contiguous):
      // new max, rescale the running sums, add the block's exponentials.
      const auto cols = s.middleCols(off, n);
      blk_max_ = cols.row(0);
      for (Index i = 1; i < b; ++i) blk_max_ = blk_max_.cwiseMax(cols.row(i));
      blk_max_ = blk_max_.cwiseMax(col_max_.transpose());
      col_sum_.array() *= (col_max_.transpose() - blk_max_)
                              .array()
                              .unaryExpr(detail::ExpShifted<Scalar>())
                              .transpose();
      for (Index i = 0; i < b; ++i) {
        col_sum_.array() +=
            (cols.row(i) - blk_max_).array().unaryExpr(detail::ExpShifted<Scalar>()).transpose();
      }
      col_max_ = blk_max_.transpose();
    }
  }
  if (sym) {
    col_lse_ = (col_max_.array() + col_sum_.array().log()).matrix().transpose();
    col_raw += col_lse_.sum();
  }
  const Scalar g = Scalar(options_.global_batch > 0 ? options_.global_batch : n);
  const Scalar c_row = options_.weight / g * (sym ? Scalar(0.5) : Scalar(1));
  const Scalar c_col = sym ? c_row : Scalar(0);
  const Scalar value = c_row * row_raw + c_col * col_raw;
  if (!detail::is_finite(value)) diagnose(q, k);
  if (!dq && !dk) {  // value(): no gradient of any kind, θ's included
    if (options_.learn_temperature) log_scale_(0, 0) = theta;
    return value;
  }

  // Backward, block by block (the last block's S is still in s_ when there is one block).
  if (dq) du_.setZero(n, d);
  if (dk) dv_.setZero(kk, d);
  Scalar d_log_scale = 0;
  for (Index bi = 0; bi < blocks; ++bi) {
    const Index r0 = bi * block, b = std::min(block, n - r0);
    auto ds = blocks > 1 ? similarities(r0, b, scale) : s_.topRows(b);
    const bool keep_raw = sym || options_.learn_temperature;  // column softmax and dθ need S
    auto raw = s_copy_.topRows(keep_raw ? b : 0);
    if (keep_raw) raw = ds;
    for (Index i = 0; i < b; ++i) {
      // Row part: c_r (softmax_j − onehot), in place over S.
      ds.row(i) =
          c_row *
          (ds.row(i).array() - row_lse_(r0 + i)).unaryExpr(detail::ExpShifted<Scalar>()).matrix();
      ds(i, r0 + i + off) -= c_row;
    }
    if (sym) {  // column part, on the positive columns, a (contiguous) row at a time
      for (Index i = 0; i < b; ++i) {
        ds.row(i).segment(off, n).array() +=
            c_col *
            (raw.row(i).segment(off, n) - col_lse_).array().unaryExpr(detail::ExpShifted<Scalar>());
        ds(i, r0 + i + off) -= c_col;
      }
    }
    // ds now holds dL/dS for the block.
    if (options_.learn_temperature) d_log_scale += (ds.array() * raw.array()).sum();
    if (dq) detail::tiled_product(du_.middleRows(r0, b), ds, v_, scale, true);
    if (dk) detail::tiled_product(dv_, ds.transpose(), u_.middleRows(r0, b), scale, true);
  }
  if (dq && options_.normalize) {
    dq_.setZero(n, d);
    l2_normalize_rows_backward(u_, qn_, du_, dq_, options_.eps);
  }
  if (dk && options_.normalize) {
    dk_.setZero(kk, d);
    l2_normalize_rows_backward(v_, kn_, dv_, dk_, options_.eps);
  }
  const Matrix<Scalar>& gq = options_.normalize ? dq_ : du_;
  const Matrix<Scalar>& gk = options_.normalize ? dk_ : dv_;
  if ((dq && !detail::all_finite(gq)) || (dk && !detail::all_finite(gk)) ||
      !detail::is_finite(d_log_scale)) {
    detail::throw_numerical(kName, "the gradient overflows");
  }
  if (dq) *dq += gq;
  if (dk) *dk += gk;
  if (options_.learn_temperature) {
    log_scale_(0, 0) = theta;
    log_scale_grad_(0, 0) += d_log_scale;
  }
  return value;
}

MMKD_EXTERN_TEMPLATE(InfoNCE)

}  // namespace mmkd
