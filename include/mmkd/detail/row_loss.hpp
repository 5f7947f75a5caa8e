#pragma once

// Plumbing shared by the losses whose terms are independent per row: optional row masks,
// label checks, per-thread scratch, the non-finite diagnosis and the strong-guarantee commit.

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/parallel.hpp"
#include "mmkd/core/reduction.hpp"
#include "mmkd/core/types.hpp"
#include "mmkd/detail/bf16.hpp"
#include "mmkd/detail/softmax_kernels.hpp"

namespace mmkd {
namespace detail {

/// An optional row mask: no mask means every row takes part.
struct RowSelect {
  const std::uint8_t* mask = nullptr;
  bool operator()(Index i) const { return mask == nullptr || mask[i] != 0; }
};

/// Whether sample i has modality m; no mask means every modality is present. `stride` is the
/// mask's row stride, so a strided view (`wide.leftCols(M)`) reads its own entries.
struct PresenceSelect {
  const std::uint8_t* mask = nullptr;
  Index stride = 1;
  bool operator()(Index i, Index m) const { return mask == nullptr || mask[i * stride + m] != 0; }
};

/// The PresenceSelect of an optional N x M presence mask.
template <class Mask>
PresenceSelect presence(const Mask* mask) {
  return mask ? PresenceSelect{mask->data(), Index(mask->outerStride())} : PresenceSelect{};
}

/// Checks a row mask (length n, values 0 or 1) and returns how many rows take part.
inline Index count_rows(const char* cls, const ConstRowMaskRef& mask, Index n) {
  check_length(cls, "mask", mask, n, "one entry per row");
  Index count = 0;
  for (Index i = 0; i < n; ++i) {
    const unsigned v = mask(i);
    if (v > 1) {
      throw_invalid(
          cls, "mask[" + std::to_string(i) + "] is " + std::to_string(v) + ", expected 0 or 1");
    }
    count += v;
  }
  return count;
}

/// Checks the labels of the rows that take part (masked rows may hold anything, e.g. -100).
inline void check_labels(const char* cls, const ConstLabelsRef& labels, Index n, Index c,
                         RowSelect rows) {
  check_length(cls, "labels", labels, n, "one label per row");
  for (Index i = 0; i < n; ++i) {
    if (rows(i) && (labels(i) < 0 || labels(i) >= c)) {
      throw_invalid(cls, "labels[" + std::to_string(i) + "] is " + std::to_string(labels(i)) +
                             ", expected a class in [0, " + std::to_string(c) + ")");
    }
  }
}

/// 1 / (number of terms averaged over) for a reduction; 0 when no row takes part.
template <class T>
T reduction_scale(Reduction r, Index rows_used, Index cols) {
  if (rows_used == 0) return T(0);
  switch (r) {
    case Reduction::BatchMean:
      return T(1) / T(rows_used);
    case Reduction::Mean:
      return T(1) / (T(rows_used) * T(cols));
    case Reduction::Sum:
      return T(1);
  }
  return T(1);
}

/// Scratch owned by a loss object and reused across calls: resized only when a shape changes.
///
/// Every scratch row starts on a 64-byte boundary (rows are padded): Eigen peels unaligned
/// heads with scalar code whose exp differs from the packet exp in the last bit, so aligned rows
/// make a row's result independent of which buffer (and which thread's buffer) it lands in.
template <class T>
class RowWorkspace {
 public:
  Vector<T> row_value;  // the loss term of each row

  /// `staged`: rows per thread for inputs stored in another type (bfloat16), read by input_row.
  void prepare(Index n, Index c, int grads, int per_thread, int staged = 0) {
    cols_ = c;
    const Index pad = Index(64 / sizeof(T));
    const Index stride = (c + pad - 1) / pad * pad;
    row_value.resize(n);
    for (int g = 0; g < grads; ++g) grad_[g].resize(n, stride);
    thread_rows_.resize(Index(max_threads()) * per_thread, stride);
    staged_ = staged;
    if (staged > 0) stage_rows_.resize(Index(max_threads()) * staged, stride);
  }
  /// Row i of scratch gradient g (the gradient before it is committed to the caller).
  RowMap<T> grad_row(int g, Index i) {
    return RowMap<T>(grad_[g].data() + i * grad_[g].cols(), cols_);
  }
  /// Scratch gradient g as a matrix view (rows are padded, hence the outer stride).
  Eigen::Map<Matrix<T>, 0, Eigen::OuterStride<>> grad_matrix(int g) {
    return {grad_[g].data(), grad_[g].rows(), cols_, Eigen::OuterStride<>(grad_[g].cols())};
  }
  /// Row buffer k of thread `thread`.
  RowMap<T> buffer(int thread, int per_thread, int k) {
    return RowMap<T>(thread_rows_.data() + (Index(thread) * per_thread + k) * thread_rows_.cols(),
                     cols_);
  }
  /// Staging row k of thread `thread` (see prepare).
  RowMap<T> stage(int thread, int k) {
    return RowMap<T>(stage_rows_.data() + (Index(thread) * staged_ + k) * stage_rows_.cols(),
                     cols_);
  }
  /// dst.row(i) += scratch gradient g, row i, for the rows that take part; a bfloat16 `dst`
  /// gets the sum rounded to nearest even.
  template <class Dst, class Rows>
  void commit(int g, Dst& dst, Rows&& rows) {
    parallel_for(dst.rows(), cols_, [&](Index i, int) {
      if (!rows(i)) return;
      if constexpr (std::is_same<typename Dst::Scalar, bfloat16>::value)
        add_to_bf16(dst.data() + i * dst.outerStride(), grad_row(g, i).data(), cols_);
      else
        row_map(dst, i) += grad_row(g, i);
    });
  }
  void release() {
    row_value = Vector<T>();
    grad_[0] = Matrix<T>();
    grad_[1] = Matrix<T>();
    thread_rows_ = Matrix<T>();
    stage_rows_ = Matrix<T>();
  }

