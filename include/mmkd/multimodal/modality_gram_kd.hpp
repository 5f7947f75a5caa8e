#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/normalize.hpp"
#include "mmkd/core/parallel.hpp"
#include "mmkd/core/tensor.hpp"
#include "mmkd/core/types.hpp"
#include "mmkd/detail/row_loss.hpp"

namespace mmkd {

/// How the rows (one embedding per modality) are normalised before the Gram is formed.
enum class GramNormalization {
  Cosine,    //!< rows L2-normalised: G_mm' = cos(f_m, f_m') (default)
  Raw,       //!< G = F Fᵀ / D (D = the embedding width of that network)
  Frobenius  //!< G = F Fᵀ / ‖F Fᵀ‖_F
};

/// Whether each sample's Gram is matched, or the batch-mean Gram.
enum class GramScope { PerSample, Batch };

/**
 * Modality-level Gram relation distillation: per sample, the M x M Gram matrix of the modality
 * embeddings (cosine similarities between modalities, by default) of the student is matched to
 * the teacher's, by MSE.
 *
 *     U_i = rownorm(F_i) ∈ R^{M x D},  G_i = U_i U_iᵀ,   L = weight · (1/P) Σ_i ‖G_i^S − G_i^T‖_F²
 *
 * with F_i row m = sample i's embedding of modality m, and P = N·M² (or, with a presence mask,
 * the number of present (m, m') pairs, summed over samples: only present pairs are compared). The
 * student and teacher widths may differ (Ds ≠ Dt): the Gram is M x M either way. `GramScope::Batch`
 * matches the batch-mean Grams instead (entry (m, m') averaged over the samples that have both),
 * with P = the number of (m, m') entries compared. Zero-norm rows are handled as PyTorch's
 * `F.normalize`: u = f / max(‖f‖, eps).
 *
 * The paper's method section could not be read; the reference note's reading is the default
 * (per-sample Gram of cosine-normalised pooled embeddings, MSE over N·M²).
 *
 * Gradient (cosine, per sample): dL/dU_i = (4/P)(G_i^S − G_i^T) U_i, then through the row
 * normalisation. The teacher gets its gradient through the overload with `d_teacher`.
 *
 * \pre  student M x N x Ds and teacher M x N x Dt (modality-major); mask N x M of 0/1.
 * \post `value_and_grad` adds to the gradient buffers; on any exception nothing is written.
 *
 * Reference:
 * @code
 * @article{liu2021gram,
 *   title   = {Multi-Modality Distillation via Learning the Teacher's Modality-Level Gram Matrix},
 *   author  = {Liu, Peng}, journal = {arXiv preprint arXiv:2112.11447}, year = {2021}}
 * @endcode
 *
 * **Example**:
 * @code
 * mmkd::ModalityGramKD<float> gram;                         // cosine rows, per sample
 * float loss = gram.value_and_grad(student_emb, teacher_emb, d_student_emb);  // M x N x D
 * @endcode
 */
template <class Scalar = float>
class ModalityGramKD : detail::FloatingScalar<Scalar> {
 public:
  //! The options; the defaults are those of the reference implementation.
  struct Options {
    GramNormalization normalization =
        GramNormalization::Cosine;  //!< how embeddings are normalised before the Gram matrix
    GramScope scope = GramScope::PerSample;  //!< Gram matrices per sample (M x M) or per modality
                                             //!< over the batch (N x N)
    Scalar eps = Scalar(1e-12);              //!< norm guard, > 0
    Scalar weight = Scalar(1);               //!< ≥ 0, scales value and gradient
  };

  ModalityGramKD() : ModalityGramKD(Options{}) {}
  //! Throws InvalidArgument for an invalid option.
  explicit ModalityGramKD(const Options& options) : options_(options) { validate(); }

  //! The options; may be changed between calls (validated at every call).
  Options& options() { return options_; }
  //! The options.
  const Options& options() const { return options_; }

