#pragma once

#include <cmath>
#include <string>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/parallel.hpp"
#include "mmkd/core/tensor.hpp"
#include "mmkd/core/types.hpp"
#include "mmkd/detail/kl.hpp"
#include "mmkd/detail/row_loss.hpp"

namespace mmkd {

/// How the saliency of modality m for sample i is measured, from the teacher only.
enum class SaliencyKind {
  RemovalKL,  //!< s_im = KL(p(t_i) ‖ p(t_i without m)): how much the prediction changes (default)
  Sufficiency,  //!< s_im = exp(−KL(p(t_i) ‖ p(t_i^[m]))) ∈ (0, 1]: how well m alone suffices
  LabelProbability  //!< s_im = p(t_i^[m])_{y_i}: the teacher's probability of the label from m
                    //!< alone
};

/**
 * Saliency scores of each modality per sample (MSD, Jin et al. 2021): an N x M matrix computed
 * from the teacher's logits on the full input (`teacher`, N x C) and on each single-modality
 * input (`teacher_modal`, M x N x C, block m = logits with only modality m kept), at a
 * temperature T (default 1): p(t) = softmax(t/T).
 *
 * The paper's definitions could not be read (see the reference note); these are the three
 * readings it suggests, `RemovalKL` the default. For RemovalKL the teacher's logits with
 * modality m *removed* are needed: with M = 2 they are the other modality's block; for M > 2
 * pass them to `compute_removal`. When m is the only modality a sample has, removing it leaves
 * no information, and the drop-one prediction is taken as uniform: s_im = log C − H(p(t_i)).
 * Missing modalities (mask 0) score 0 and their logits are never read. The scores are constants
 * (no gradient): they are computed from the teacher's fixed logits only, so there is nothing to
 * differentiate (the reference note's reading; the paper's text on this was not available).
 *
 * **Example**:
 * @code
 * mmkd::ModalitySaliency<float> saliency;                     // removal KL, T = 1
 * const mmkd::Matrix<float>& s = saliency.compute(teacher, teacher_modal);  // N x M
 * @endcode
 */
template <class Scalar = float>
class ModalitySaliency : detail::FloatingScalar<Scalar> {
 public:
  //! The options; the defaults are those of the reference implementation.
  struct Options {
    SaliencyKind kind = SaliencyKind::RemovalKL;  //!< how a modality's importance is scored
    Scalar temperature = Scalar(1);               //!< T > 0
  };

  ModalitySaliency() : ModalitySaliency(Options{}) {}
  //! Throws InvalidArgument for an invalid option.
  explicit ModalitySaliency(const Options& options) : options_(options) { validate(); }

  //! The options; may be changed between calls (validated at every call).
  Options& options() { return options_; }
  //! The options.
  const Options& options() const { return options_; }

  //! The N x M scores from the teacher's logits and its per-modality logits.
  const Matrix<Scalar>& compute(const ConstMatrixRef<Scalar>& teacher,
                                const ConstTensor3Ref<Scalar>& teacher_modal) {
    return run(teacher, teacher_modal, nullptr, nullptr, false);
  }
  //! With a presence mask (N x M; missing modalities score 0).
  const Matrix<Scalar>& compute(const ConstMatrixRef<Scalar>& teacher,
                                const ConstTensor3Ref<Scalar>& teacher_modal,
                                const ConstPresenceMaskRef& mask) {
    return run(teacher, teacher_modal, nullptr, &mask, false);
  }
  //! For `LabelProbability`, which needs the labels.
  const Matrix<Scalar>& compute(const ConstMatrixRef<Scalar>& teacher,
                                const ConstTensor3Ref<Scalar>& teacher_modal,
                                const ConstLabelsRef& labels) {
    return run(teacher, teacher_modal, &labels, nullptr, false);
  }
  //! With the labels and a presence mask.
  const Matrix<Scalar>& compute(const ConstMatrixRef<Scalar>& teacher,
                                const ConstTensor3Ref<Scalar>& teacher_modal,
                                const ConstLabelsRef& labels, const ConstPresenceMaskRef& mask) {
    return run(teacher, teacher_modal, &labels, &mask, false);
  }
  //! `RemovalKL` for any M: block m of `teacher_drop_one` holds the teacher's logits on the
  //! input with modality m removed.
  const Matrix<Scalar>& compute_removal(const ConstMatrixRef<Scalar>& teacher,
                                        const ConstTensor3Ref<Scalar>& teacher_drop_one) {
    return run(teacher, teacher_drop_one, nullptr, nullptr, true);
  }
  //! `RemovalKL` with a presence mask.
  const Matrix<Scalar>& compute_removal(const ConstMatrixRef<Scalar>& teacher,
                                        const ConstTensor3Ref<Scalar>& teacher_drop_one,
                                        const ConstPresenceMaskRef& mask) {
    return run(teacher, teacher_drop_one, nullptr, &mask, true);
  }

  //! The scores of the last call, N x M.
  const Matrix<Scalar>& scores() const { return scores_; }

 private:
  static constexpr const char* kName = "ModalitySaliency";

  void validate() const {
    detail::check_enum(kName, "kind", options_.kind, 3);
    detail::check_positive(kName, "temperature", options_.temperature);
  }

