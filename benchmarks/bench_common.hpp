#pragma once

// Shared helpers of the benchmark binaries: seeded inputs and the bytes_per_second counter.

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>

#include <mmkd/mmkd.hpp>

#ifdef MMKD_BENCH_TORCH
#include <torch/torch.h>
#endif

namespace bench {

using mmkd::Index;
using Mat = mmkd::Matrix<float>;

inline Mat random_matrix(Index n, Index c, std::uint64_t seed, double scale = 3) {
  mmkd::SplitMix64 rng(seed);
  Mat m(n, c);
  for (Index k = 0; k < m.size(); ++k) m.data()[k] = float(scale * rng.normal());
  return m;
}

inline mmkd::Tensor3<float> random_stack(Index m, Index n, Index d, std::uint64_t seed,
                                         double scale = 3) {
  const Mat flat = random_matrix(m * n, d, seed, scale);
  mmkd::Tensor3<float> x(m, n, d);
  std::copy(flat.data(), flat.data() + flat.size(), x.data());
  return x;
}

inline mmkd::Labels random_labels(Index n, Index c) {
  mmkd::SplitMix64 rng(7);
  mmkd::Labels y(n);
  for (Index i = 0; i < n; ++i) y(i) = int(rng.next() % std::uint64_t(c));
  return y;
}

/// bytes_per_second from the number of float elements one call must touch.
inline void set_bytes(benchmark::State& st, double elements) {
  st.SetBytesProcessed(std::int64_t(double(st.iterations()) * elements * sizeof(float)));
}

#ifdef MMKD_BENCH_TORCH
inline torch::Tensor to_tensor(const float* data, std::vector<std::int64_t> shape) {
  return torch::from_blob(const_cast<float*>(data), shape, torch::kFloat32).clone();
}
inline torch::Tensor to_tensor(const Mat& m) {
  return to_tensor(m.data(), {m.rows(), m.cols()});
}
inline torch::Tensor to_tensor(const mmkd::Tensor3<float>& x) {
  return to_tensor(x.data(), {x.dimension(0), x.dimension(1), x.dimension(2)});
}
#endif

}  // namespace bench