  //! The loss of M x N x D student and teacher embeddings.
  Scalar value(const ConstTensor3Ref<Scalar>& student, const ConstTensor3Ref<Scalar>& teacher) {
    return run(student, teacher, nullptr, nullptr, nullptr);
  }
  //! With a presence mask (N x M, 1 = sample i has modality m).
  Scalar value(const ConstTensor3Ref<Scalar>& student, const ConstTensor3Ref<Scalar>& teacher,
               const ConstPresenceMaskRef& mask) {
    return run(student, teacher, &mask, nullptr, nullptr);
  }
  //! The loss; adds dL/d(student) to `d_student`.
  Scalar value_and_grad(const ConstTensor3Ref<Scalar>& student,
                        const ConstTensor3Ref<Scalar>& teacher, Tensor3Ref<Scalar> d_student) {
    return run(student, teacher, nullptr, &d_student, nullptr);
  }
  //! With a presence mask; adds dL/d(student) to `d_student`.
  Scalar value_and_grad(const ConstTensor3Ref<Scalar>& student,
                        const ConstTensor3Ref<Scalar>& teacher, const ConstPresenceMaskRef& mask,
                        Tensor3Ref<Scalar> d_student) {
    return run(student, teacher, &mask, &d_student, nullptr);
  }
  //! Also adds dL/d(teacher) (a trainable teacher or projection head).
  Scalar value_and_grad(const ConstTensor3Ref<Scalar>& student,
                        const ConstTensor3Ref<Scalar>& teacher, Tensor3Ref<Scalar> d_student,
                        Tensor3Ref<Scalar> d_teacher) {
    return run(student, teacher, nullptr, &d_student, &d_teacher);
  }
  //! With a presence mask; adds to both gradients.
  Scalar value_and_grad(const ConstTensor3Ref<Scalar>& student,
                        const ConstTensor3Ref<Scalar>& teacher, const ConstPresenceMaskRef& mask,
                        Tensor3Ref<Scalar> d_student, Tensor3Ref<Scalar> d_teacher) {
    return run(student, teacher, &mask, &d_student, &d_teacher);
  }

  //! Frees the scratch memory kept between calls.
  void release_workspace() {
    for (Side* side : {&s_, &t_}) *side = Side();
    diff_ = Matrix<Scalar>();
    per_sample_ = Vector<Scalar>();
  }

 private:
  static constexpr const char* kName = "ModalityGramKD";

  // Per network: normalised rows, norms, per-sample Grams (N x M²), their gradients, dF scratch.
  struct Side {
    Matrix<Scalar> u, df;
    Vector<Scalar> norms;
    Matrix<Scalar> gram, dgram;
  };

  void validate() const {
    detail::check_enum(kName, "normalization", options_.normalization, 3);
    detail::check_enum(kName, "scope", options_.scope, 2);
    detail::check_positive(kName, "eps", options_.eps);
    detail::check_nonnegative(kName, "weight", options_.weight);
  }

  template <class F>
  void prepare_side(Side& side, const F& f, Index n, Index m) {
    const Index rows = f.rows(), d = f.cols();
    side.norms.resize(rows);
    side.gram.resize(n, m * m);
    side.dgram.resize(n, m * m);
    side.df.resize(rows, d);
    if (options_.normalization == GramNormalization::Cosine) side.u.resize(rows, d);
  }

  // Row m of sample i of the (possibly normalised) features.
  template <class F>
  auto row(const Side& side, const F& f, Index i, Index m, Index n) const {
    const bool cosine = options_.normalization == GramNormalization::Cosine;
    const Scalar* base = cosine ? side.u.data() : f.data();
    return Eigen::Map<const Eigen::Matrix<Scalar, 1, Eigen::Dynamic>>(base + (m * n + i) * f.cols(),
                                                                      f.cols());
  }

