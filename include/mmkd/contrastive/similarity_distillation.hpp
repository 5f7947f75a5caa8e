#pragma once

#include <cmath>
#include <string>

#include "mmkd/contrastive/embedding_queue.hpp"
#include "mmkd/core/errors.hpp"
#include "mmkd/core/normalize.hpp"
#include "mmkd/core/types.hpp"
#include "mmkd/detail/kl.hpp"
#include "mmkd/detail/products.hpp"

namespace mmkd {

/// Which embeddings each sample's similarity distribution runs over.
enum class SimilarityDictionary {
  PositiveAndQueue,  //!< [v_i; queue] for sample i: SEED's dictionary (the default)
  BatchAndQueue,     //!< [v_1 … v_N; queue] for every sample: the batch's teachers as negatives
};

/**
 * Similarity distillation (the CMD loss; SEED-style): the student matches the teacher's
 * similarity distribution over a dictionary of teacher embeddings, by soft cross-entropy.
 *
 *     U = normalize(student), V = normalize(teacher) (N x D), Q = normalize(queue) (K x D)
 *     PositiveAndQueue:  A_i = [v_i·v_i, v_i Qᵀ] / tau_t,  B_i = [u_i·v_i, u_i Qᵀ] / tau_s
 *     BatchAndQueue:     A_i = v_i [V; Q]ᵀ / tau_t,        B_i = u_i [V; Q]ᵀ / tau_s
 *     P_i = softmax(A_i) (target, constant),   L = weight · (1/N) Σ_i Σ_j −P_ij log softmax(B_i)_j
 *
 * `PositiveAndQueue` is SEED exactly (jacobswan1/SEED, `SEED.forward` + `soft_cross_entropy`):
 * sample i is scored against its own teacher embedding and the queue. `BatchAndQueue` puts the
 * other samples' teacher embeddings in the dictionary as extra negatives (the in-batch reading of
 * the CMCD paper's Eq. 2; with an empty queue it needs no queue at all). The CMCD paper's text
 * gives no temperatures, so the defaults are SEED's: tau_s = 0.2 (its `--temp`) and
 * tau_t = 1e-4 (its `--distill-t`). The queue is an `EmbeddingQueue` of past teacher embeddings
 * (or any K x D matrix). SEED starts its queue from random unit vectors; an `EmbeddingQueue`
 * starts empty, and that works: with no queue rows `PositiveAndQueue` has one column per sample,
 * so the loss and gradient are 0 until the first `push`. The usual step is value_and_grad, then
 * `queue.push(teacher)`, as SEED enqueues after computing its logits.
 *
 * Gradient: dL/dB = (softmax(B) − P)/N; dL/du_i = (1/tau_s) Σ_j dL/dB_ij d_j (d_j the
 * dictionary rows of sample i), then through the normalisation; the teacher and the queue are
 * constants. The similarities and the gradient are GEMMs. Each row's cross-entropy is computed as
 * Σ_j P_ij (max B_i − B_ij) + log Σ_j exp(B_ij − max B_i): no term is formed at A's magnitude
 * (1e4 at tau_t = 1e-4), so nothing cancels.
 *
 * After each call, `row_values()` holds each sample's weight · CE_i.
 *
 * **Example**:
 * @code
 * mmkd::SimilarityDistillation<float> cmd;              // SEED: tau_s 0.2, tau_t 1e-4
 * mmkd::EmbeddingQueue<float> queue(4096, D);
 * float loss = cmd.value_and_grad(student_emb, teacher_emb, queue, d_student_emb);
 * queue.push(teacher_emb);
 * @endcode
 */
template <class Scalar = float>
class SimilarityDistillation : detail::FloatingScalar<Scalar> {
 public:
  //! The options; the defaults are those of the reference implementation.
  struct Options {
    Scalar tau_s = Scalar(0.2);   //!< student temperature > 0
    Scalar tau_t = Scalar(1e-4);  //!< teacher temperature > 0
    bool normalize = true;        //!< L2-normalise student, teacher and queue rows
    Scalar eps = Scalar(1e-12);   //!< norm guard, > 0
    Scalar weight = Scalar(1);    //!< ≥ 0
    SimilarityDictionary dictionary =
        SimilarityDictionary::PositiveAndQueue;  //!< which rows the similarities are taken against
  };

  SimilarityDistillation() : SimilarityDistillation(Options{}) {}
  //! Throws InvalidArgument for an invalid option.
  explicit SimilarityDistillation(const Options& options) : options_(options) { validate(); }

