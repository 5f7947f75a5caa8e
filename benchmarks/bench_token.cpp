// Token-level distillation at LLM vocabularies: mmkd against the same formula in libtorch (forward
// + autograd backward), same thread count, one binary. Names: <impl>_<Class-Variant>_<call>/args.
//
// - LogitDivergence, every divergence, N = 1024 tokens x V = 32 000 and 152 064: BW_share against
//   a plain pass over the bytes it must touch (student and teacher read, gradient updated) and
//   exp_share, the time of its two softmaxes' exponentials alone over the call's; and the same
//   with bfloat16 logits and gradient (-bf16: half the bytes; libtorch converts to float in the
//   graph, as autocast does).
// - SparseLogitKD at k = 64, V = 152 064 against libtorch's dense path (log_softmax over V, gather,
//   the tail bucket or the renormalisation, KL).
// - FusedLinearKD at N = 1024, d = 1024, V = 32 000: products_share, the time of its four matrix
//   products alone (the two heads, the two backward products, tiled as the loss runs them) over
//   the call's, and peak_extra, the most heap memory the first call holds at once (counted by the
//   allocation functions below), in units of chunk_rows·V floats. The libtorch side is the
//   unfused head + loss + backward; its peak_extra is counted the same way.

#include <mmkd/logit/fused_linear_kd.hpp>
#include <mmkd/logit/logit_divergence.hpp>
#include <mmkd/logit/sparse_logit_kd.hpp>

#include <malloc.h>

#include <atomic>
#include <cerrno>
#include <cstddef>

#include "bench_common.hpp"
#ifdef MMKD_BENCH_TORCH
#include "torch/torch_losses.hpp"
#endif

// Heap accounting: the bytes live since counting() started and their peak. Every C allocation
// function goes through here (Eigen uses malloc, libtorch posix_memalign, operator new malloc).
namespace heap {
std::atomic<bool> on{false};
std::atomic<long long> live{0}, peak{0};
inline void add(void* p) {
  if (!p || !on.load(std::memory_order_relaxed)) return;
  const long long now = live += static_cast<long long>(malloc_usable_size(p));
  long long top = peak.load();
  while (now > top && !peak.compare_exchange_weak(top, now)) {
  }
}
inline void sub(void* p) {
  if (p && on.load(std::memory_order_relaxed))
    live -= static_cast<long long>(malloc_usable_size(p));
}
/// The peak heap growth while f runs, in bytes.
template <class F>
double peak_of(F&& f) {
  live = 0;
  peak = 0;
  on = true;
  f();
  on = false;
  return double(peak.load());
}
}  // namespace heap

extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void __libc_free(void*);

void* malloc(std::size_t n) {
  void* p = __libc_malloc(n);
  heap::add(p);
  return p;
}
void* calloc(std::size_t a, std::size_t b) {
  void* p = __libc_calloc(a, b);
  heap::add(p);
  return p;
}
void* realloc(void* p, std::size_t n) {
  heap::sub(p);
  void* q = __libc_realloc(p, n);
  heap::add(q ? q : (n ? p : nullptr));
  return q;
}
void free(void* p) {
  heap::sub(p);
  __libc_free(p);
}
int posix_memalign(void** out, std::size_t align, std::size_t n) {
  void* p = __libc_memalign(align, n);
  if (!p) return ENOMEM;
  heap::add(p);
  *out = p;
  return 0;
}
void* aligned_alloc(std::size_t align, std::size_t n) {
  void* p = __libc_memalign(align, n);
  heap::add(p);
  return p;
}
void* memalign(std::size_t align, std::size_t n) {
  void* p = __libc_memalign(align, n);
  heap::add(p);
  return p;
}
}