  // Sample i: normalise its rows (cosine) and form its Gram (present pairs; others 0).
  template <class F>
  void forward_sample(Side& side, const F& f, Index i, Index n, Index m,
                      detail::PresenceSelect present) {
    if (options_.normalization == GramNormalization::Cosine) {
      for (Index a = 0; a < m; ++a) {
        if (!present(i, a)) continue;
        const Index k = a * n + i;
        l2_normalize_rows(f.row(k), side.u.row(k), side.norms.segment(k, 1), options_.eps);
      }
    }
    const Scalar scale =
        options_.normalization == GramNormalization::Raw ? Scalar(1) / Scalar(f.cols()) : Scalar(1);
    for (Index a = 0; a < m; ++a) {
      for (Index b = a; b < m; ++b) {
        const Scalar g = present(i, a) && present(i, b)
                             ? scale * row(side, f, i, a, n).dot(row(side, f, i, b, n))
                             : Scalar(0);
        side.gram(i, a * m + b) = g;
        side.gram(i, b * m + a) = g;
      }
    }
  }

  // Sample i: dG (symmetric, in side.dgram) -> dF rows of the sample, into side.df.
  template <class F>
  void backward_sample(Side& side, const F& f, Index i, Index n, Index m,
                       detail::PresenceSelect present, int thread) {
    const bool cosine = options_.normalization == GramNormalization::Cosine;
    const Scalar scale =
        options_.normalization == GramNormalization::Raw ? Scalar(1) / Scalar(f.cols()) : Scalar(1);
    for (Index a = 0; a < m; ++a) {
      const Index k = a * n + i;
      auto out = side.df.row(k);
      out.setZero();
      if (!present(i, a)) continue;
      // dU_a = 2 · scale · Σ_b dG_ab u_b (dG symmetric); the cosine case goes through the norm.
      Eigen::Map<Eigen::Matrix<Scalar, 1, Eigen::Dynamic>> du(
          cosine ? thread_du_.row(thread).data() : out.data(), f.cols());
      if (cosine) du.setZero();
      for (Index b = 0; b < m; ++b) {
        const Scalar c = 2 * scale * side.dgram(i, a * m + b);
        if (c != Scalar(0)) du.noalias() += c * row(side, f, i, b, n);
      }
      if (cosine)
        l2_normalize_rows_backward(side.u.row(k), side.norms.segment(k, 1), du, out, options_.eps);
    }
  }

  // dL/dĜ = sign · (Ĝ^S − Ĝ^T) for sample (or batch) row r, back through the Frobenius norm.
  void gram_grad(Index r, Scalar sign,
                 const Eigen::Ref<const Eigen::Matrix<Scalar, 1, Eigen::Dynamic>>& ghat, Scalar nrm,
                 Eigen::Ref<Eigen::Matrix<Scalar, 1, Eigen::Dynamic>> dg) const {
    dg = sign * diff_.row(r);
    if (options_.normalization == GramNormalization::Frobenius) fro_backward(dg, ghat, nrm);
  }

  // Frobenius normalisation of one Gram (as a row of M² entries): forward in place, returns ‖G‖.
  Scalar fro_forward(Eigen::Ref<Eigen::Matrix<Scalar, 1, Eigen::Dynamic>> g) const {
    const Scalar nrm = g.norm();
    g /= std::max(nrm, options_.eps);
    return nrm;
  }
  // dL/dG from dL/dĜ for Ĝ = G / max(‖G‖, eps), in place.
  void fro_backward(Eigen::Ref<Eigen::Matrix<Scalar, 1, Eigen::Dynamic>> dg,
                    const Eigen::Ref<const Eigen::Matrix<Scalar, 1, Eigen::Dynamic>>& ghat,
                    Scalar nrm) const {
    if (nrm > options_.eps) {
      dg = (dg - dg.dot(ghat) * ghat) / nrm;
    } else {
      dg /= options_.eps;
    }
  }

  Scalar run(const ConstTensor3Ref<Scalar>& st, const ConstTensor3Ref<Scalar>& tt,
             const ConstPresenceMaskRef* mask, Tensor3Ref<Scalar>* ds, Tensor3Ref<Scalar>* dt);

