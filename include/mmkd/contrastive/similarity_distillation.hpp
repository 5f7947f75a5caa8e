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

/**
 * Similarity distillation (the CMD loss; SEED-style): the student matches the teacher's
 * similarity distribution over a dictionary of teacher embeddings, by soft cross-entropy.
 *
 *     U = normalize(student), V = normalize(teacher) (both N x D), Dict = [V; queue] (M x D,
 * normalised) P = rowsoftmax(V Dictᵀ / tau_t)  (target, constant),   B = U Dictᵀ / tau_s L = weight
 * · (1/N) Σ_i Σ_j −P_ij log softmax(B_i)_j
 *
 * As SEED (`soft_cross_entropy`, jacobswan1/SEED) with the teacher batch itself in the dictionary
 * (its column i is the teacher's self-similarity). As tau_t → 0 the target becomes one-hot on
 * j = i and L is one-directional InfoNCE of the student against the dictionary. Defaults
 * tau_s = tau_t = 0.07: the paper appears to use one temperature (SEED's own are 0.2 and 1e-4).
 * The optional queue is an `EmbeddingQueue` of past teacher embeddings (or any K x D matrix).
 *
 * Gradient: dL/dB = (softmax(B) − P)/N, dL/dU = (1/tau_s) dL/dB · Dict, then through the
 * normalisation; the teacher and the queue are constants. B and the gradient are GEMMs; the
 * row terms use the same KL kernel as `LogitKD` (CE = KL + H(P)).
 *
 * **Example**:
 * @code
 * mmkd::SimilarityDistillation<float> cmd;
 * mmkd::EmbeddingQueue<float> queue(4096, D);
 * float loss = cmd.value_and_grad(student_emb, teacher_emb, queue, d_student_emb);
 * queue.push(teacher_emb);
 * @endcode
 */
template <class Scalar = float>
class SimilarityDistillation : detail::FloatingScalar<Scalar> {
 public:
  struct Options {
    Scalar tau_s = Scalar(0.07);  //!< student temperature > 0
    Scalar tau_t = Scalar(0.07);  //!< teacher temperature > 0
    bool normalize = true;        //!< L2-normalise student, teacher and queue rows
    Scalar eps = Scalar(1e-12);   //!< norm guard, > 0
    Scalar weight = Scalar(1);    //!< ≥ 0
  };

  SimilarityDistillation() : SimilarityDistillation(Options{}) {}
  explicit SimilarityDistillation(const Options& options) : options_(options) { validate(); }

  Options& options() { return options_; }
  const Options& options() const { return options_; }