namespace {

using namespace bench;
using mmkd::Divergence;

const Divergence kKinds[] = {Divergence::ForwardKL,      Divergence::ReverseKL,
                             Divergence::GeneralizedJSD, Divergence::SkewForwardKL,
                             Divergence::SkewReverseKL,  Divergence::TotalVariation};
const char* kind_name(Divergence d) {
  const char* names[] = {"ForwardKL",     "ReverseKL",     "JSD",
                         "SkewForwardKL", "SkewReverseKL", "TotalVariation"};
  return names[int(d)];
}
double mix_of(Divergence d) {
  return d == Divergence::GeneralizedJSD ? 0.5 : 0.1;
}

// Inputs of a shape, made once per process: at V = 152 064 drawing them takes longer than a call,
// and Google Benchmark runs each function several times.
const Mat& cached(Index n, Index c, std::uint64_t seed, double scale = 3) {
  static std::map<std::array<double, 4>, Mat> made;
  const std::array<double, 4> key{double(n), double(c), double(seed), scale};
  auto it = made.find(key);
  if (it == made.end()) it = made.emplace(key, random_matrix(n, c, seed, scale)).first;
  return it->second;
}

void divergence_shapes(benchmark::internal::Benchmark* b) {
  b->Args({1024, 32000})->Args({1024, 152064})->Unit(benchmark::kMillisecond)->UseRealTime();
}

void mmkd_divergence(benchmark::State& st, Divergence kind) {
  const Index n = st.range(0), v = st.range(1);
  const Mat &s = cached(n, v, 1), &t = cached(n, v, 2);
  Mat g = Mat::Zero(n, v);
  mmkd::LogitDivergence<float>::Options o;
  o.divergence = kind;
  mmkd::LogitDivergence<float> loss(o);
  const double t_call =
      timed_loop(st, [&] { benchmark::DoNotOptimize(loss.value_and_grad(s, t, g)); });
  report_memory_bound(st, t_call, {double(n * v), 2, 0, 1});
  report_exp_bound(st, t_call, n, v, 2.0 * double(v));
}

// The same inputs stored as bfloat16.
const mmkd::Matrix<mmkd::bfloat16>& cached16(Index n, Index c, std::uint64_t seed) {
  static std::map<std::array<double, 3>, mmkd::Matrix<mmkd::bfloat16>> made;
  const std::array<double, 3> key{double(n), double(c), double(seed)};
  auto it = made.find(key);
  if (it == made.end()) it = made.emplace(key, cached(n, c, seed).cast<mmkd::bfloat16>()).first;
  return it->second;
}

// bfloat16 logits and gradient: half the bytes of the float call.
void mmkd_divergence16(benchmark::State& st, Divergence kind) {
  const Index n = st.range(0), v = st.range(1);
  const auto &s = cached16(n, v, 1), &t = cached16(n, v, 2);
  mmkd::Matrix<mmkd::bfloat16> g = mmkd::Matrix<mmkd::bfloat16>::Zero(n, v);
  mmkd::LogitDivergence<float>::Options o;
  o.divergence = kind;
  mmkd::LogitDivergence<float> loss(o);
  const double t_call =
      timed_loop(st, [&] { benchmark::DoNotOptimize(loss.value_and_grad(s, t, g)); });
  report_memory_bound(st, t_call, {double(n * v) / 2, 2, 0, 1});
  report_exp_bound(st, t_call, n, v, 2.0 * double(v));
}

// A top-k teacher: the k largest of random teacher logits' log-softmax, in order.
void top_k(const Mat& t, Index k, mmkd::IndexMatrix& idx, Mat& lp) {
  const Index n = t.rows(), v = t.cols();
  idx.resize(n, k);
  lp.resize(n, k);
  std::vector<int> order(static_cast<std::size_t>(v));
  for (Index i = 0; i < n; ++i) {
    const auto row = t.row(i);
    const float m = row.maxCoeff();
    const float lse = m + std::log((row.array() - m).exp().sum());
    for (Index c = 0; c < v; ++c) order[std::size_t(c)] = int(c);
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](int a, int b) { return row(a) > row(b); });
    for (Index j = 0; j < k; ++j) {
      idx(i, j) = order[std::size_t(j)];
      lp(i, j) = row(order[std::size_t(j)]) - lse;
    }
  }
}

void mmkd_sparse(benchmark::State& st, mmkd::SparseSupport support) {
  const Index n = st.range(0), v = st.range(1), k = st.range(2);
  const Mat& s = cached(n, v, 1);
  mmkd::IndexMatrix idx;
  Mat lp;
  top_k(cached(n, v, 2), k, idx, lp);
  Mat g = Mat::Zero(n, v);
  mmkd::SparseLogitKD<float> loss({support});
  const double t_call =
      timed_loop(st, [&] { benchmark::DoNotOptimize(loss.value_and_grad(s, idx, lp, g)); });
  if (support == mmkd::SparseSupport::TailBucket) {
    report_memory_bound(st, t_call, {double(n * v), 1, 0, 1});
    report_exp_bound(st, t_call, n, v, double(v));
  }
}

