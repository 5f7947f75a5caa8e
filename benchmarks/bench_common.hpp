#pragma once

// Shared helpers of the benchmark binaries: seeded inputs, the thread count, and the machine's
// limits measured in the same run — the FLOP rate of a plain GEMM, the bandwidth of the simplest
// pass over the bytes a call touches, and the rate of mmkd's softmax exp — against which each
// benchmark reports its share (counters GEMM_share, BW_share, exp_share).

#include <benchmark/benchmark.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

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

#ifdef MMKD_BENCH_TORCH
#include <torch/torch.h>
#endif

namespace bench {

using mmkd::Index;
using Mat = mmkd::Matrix<float>;
using Clock = std::chrono::steady_clock;

/// Threads of this run: OMP_NUM_THREADS with MMKD_OPENMP, else 1. mmkd's loops, Eigen's products
/// and libtorch all get this many.
inline int threads() {
  return mmkd::max_threads();
}

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

inline mmkd::Tensor4<float> random_map(Index n, Index c, Index h, std::uint64_t seed,
                                       double scale = 1) {
  const Mat flat = random_matrix(n * c, h * h, seed, scale);
  mmkd::Tensor4<float> x(n, c, h, h);
  std::copy(flat.data(), flat.data() + flat.size(), x.data());
  return x;
}

inline mmkd::Labels random_labels(Index n, Index c) {
  mmkd::SplitMix64 rng(7);
  mmkd::Labels y(n);
  for (Index i = 0; i < n; ++i) y(i) = int(rng.next() % std::uint64_t(c));
  return y;
}

/// Seconds per call of f over at least 0.3 s and 3 calls, after one warm-up call.
template <class F>
double seconds_per_call(F&& f) {
  f();
  int reps = 0;
  const auto t0 = Clock::now();
  double elapsed = 0;
  while (elapsed < 0.3 || reps < 3) {
    f();
    ++reps;
    elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
  }
  return elapsed / reps;
}

/// Runs the timed loop (after one call that sizes the workspaces) and returns seconds per call.
template <class F>
double timed_loop(benchmark::State& st, F&& call) {
  call();
  const auto t0 = Clock::now();
  for (auto _ : st) {
    call();
    benchmark::ClobberMemory();
  }
  return std::chrono::duration<double>(Clock::now() - t0).count() / double(st.iterations());
}

/// A reference rate measured once per process and key (Google Benchmark calls a benchmark
/// function several times).
template <class F>
double memo(const std::array<double, 4>& key, F&& measure) {
  static std::map<std::array<double, 4>, double> rates;
  auto it = rates.find(key);
  if (it == rates.end()) it = rates.emplace(key, measure()).first;
  return it->second;
}

inline void set_flops(benchmark::State& st, double flops) {
  st.counters["FLOPS"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
}

/// FLOP rate of a plain C = A Bᵀ (A m x k, B n x k) on this binary's backend and thread count.
inline double gemm_rate(Index m, Index n, Index k) {
  return memo({0, double(m), double(n), double(k)}, [&] {
    const Mat a = random_matrix(m, k, 11), b = random_matrix(n, k, 12);
    Mat c(m, n);
    const double s = seconds_per_call([&] {
      c.noalias() = a * b.transpose();
      benchmark::DoNotOptimize(c.data());
    });
    return 2.0 * double(m) * double(n) * double(k) / s;
  });
}

/// Reports FLOPS and GEMM_share: the call's FLOP rate over that of a plain GEMM of its dominant
/// product (m, n, k), measured now.
inline void report_gemm_bound(benchmark::State& st, double per_call, double flops, Index m, Index n,
                              Index k) {
  set_flops(st, flops);
  st.counters["GEMM_share"] = (flops / per_call) / gemm_rate(m, n, k);
}

/// The memory traffic a call cannot avoid, in arrays of `elements` floats: `reads` read,
/// `writes` written, `updates` read and written (a gradient buffer that is added to).
struct Streams {
  double elements;
  int reads, writes, updates;
  double bytes() const { return elements * double(reads + writes + 2 * updates) * sizeof(float); }
};

/// Bytes/s of the simplest pass with that traffic — u_j += Σ_i r_i and w_j = Σ_i r_i, in chunks
/// run by mmkd's parallel loop as a loss's rows are — measured now. Its working set is the
/// call's, so the limit is the cache level or memory the call itself streams from.
inline double stream_rate(const Streams& s) {
  return memo({1, s.elements, double(s.reads * 100 + s.writes * 10 + s.updates), 0}, [&] {
    const Index e = Index(s.elements), chunk = 4096, chunks = (e + chunk - 1) / chunk;
    auto arrays = [&](int count) { return std::vector<Mat>(std::size_t(count), Mat::Ones(1, e)); };
    std::vector<Mat> in = arrays(s.reads), out = arrays(s.writes), up = arrays(s.updates);
    Mat tmp(std::max(1, mmkd::max_threads()), chunk), partial = Mat::Zero(1, chunks);
    const double t = seconds_per_call([&] {
      mmkd::detail::parallel_for(chunks, chunk, [&](Index q, int thread) {
        const Index b = q * chunk, len = std::min(chunk, e - b);
        auto seg = [&](Mat& m) { return mmkd::detail::RowMap<float>(m.data() + b, len); };
        auto acc = tmp.row(thread).head(len).array();
        acc.setConstant(1e-3f);
        for (auto& r : in) acc += seg(r);
        for (auto& w : out) seg(w) = acc;
        for (auto& u : up) seg(u) += acc;
        partial(0, q) = acc.sum();  // keeps a read-only pass from being optimised away
      });
      benchmark::DoNotOptimize(partial.data());
      benchmark::ClobberMemory();
    });
    return s.bytes() / t;
  });
}

/// exp/s of mmkd's softmax exponential (detail::ExpShifted) over rows of width `cols`, row-parallel
/// as the softmax losses run it: the arithmetic every row of a softmax-based loss needs.
inline double exp_rate(Index rows, Index cols) {
  return memo({2, double(rows), double(cols), 0}, [&] {
    Mat x(rows, cols);  // shifted arguments in [-20, 0]
    for (Index k = 0; k < x.size(); ++k) x.data()[k] = -20.0f * float(k % 1021) / 1020.0f;
    Mat e(std::max(1, mmkd::max_threads()), cols), sums = Mat::Zero(1, rows);
    const double t = seconds_per_call([&] {
      mmkd::detail::parallel_for(rows, cols, [&](Index i, int thread) {
        e.row(thread) = x.row(i).unaryExpr(mmkd::detail::ExpShifted<float>());
        sums(0, i) = e.row(thread).sum();
      });
      benchmark::DoNotOptimize(sums.data());
    });
    return double(rows) * double(cols) / t;
  });
}

/// Reports bytes_per_second for the traffic `s` and BW_share: the call's bandwidth over the
/// simplest pass with the same traffic, measured now.
inline void report_memory_bound(benchmark::State& st, double per_call, const Streams& s) {
  st.SetBytesProcessed(std::int64_t(double(st.iterations()) * s.bytes()));
  st.counters["BW_share"] = (s.bytes() / per_call) / stream_rate(s);
}

/// Also exp_share, for a call that needs `exps_per_row` exponentials per row of `cols`: the time
/// of those exponentials alone over the call's time.
inline void report_exp_bound(benchmark::State& st, double per_call, Index rows, Index cols,
                             double exps_per_row) {
  st.counters["exp_share"] = (double(rows) * exps_per_row / exp_rate(rows, cols)) / per_call;
}

#ifdef MMKD_BENCH_TORCH
/// libtorch on this run's thread count.
inline void torch_threads() {
  torch::set_num_threads(threads());
}

inline torch::Tensor to_tensor(const float* data, std::vector<std::int64_t> shape) {
  return torch::from_blob(const_cast<float*>(data), shape, torch::kFloat32).clone();
}
inline torch::Tensor to_tensor(const Mat& m) {
  return to_tensor(m.data(), {m.rows(), m.cols()});
}
inline torch::Tensor to_tensor(const mmkd::Tensor3<float>& x) {
  return to_tensor(x.data(), {x.dimension(0), x.dimension(1), x.dimension(2)});
}
inline torch::Tensor to_tensor(const mmkd::Tensor4<float>& x) {
  const auto& d = x.dimensions();
  return to_tensor(x.data(), {d[0], d[1], d[2], d[3]});
}
inline torch::Tensor to_labels(const mmkd::Labels& y) {
  return torch::from_blob(const_cast<int*>(y.data()), {y.size()}, torch::kInt32).to(torch::kLong);
}

/// The libtorch side of a benchmark: `step` runs forward and backward and returns the loss.
template <class F>
void torch_loop(benchmark::State& st, F&& step) {
  step();  // warm-up
  for (auto _ : st) benchmark::DoNotOptimize(step());
}
#endif

/// Competing load: MMKD_BENCH_BUSY=N starts N processes that spin until this one exits, as a
/// trainer's own threads or other jobs keep the cores busy (scripts/bench.sh --busy runs every
/// mmkd benchmark so, on 1 and on 2 threads).
class BusyProcesses {
 public:
  BusyProcesses() {
    const char* env = std::getenv("MMKD_BENCH_BUSY");
    const int n = env ? std::atoi(env) : 0;
    for (int k = 0; k < n; ++k) {
      const pid_t pid = fork();
      if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        for (volatile std::uint64_t spin = 0;; spin = spin + 1) {
        }
      }
      if (pid > 0) pids_.push_back(pid);
    }
    benchmark::AddCustomContext("busy", std::to_string(pids_.size()));
  }
  ~BusyProcesses() {
    for (pid_t pid : pids_) kill(pid, SIGKILL);
    for (pid_t pid : pids_) waitpid(pid, nullptr, 0);
  }
  BusyProcesses(const BusyProcesses&) = delete;
  BusyProcesses& operator=(const BusyProcesses&) = delete;

 private:
  std::vector<pid_t> pids_;
};

}  // namespace bench

// Google Benchmark's main, with the competing load of MMKD_BENCH_BUSY running throughout.
#define MMKD_BENCHMARK_MAIN()                                         \
  int main(int argc, char** argv) {                                   \
    benchmark::Initialize(&argc, argv);                               \
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1; \
    const bench::BusyProcesses busy;                                  \
    benchmark::RunSpecifiedBenchmarks();                              \
    benchmark::Shutdown();                                            \
    return 0;                                                         \
  }
