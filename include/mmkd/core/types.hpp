#pragma once

#include <cstdint>
#include <type_traits>

#include <Eigen/Core>

#include "mmkd/detail/scalar.hpp"

namespace mmkd {

using Index = Eigen::Index;

/// The 16-bit storage type of LLM logits (8 exponent bits, as float's; 8 significant bits).
/// The logit losses read it into their scalar type and round their gradients back to it.
using bfloat16 = Eigen::bfloat16;

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

namespace detail {

template <class T>
using Plain = std::remove_cv_t<std::remove_reference_t<T>>;

template <class D>
std::true_type dense_probe(const Eigen::DenseBase<D>*);
std::false_type dense_probe(...);

/// Whether T (a reference or not) is an Eigen matrix, array, Map, block or expression.
template <class T>
constexpr bool is_eigen_dense = decltype(dense_probe(std::declval<Plain<T>*>()))::value;

/// A writable view of a gradient buffer: Eigen's `Ref<Plain>`, which binds a row-major matrix, a
/// Map or a block of one in place. Any other floating-point Eigen argument (const, column-major,
/// strided, an expression, the other scalar type) is a compile-time error with a sentence saying
/// why, instead of a list of overloads that did not match.
template <class PlainType>
class OutRef : public Eigen::Ref<PlainType> {
  using Base = Eigen::Ref<PlainType>;
  using Element = typename PlainType::Scalar;
  template <class D>
  using Match = typename Eigen::internal::traits<Base>::template match<D>;

  template <class D>
  static constexpr bool writable = !std::is_const<std::remove_reference_t<D>>::value &&
                                   bool(Eigen::internal::is_lvalue<Plain<D>>::value);
  template <class D>
  static constexpr bool binds = std::is_same<typename Plain<D>::Scalar, Element>::value&&
      writable<D>&& bool(Match<Plain<D>>::MatchAtCompileTime);
  // The arguments this view takes part in overload resolution for: its own scalar type, and
  // (for the error message) float or double where it is float or double. A bfloat16 view takes
  // only bfloat16 and a float view never takes bfloat16, so both overloads can coexist.
  template <class S>
  static constexpr bool candidate = std::is_same<S, Element>::value ||
                                    (std::is_floating_point<Element>::value &&
                                     std::is_floating_point<S>::value);

  // The argument itself when it binds; otherwise (the build fails at the static_asserts) a
  // stand-in that keeps the base's constructor from adding errors of its own.
  template <class D>
  static decltype(auto) bindable(D&& x) {
    if constexpr (binds<D>) {
      return std::forward<D>(x);
    } else {
      static PlainType stand_in;
      return (stand_in);
    }
  }

 public:
  template <class D,
            std::enable_if_t<is_eigen_dense<D> && !std::is_base_of<Base, Plain<D>>::value &&
                                 candidate<typename Plain<D>::Scalar>,
                             int> = 0>
  OutRef(D&& x)  // NOLINT(google-explicit-constructor): as implicit as Eigen's Ref
      : Base(bindable(std::forward<D>(x))) {
    static_assert(std::is_same<typename Plain<D>::Scalar, Element>::value,
                  "mmkd: the gradient buffer's scalar type differs from the loss's (float vs "
                  "double): gradients are written in place, never converted");
    static_assert(!std::is_same<typename Plain<D>::Scalar, Element>::value || writable<D>,
                  "mmkd: a gradient buffer must be writable: this argument is const or an "
                  "expression (pass a non-const mmkd::Matrix, a Map of writable memory or a block "
                  "of one)");
    static_assert(!std::is_same<typename Plain<D>::Scalar, Element>::value || !writable<D> ||
                      bool(Match<Plain<D>>::MatchAtCompileTime),
                  "mmkd: a gradient buffer must be row-major with contiguous rows "
                  "(mmkd::Matrix, a Map or a block of one): this argument is column-major or "
                  "strided, and gradients are never written through a copy");
  }
  OutRef(const Base& other) : Base(other) {}  // NOLINT(google-explicit-constructor)
  using Base::operator=;
};

/// Class labels (int32): Eigen's read-only view, plus a sentence for labels of another integer
/// type (an int64 torch::kLong tensor mapped as is), which Eigen would not convert.
template <class Base>
class LabelsView : public Base {
  template <class D>
  static constexpr bool other_integer =
      std::is_integral<typename Plain<D>::Scalar>::value &&
      !std::is_same<typename Plain<D>::Scalar, int>::value && sizeof(typename Plain<D>::Scalar) > 1;

 public:
  template <class D, std::enable_if_t<std::is_same<typename D::Scalar, int>::value, int> = 0>
  LabelsView(const Eigen::DenseBase<D>& x)  // NOLINT(google-explicit-constructor)
      : Base(x.derived()) {}
  template <class D, std::enable_if_t<other_integer<D>, int> = 0>
  LabelsView(const Eigen::DenseBase<D>& x)  // NOLINT(google-explicit-constructor)
      : Base(stand_in()) {
    static_assert(!other_integer<D>,
                  "mmkd: labels are int32 (mmkd::Labels, Eigen::VectorXi): convert labels of "
                  "another integer type first, e.g. labels.cast<int>() (or, from libtorch, "
                  "through <mmkd/torch.hpp>, which takes int64 labels)");
    (void)x;
  }
  LabelsView(const Base& other) : Base(other) {}  // NOLINT(google-explicit-constructor)

 private:
  static const Eigen::VectorXi& stand_in() {
    static const Eigen::VectorXi v;
    return v;
  }
};

}  // namespace detail

/// Gradient output: must be row-major with unit inner stride; never copied (anything else is a
/// compile-time error naming the reason).
template <class Scalar>
using MatrixRef = detail::OutRef<Matrix<Scalar>>;

template <class Scalar>
using ConstVectorRef = detail::ConstRef<Vector<Scalar>>;

template <class Scalar>
using VectorRef = Eigen::Ref<Vector<Scalar>>;

/// Class labels, one per row, in [0, C).
using Labels = Eigen::VectorXi;
using ConstLabelsRef = detail::LabelsView<detail::ConstRef<Labels>>;

/// Per-row mask: 1 = the row takes part, 0 = the row is ignored (not read, zero gradient).
/// One byte per row, so a `torch::kBool` or `torch::kUInt8` tensor maps without a copy.
using RowMask = Eigen::Matrix<std::uint8_t, Eigen::Dynamic, 1>;
using ConstRowMaskRef = detail::ConstRef<RowMask>;

/// Class indices, N x k, row-major (int32): a sparse teacher's top-k token ids per row, the
/// layout of a contiguous `torch::kInt` tensor.
using IndexMatrix = Eigen::Matrix<std::int32_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstIndexMatrixRef = detail::ConstRef<IndexMatrix>;

}  // namespace mmkd
