// Multimodal losses: mmkd against the same loss in libtorch (forward + autograd backward), both
// single threaded, in one binary. Names: <impl>_<loss>_<call>/<shape>.

#include "bench_common.hpp"

namespace {

using namespace bench;

// MSD at N x C with M modalities: instance-wise removal-KL weights computed once (they are
// constants for the gradient); the loss and both gradients are timed.
void mmkd_ModalitySpecificKD_value_and_grad(benchmark::State& st) {
  const Index n = st.range(0), c = st.range(1), m = st.range(2);
  const Mat s = random_matrix(n, c, 1), t = random_matrix(n, c, 2);
  const auto zs = random_stack(m, n, c, 3), zt = random_stack(m, n, c, 4),
             drop = random_stack(m, n, c, 5);
  mmkd::ModalitySaliency<float> saliency;
  mmkd::ModalityWeighting<float> weighting;
  const Mat w = weighting.compute(saliency.compute_removal(t, drop));
  Mat ds = Mat::Zero(n, c);
  mmkd::Tensor3<float> dzs(m, n, c);
  dzs.setZero();
  mmkd::ModalitySpecificKD<float> msd;
  msd.value_and_grad(s, t, zs, zt, w, ds, dzs);
  for (auto _ : st) {
    benchmark::DoNotOptimize(msd.value_and_grad(s, t, zs, zt, w, ds, dzs));
    benchmark::ClobberMemory();
  }
  set_bytes(st, 4.0 * double((m + 1) * n * c));
}

void mmkd_ModalityGramKD_value_and_grad(benchmark::State& st) {
  const Index n = st.range(0), m = st.range(1), d = st.range(2);
  const auto fs = random_stack(m, n, d, 1), ft = random_stack(m, n, d, 2);
  mmkd::Tensor3<float> dfs(m, n, d);
  dfs.setZero();
  mmkd::ModalityGramKD<float> gram;
  gram.value_and_grad(fs, ft, dfs);
  for (auto _ : st) {
    benchmark::DoNotOptimize(gram.value_and_grad(fs, ft, dfs));
    benchmark::ClobberMemory();
  }
  set_bytes(st, 4.0 * double(m * n * d));
}

#ifdef MMKD_BENCH_TORCH
namespace F = torch::nn::functional;

torch::Tensor kd_rows(const torch::Tensor& s, const torch::Tensor& t, double temp) {
  return F::kl_div(torch::log_softmax(s / temp, -1), torch::softmax(t / temp, -1),
                   F::KLDivFuncOptions().reduction(torch::kNone))
             .sum(-1) *
         (temp * temp);
}

void torch_ModalitySpecificKD_value_and_grad(benchmark::State& st) {
  torch::set_num_threads(1);
  const Index n = st.range(0), c = st.range(1), m = st.range(2);
  auto s = to_tensor(random_matrix(n, c, 1)).set_requires_grad(true);
  const auto t = to_tensor(random_matrix(n, c, 2));
  auto zs = to_tensor(random_stack(m, n, c, 3)).set_requires_grad(true);
  const auto zt = to_tensor(random_stack(m, n, c, 4));
  const auto w = torch::rand({m, n});
  for (auto _ : st) {
    auto loss = (kd_rows(s, t, 1.0).sum() + (w * kd_rows(zs, zt, 1.0)).sum()) / double(n);
    loss.backward();
    benchmark::DoNotOptimize(loss.item<float>());
  }
  set_bytes(st, 4.0 * double((m + 1) * n * c));
}

void torch_ModalityGramKD_value_and_grad(benchmark::State& st) {
  torch::set_num_threads(1);
  const Index n = st.range(0), m = st.range(1), d = st.range(2);
  auto fs = to_tensor(random_stack(m, n, d, 1)).set_requires_grad(true);
  const auto ft = to_tensor(random_stack(m, n, d, 2));
  auto gram = [](const torch::Tensor& f) {
    const auto u = F::normalize(f.permute({1, 0, 2}), F::NormalizeFuncOptions().dim(2));
    return torch::bmm(u, u.transpose(1, 2));
  };
  for (auto _ : st) {
    auto loss = F::mse_loss(gram(fs), gram(ft));
    loss.backward();
    benchmark::DoNotOptimize(loss.item<float>());
  }
  set_bytes(st, 4.0 * double(m * n * d));
}
#endif

void msd_shapes(benchmark::internal::Benchmark* b) {
  b->Args({256, 1000, 3})->Unit(benchmark::kMicrosecond)->UseRealTime();
}
void gram_shapes(benchmark::internal::Benchmark* b) {
  b->Args({256, 3, 768})->Args({4096, 4, 256})->Unit(benchmark::kMicrosecond)->UseRealTime();
}

}  // namespace

BENCHMARK(mmkd_ModalitySpecificKD_value_and_grad)->Apply(msd_shapes);
BENCHMARK(mmkd_ModalityGramKD_value_and_grad)->Apply(gram_shapes);
#ifdef MMKD_BENCH_TORCH
BENCHMARK(torch_ModalitySpecificKD_value_and_grad)->Apply(msd_shapes);
BENCHMARK(torch_ModalityGramKD_value_and_grad)->Apply(gram_shapes);
#endif

BENCHMARK_MAIN();