  template <class Rows>
  static void commit(const Matrix<Scalar>& src, Tensor3Ref<Scalar>& dst, Rows&& rows) {
    auto out = detail::as_matrix(dst);
    for (Index k = 0; k < out.rows(); ++k) {
      if (rows(k)) out.row(k) += src.row(k);
    }
  }

  template <class F>
  [[noreturn]] void diagnose(const F& fs, const F& ft, Index n,
                             detail::PresenceSelect present) const {
    for (Index k = 0; k < fs.rows(); ++k) {
      if (!present(k % n, k / n)) continue;
      std::string why = detail::bad_element_in_row("student", fs, k, false);
      if (why.empty()) why = detail::bad_element_in_row("teacher", ft, k, false);
      if (!why.empty()) {
        detail::throw_numerical(kName, why + " (modality " + std::to_string(k / n) + ", sample " +
                                           std::to_string(k % n) + ")");
      }
    }
    detail::throw_numerical(kName, "the loss overflows (embeddings too large for the scalar type)");
  }

  Options options_;
  Side s_, t_;
  Matrix<Scalar> diff_, mean_s_, mean_t_, pair_count_, dmean_, thread_du_;
  Vector<Scalar> per_sample_, norms_s_, norms_t_;
};

template <class Scalar>
Scalar ModalityGramKD<Scalar>::run(const ConstTensor3Ref<Scalar>& st,
                                   const ConstTensor3Ref<Scalar>& tt,
                                   const ConstPresenceMaskRef* mask, Tensor3Ref<Scalar>* ds,
                                   Tensor3Ref<Scalar>* dt) {
  validate();
  const Index m = st.dimension(0), n = st.dimension(1), dsw = st.dimension(2),
              dtw = tt.dimension(2);
  if (m == 0 || n == 0 || dsw == 0) {
    detail::throw_invalid(kName, "student is empty (shape " + detail::shape_str3(m, n, dsw) + ")");
  }
  if (tt.dimension(0) != m || tt.dimension(1) != n || dtw == 0) {
    detail::throw_invalid(kName, "teacher has shape " +
                                     detail::shape_str3(tt.dimension(0), tt.dimension(1), dtw) +
                                     ", expected " + detail::shape_str3(m, n, dtw) +
                                     " (same modalities and samples as student, any width >= 1)");
  }
  if (mask) detail::check_presence(kName, *mask, n, m);
  if (ds) detail::check_shape3(kName, "d_student", *ds, m, n, dsw, "same as student");
  if (dt) detail::check_shape3(kName, "d_teacher", *dt, m, n, dtw, "same as teacher");
  const auto present = detail::presence(mask);
  const auto fs = detail::as_matrix(st);
  const auto ft = detail::as_matrix(tt);
  const bool fro = options_.normalization == GramNormalization::Frobenius;
  const bool batch = options_.scope == GramScope::Batch;

  prepare_side(s_, fs, n, m);
  prepare_side(t_, ft, n, m);
  thread_du_.resize(max_threads(), std::max(dsw, dtw));
  diff_.resize(batch ? 1 : n, m * m);
  per_sample_.resize(diff_.rows());
  norms_s_.resize(diff_.rows());
  norms_t_.resize(diff_.rows());

  // P: the number of Gram entries compared.
  Scalar count = 0;
  if (!batch) {
    for (Index i = 0; i < n; ++i) {
      Index k = 0;
      for (Index a = 0; a < m; ++a) k += present(i, a) ? 1 : 0;
      count += Scalar(k * k);
    }
  } else {
    pair_count_.setZero(1, m * m);
    for (Index i = 0; i < n; ++i) {
      for (Index e = 0; e < m * m; ++e)
        pair_count_(0, e) += present(i, e / m) && present(i, e % m) ? Scalar(1) : Scalar(0);
    }
    for (Index e = 0; e < m * m; ++e) count += pair_count_(0, e) > 0 ? Scalar(1) : Scalar(0);
  }
  const Scalar factor = count > 0 ? options_.weight / count : Scalar(0);
  const Scalar sign_s = 2 * factor, sign_t = -2 * factor;

  if (!batch) {
    // Everything about sample i (2·M rows) stays in cache: forward, loss, backward.
    detail::parallel_for(n, 4 * m * m * (dsw + dtw), [&](Index i, int thread) {
      forward_sample(s_, fs, i, n, m, present);
      forward_sample(t_, ft, i, n, m, present);
      if (fro) {
        norms_s_(i) = fro_forward(s_.gram.row(i));
        norms_t_(i) = fro_forward(t_.gram.row(i));
      }
      diff_.row(i) = s_.gram.row(i) - t_.gram.row(i);
      per_sample_(i) = diff_.row(i).squaredNorm();
      if (ds) {
        gram_grad(i, sign_s, s_.gram.row(i), norms_s_(i), s_.dgram.row(i));
        backward_sample(s_, fs, i, n, m, present, thread);
      }
      if (dt) {
        gram_grad(i, sign_t, t_.gram.row(i), norms_t_(i), t_.dgram.row(i));
        backward_sample(t_, ft, i, n, m, present, thread);
      }
    });
  } else {
    // Batch means over the samples that have both modalities of an entry.
    mean_s_.setZero(1, m * m);
    mean_t_.setZero(1, m * m);
    detail::parallel_for(n, 2 * m * m * (dsw + dtw), [&](Index i, int) {
      forward_sample(s_, fs, i, n, m, present);
      forward_sample(t_, ft, i, n, m, present);
    });
    for (Index i = 0; i < n; ++i) {  // in sample order, for any thread count
      mean_s_ += s_.gram.row(i);
      mean_t_ += t_.gram.row(i);
    }
    for (Index e = 0; e < m * m; ++e) {
      const Scalar c = pair_count_(0, e);
      mean_s_(0, e) = c > 0 ? mean_s_(0, e) / c : Scalar(0);
      mean_t_(0, e) = c > 0 ? mean_t_(0, e) / c : Scalar(0);
    }
    if (fro) {
      norms_s_(0) = fro_forward(mean_s_.row(0));
      norms_t_(0) = fro_forward(mean_t_.row(0));
    }
    diff_.row(0) = mean_s_ - mean_t_;
    per_sample_(0) = diff_.row(0).squaredNorm();
    dmean_.resize(2, m * m);
    if (ds) gram_grad(0, sign_s, mean_s_.row(0), norms_s_(0), dmean_.row(0));
    if (dt) gram_grad(0, sign_t, mean_t_.row(0), norms_t_(0), dmean_.row(1));
    for (Index e = 0; e < m * m; ++e) {
      if (pair_count_(0, e) > 0) dmean_.col(e) /= pair_count_(0, e);
    }
    detail::parallel_for(n, 2 * m * m * (dsw + dtw), [&](Index i, int thread) {
      for (int side = 0; side < 2; ++side) {
        if ((side == 0 && !ds) || (side == 1 && !dt)) continue;
        Side& sd = side == 0 ? s_ : t_;
        for (Index e = 0; e < m * m; ++e) {
          sd.dgram(i, e) = present(i, e / m) && present(i, e % m) ? dmean_(side, e) : Scalar(0);
        }
        if (side == 0) {
          backward_sample(s_, fs, i, n, m, present, thread);
        } else {
          backward_sample(t_, ft, i, n, m, present, thread);
        }
      }
    });
  }

  const Scalar raw = per_sample_.sum();
  if (!detail::is_finite(raw)) diagnose(fs, ft, n, present);
  const Scalar value = detail::scaled_value(kName, factor, raw, Scalar(0));
  if ((ds && !detail::all_finite(s_.df)) || (dt && !detail::all_finite(t_.df))) {
    detail::throw_numerical(kName,
                            "the gradient overflows (embeddings too large for the scalar type)");
  }
  auto rows = [&](Index k) { return present(k % n, k / n); };
  if (ds) commit(s_.df, *ds, rows);
  if (dt) commit(t_.df, *dt, rows);
  return value;
}

MMKD_EXTERN_TEMPLATE(ModalityGramKD)

}  // namespace mmkd
