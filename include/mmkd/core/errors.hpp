#pragma once

#include <cmath>
#include <stdexcept>
#include <string>

#include "mmkd/core/types.hpp"

namespace mmkd {

/// A shape, an option or a label is invalid. The message names the class, the argument, and the
/// expected and actual values. Nothing has been written when it is thrown.
class InvalidArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// The loss is not finite. The message names the first offending input element, or the reason
/// (e.g. the student rules out a class the teacher does not). Nothing has been written.
class NumericalError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

inline std::string shape_str(Index rows, Index cols) {
  return std::to_string(rows) + "x" + std::to_string(cols);
}

[[noreturn]] inline void throw_invalid(const char* cls, const std::string& what) {
  throw InvalidArgument(std::string(cls) + ": " + what);
}

[[noreturn]] inline void throw_numerical(const char* cls, const std::string& what) {
  throw NumericalError(std::string(cls) + ": " + what);
}

/// Throws unless `m` is rows x cols: "<cls>: <name> has shape AxB, expected CxD (<why>)".
template <class M>
void check_shape(const char* cls, const char* name, const M& m, Index rows, Index cols,
                 const char* why) {
  if (m.rows() != rows || m.cols() != cols) {
    throw_invalid(cls, std::string(name) + " has shape " + shape_str(m.rows(), m.cols()) +
                           ", expected " + shape_str(rows, cols) + " (" + why + ")");
  }
}

template <class M>
void check_length(const char* cls, const char* name, const M& v, Index n, const char* why) {
  if (v.size() != n) {
    throw_invalid(cls, std::string(name) + " has length " + std::to_string(v.size()) +
                           ", expected " + std::to_string(n) + " (" + why + ")");
  }
}

inline void check_nonempty(const char* cls, const char* name, Index rows, Index cols) {
  if (rows == 0 || cols == 0) {
    throw_invalid(cls, std::string(name) + " is empty (shape " + shape_str(rows, cols) +
                           "); need at least one row and one column");
  }
}

/// An enum option must hold one of its named values (a cast from an integer may not).
template <class E>
void check_enum(const char* cls, const char* option, E v, int count) {
  const int k = static_cast<int>(v);
  if (k < 0 || k >= count)
    throw_invalid(
        cls, std::string("option ") + option + " holds no valid value (" + std::to_string(k) + ")");
}

template <class T>
void check_positive(const char* cls, const char* option, T v) {
  if (!(v > T(0)) || !std::isfinite(v)) {
    throw_invalid(
        cls, std::string("option ") + option + " must be finite and > 0, got " + std::to_string(v));
  }
}

template <class T>
void check_nonnegative(const char* cls, const char* option, T v) {
  if (!(v >= T(0)) || !std::isfinite(v)) {
    throw_invalid(cls, std::string("option ") + option + " must be finite and >= 0, got " +
                           std::to_string(v));
  }
}

/// Whether every entry is finite, vectorised: Σ x·0 is 0 unless some x is ±inf or NaN
/// (Eigen's allFinite() compares x − x elementwise without vectorising).
template <class Derived>
bool all_finite(const Eigen::DenseBase<Derived>& x) {
  using T = typename Derived::Scalar;
  return (x.derived().array() * T(0)).sum() == T(0);
}

/// "name[i,j] is NaN" / "+Inf" / "-Inf".
inline std::string element_str(const char* name, Index i, Index j, double v) {
  const char* what = std::isnan(v) ? "NaN" : (v > 0 ? "+Inf" : "-Inf");
  return std::string(name) + "[" + std::to_string(i) + "," + std::to_string(j) + "] is " + what;
}

/// "<kind> name[i,j] is NaN" (or +Inf, -Inf) for the first non-finite entry of a module's
/// parameter or buffer `m`, or, with `nonnegative`, "... is negative (v)" for its first negative
/// one; "" if there is none. Failure paths only: it allocates.
template <class M>
std::string bad_entry(const char* kind, const std::string& name, const M& m,
                      bool nonnegative = false) {
  for (Index i = 0; i < m.rows(); ++i) {
    for (Index j = 0; j < m.cols(); ++j) {
      const double v = double(m(i, j));
      if (!std::isfinite(v)) return std::string(kind) + " " + element_str(name.c_str(), i, j, v);
      if (nonnegative && v < 0) {
        return std::string(kind) + " " + name + "[" + std::to_string(i) + "," + std::to_string(j) +
               "] is negative (" + std::to_string(v) + ")";
      }
    }
  }
  return "";
}

}  // namespace detail
}  // namespace mmkd
