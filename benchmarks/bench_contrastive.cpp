// Dimensional-structure and contrastive losses: mmkd against the same loss in libtorch (forward +
// autograd backward), on the same thread count, in one binary, plus a plain GEMM of the dominant
// size on mmkd's backend (Eigen, or the BLAS given to Eigen with EIGEN_USE_BLAS). Each mmkd
// benchmark reports FLOPS, the floating-point operations of its matrix products per second, and
// GEMM_share, that rate over the plain GEMM's in the same run.

#include <mmkd/contrastive/embedding_queue.hpp>
#include <mmkd/contrastive/info_nce.hpp>
#include <mmkd/contrastive/similarity_distillation.hpp>
#include <mmkd/structure/channel_decorrelation.hpp>
#include <mmkd/structure/uniformity.hpp>

#include "bench_common.hpp"

namespace {

using namespace bench;

#ifdef EIGEN_USE_BLAS
#define MMKD_IMPL "mmkd-blas"
#define GEMM_IMPL "gemm-blas"
#else
#define MMKD_IMPL "mmkd"
#define GEMM_IMPL "gemm"
#endif

// Times `call` and reports its FLOP rate against a plain GEMM of its dominant product (m, n, k).
template <class F>
void run_gemm_bound(benchmark::State& st, double flops, Index m, Index n, Index k, F&& call) {
  report_gemm_bound(st, timed_loop(st, call), flops, m, n, k);
}

// C = A Bᵀ with A m x k and B n x k (the similarity / Gram shape).
void gemm(benchmark::State& st) {
  const Index m = st.range(0), n = st.range(1), k = st.range(2);
  const Mat a = random_matrix(m, k, 1), b = random_matrix(n, k, 2);
  Mat c(m, n);
  for (auto _ : st) {
    c.noalias() = a * b.transpose();
    benchmark::ClobberMemory();
  }
  set_flops(st, 2.0 * double(m) * double(n) * double(k));
}

void mmkd_InfoNCE_value_and_grad(benchmark::State& st) {
  const Index n = st.range(0), d = st.range(1);
  const Mat q = random_matrix(n, d, 1), k = random_matrix(n, d, 2);
  Mat dq = Mat::Zero(n, d);
  mmkd::InfoNCE<float> nce;                                             // symmetric, τ = 0.07
  run_gemm_bound(st, 4.0 * double(n) * double(n) * double(d), n, n, d,  // S and dU
                 [&] { benchmark::DoNotOptimize(nce.value_and_grad(q, k, dq)); });
}

void mmkd_ChannelDecorrelation_value_and_grad(benchmark::State& st) {
  const Index n = st.range(0), c = st.range(1);
  const Mat z = random_matrix(n, c, 1);
  Mat dz = Mat::Zero(n, c);
  mmkd::ChannelDecorrelation<float> decor;
  run_gemm_bound(st, 3.0 * double(n) * double(c) * double(c), c, c, n,  // rank-N update and H·G_R
                 [&] { benchmark::DoNotOptimize(decor.value_and_grad(z, dz)); });
}

void mmkd_Uniformity_value_and_grad(benchmark::State& st) {
  const Index n = st.range(0), d = st.range(1);
  const Mat x = random_matrix(n, d, 1);
  Mat dx = Mat::Zero(n, d);
  mmkd::Uniformity<float> unif;
  run_gemm_bound(st, 3.0 * double(n) * double(n) * double(d), n, n, d,  // rank-D update and W·U
                 [&] { benchmark::DoNotOptimize(unif.value_and_grad(x, dx)); });
}

void mmkd_SimilarityDistillation_value_and_grad(benchmark::State& st) {
  const Index n = st.range(0), k = st.range(1), d = st.range(2);
  const Mat s = random_matrix(n, d, 1), t = random_matrix(n, d, 2);
  mmkd::EmbeddingQueue<float> queue(k, d);
  queue.push(random_matrix(k, d, 3));
  Mat ds = Mat::Zero(n, d);
  // The batch dictionary at one temperature, the formulation the libtorch side below computes
  // (N + K columns per row; SEED's own dictionary has 1 + K).
  typename mmkd::SimilarityDistillation<float>::Options o{0.07f, 0.07f};
  o.dictionary = mmkd::SimilarityDictionary::BatchAndQueue;
  mmkd::SimilarityDistillation<float> seed(o);
  run_gemm_bound(st, 6.0 * double(n) * double(n + k) * double(d), n, n + k, d,  // A, B and dU
                 [&] { benchmark::DoNotOptimize(seed.value_and_grad(s, t, queue, ds)); });
}

#if defined(MMKD_BENCH_TORCH) && !defined(EIGEN_USE_BLAS)
namespace F = torch::nn::functional;

void torch_InfoNCE_value_and_grad(benchmark::State& st) {
  torch_threads();
  const Index n = st.range(0), d = st.range(1);
  auto q = to_tensor(random_matrix(n, d, 1)).set_requires_grad(true);
  const auto k = to_tensor(random_matrix(n, d, 2));
  const auto labels = torch::arange(n, torch::kLong);
  for (auto _ : st) {
    const auto u = F::normalize(q, F::NormalizeFuncOptions().dim(1));
    const auto v = F::normalize(k, F::NormalizeFuncOptions().dim(1));
    const auto logits = torch::mm(u, v.t()) / 0.07;
    auto loss = 0.5 * (F::cross_entropy(logits, labels) + F::cross_entropy(logits.t(), labels));
    loss.backward();
    benchmark::DoNotOptimize(loss.item<float>());
  }
}

void torch_ChannelDecorrelation_value_and_grad(benchmark::State& st) {
  torch_threads();
  const Index n = st.range(0), c = st.range(1);
  auto z = to_tensor(random_matrix(n, c, 1)).set_requires_grad(true);
  const auto off = 1 - torch::eye(c);
  for (auto _ : st) {
    auto h = z - z.mean(0, true);
    h = h / (h.pow(2).mean(0, true) + 1e-5).sqrt();
    const auto r = torch::mm(h.t(), h) / double(n);
    auto loss = (r * off).pow(2).sum() / double(c * (c - 1));
    loss.backward();
    benchmark::DoNotOptimize(loss.item<float>());
  }
}

void torch_Uniformity_value_and_grad(benchmark::State& st) {
  torch_threads();
  const Index n = st.range(0), d = st.range(1);
  auto x = to_tensor(random_matrix(n, d, 1)).set_requires_grad(true);
  const auto upper = torch::ones({n, n}, torch::kBool).triu(1);
  const double log_pairs = std::log(double(n) * double(n - 1) / 2);
  for (auto _ : st) {
    const auto u = F::normalize(x, F::NormalizeFuncOptions().dim(1));
    const auto sq = 2 - 2 * torch::mm(u, u.t());
    auto loss = torch::logsumexp(-2.0 * sq.masked_select(upper), 0) - log_pairs;
    loss.backward();
    benchmark::DoNotOptimize(loss.item<float>());
  }
}

void torch_SimilarityDistillation_value_and_grad(benchmark::State& st) {
  torch_threads();
  const Index n = st.range(0), k = st.range(1), d = st.range(2);
  auto s = to_tensor(random_matrix(n, d, 1)).set_requires_grad(true);
  const auto t = F::normalize(to_tensor(random_matrix(n, d, 2)), F::NormalizeFuncOptions().dim(1));
  const auto queue =
      F::normalize(to_tensor(random_matrix(k, d, 3)), F::NormalizeFuncOptions().dim(1));
  for (auto _ : st) {
    const auto dict = torch::cat({t, queue});
    const auto target = torch::softmax(torch::mm(t, dict.t()) / 0.07, 1);
    const auto u = F::normalize(s, F::NormalizeFuncOptions().dim(1));
    auto loss = -(target * torch::log_softmax(torch::mm(u, dict.t()) / 0.07, 1)).sum() / double(n);
    loss.backward();
    benchmark::DoNotOptimize(loss.item<float>());
  }
}
#endif

void args(benchmark::internal::Benchmark* b,
          std::initializer_list<std::vector<std::int64_t>> shapes) {
  for (const auto& s : shapes) b->Args(s);
  b->Unit(benchmark::kMicrosecond)->UseRealTime();
}
void nce_shapes(benchmark::internal::Benchmark* b) {
  args(b, {{256, 128}, {4096, 512}});
}
void decor_shapes(benchmark::internal::Benchmark* b) {
  args(b, {{256, 2048}});
}
void unif_shapes(benchmark::internal::Benchmark* b) {
  args(b, {{512, 4096}});
}
void seed_shapes(benchmark::internal::Benchmark* b) {
  args(b, {{256, 4096, 128}});
}
// The dominant product of each loss above, as C = A Bᵀ (m, n, k).
void gemm_shapes(benchmark::internal::Benchmark* b) {
  args(b,
       {{256, 256, 128}, {4096, 4096, 512}, {2048, 2048, 256}, {512, 512, 4096}, {256, 4352, 128}});
}

}  // namespace