  //! The options; may be changed between calls (validated at every call).
  Options& options() { return options_; }
  //! The options.
  const Options& options() const { return options_; }

  //! The loss over the teacher's batch alone as the dictionary.
  Scalar value(const ConstMatrixRef<Scalar>& student, const ConstMatrixRef<Scalar>& teacher) {
    return run(student, teacher, nullptr, "", nullptr);
  }
  //! The loss with `queue` (past teacher embeddings) in the dictionary.
  Scalar value(const ConstMatrixRef<Scalar>& student, const ConstMatrixRef<Scalar>& teacher,
               const EmbeddingQueue<Scalar>& queue) {
    const QueueView q = view(queue);
    return run(student, teacher, &q, "queue", nullptr);
  }
  //! The loss; adds dL/d(student) to `d_student`.
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& student,
                        const ConstMatrixRef<Scalar>& teacher, MatrixRef<Scalar> d_student) {
    return run(student, teacher, nullptr, "", &d_student);
  }
  //! With `queue` in the dictionary; adds dL/d(student) to `d_student`.
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& student,
                        const ConstMatrixRef<Scalar>& teacher, const EmbeddingQueue<Scalar>& queue,
                        MatrixRef<Scalar> d_student) {
    const QueueView q = view(queue);
    return run(student, teacher, &q, "queue", &d_student);
  }
  //! With any K x D matrix of extra dictionary rows.
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& student,
                        const ConstMatrixRef<Scalar>& teacher, const ConstMatrixRef<Scalar>& extra,
                        MatrixRef<Scalar> d_student) {
    const QueueView q(extra.data(), extra.rows(), extra.cols(),
                      Eigen::OuterStride<>(extra.outerStride()));
    return run(student, teacher, &q, "extra", &d_student);
  }

  //! weight · CE_i of each sample of the last call.
  const Vector<Scalar>& row_values() const { return ws_.row_value; }

  //! Frees the scratch memory kept between calls.
  void release_workspace() {
    u_ = dict_ = a_ = b_ = du_ = dx_ = Matrix<Scalar>();
    ws_.release();
  }

 private:
  static constexpr const char* kName = "SimilarityDistillation";
  using QueueView = Eigen::Map<const Matrix<Scalar>, 0, Eigen::OuterStride<>>;

  static QueueView view(const EmbeddingQueue<Scalar>& queue) {
    const auto rows = queue.embeddings();
    return QueueView(rows.data(), rows.rows(), rows.cols(), Eigen::OuterStride<>(rows.cols()));
  }

  void validate() const {
    detail::check_positive(kName, "tau_s", options_.tau_s);
    detail::check_positive(kName, "tau_t", options_.tau_t);
    detail::check_positive(kName, "eps", options_.eps);
    detail::check_nonnegative(kName, "weight", options_.weight);
    detail::check_enum(kName, "dictionary", options_.dictionary, 2);
  }

  Scalar run(const ConstMatrixRef<Scalar>& s, const ConstMatrixRef<Scalar>& t,
             const QueueView* queue, const char* queue_name, MatrixRef<Scalar>* ds);

  [[noreturn]] void diagnose(const ConstMatrixRef<Scalar>& s, const ConstMatrixRef<Scalar>& t,
                             const QueueView* queue, const char* queue_name) const {
    std::string why = detail::bad_element("student", s, false);
    if (why.empty()) why = detail::bad_element("teacher", t, false);
    if (why.empty() && queue) why = detail::bad_element(queue_name, *queue, false);
    if (!why.empty()) detail::throw_numerical(kName, why);
    detail::throw_numerical(kName,
                            "the loss overflows (a temperature too small for the scalar type, or "
                            "unnormalised embeddings too large)");
  }

  Options options_;
  Matrix<Scalar> u_, dict_, a_, b_, du_, dx_;
  Vector<Scalar> norms_, dict_norms_;
  detail::RowWorkspace<Scalar> ws_;
};

