// Logit losses: mmkd against the same loss in libtorch (forward + autograd backward), on the same
// thread count, in one binary. Names: <impl>_<loss>_<value|value_and_grad>/N/C. Each mmkd
// benchmark reports bytes_per_second for the matrices a call must touch (value reads student and
// teacher; value_and_grad also reads and writes the gradient), BW_share against a plain pass over
// the same bytes, and exp_share: the time of the row softmaxes' exponentials alone (2 per element
// for the KD losses, 1 for cross-entropy) over the call's time.

#include <mmkd/logit/cross_entropy.hpp>
#include <mmkd/logit/decoupled_kd.hpp>
#include <mmkd/logit/logit_kd.hpp>

#include "bench_common.hpp"

namespace {

using namespace bench;

Mat random_logits(Index n, Index c, std::uint64_t seed) {
  return random_matrix(n, c, seed);
}

// Reports the memory and exp counters of a call on N x C logits.
void report(benchmark::State& st, double per_call, int reads, int updates, double exps_per_elem) {
  const Index n = st.range(0), c = st.range(1);
  report_memory_bound(st, per_call, {double(n * c), reads, 0, updates});
  report_exp_bound(st, per_call, n, c, exps_per_elem * double(c));
}

void mmkd_LogitKD_value(benchmark::State& st) {
  const Mat s = random_logits(st.range(0), st.range(1), 1),
            t = random_logits(st.range(0), st.range(1), 2);
  mmkd::LogitKD<float> kd;
  const double t_call = timed_loop(st, [&] { benchmark::DoNotOptimize(kd.value(s, t)); });
  report(st, t_call, 2, 0, 2);
}

void mmkd_LogitKD_value_and_grad(benchmark::State& st) {
  const Mat s = random_logits(st.range(0), st.range(1), 1),
            t = random_logits(st.range(0), st.range(1), 2);
  Mat g = Mat::Zero(st.range(0), st.range(1));
  mmkd::LogitKD<float> kd;
  const double t_call =
      timed_loop(st, [&] { benchmark::DoNotOptimize(kd.value_and_grad(s, t, g)); });
  report(st, t_call, 2, 1, 2);
}

void mmkd_DecoupledKD_value_and_grad(benchmark::State& st) {
  const Mat s = random_logits(st.range(0), st.range(1), 1),
            t = random_logits(st.range(0), st.range(1), 2);
  const mmkd::Labels y = random_labels(st.range(0), st.range(1));
  Mat g = Mat::Zero(st.range(0), st.range(1));
  mmkd::DecoupledKD<float> dkd;
  const double t_call =
      timed_loop(st, [&] { benchmark::DoNotOptimize(dkd.value_and_grad(s, t, y, g)); });
  report(st, t_call, 2, 1, 2);
}

void mmkd_CrossEntropy_value_and_grad(benchmark::State& st) {
  const Mat z = random_logits(st.range(0), st.range(1), 1);
  const mmkd::Labels y = random_labels(st.range(0), st.range(1));
  Mat g = Mat::Zero(st.range(0), st.range(1));
  mmkd::CrossEntropy<float> ce;
  const double t_call =
      timed_loop(st, [&] { benchmark::DoNotOptimize(ce.value_and_grad(z, y, g)); });
  report(st, t_call, 1, 1, 1);
}

#ifdef MMKD_BENCH_TORCH
namespace F = torch::nn::functional;

torch::Tensor torch_kd(const torch::Tensor& s, const torch::Tensor& t, double temp) {
  return F::kl_div(torch::log_softmax(s / temp, 1), torch::softmax(t / temp, 1),
                   F::KLDivFuncOptions().reduction(torch::kBatchMean)) *
         (temp * temp);
}

void torch_LogitKD_value(benchmark::State& st) {
  torch_threads();
  const auto s = to_tensor(random_logits(st.range(0), st.range(1), 1));
  const auto t = to_tensor(random_logits(st.range(0), st.range(1), 2));
  torch::NoGradGuard no_grad;
  for (auto _ : st) benchmark::DoNotOptimize(torch_kd(s, t, 4.0).item<float>());
}

void torch_LogitKD_value_and_grad(benchmark::State& st) {
  torch_threads();
  auto s = to_tensor(random_logits(st.range(0), st.range(1), 1)).set_requires_grad(true);
  const auto t = to_tensor(random_logits(st.range(0), st.range(1), 2));
  for (auto _ : st) {
    auto loss = torch_kd(s, t, 4.0);
    loss.backward();  // accumulates into s.grad, as mmkd adds into its buffer
    benchmark::DoNotOptimize(loss.item<float>());
  }
}

void torch_DecoupledKD_value_and_grad(benchmark::State& st) {
  torch_threads();
  auto s = to_tensor(random_logits(st.range(0), st.range(1), 1)).set_requires_grad(true);
  const auto t = to_tensor(random_logits(st.range(0), st.range(1), 2));
  const mmkd::Labels yl = random_labels(st.range(0), st.range(1));
  const auto y = to_labels(yl);
  const double temp = 4, n = double(st.range(0));
  const auto gt = F::one_hot(y, st.range(1)).to(torch::kFloat32);
  const auto other = 1 - gt;
  for (auto _ : st) {
    const auto ps = torch::softmax(s / temp, 1), pt = torch::softmax(t / temp, 1);
    const auto bs = torch::stack({(ps * gt).sum(1), (ps * other).sum(1)}, 1);
    const auto bt = torch::stack({(pt * gt).sum(1), (pt * other).sum(1)}, 1);
    const auto tckd = F::kl_div(torch::log(bs), bt, F::KLDivFuncOptions().reduction(torch::kSum));
    const auto nckd = F::kl_div(torch::log_softmax(s / temp - 1000.0 * gt, 1),
                                torch::softmax(t / temp - 1000.0 * gt, 1),
                                F::KLDivFuncOptions().reduction(torch::kSum));
    auto loss = (tckd + 8.0 * nckd) * (temp * temp / n);
    loss.backward();
    benchmark::DoNotOptimize(loss.item<float>());
  }
}

void torch_CrossEntropy_value_and_grad(benchmark::State& st) {
  torch_threads();
  auto z = to_tensor(random_logits(st.range(0), st.range(1), 1)).set_requires_grad(true);
  const mmkd::Labels yl = random_labels(st.range(0), st.range(1));
  const auto y = to_labels(yl);
  for (auto _ : st) {
    auto loss = F::cross_entropy(z, y);
    loss.backward();
    benchmark::DoNotOptimize(loss.item<float>());
  }
}
#endif

void kd_shapes(benchmark::internal::Benchmark* b) {
  b->Args({128, 100})->Args({256, 1000})->Args({1024, 1000})->Args({4096, 32000});
  b->Unit(benchmark::kMicrosecond)->UseRealTime();
}
void one_shape(benchmark::internal::Benchmark* b) {
  b->Args({256, 1000})->Unit(benchmark::kMicrosecond)->UseRealTime();
}

}  // namespace

BENCHMARK(mmkd_LogitKD_value)->Apply(kd_shapes);
BENCHMARK(mmkd_LogitKD_value_and_grad)->Apply(kd_shapes);
BENCHMARK(mmkd_DecoupledKD_value_and_grad)->Apply(one_shape);
BENCHMARK(mmkd_CrossEntropy_value_and_grad)->Apply(one_shape);
#ifdef MMKD_BENCH_TORCH
BENCHMARK(torch_LogitKD_value)->Apply(kd_shapes);
BENCHMARK(torch_LogitKD_value_and_grad)->Apply(kd_shapes);
BENCHMARK(torch_DecoupledKD_value_and_grad)->Apply(one_shape);
BENCHMARK(torch_CrossEntropy_value_and_grad)->Apply(one_shape);
#endif

MMKD_BENCHMARK_MAIN()
