#pragma once

// Rank-3 and rank-4 views: modality stacks M x N x D and NCHW feature maps, row-major like a
// contiguous PyTorch tensor. A `ConstTensor3Ref<T>` binds an `Eigen::Tensor<T, 3, RowMajor>` or is
// built over any buffer: `mmkd::ConstTensor3Ref<float>(ptr, M, N, D)`.

#include <atomic>
#include <cmath>
#include <string>
#include <type_traits>
#include <utility>

#include <unsupported/Eigen/CXX11/Tensor>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/parallel.hpp"
#include "mmkd/core/types.hpp"

namespace mmkd {

template <class Scalar>
using Tensor3 = Eigen::Tensor<Scalar, 3, Eigen::RowMajor>;
template <class Scalar>
using Tensor4 = Eigen::Tensor<Scalar, 4, Eigen::RowMajor>;

namespace detail {

/// A view of a stack of M per-modality matrices: Eigen's TensorMap (its constructors: a Tensor3,
/// or a pointer and M, N, C), plus sentences for the misuse its overloads would only list: a
/// matrix where a stack is expected, a const stack as a gradient output.
template <class Scalar, bool writable>
class StackView : public Eigen::TensorMap<
                      std::conditional_t<writable, Tensor3<Scalar>, const Tensor3<Scalar>>> {
  using Tensor = Tensor3<Scalar>;
  using Base = Eigen::TensorMap<std::conditional_t<writable, Tensor, const Tensor>>;

 public:
  using Base::Base;
  StackView(const Base& other) : Base(other) {}  // NOLINT(google-explicit-constructor)

  template <class D,
            std::enable_if_t<is_eigen_dense<D> && std::is_floating_point<typename D::Scalar>::value,
                             int> = 0>
  StackView(const D&)  // NOLINT(google-explicit-constructor)
      : Base(nullptr, 0, 0, 0) {
    static_assert(!is_eigen_dense<D>,
                  "mmkd: this argument is a stack of M per-modality matrices (mmkd::Tensor3, "
                  "M x N x C), not a matrix: fill a mmkd::Tensor3<Scalar>(M, N, C) through "
                  "mmkd::modality_block(stack, m), or view a buffer as "
                  "mmkd::ConstTensor3Ref<Scalar>(ptr, M, N, C)");
  }
  template <class T, std::enable_if_t<std::is_same<T, Tensor>::value && writable, int> = 0>
  StackView(const T&)  // NOLINT(google-explicit-constructor)
      : Base(nullptr, 0, 0, 0) {
    static_assert(!std::is_same<T, Tensor>::value,
                  "mmkd: a gradient stack must be writable: this Tensor3 is const");
  }
};

}  // namespace detail

/// Read-only rank-3 input (e.g. a modality stack M x N x C).
template <class Scalar>
using ConstTensor3Ref = detail::StackView<Scalar, false>;
/// Rank-3 gradient output.
template <class Scalar>
using Tensor3Ref = detail::StackView<Scalar, true>;
template <class Scalar>
using ConstTensor4Ref = Eigen::TensorMap<const Tensor4<Scalar>>;
template <class Scalar>
using Tensor4Ref = Eigen::TensorMap<Tensor4<Scalar>>;

/// N x M presence mask of a multimodal batch: 1 = sample i has modality m, 0 = it is missing.
using PresenceMask = Eigen::Matrix<std::uint8_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstPresenceMaskRef = detail::ConstRef<PresenceMask>;

/// Block m of an M x N x D stack (a `Tensor3`, or a `Tensor3Ref` / `ConstTensor3Ref` view):
/// modality m's N x D matrix, viewed in place (rows m·N to (m+1)·N − 1 of the stack's memory);
/// read-only when the stack is. Throws InvalidArgument unless 0 <= m < M.
///
///     mmkd::Tensor3<float> logits(M, N, C);
///     mmkd::modality_block(logits, 1) = model_without_modality_1(x);  // fills modality 1
template <class X>
auto modality_block(X&& x, Index m) {
  static_assert(std::decay_t<X>::NumDimensions == 3,
                "mmkd: modality_block needs an M x N x D stack");
  using P = std::remove_pointer_t<decltype(x.data())>;
  using Plain = Matrix<std::remove_const_t<P>>;
  using View = std::conditional_t<std::is_const_v<P>, Eigen::Map<const Plain>, Eigen::Map<Plain>>;
  if (m < 0 || m >= x.dimension(0))
    detail::throw_invalid("modality_block", "modality " + std::to_string(m) +
                                                " is out of range for a stack of " +
                                                std::to_string(x.dimension(0)) + " modalities");
  return View(x.data() + m * x.dimension(1) * x.dimension(2), x.dimension(1), x.dimension(2));
}

namespace detail {

/// A stack M x N x D seen as the (M·N) x D row-major matrix it is in memory: modality m's block is
/// rows [m·N, (m+1)·N).
template <class Scalar>
Eigen::Map<const Matrix<Scalar>> as_matrix(const ConstTensor3Ref<Scalar>& x) {
  return {x.data(), x.dimension(0) * x.dimension(1), x.dimension(2)};
}
template <class Scalar>
Eigen::Map<Matrix<Scalar>> as_matrix(Tensor3Ref<Scalar>& x) {
  return {x.data(), x.dimension(0) * x.dimension(1), x.dimension(2)};
}

inline std::string shape_str3(Index a, Index b, Index c) {
  return std::to_string(a) + "x" + std::to_string(b) + "x" + std::to_string(c);
}

template <class X>
void check_shape3(const char* cls, const char* name, const X& x, Index a, Index b, Index c,
                  const char* why) {
  if (x.dimension(0) != a || x.dimension(1) != b || x.dimension(2) != c) {
    throw_invalid(cls, std::string(name) + " has shape " +
                           shape_str3(x.dimension(0), x.dimension(1), x.dimension(2)) +
                           ", expected " + shape_str3(a, b, c) + " (" + why + ")");
  }
}

/// T in a non-deduced context: op templates that take views name their scalar explicitly.
template <class T>
using NonDeduced = typename std::common_type<T>::type;

inline std::string shape_str4(Index n, Index c, Index h, Index w) {
  return std::to_string(n) + "x" + std::to_string(c) + "x" + std::to_string(h) + "x" +
         std::to_string(w);
}

/// An argument name for a message: a string, or a callable that builds one (only on failure,
/// so a check on the success path allocates nothing).
inline std::string name_str(const char* s) {
  return s;
}
inline std::string name_str(const std::string& s) {
  return s;
}
template <class F, class = decltype(std::declval<const F&>()())>
std::string name_str(const F& f) {
  return f();
}

template <class X, class Name>
void check_shape4(const char* cls, const Name& name, const X& x, Index n, Index c, Index h, Index w,
                  const char* why) {
  if (x.dimension(0) != n || x.dimension(1) != c || x.dimension(2) != h || x.dimension(3) != w) {
    throw_invalid(cls,
                  name_str(name) + " has shape " +
                      shape_str4(x.dimension(0), x.dimension(1), x.dimension(2), x.dimension(3)) +
                      ", expected " + shape_str4(n, c, h, w) + " (" + why + ")");
  }
}

/// A rank-4 NCHW tensor seen as the (N·C) x (H·W) row-major matrix it is in memory.
template <class X>
auto planes(X& x) {
  using S = std::remove_pointer_t<decltype(x.data())>;
  using M = std::conditional_t<std::is_const_v<S>, Eigen::Map<const Matrix<std::remove_const_t<S>>>,
                               Eigen::Map<Matrix<S>>>;
  return M(x.data(), x.dimension(0) * x.dimension(1), x.dimension(2) * x.dimension(3));
}

/// Whether every entry of a tensor (or its view) is finite; chunks in parallel.
template <class X>
bool all_finite4(const X& x) {
  using S = std::remove_const_t<std::remove_pointer_t<decltype(x.data())>>;
  const S* p = x.data();
  std::atomic<bool> finite{true};
  parallel_chunks(x.size(), [&](Index b, Index len) {
    if (!all_finite(Eigen::Map<const Eigen::Array<S, Eigen::Dynamic, 1>>(p + b, len)))
      finite.store(false, std::memory_order_relaxed);
  });
  return finite.load(std::memory_order_relaxed);
}

/// "name[n,c,h,w] is NaN" (or +Inf / -Inf) for the first non-finite entry; "" if there is none.
template <class X>
std::string bad_element4(const std::string& name, const X& x) {
  const Index d1 = x.dimension(1), d2 = x.dimension(2), d3 = x.dimension(3);
  for (Index k = 0; k < x.size(); ++k) {
    const double v = double(x.data()[k]);
    if (detail::is_finite(v)) continue;
    const Index w = k % d3, h = (k / d3) % d2, c = (k / (d3 * d2)) % d1, n = k / (d3 * d2 * d1);
    return name + "[" + std::to_string(n) + "," + std::to_string(c) + "," + std::to_string(h) +
           "," + std::to_string(w) + "] is " + nonfinite_str(v);
  }
  return "";
}

/// Checks an N x M presence mask (values 0 or 1).
inline void check_presence(const char* cls, const ConstPresenceMaskRef& mask, Index n, Index m) {
  check_shape(cls, "mask", mask, n, m, "samples x modalities");
  for (Index i = 0; i < n; ++i) {
    for (Index j = 0; j < m; ++j) {
      if (mask(i, j) > 1) {
        throw_invalid(cls, "mask[" + std::to_string(i) + "," + std::to_string(j) + "] is " +
                               std::to_string(unsigned(mask(i, j))) + ", expected 0 or 1");
      }
    }
  }
}

}  // namespace detail
}  // namespace mmkd