template <class Scalar>
Scalar SimilarityDistillation<Scalar>::run(const ConstMatrixRef<Scalar>& s,
                                           const ConstMatrixRef<Scalar>& t, const QueueView* queue,
                                           const char* queue_name, MatrixRef<Scalar>* ds) {
  validate();
  const Index n = s.rows(), d = s.cols(), kq = queue ? queue->rows() : 0;
  const bool positive = options_.dictionary == SimilarityDictionary::PositiveAndQueue;
  const Index m = (positive ? 1 : n) + kq;  // columns of A and B
  detail::check_nonempty(kName, "student", n, d);
  detail::check_shape(kName, "teacher", t, n, d, "same as student");
  if (queue && queue->cols() != d && kq > 0) {
    detail::throw_invalid(kName, "queue has width " + std::to_string(queue->cols()) +
                                     ", expected " + std::to_string(d) + " (same as student)");
  }
  if (ds) detail::check_shape(kName, "d_student", *ds, n, d, "same as student");

  // Dictionary [V; queue] and the student rows, normalised.
  norms_.resize(n);
  dict_norms_.resize(n + kq);
  u_.resize(n, d);
  dict_.resize(n + kq, d);
  if (options_.normalize) {  // straight into the dictionary: no separate copy pass
    l2_normalize_rows(s, u_, norms_, options_.eps);
    l2_normalize_rows(t, dict_.topRows(n), dict_norms_.head(n), options_.eps);
    if (kq > 0) l2_normalize_rows(*queue, dict_.bottomRows(kq), dict_norms_.tail(kq), options_.eps);
  } else {
    u_ = s;
    dict_.topRows(n) = t;
    if (kq > 0) dict_.bottomRows(kq) = *queue;
  }
  const auto v = dict_.topRows(n);
  const auto q = dict_.bottomRows(kq);
  const Scalar inv_ts = Scalar(1) / options_.tau_s, inv_tt = Scalar(1) / options_.tau_t;
  // Similarities already divided by their temperatures.
  a_.resize(n, m);
  b_.resize(n, m);
  if (positive) {
    a_.col(0) = v.rowwise().squaredNorm() * inv_tt;
    b_.col(0) = u_.cwiseProduct(v).rowwise().sum() * inv_ts;
    if (kq > 0) {
      detail::tiled_product(a_.rightCols(kq), v, q.transpose(), inv_tt, false);
      detail::tiled_product(b_.rightCols(kq), u_, q.transpose(), inv_ts, false);
    }
  } else {
    detail::tiled_product(a_, v, dict_.transpose(), inv_tt, false);
    detail::tiled_product(b_, u_, dict_.transpose(), inv_ts, false);
  }

  const Scalar c = options_.weight / Scalar(n);
  ws_.prepare(n, m, ds ? 1 : 0, 2);
  detail::parallel_for(n, m, [&](Index i, int thread) {
    auto eb = ds ? ws_.grad_row(0, i) : ws_.buffer(thread, 2, 0);
    auto ea = ws_.buffer(thread, 2, 1);
    const auto arow = detail::const_row_map(a_, i), brow = detail::const_row_map(b_, i);
    const auto sa = detail::shifted_exp(arow, Scalar(1), ea);
    detail::ShiftedExp<Scalar> sb;
    ws_.row_value(i) =
        detail::soft_ce_row(brow, Scalar(1), ea, Scalar(1) / sa.sum, Scalar(1), sb, eb);
    if (ds) eb = eb * (c / sb.sum) - ea * (c / sa.sum);  // c (softmax(B_i) − P_i)
  });
  const Scalar raw = ws_.row_value.sum();
  if (!detail::is_finite(raw)) diagnose(s, t, queue, queue_name);
  const Scalar value = detail::scaled_value(kName, c, raw, Scalar(0));
  ws_.row_value *= options_.weight;
  if (ds) {
    // dL/dU = (1/tau_s) dL/dB · Dict_i; the row kernel left dL/dB in the scratch gradient rows.
    du_.resize(n, d);
    const auto g = ws_.grad_matrix(0);
    if (positive) {
      du_ = (g.col(0).asDiagonal() * v) * inv_ts;
      if (kq > 0) detail::tiled_product(du_, g.rightCols(kq), q, inv_ts, true);
    } else {
      detail::tiled_product(du_, g, dict_, inv_ts, false);
    }
    if (options_.normalize) {
      dx_.setZero(n, d);
      l2_normalize_rows_backward(u_, norms_, du_, dx_, options_.eps);
    } else {
      dx_ = du_;
    }
    if (!detail::all_finite(dx_)) detail::throw_numerical(kName, "the gradient overflows");
    *ds += dx_;
  }
  return value;
}

MMKD_EXTERN_TEMPLATE(SimilarityDistillation)

}  // namespace mmkd