void sparse_shapes(benchmark::internal::Benchmark* b) {
  b->Args({1024, 152064, 64})->Unit(benchmark::kMillisecond)->UseRealTime();
}

mmkd::FusedLinearKD<float>::Options fused_options() {
  mmkd::FusedLinearKD<float>::Options o;
  o.divergence.divergence = Divergence::GeneralizedJSD;
  o.hard_weight = 0.5f;
  return o;
}

void fused_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"N", "d", "V"})->Args({1024, 1024, 32000})->Unit(benchmark::kMillisecond);
  b->UseRealTime();
}

void mmkd_FusedLinearKD_value_and_grad(benchmark::State& st) {
  const Index n = st.range(0), d = st.range(1), v = st.range(2);
  const Mat h = random_matrix(n, d, 1, 1), w = random_matrix(v, d, 2, 0.05f),
            ht = random_matrix(n, d, 3, 1), wt = random_matrix(v, d, 4, 0.05f);
  const mmkd::Labels y = random_labels(n, v);
  Mat dh = Mat::Zero(n, d), dw = Mat::Zero(v, d);
  const auto o = fused_options();
  const double peak = heap::peak_of([&] {
    mmkd::FusedLinearKD<float> fresh(o);
    benchmark::DoNotOptimize(fresh.value_and_grad(h, w, ht, wt, y, dh, dw));
  });
  mmkd::FusedLinearKD<float> loss(o);
  const double t_call = timed_loop(
      st, [&] { benchmark::DoNotOptimize(loss.value_and_grad(h, w, ht, wt, y, dh, dw)); });
  // The products alone, chunk by chunk as the loss runs them.
  const double t_products = memo({3, double(n), double(d), double(v)}, [&] {
    const Index chunk = std::min(o.chunk_rows, n);
    Mat s(chunk, v), t(chunk, v);
    return seconds_per_call([&] {
      for (Index r0 = 0; r0 < n; r0 += chunk) {
        const Index m = std::min(chunk, n - r0);
        auto sm = s.topRows(m);
        auto tm = t.topRows(m);
        mmkd::detail::tiled_product(sm, h.middleRows(r0, m), w.transpose(), 1.0f, false);
        mmkd::detail::tiled_product(tm, ht.middleRows(r0, m), wt.transpose(), 1.0f, false);
        mmkd::detail::tiled_product(dh.middleRows(r0, m), sm, w, 1.0f, true);
        mmkd::detail::tiled_product(dw, sm.transpose(), h.middleRows(r0, m), 1.0f, true);
      }
      benchmark::DoNotOptimize(dw.data());
    });
  });
  const double flops = 8.0 * double(n) * double(v) * double(d);
  report_gemm_bound(st, t_call, flops, n, v, d);
  st.counters["products_share"] = t_products / t_call;
  st.counters["peak_extra"] = peak / (4.0 * double(std::min(o.chunk_rows, n)) * double(v));
}

#ifdef MMKD_BENCH_TORCH
void torch_divergence(benchmark::State& st, Divergence kind) {
  torch_threads();
  const Index n = st.range(0), v = st.range(1);
  auto s = to_tensor(cached(n, v, 1)).set_requires_grad(true);
  const auto t = to_tensor(cached(n, v, 2));
  torch_loop(st, [&] {
    auto loss = torch_ref::torch_divergence_rows(kind, mix_of(kind), s, t, 1.0).sum() / double(n);
    loss.backward();
    return loss.item<float>();
  });
}

// bfloat16 tensors computed in float, as autocast does for a softmax loss: the conversion is part
// of the graph, so the gradient comes back in bfloat16.
void torch_divergence16(benchmark::State& st, Divergence kind) {
  torch_threads();
  const Index n = st.range(0), v = st.range(1);
  auto s = to_tensor(cached(n, v, 1)).to(torch::kBFloat16).set_requires_grad(true);
  const auto t = to_tensor(cached(n, v, 2)).to(torch::kBFloat16);
  torch_loop(st, [&] {
    auto loss = torch_ref::torch_divergence_rows(kind, mix_of(kind), s.to(torch::kFloat32),
                                                 t.to(torch::kFloat32), 1.0)
                    .sum() /
                double(n);
    loss.backward();
    return loss.item<float>();
  });
}

