#pragma once

// Shared pieces of the libFuzzer targets: a reader that decodes shapes, options and values from
// the fuzzer's bytes, and the checks every call must pass.
//
// The contract checked for each call of a loss or module:
//   - it returns normally with a finite value and finite gradients, or
//   - it throws mmkd::InvalidArgument or mmkd::NumericalError and every buffer the caller handed
//     in (gradients, module parameters, gradients and running statistics) is bit-for-bit as before.
// Anything else (another exception, a crash, a sanitizer report) aborts the run.

// The core only: each file includes the headers of the losses it uses, so a change to one
// family's header recompiles only the objects that use that family.
#include <mmkd/core/errors.hpp>
#include <mmkd/core/module.hpp>
#include <mmkd/core/normalize.hpp>
#include <mmkd/core/parallel.hpp>
#include <mmkd/core/random.hpp>
#include <mmkd/core/reduction.hpp>
#include <mmkd/core/softmax.hpp>
#include <mmkd/core/tensor.hpp>
#include <mmkd/core/types.hpp>
#include <mmkd/core/version.hpp>
#include <mmkd/gradcheck.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace mmkd_fuzz {

using mmkd::Index;

[[noreturn]] inline void die(const std::string& what) {
  std::fprintf(stderr, "mmkd fuzz: %s\n", what.c_str());
  std::abort();
}

/// Decodes the fuzzer's bytes; past the end every read gives 0.
class Reader {
 public:
  Reader(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}
  std::uint8_t byte() { return pos_ < size_ ? data_[pos_++] : 0; }
  bool flag() { return byte() & 1; }
  /// 0..count-1.
  Index pick(Index count) { return Index(byte()) % count; }
  /// A dimension 0..max, mostly ≥ 1.
  Index dim(Index max) {
    const std::uint8_t b = byte();
    return b < 16 ? 0 : 1 + Index(b) % max;
  }
  /// An option value: ordinary, tiny, huge, zero, negative or non-finite.
  double option(double usual) {
    static const double table[] = {0.0,
                                   -1.0,
                                   1e-3,
                                   0.05,
                                   0.5,
                                   1.0,
                                   2.0,
                                   4.0,
                                   100.0,
                                   1e6,
                                   1e-30,
                                   1e30,
                                   -1e30,
                                   3e38,
                                   1e300,
                                   std::numeric_limits<double>::quiet_NaN(),
                                   std::numeric_limits<double>::infinity()};
    const std::uint8_t b = byte();
    return b < 128 ? usual : table[b % (sizeof(table) / sizeof(table[0]))];
  }
  /// Fills n values: a magnitude for the whole buffer, then one byte per value, with NaN, ±Inf,
  /// ±0 and extremes mixed in.
  template <class S>
  void fill(S* out, Index n) {
    static const double scales[] = {1.0, 1e-3, 10.0, 1e3, 1e4, 1e6, 1e30};
    const double scale = scales[byte() % 7];
    for (Index k = 0; k < n; ++k) {
      const std::uint8_t b = byte();
      double v;
      switch (b) {
        case 0:
          v = std::numeric_limits<double>::quiet_NaN();
          break;
        case 1:
          v = std::numeric_limits<double>::infinity();
          break;
        case 2:
          v = -std::numeric_limits<double>::infinity();
          break;
        case 3:
          v = -0.0;
          break;
        case 4:
          v = std::numeric_limits<double>::max();
          break;
        case 5:
          v = std::numeric_limits<double>::denorm_min();
          break;
        default:
          v = (double(b) - 128.0) / 32.0 * scale;
      }
      out[k] = S(v);
    }
  }
  template <class S>
  mmkd::Matrix<S> matrix(Index rows, Index cols) {
    mmkd::Matrix<S> m(rows, cols);
    fill(m.data(), m.size());
    return m;
  }
  template <class S>
  mmkd::Tensor3<S> tensor3(Index a, Index b, Index c) {
    mmkd::Tensor3<S> t(a, b, c);
    fill(t.data(), t.size());
    return t;
  }
  template <class S>
  mmkd::Tensor4<S> tensor4(Index a, Index b, Index c, Index d) {
    mmkd::Tensor4<S> t(a, b, c, d);
    fill(t.data(), t.size());
    return t;
  }
  mmkd::Labels labels(Index n, Index classes) {
    mmkd::Labels y(n);
    for (Index i = 0; i < n; ++i) {
      const std::uint8_t b = byte();
      y(i) = b < 240 ? int(b % std::max<Index>(classes, 1)) : int(b) - 250;  // some out of range
    }
    return y;
  }
  /// 0/1 bytes per entry, occasionally another value.
  template <class M>
  M mask(Index rows, Index cols) {
    M m(rows, cols);
    for (Index k = 0; k < m.size(); ++k) {
      const std::uint8_t b = byte();
      m.data()[k] = std::uint8_t(b < 250 ? (b & 1) : b);
    }
    return m;
  }