BENCHMARK(gemm)->Name(GEMM_IMPL "_GEMM")->Apply(gemm_shapes);
BENCHMARK(mmkd_InfoNCE_value_and_grad)
    ->Name(MMKD_IMPL "_InfoNCE_value_and_grad")
    ->Apply(nce_shapes);
BENCHMARK(mmkd_ChannelDecorrelation_value_and_grad)
    ->Name(MMKD_IMPL "_ChannelDecorrelation_value_and_grad")
    ->Apply(decor_shapes);
BENCHMARK(mmkd_Uniformity_value_and_grad)
    ->Name(MMKD_IMPL "_Uniformity_value_and_grad")
    ->Apply(unif_shapes);
BENCHMARK(mmkd_SimilarityDistillation_value_and_grad)
    ->Name(MMKD_IMPL "_SimilarityDistillation_value_and_grad")
    ->Apply(seed_shapes);
#if defined(MMKD_BENCH_TORCH) && !defined(EIGEN_USE_BLAS)
BENCHMARK(torch_InfoNCE_value_and_grad)->Apply(nce_shapes);
BENCHMARK(torch_ChannelDecorrelation_value_and_grad)->Apply(decor_shapes);
BENCHMARK(torch_Uniformity_value_and_grad)->Apply(unif_shapes);
BENCHMARK(torch_SimilarityDistillation_value_and_grad)->Apply(seed_shapes);
#endif

MMKD_BENCHMARK_MAIN()
