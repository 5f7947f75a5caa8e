#pragma once

// Helpers shared by the tests: seeded random inputs, per-type tolerances, exact-copy checks.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <catch2/catch.hpp>
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

namespace mmkd_test {

using mmkd::Index;
using mmkd::Matrix;

/// Relative tolerance for comparing a Scalar computation with an exact (long double) reference.
template <class T>
struct Tol;
template <>
struct Tol<float> {
  static constexpr double rel = 2e-5;
};
template <>
struct Tol<double> {
  static constexpr double rel = 1e-12;
};

/// Tight finite-difference settings for double: central differences with h = 1e-6 are accurate
/// to ~1e-9 on these smooth, O(1) functions.
inline mmkd::GradcheckOptions tight() {
  mmkd::GradcheckOptions o;
  o.atol = 1e-8;
  o.rtol = 1e-6;
  return o;
}

template <class T>
Matrix<T> random_matrix(Index rows, Index cols, std::uint64_t seed, double scale = 1.0) {
  mmkd::SplitMix64 rng(seed);
  Matrix<T> m(rows, cols);
  for (Index k = 0; k < m.size(); ++k) m.data()[k] = T(scale * rng.normal());
  return m;
}

inline mmkd::Labels random_labels(Index n, Index c, std::uint64_t seed) {
  mmkd::SplitMix64 rng(seed);
  mmkd::Labels y(n);
  for (Index i = 0; i < n; ++i) y(i) = int(rng.next() % std::uint64_t(c));
  return y;
}

/// k distinct classes in [0, v) per row, drawn without replacement (a sparse teacher's support).
inline mmkd::IndexMatrix random_indices(Index n, Index v, Index k, std::uint64_t seed) {
  mmkd::SplitMix64 rng(seed);
  mmkd::IndexMatrix idx(n, k);
  std::vector<int> pool(static_cast<std::size_t>(v));
  for (Index i = 0; i < n; ++i) {
    for (Index c = 0; c < v; ++c) pool[std::size_t(c)] = int(c);
    for (Index j = 0; j < k; ++j) {
      const auto r = std::size_t(j) + std::size_t(rng.next() % std::uint64_t(v - j));
      std::swap(pool[std::size_t(j)], pool[r]);
      idx(i, j) = pool[std::size_t(j)];
    }
  }
  return idx;
}

/// max_k |a_k − b_k| / max(1, |b_k|) over two same-shaped matrices or vectors (double).
template <class A, class B>
double max_rel_diff(const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b) {
  return ((a - b).array().abs() / b.array().abs().max(1.0)).maxCoeff();
}

/// True when the two matrices hold the same bits (NaN-safe, -0 vs +0 distinguished).
template <class T>
bool bit_identical(const Matrix<T>& a, const Matrix<T>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(T) * std::size_t(a.size())) == 0;
}

template <class T>
bool close(double a, double b, double rel) {
  return std::abs(a - b) <= rel * std::max(1.0, std::max(std::abs(a), std::abs(b)));
}

/// Reference log-sum-exp of a row in long double, written directly from the definition.
template <class Row>
long double ref_lse(const Row& x, long double inv_t) {
  long double m = -std::numeric_limits<long double>::infinity();
  for (Index k = 0; k < x.size(); ++k) m = std::max(m, (long double)x(k) * inv_t);
  long double z = 0;
  for (Index k = 0; k < x.size(); ++k) z += std::exp((long double)x(k) * inv_t - m);
  return m + std::log(z);
}

/// Reference KL(softmax(t/T) ‖ softmax(s/T)) of two rows, from the definition, long double.
template <class RowS, class RowT>
long double ref_kl(const RowS& s, const RowT& t, long double temp) {
  const long double ls = ref_lse(s, 1 / temp), lt = ref_lse(t, 1 / temp);
  long double kl = 0;
  for (Index k = 0; k < s.size(); ++k) {
    const long double log_pt = t(k) / temp - lt, log_ps = s(k) / temp - ls;
    const long double pt = std::exp(log_pt);
    if (pt > 0) kl += pt * (log_pt - log_ps);
  }
  return kl;
}

/// A random M x N x D stack.
template <class T>
mmkd::Tensor3<T> random_stack(Index m, Index n, Index d, std::uint64_t seed, double scale = 1.0) {
  const Matrix<T> flat = random_matrix<T>(m * n, d, seed, scale);
  mmkd::Tensor3<T> x(m, n, d);
  std::copy(flat.data(), flat.data() + flat.size(), x.data());
  return x;
}

/// Row i of modality m of a stack, as a row vector.
template <class T>
Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>> stack_row(const mmkd::Tensor3<T>& x, Index m,
                                                                Index i) {
  return {x.data() + (m * x.dimension(1) + i) * x.dimension(2), x.dimension(2)};
}

/// A stack's memory as an (M·N) x D matrix copy (for gradcheck, which works on matrices).
template <class T>
Matrix<T> flat(const mmkd::Tensor3<T>& x) {
  return Eigen::Map<const Matrix<T>>(x.data(), x.dimension(0) * x.dimension(1), x.dimension(2));
}

/// A random N x C x H x W feature map.
template <class T>
mmkd::Tensor4<T> random_map(Index n, Index c, Index h, Index w, std::uint64_t seed,
                            double scale = 1.0) {
  const Matrix<T> m = random_matrix<T>(n * c, h * w, seed, scale);
  mmkd::Tensor4<T> x(n, c, h, w);
  std::copy(m.data(), m.data() + m.size(), x.data());
  return x;
}

/// A feature map's memory as an (N·C) x (H·W) matrix copy.
template <class T>
Matrix<T> flat(const mmkd::Tensor4<T>& x) {
  return Eigen::Map<const Matrix<T>>(x.data(), x.dimension(0) * x.dimension(1),
                                     x.dimension(2) * x.dimension(3));
}

/// An (N·C) x (H·W) matrix seen as an N x C x H x W input map (no copy)...
template <class T>
mmkd::ConstTensor4Ref<T> map4(const Matrix<T>& m, Index n, Index c, Index h, Index w) {
  return {m.data(), n, c, h, w};
}
/// ... and as an output map.
template <class T>
mmkd::Tensor4Ref<T> out4(Matrix<T>& m, Index n, Index c, Index h, Index w) {
  return {m.data(), n, c, h, w};
}

}  // namespace mmkd_test