 private:
  const std::uint8_t* data_;
  std::size_t size_, pos_ = 0;
};

/// `m` as the left columns of a matrix `pad` columns wider whose other entries are `fill` (NaN, an
/// invalid mask value): its `leftCols(m.cols())` is a strided view that must give the same result
/// as `m`, bit for bit when `pad` is a multiple of kAlignedPad (every row then has the alignment
/// of the dense copy's row, so the vectorised reductions round alike).
inline constexpr Index kAlignedPad = 16;
template <class M>
M widened(const M& m, Index pad, typename M::Scalar fill) {
  M wide(m.rows(), m.cols() + pad);
  wide.setConstant(fill);
  wide.leftCols(m.cols()) = m;
  return wide;
}

/// Dies unless two results (value, then the buffers) are bit-for-bit equal.
template <class M>
void same_bits(const char* what, double a, double b, const std::vector<const M*>& x,
               const std::vector<const M*>& y) {
  if (std::memcmp(&a, &b, sizeof a) != 0)
    die(std::string(what) + ": a strided view gives another value than its dense copy");
  for (std::size_t k = 0; k < x.size(); ++k) {
    if (x[k]->size() != y[k]->size() ||
        (x[k]->size() > 0 && std::memcmp(x[k]->data(), y[k]->data(),
                                         sizeof(*x[k]->data()) * std::size_t(x[k]->size())) != 0))
      die(std::string(what) + ": a strided view gives another gradient than its dense copy");
  }
}

/// The bits of some buffers as a double (FNV-1a, 52 bits: exact and finite), for a call whose
/// outputs must match another's bit for bit but that returns no value of its own.
template <class... T>
double fingerprint(const T&... buffers) {
  std::uint64_t h = 14695981039346656037ull;
  auto mix = [&h](const auto& t) {
    const auto* p = reinterpret_cast<const unsigned char*>(t.data());
    for (std::size_t k = 0; k < sizeof(*t.data()) * std::size_t(t.size()); ++k)
      h = (h ^ p[k]) * 1099511628211ull;
  };
  (mix(buffers), ...);
  return double(h >> 12);
}

/// A module output's stand-in for a loss value: 0 when every value is finite, NaN otherwise (a
/// sum could overflow on its own).
template <class T>
double sum_of(const T& t) {
  for (Index k = 0; k < t.size(); ++k)
    if (!std::isfinite(t.data()[k])) return std::numeric_limits<double>::quiet_NaN();
  return 0.0;
}

/// The buffers a call may write: their contents are compared when it throws, and scanned for
/// non-finite values when it returns.
class Buffers {
 public:
  template <class S>
  void add(S* data, Index n) {
    // Read-only views of writable memory reach here through const ParameterViews.
    using Plain = typename std::remove_const<S>::type;
    entries_.push_back({const_cast<Plain*>(data), std::size_t(n) * sizeof(S), sizeof(S)});
  }
  template <class S>
  void add(mmkd::Matrix<S>& m) {
    add(m.data(), m.size());
  }
  template <class T>
  void add_tensor(T& t) {
    add(t.data(), t.size());
  }
  template <class S>
  void add_views(const std::vector<mmkd::ParameterView<S>>& views) {
    for (const auto& v : views) add(v.value.data(), v.value.size());
  }

  /// Runs `call` (returning a value, or void) under the contract above. The raw ops (convolution,
  /// resampling) compute like any BLAS routine, so overflow in their outputs is not an error:
  /// `require_finite = false` checks only the exception contract for them.
  /// Returns whether the call succeeded.
  template <class F>
  bool check(const char* what, F&& call, bool require_finite = true) {
    std::vector<std::vector<unsigned char>> saved;
    for (const auto& e : entries_) {
      const auto* p = static_cast<const unsigned char*>(e.data);
      saved.emplace_back(p, p + e.bytes);
    }
    try {
      const double value = run(call);
      if (!require_finite) return true;
      if (!std::isfinite(value)) die(std::string(what) + ": returned a non-finite value");
      for (const auto& e : entries_)
        if (!finite(e)) die(std::string(what) + ": wrote a non-finite gradient or output");
      return true;
    } catch (const mmkd::InvalidArgument&) {
      unchanged(what, saved);
    } catch (const mmkd::NumericalError&) {
      unchanged(what, saved);
    }
    return false;
  }

