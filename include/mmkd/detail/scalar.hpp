#pragma once

#include <type_traits>

namespace mmkd {
namespace detail {

/// Empty base of every class template over a scalar type: mmkd computes in float or double.
template <class Scalar>
struct FloatingScalar {
  static_assert(std::is_same<Scalar, float>::value || std::is_same<Scalar, double>::value,
                "mmkd: the scalar type must be float or double");
};

}  // namespace detail
}  // namespace mmkd

// Compiled mode (the mmkd::compiled CMake target defines MMKD_COMPILED): each class's float and
// double instantiations are declared extern here and defined once in the mmkd_compiled library,
// so a user's translation unit compiles only the thin inline members; MMKD_EXTERN_FUNCTION does
// the same for the kernels of the free functions (convolutions, resampling). The functions that
// reach the kernels are defined outside their classes (not inline), which is what lets the extern
// declaration skip them. Off, falling back to the header-only mode, where the library's build
// would not match the caller's: MMKD_STRICT_VIEWS (other parameter types) and builds without
// exceptions (the library throws).
#if defined(MMKD_COMPILED) && !defined(MMKD_STRICT_VIEWS) && \
    (defined(__cpp_exceptions) || defined(__EXCEPTIONS) || defined(_CPPUNWIND))
#define MMKD_EXTERN_TEMPLATE(Class)   \
  extern template class Class<float>; \
  extern template class Class<double>;
#define MMKD_EXTERN_FUNCTION(function)                       \
  extern template decltype(function<float>) function<float>; \
  extern template decltype(function<double>) function<double>;
#else
#define MMKD_EXTERN_TEMPLATE(Class)
#define MMKD_EXTERN_FUNCTION(function)
#endif