void torch_sparse(benchmark::State& st, mmkd::SparseSupport support) {
  torch_threads();
  const Index n = st.range(0), v = st.range(1), k = st.range(2);
  auto s = to_tensor(cached(n, v, 1)).set_requires_grad(true);
  mmkd::IndexMatrix idx;
  Mat lp;
  top_k(cached(n, v, 2), k, idx, lp);
  const auto tidx = torch::from_blob(idx.data(), {n, k}, torch::kInt32).to(torch::kLong);
  const auto tlp = to_tensor(lp);
  const bool tail = support == mmkd::SparseSupport::TailBucket;
  torch_loop(st, [&] {
    auto loss = torch_ref::torch_sparse_kd_rows(s, tidx, tlp, 1.0, tail).sum() / double(n);
    loss.backward();
    return loss.item<float>();
  });
}

void torch_FusedLinearKD_value_and_grad(benchmark::State& st) {
  torch_threads();
  const Index n = st.range(0), d = st.range(1), v = st.range(2);
  auto h = to_tensor(random_matrix(n, d, 1, 1)).set_requires_grad(true);
  auto w = to_tensor(random_matrix(v, d, 2, 0.05f)).set_requires_grad(true);
  const auto ht = to_tensor(random_matrix(n, d, 3, 1)),
             wt = to_tensor(random_matrix(v, d, 4, 0.05f));
  const mmkd::Labels yl = random_labels(n, v);
  const auto y = to_labels(yl);
  namespace F = torch::nn::functional;
  auto step = [&] {
    const auto s = torch::matmul(h, w.t());
    torch::Tensor t;
    {
      torch::NoGradGuard no_grad;
      t = torch::matmul(ht, wt.t());
    }
    const auto soft = torch_ref::torch_divergence_rows(Divergence::GeneralizedJSD, 0.5, s, t, 1.0);
    const auto hard = F::cross_entropy(s, y, F::CrossEntropyFuncOptions().reduction(torch::kSum));
    auto loss = (0.5 * hard + soft.sum()) / double(n);
    loss.backward();
    return loss.item<float>();
  };
  const double peak = heap::peak_of([&] {
    h.mutable_grad() = torch::Tensor();
    w.mutable_grad() = torch::Tensor();
    step();
  });
  torch_loop(st, step);
  st.counters["peak_extra"] = peak / (4.0 * 1024.0 * double(v));
}
#endif

const bool registered = [] {
  for (Divergence kind : kKinds) {
    const std::string name = std::string("LogitDivergence-") + kind_name(kind) + "_value_and_grad";
    benchmark::RegisterBenchmark(("mmkd_" + name).c_str(), mmkd_divergence, kind)
        ->Apply(divergence_shapes);
#ifdef MMKD_BENCH_TORCH
    benchmark::RegisterBenchmark(("torch_" + name).c_str(), torch_divergence, kind)
        ->Apply(divergence_shapes);
#endif
  }
  for (Divergence kind : kKinds) {
    const std::string name =
        std::string("LogitDivergence-") + kind_name(kind) + "-bf16_value_and_grad";
    benchmark::RegisterBenchmark(("mmkd_" + name).c_str(), mmkd_divergence16, kind)
        ->Apply(divergence_shapes);
#ifdef MMKD_BENCH_TORCH
    benchmark::RegisterBenchmark(("torch_" + name).c_str(), torch_divergence16, kind)
        ->Apply(divergence_shapes);
#endif
  }
  for (auto support : {mmkd::SparseSupport::TailBucket, mmkd::SparseSupport::Renormalized}) {
    const std::string name =
        std::string("SparseLogitKD-") +
        (support == mmkd::SparseSupport::TailBucket ? "TailBucket" : "Renormalized") +
        "_value_and_grad";
    benchmark::RegisterBenchmark(("mmkd_" + name).c_str(), mmkd_sparse, support)
        ->Apply(sparse_shapes);
#ifdef MMKD_BENCH_TORCH
    benchmark::RegisterBenchmark(("torch_" + name).c_str(), torch_sparse, support)
        ->Apply(sparse_shapes);
#endif
  }
  return true;
}();

}  // namespace

BENCHMARK(mmkd_FusedLinearKD_value_and_grad)->Apply(fused_shapes);
#ifdef MMKD_BENCH_TORCH
BENCHMARK(torch_FusedLinearKD_value_and_grad)->Apply(fused_shapes);
#endif

MMKD_BENCHMARK_MAIN()