 private:
  struct Entry {
    void* data;
    std::size_t bytes, scalar;
  };

  template <class F>
  static double run(F& call) {
    if constexpr (std::is_void<decltype(call())>::value) {
      call();
      return 0.0;
    } else {
      return double(call());
    }
  }
  static bool finite(const Entry& e) {
    const std::size_t n = e.bytes / e.scalar;
    if (e.scalar == sizeof(float)) {
      const float* p = static_cast<const float*>(e.data);
      for (std::size_t k = 0; k < n; ++k)
        if (!std::isfinite(p[k])) return false;
    } else {
      const double* p = static_cast<const double*>(e.data);
      for (std::size_t k = 0; k < n; ++k)
        if (!std::isfinite(p[k])) return false;
    }
    return true;
  }
  void unchanged(const char* what, const std::vector<std::vector<unsigned char>>& saved) const {
    for (std::size_t k = 0; k < entries_.size(); ++k)
      if (!saved[k].empty() && std::memcmp(entries_[k].data, saved[k].data(), saved[k].size()) != 0)
        die(std::string(what) + ": threw but changed a caller's buffer");
  }

  std::vector<Entry> entries_;
};

/// Runs call(x, t, dx, dt) — x and t read, gradients added to dx and dt — under the contract of
/// `b` plus dx and dt, either on the matrices themselves or, when `strided`, on the left columns
/// of copies `pad` columns wider: the inputs' other entries NaN, the gradients' 0.5. A strided
/// call that succeeds must leave those entries alone and give the bits of the dense call.
/// `require_finite` as for Buffers::check.
template <class S, class F>
void dense_or_strided(const char* what, Buffers b, bool strided, Index pad, F&& call,
                      const mmkd::Matrix<S>& x, const mmkd::Matrix<S>& t, mmkd::Matrix<S>& dx,
                      mmkd::Matrix<S>& dt, bool require_finite = true) {
  if (!strided) {
    b.add(dx);
    b.add(dt);
    b.check(
        what, [&] { return call(x, t, dx, dt); }, require_finite);
    return;
  }
  const S nan = std::numeric_limits<S>::quiet_NaN(), half = S(0.5);
  const mmkd::Matrix<S> x_wide = widened(x, pad, nan), t_wide = widened(t, pad, nan);
  mmkd::Matrix<S> dx_wide = widened(dx, pad, half), dt_wide = widened(dt, pad, half);
  const mmkd::ConstMatrixRef<S> xv(x_wide.leftCols(x.cols())), tv(t_wide.leftCols(t.cols()));
  mmkd::MatrixRef<S> dxv(dx_wide.leftCols(dx.cols())), dtv(dt_wide.leftCols(dt.cols()));
  if (xv.data() != x_wide.data() || tv.data() != t_wide.data())
    die(std::string(what) + ": a strided view was copied on binding");
  b.add(dx_wide);
  b.add(dt_wide);
  double v = 0;
  if (!b.check(
          what, [&] { return v = double(call(xv, tv, dxv, dtv)); }, require_finite))
    return;
  for (const mmkd::Matrix<S>* g : {&dx_wide, &dt_wide})
    if (g->rows() > 0 && !(g->rightCols(pad).array() == half).all())  // no block of null data
      die(std::string(what) + ": wrote outside a strided gradient view");
  double v2 = 0;
  try {
    v2 = double(call(x, t, dx, dt));
  } catch (const std::exception& e) {
    die(std::string(what) + ": the dense call threw where the strided one did not: " + e.what());
  }
  const mmkd::Matrix<S> dx1 = dx_wide.leftCols(dx.cols()), dt1 = dt_wide.leftCols(dt.cols());
  same_bits<mmkd::Matrix<S>>(what, v, v2, {&dx1, &dt1}, {&dx, &dt});
}

}  // namespace mmkd_fuzz

/// The libFuzzer entry point: the first byte picks float or double for `run<S>(Reader&)`.
#define MMKD_FUZZ_ENTRY(run)                                                          \
  extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) { \
    mmkd_fuzz::Reader r(data, size);                                                  \
    if (r.flag())                                                                     \
      run<float>(r);                                                                  \
    else                                                                              \
      run<double>(r);                                                                 \
    return 0;                                                                         \
  }
