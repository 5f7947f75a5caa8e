#pragma once

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "mmkd/core/types.hpp"
#include "mmkd/detail/finite.hpp"

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

/// The two kinds of error, for the handler of builds without exceptions.
enum class ErrorKind { InvalidArgument, NumericalError };

/// Receives an error in a build without exceptions (`-fno-exceptions`): the kind and the message
/// the exception would have carried. It must not return (abort, exit, or leave by longjmp);
/// nothing has been written when it is called. If it returns, mmkd calls std::abort().
using ErrorHandler = void (*)(ErrorKind kind, const char* message);

namespace detail {

/// The default handler: "mmkd: <message>" on stderr, then std::abort().
inline void print_and_abort(ErrorKind, const char* message) {
  std::fprintf(stderr, "mmkd: %s\n", message);
  std::abort();
}

inline std::atomic<ErrorHandler>& error_handler() {
  static std::atomic<ErrorHandler> handler{&print_and_abort};
  return handler;
}

}  // namespace detail

/// Sets the handler called instead of throwing when exceptions are disabled, process-wide and
/// thread-safe; returns the previous one. nullptr restores the default (print and abort). With
/// exceptions enabled, errors are thrown and the handler is never called.
inline ErrorHandler set_error_handler(ErrorHandler handler) noexcept {
  return detail::error_handler().exchange(handler ? handler : &detail::print_and_abort);
}

namespace detail {

inline std::string shape_str(Index rows, Index cols) {
  return std::to_string(rows) + "x" + std::to_string(cols);
}

#if defined(__cpp_exceptions) || defined(__EXCEPTIONS) || defined(_CPPUNWIND)
[[noreturn]] inline void throw_invalid(const char* cls, const std::string& what) {
  throw InvalidArgument(std::string(cls) + ": " + what);
}

[[noreturn]] inline void throw_numerical(const char* cls, const std::string& what) {
  throw NumericalError(std::string(cls) + ": " + what);
}
#else
[[noreturn]] inline void raise_error(ErrorKind kind, const char* cls, const std::string& what) {
  error_handler().load()(kind, (std::string(cls) + ": " + what).c_str());
  std::abort();  // a handler that returned
}

[[noreturn]] inline void throw_invalid(const char* cls, const std::string& what) {
  raise_error(ErrorKind::InvalidArgument, cls, what);
}

[[noreturn]] inline void throw_numerical(const char* cls, const std::string& what) {
  raise_error(ErrorKind::NumericalError, cls, what);
}
#endif

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
  if (!(v > T(0)) || !detail::is_finite(v)) {
    throw_invalid(
        cls, std::string("option ") + option + " must be finite and > 0, got " + std::to_string(v));
  }
}

template <class T>
void check_nonnegative(const char* cls, const char* option, T v) {
  if (!(v >= T(0)) || !detail::is_finite(v)) {
    throw_invalid(cls, std::string("option ") + option + " must be finite and >= 0, got " +
                           std::to_string(v));
  }
}

/// "NaN" / "+Inf" / "-Inf" for a non-finite value.
inline const char* nonfinite_str(double v) {
  const FloatClass c = classify(v);
  return c == FloatClass::NaN ? "NaN" : (c == FloatClass::PosInf ? "+Inf" : "-Inf");
}

/// "name[i,j] is NaN" / "+Inf" / "-Inf".
inline std::string element_str(const char* name, Index i, Index j, double v) {
  const char* what = nonfinite_str(v);
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
      if (!detail::is_finite(v))
        return std::string(kind) + " " + element_str(name.c_str(), i, j, v);
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