 private:
  Index cols_ = 0;
  int staged_ = 0;
  Matrix<T> grad_[2];
  Matrix<T> thread_rows_, stage_rows_;
};

/// Row i of an input matrix in the compute type T: a view of the row itself, or for storage in
/// bfloat16 the row read into staging row k of the thread (prepared with prepare's `staged`).
template <class T, class M>
ConstRowMap<T> input_row(const M& m, Index i, RowWorkspace<T>& ws, int thread, int k) {
  if constexpr (std::is_same<typename M::Scalar, T>::value) {
    return const_row_map(m, i);
  } else {
    static_assert(std::is_same<typename M::Scalar, bfloat16>::value, "float, double or bfloat16");
    RowMap<T> b = ws.stage(thread, k);
    load_bf16(m.data() + i * m.outerStride(), b.data(), m.cols());
    return ConstRowMap<T>(b.data(), m.cols());
  }
}

/// Staging rows per thread for a loss reading `inputs` matrices of scalar type In in type T.
template <class T, class In>
constexpr int staged_rows(int inputs) {
  return std::is_same<T, In>::value ? 0 : inputs;
}

/// First NaN or +Inf (and -Inf unless allowed) of row i of `m`, as "name[i,j] is NaN"; "" if none.
template <class M>
std::string bad_element_in_row(const char* name, const M& m, Index i, bool allow_neg_inf) {
  for (Index j = 0; j < m.cols(); ++j) {
    const double v = double(m(i, j));
    const FloatClass k = classify(v);
    if (k == FloatClass::NaN || k == FloatClass::PosInf ||
        (!allow_neg_inf && k == FloatClass::NegInf)) {
      return element_str(name, i, j, v);
    }
  }
  return "";
}

/// First NaN or +Inf (and -Inf unless allowed) of `m`, scanning rows in order; "" if none.
template <class M>
std::string bad_element(const char* name, const M& m, bool allow_neg_inf) {
  for (Index i = 0; i < m.rows(); ++i) {
    std::string why = bad_element_in_row(name, m, i, allow_neg_inf);
    if (!why.empty()) return why;
  }
  return "";
}

/// "name row i is entirely -Inf" when it is; "" otherwise.
template <class M>
std::string all_neg_inf_row(const char* name, const M& m, Index i) {
  bool all = true;
  for (Index j = 0; j < m.cols() && all; ++j)
    all = double(m(i, j)) == -std::numeric_limits<double>::infinity();
  if (all) {
    return std::string(name) + " row " + std::to_string(i) +
           " is entirely -Inf (no class has positive probability)";
  }
  return "";
}

/// Index of the first row whose term is not finite, or -1.
template <class T, class Rows>
Index first_nonfinite_row(const Vector<T>& row_value, Rows&& rows) {
  for (Index i = 0; i < row_value.size(); ++i) {
    if (rows(i) && !detail::is_finite(row_value(i))) return i;
  }
  return -1;
}

/// factor · raw for a finite raw loss, or NumericalError when the options' scale (weight,
/// temperature², reduction) takes the value, or a gradient element of size up to `grad_bound`
/// (already scaled), beyond the scalar type's range. O(1).
template <class T>
T scaled_value(const char* cls, T factor, T raw, T grad_bound) {
  const T value = factor * raw;
  if (!detail::is_finite(value) || !detail::is_finite(grad_bound)) {
    throw_numerical(cls, !detail::is_finite(value)
                             ? "the loss overflows: the options' scale (weight, temperature, "
                               "reduction) takes it beyond the range of the scalar type"
                             : "the gradient overflows: the options' scale (weight, temperature, "
                               "reduction) takes it beyond the range of the scalar type");
  }
  return value;
}

}  // namespace detail
}  // namespace mmkd