  Scalar value(const ConstMatrixRef<Scalar>& student, const ConstMatrixRef<Scalar>& teacher) {
    return run(student, teacher, nullptr, nullptr);
  }
  Scalar value(const ConstMatrixRef<Scalar>& student, const ConstMatrixRef<Scalar>& teacher,
               const EmbeddingQueue<Scalar>& queue) {
    const QueueView q = view(queue);
    return run(student, teacher, &q, nullptr);
  }
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& student,
                        const ConstMatrixRef<Scalar>& teacher, MatrixRef<Scalar> d_student) {
    return run(student, teacher, nullptr, &d_student);
  }
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& student,
                        const ConstMatrixRef<Scalar>& teacher, const EmbeddingQueue<Scalar>& queue,
                        MatrixRef<Scalar> d_student) {
    const QueueView q = view(queue);
    return run(student, teacher, &q, &d_student);
  }
  //! With any K x D matrix of extra dictionary rows.
  Scalar value_and_grad(const ConstMatrixRef<Scalar>& student,
                        const ConstMatrixRef<Scalar>& teacher, const ConstMatrixRef<Scalar>& extra,
                        MatrixRef<Scalar> d_student) {
    const QueueView q(extra.data(), extra.rows(), extra.cols(),
                      Eigen::OuterStride<>(extra.outerStride()));
    return run(student, teacher, &q, &d_student);
  }

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
  }

  Scalar run(const ConstMatrixRef<Scalar>& s, const ConstMatrixRef<Scalar>& t,
             const QueueView* queue, MatrixRef<Scalar>* ds) {
    validate();
    const Index n = s.rows(), d = s.cols(), kq = queue ? queue->rows() : 0, m = n + kq;
    detail::check_nonempty(kName, "student", n, d);
    detail::check_shape(kName, "teacher", t, n, d, "same as student");
    if (queue && queue->cols() != d && kq > 0) {
      detail::throw_invalid(kName, "queue has width " + std::to_string(queue->cols()) +
                                       ", expected " + std::to_string(d) + " (same as student)");
    }
    if (ds) detail::check_shape(kName, "d_student", *ds, n, d, "same as student");

    // Dictionary [V; queue] and the student rows, normalised.
    norms_.resize(n);
    dict_norms_.resize(m);
    u_.resize(n, d);
    dict_.resize(m, d);
    if (options_.normalize) {  // straight into the dictionary: no separate copy pass
      l2_normalize_rows(s, u_, norms_, options_.eps);
      l2_normalize_rows(t, dict_.topRows(n), dict_norms_.head(n), options_.eps);
      if (kq > 0)
        l2_normalize_rows(*queue, dict_.bottomRows(kq), dict_norms_.tail(kq), options_.eps);
    } else {
      u_ = s;
      dict_.topRows(n) = t;
      if (kq > 0) dict_.bottomRows(kq) = *queue;
    }
    // Logits already divided by their temperatures: the KL kernel then runs at T = 1.
    a_.resize(n, m);
    b_.resize(n, m);
    detail::tiled_product(a_, dict_.topRows(n), dict_.transpose(), Scalar(1) / options_.tau_t,
                          false);
    detail::tiled_product(b_, u_, dict_.transpose(), Scalar(1) / options_.tau_s, false);

    const Scalar c = options_.weight / Scalar(n);
    ws_.prepare(n, m, ds ? 1 : 0, 2);
    // Soft CE = KL(P ‖ Q) + H(P), H(P)_i = lse(A_i) − Σ_j P_ij A_ij, taken from the kernel's
    // exp(A_i − max) while it is in cache.
    entropy_.resize(n);
    detail::kd_rows(
        b_, a_, Scalar(1), [](Index) { return true; }, ws_, ds ? 0 : -1, -1,
        [c](Index) { return c; },
        [&](Index i, const detail::KlRow<Scalar>& r, const detail::RowMap<Scalar>& et) {
          entropy_(i) = r.t.lse() - (et * a_.row(i).array()).sum() / r.t.sum;
        });
    const Scalar entropy = entropy_.sum();
    const Scalar raw = ws_.row_value.sum() + entropy;
    if (!std::isfinite(raw)) diagnose(s, t);
    const Scalar value = detail::scaled_value(kName, c, raw, Scalar(0));
    if (ds) {
      // dL/dU = (1/tau_s) dL/dB · Dict; the kernel left dL/dB in the scratch gradient rows.
      du_.resize(n, d);
      detail::tiled_product(du_, ws_.grad_matrix(0), dict_, Scalar(1) / options_.tau_s, false);
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

  [[noreturn]] void diagnose(const ConstMatrixRef<Scalar>& s,
                             const ConstMatrixRef<Scalar>& t) const {
    std::string why = detail::bad_element("student", s, false);
    if (why.empty()) why = detail::bad_element("teacher", t, false);
    if (!why.empty()) detail::throw_numerical(kName, why);
    detail::throw_numerical(kName,
                            "the loss overflows (a temperature too small for the scalar type, or a "
                            "non-finite queue row)");
  }

  Options options_;
  Matrix<Scalar> u_, dict_, a_, b_, du_, dx_;
  Vector<Scalar> norms_, dict_norms_, entropy_;
  detail::RowWorkspace<Scalar> ws_;
};

}  // namespace mmkd
