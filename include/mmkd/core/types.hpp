#pragma once

#include <cstdint>
#include <type_traits>

#include <Eigen/Core>

#include "mmkd/detail/scalar.hpp"

namespace mmkd {

using Index = Eigen::Index;

/// A batch: rows are samples, row-major, the memory layout of a contiguous PyTorch tensor.
template <class Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <class Scalar>
using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

namespace detail {

/// A read-only view that binds only what Eigen's `Ref<const Plain>` binds without a copy: an
/// argument it would copy (column-major, an expression such as `a * b` or `a.transpose()`, a
/// non-unit inner stride) is a compile-time error, and so is a copy at run time (a Map whose
/// inner stride is only known then) an assertion. The read-only input views use it when
/// MMKD_STRICT_VIEWS is defined; otherwise Eigen's Ref, which copies into a temporary.
template <class Plain>
class StrictConstRef : public Eigen::Ref<const Plain> {
  using Base = Eigen::Ref<const Plain>;
  template <class D>
  using Match = typename Eigen::internal::traits<Base>::template match<D>;

 public:
  // Implicit, as Eigen's Ref; the same constraint (a matching scalar type) keeps overload
  // resolution between the input types unchanged.
  template <class D, std::enable_if_t<bool(Match<D>::ScalarTypeMatch), int> = 0>
  StrictConstRef(const Eigen::DenseBase<D>& x)  // NOLINT(google-explicit-constructor)
      : Base(x.derived()) {
    static_assert(bool(Match<D>::MatchAtCompileTime),
                  "mmkd (MMKD_STRICT_VIEWS): this argument would be copied into a temporary: pass "
                  "a row-major matrix, a Map or a block of one (not column-major, not an "
                  "expression)");
    eigen_assert(this->data() == x.derived().data() && "mmkd (MMKD_STRICT_VIEWS): copied view");
  }
  StrictConstRef(const Base& other) : Base(other) {}  // NOLINT(google-explicit-constructor)
};

#ifdef MMKD_STRICT_VIEWS
template <class Plain>
using ConstRef = StrictConstRef<Plain>;
#else
template <class Plain>
using ConstRef = Eigen::Ref<const Plain>;
#endif

}  // namespace detail

/// Read-only input. Binds to a `Matrix`, a `Map` of a raw buffer or a block without copying;
/// Eigen copies any other argument (column-major, an expression) into a temporary, which
/// MMKD_STRICT_VIEWS turns into a compile-time error.
template <class Scalar>
using ConstMatrixRef = detail::ConstRef<Matrix<Scalar>>;

/// Gradient output: must be row-major with unit inner stride; never copied.
template <class Scalar>
using MatrixRef = Eigen::Ref<Matrix<Scalar>>;

template <class Scalar>
using ConstVectorRef = detail::ConstRef<Vector<Scalar>>;

template <class Scalar>
using VectorRef = Eigen::Ref<Vector<Scalar>>;

/// Class labels, one per row, in [0, C).
using Labels = Eigen::VectorXi;
using ConstLabelsRef = detail::ConstRef<Labels>;

/// Per-row mask: 1 = the row takes part, 0 = the row is ignored (not read, zero gradient).
/// One byte per row, so a `torch::kBool` or `torch::kUInt8` tensor maps without a copy.
using RowMask = Eigen::Matrix<std::uint8_t, Eigen::Dynamic, 1>;
using ConstRowMaskRef = detail::ConstRef<RowMask>;

}  // namespace mmkd