  const Matrix<Scalar>& run(const ConstMatrixRef<Scalar>& t, const ConstTensor3Ref<Scalar>& stack,
                            const ConstLabelsRef* labels, const ConstPresenceMaskRef* mask,
                            bool drop_one_given);

  template <class B>
  [[noreturn]] void diagnose(const ConstMatrixRef<Scalar>& t, const B& blocks,
                             detail::PresenceSelect present, bool drop_one_given) const {
    const Index n = t.rows();
    for (Index i = 0; i < n; ++i) {
      for (Index m = 0; m < scores_.cols(); ++m) {
        if (detail::is_finite(scores_(i, m))) continue;
        std::string why = detail::bad_element_in_row("teacher", t, i, true);
        for (Index o = 0; o < scores_.cols() && why.empty(); ++o) {
          if (!present(i, o)) continue;
          why = detail::bad_element_in_row(drop_one_given ? "teacher_drop_one" : "teacher_modal",
                                           blocks, o * n + i, true);
          if (!why.empty())
            why += " (modality " + std::to_string(o) + ", sample " + std::to_string(i) + ")";
        }
        if (why.empty()) {
          why = "saliency of sample " + std::to_string(i) + ", modality " + std::to_string(m) +
                " is infinite (a reference prediction rules out a class the teacher does not)";
        }
        detail::throw_numerical(kName, why);
      }
    }
    detail::throw_numerical(kName, "non-finite saliency");
  }

  Options options_;
  detail::RowWorkspace<Scalar> ws_;
  Vector<Scalar> zeros_;
  Matrix<Scalar> scores_;
};

template <class Scalar>
const Matrix<Scalar>& ModalitySaliency<Scalar>::run(const ConstMatrixRef<Scalar>& t,
                                                    const ConstTensor3Ref<Scalar>& stack,
                                                    const ConstLabelsRef* labels,
                                                    const ConstPresenceMaskRef* mask,
                                                    bool drop_one_given) {
  validate();
  const Index n = t.rows(), c = t.cols(), m_count = stack.dimension(0);
  detail::check_nonempty(kName, "teacher", n, c);
  if (m_count == 0) detail::throw_invalid(kName, "teacher_modal has no modality (shape 0xNxC)");
  detail::check_shape3(kName, drop_one_given ? "teacher_drop_one" : "teacher_modal", stack, m_count,
                       n, c, "modalities x samples x classes of teacher");
  if (mask) detail::check_presence(kName, *mask, n, m_count);
  const auto present = detail::presence(mask);
  const SaliencyKind kind = options_.kind;
  if (drop_one_given && kind != SaliencyKind::RemovalKL) {
    detail::throw_invalid(kName, "compute_removal() is for SaliencyKind::RemovalKL");
  }
  if (kind == SaliencyKind::RemovalKL && !drop_one_given && m_count > 2) {
    detail::throw_invalid(kName, "RemovalKL with " + std::to_string(m_count) +
                                     " modalities needs the teacher's drop-one logits: use "
                                     "compute_removal()");
  }
  if (kind == SaliencyKind::LabelProbability) {
    if (!labels) detail::throw_invalid(kName, "LabelProbability needs labels");
    detail::check_labels(kName, *labels, n, c, detail::RowSelect{});
  }

  const auto blocks = detail::as_matrix(stack);
  const Scalar inv_t = Scalar(1) / options_.temperature;
  ws_.prepare(n, c, 0, 2);
  zeros_.setZero(c);  // uniform logits: the prediction with no input left
  scores_.resize(n, m_count);
  Matrix<Scalar>& out = scores_;
  detail::parallel_for(n, c * m_count, [&](Index i, int thread) {
    const auto trow = detail::const_row_map(t, i);
    for (Index m = 0; m < m_count; ++m) {
      if (!present(i, m)) {
        out(i, m) = Scalar(0);
        continue;
      }
      auto es = ws_.buffer(thread, 2, 0);
      auto et = ws_.buffer(thread, 2, 1);
      if (kind == SaliencyKind::LabelProbability) {
        const auto row = detail::const_row_map(blocks, m * n + i);
        out(i, m) = std::exp(row((*labels)(i)) * inv_t - detail::log_sum_exp_row(row, inv_t));
        continue;
      }
      Index ref = m;  // the block holding the reference prediction
      bool uniform = false;
      if (kind == SaliencyKind::RemovalKL && !drop_one_given) {
        ref = -1;
        for (Index o = 0; o < m_count; ++o) {
          if (o != m && present(i, o)) ref = o;  // M = 2: the other modality
        }
        uniform = ref < 0;
      }
      const Scalar kl =
          uniform
              ? detail::kl_row(detail::ConstRowMap<Scalar>(zeros_.data(), c), trow, inv_t, es, et)
                    .value
              : detail::kl_row(detail::const_row_map(blocks, ref * n + i), trow, inv_t, es, et)
                    .value;
      out(i, m) = kind == SaliencyKind::Sufficiency ? std::exp(-kl) : kl;
    }
  });
  if (!detail::all_finite(out)) diagnose(t, blocks, present, drop_one_given);
  return scores_;
}

MMKD_EXTERN_TEMPLATE(ModalitySaliency)

}  // namespace mmkd
