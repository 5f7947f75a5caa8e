#pragma once

#include <string>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/types.hpp"

namespace mmkd {

/**
 * A fixed-size ring buffer of past teacher embeddings (a MoCo/SEED-style queue) for
 * `SimilarityDistillation`'s dictionary. Explicit state: allocated once at construction, `push`
 * overwrites the oldest rows, nothing is hidden in the loss.
 *
 * **Example**:
 * @code
 * mmkd::EmbeddingQueue<float> queue(4096, 128);        // capacity x width
 * loss = seed.value_and_grad(student, teacher, queue, d_student);
 * queue.push(teacher);                                 // after the step, as SEED
 * @endcode
 */
template <class Scalar = float>
class EmbeddingQueue : detail::FloatingScalar<Scalar> {
 public:
  //! An empty queue of up to `capacity` rows of `dim` entries (both ≥ 1).
  EmbeddingQueue(Index capacity, Index dim) {
    if (capacity < 1 || dim < 1) {
      detail::throw_invalid(kName, "capacity and dim must be >= 1, got " +
                                       std::to_string(capacity) + " and " + std::to_string(dim));
    }
    rows_.setZero(capacity, dim);
  }

  //! Appends the rows of `embeddings` (B x dim), overwriting the oldest; with B > capacity only
  //! the last `capacity` rows are kept. `embeddings` may be a view of this queue's own rows
  //! (`q.push(q.embeddings())`): they are then copied first (into a buffer kept for such calls).
  void push(const ConstMatrixRef<Scalar>& embeddings);

  //! The stored rows (size() x dim), in storage order (the loss treats them as a set).
  Eigen::Map<const Matrix<Scalar>> embeddings() const { return {rows_.data(), size_, dim()}; }
  //! Rows held (≤ capacity).
  Index size() const { return size_; }
  //! The most rows it holds.
  Index capacity() const { return rows_.rows(); }
  //! Entries per row.
  Index dim() const { return rows_.cols(); }
  //! Drops every row (the memory is kept).
  void clear() {
    size_ = 0;
    head_ = 0;
  }

 private:
  static constexpr const char* kName = "EmbeddingQueue";

  template <class M>
  void push_rows(const M& embeddings) {
    const Index b = embeddings.rows(), first = b > capacity() ? b - capacity() : 0;
    for (Index r = first; r < b; ++r) {
      rows_.row(head_) = embeddings.row(r);
      head_ = (head_ + 1) % capacity();
      if (size_ < capacity()) ++size_;
    }
  }

  Matrix<Scalar> rows_, alias_;
  Index size_ = 0, head_ = 0;
};

template <class Scalar>
void EmbeddingQueue<Scalar>::push(const ConstMatrixRef<Scalar>& embeddings) {
  if (embeddings.cols() != dim()) {
    detail::throw_invalid(kName, "embeddings has width " + std::to_string(embeddings.cols()) +
                                     ", expected " + std::to_string(dim()));
  }
  if (!detail::all_finite(embeddings))
    detail::throw_invalid(kName, "embeddings hold a non-finite value");
  if (embeddings.size() == 0) return;  // (and its data() may be null: no pointer arithmetic)
  const Scalar* first_in = embeddings.data();
  const Scalar* last_in =
      first_in + (embeddings.rows() - 1) * embeddings.outerStride() + embeddings.cols();
  if (first_in < rows_.data() + rows_.size() && last_in > rows_.data()) {
    alias_ = embeddings;
    push_rows(alias_);
  } else {
    push_rows(embeddings);
  }
}

MMKD_EXTERN_TEMPLATE(EmbeddingQueue)

}  // namespace mmkd
