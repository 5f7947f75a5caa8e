// Logit losses: mmkd against the same loss in libtorch (forward + autograd backward), both single
// threaded, in one binary. Names: <impl>_<loss>_<value|value_and_grad>/N/C. bytes_per_second
// counts the matrices each call must touch: value reads student and teacher; value_and_grad also
// reads and writes the gradient.

#include "bench_common.hpp"

namespace {

using namespace bench;

Mat random_logits(Index n, Index c, std::uint64_t seed) {
  return random_matrix(n, c, seed);
}

void set_bytes(benchmark::State& st, int matrices) {
  bench::set_bytes(st, double(matrices) * double(st.range(0) * st.range(1)));
}

void mmkd_LogitKD_value(benchmark::State& st) {
  const Mat s = random_logits(st.range(0), st.range(1), 1),
            t = random_logits(st.range(0), st.range(1), 2);
  mmkd::LogitKD<float> kd;
  for (auto _ : st) benchmark::DoNotOptimize(kd.value(s, t));
  set_bytes(st, 2);
}

void mmkd_LogitKD_value_and_grad(benchmark::State& st) {
  const Mat s = random_logits(st.range(0), st.range(1), 1),
            t = random_logits(st.range(0), st.range(1), 2);
  Mat g = Mat::Zero(st.range(0), st.range(1));
  mmkd::LogitKD<float> kd;
  kd.value_and_grad(s, t, g);  // sizes the workspace
  for (auto _ : st) {
    benchmark::DoNotOptimize(kd.value_and_grad(s, t, g));
    benchmark::ClobberMemory();
  }
  set_bytes(st, 4);
}

void mmkd_DecoupledKD_value_and_grad(benchmark::State& st) {
  const Mat s = random_logits(st.range(0), st.range(1), 1),
            t = random_logits(st.range(0), st.range(1), 2);
  const mmkd::Labels y = random_labels(st.range(0), st.range(1));
  Mat g = Mat::Zero(st.range(0), st.range(1));
  mmkd::DecoupledKD<float> dkd;
  dkd.value_and_grad(s, t, y, g);
  for (auto _ : st) {
    benchmark::DoNotOptimize(dkd.value_and_grad(s, t, y, g));
    benchmark::ClobberMemory();
  }
  set_bytes(st, 4);
}

void mmkd_CrossEntropy_value_and_grad(benchmark::State& st) {
  const Mat z = random_logits(st.range(0), st.range(1), 1);
  const mmkd::Labels y = random_labels(st.range(0), st.range(1));
  Mat g = Mat::Zero(st.range(0), st.range(1));
  mmkd::CrossEntropy<float> ce;
  ce.value_and_grad(z, y, g);
  for (auto _ : st) {
    benchmark::DoNotOptimize(ce.value_and_grad(z, y, g));
    benchmark::ClobberMemory();
  }
  set_bytes(st, 3);
}

#ifdef MMKD_BENCH_TORCH
namespace F = torch::nn::functional;

torch::Tensor torch_kd(const torch::Tensor& s, const torch::Tensor& t, double temp) {
  return F::kl_div(torch::log_softmax(s / temp, 1), torch::softmax(t / temp, 1),
                   F::KLDivFuncOptions().reduction(torch::kBatchMean)) *
         (temp * temp);
}

void torch_LogitKD_value(benchmark::State& st) {
  torch::set_num_threads(1);
  const auto s = to_tensor(random_logits(st.range(0), st.range(1), 1));
  const auto t = to_tensor(random_logits(st.range(0), st.range(1), 2));
  torch::NoGradGuard no_grad;
  for (auto _ : st) benchmark::DoNotOptimize(torch_kd(s, t, 4.0).item<float>());
  set_bytes(st, 2);
}

void torch_LogitKD_value_and_grad(benchmark::State& st) {
  torch::set_num_threads(1);
  auto s = to_tensor(random_logits(st.range(0), st.range(1), 1)).set_requires_grad(true);
  const auto t = to_tensor(random_logits(st.range(0), st.range(1), 2));
  for (auto _ : st) {
    auto loss = torch_kd(s, t, 4.0);
    loss.backward();  // accumulates into s.grad, as mmkd adds into its buffer
    benchmark::DoNotOptimize(loss.item<float>());
  }
  set_bytes(st, 4);
}

void torch_DecoupledKD_value_and_grad(benchmark::State& st) {
  torch::set_num_threads(1);
  auto s = to_tensor(random_logits(st.range(0), st.range(1), 1)).set_requires_grad(true);
  const auto t = to_tensor(random_logits(st.range(0), st.range(1), 2));
  const mmkd::Labels yl = random_labels(st.range(0), st.range(1));
  const auto y =
      torch::from_blob(const_cast<int*>(yl.data()), {yl.size()}, torch::kInt32).to(torch::kLong);
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
  set_bytes(st, 4);
}

void torch_CrossEntropy_value_and_grad(benchmark::State& st) {
  torch::set_num_threads(1);
  auto z = to_tensor(random_logits(st.range(0), st.range(1), 1)).set_requires_grad(true);
  const mmkd::Labels yl = random_labels(st.range(0), st.range(1));
  const auto y =
      torch::from_blob(const_cast<int*>(yl.data()), {yl.size()}, torch::kInt32).to(torch::kLong);
  for (auto _ : st) {
    auto loss = F::cross_entropy(z, y);
    loss.backward();
    benchmark::DoNotOptimize(loss.item<float>());
  }
  set_bytes(st, 3);
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

BENCHMARK_MAIN();
