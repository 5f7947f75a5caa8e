// Feature-map losses of the standard catalogue: mmkd against the same loss in libtorch (forward +
// autograd backward), same thread count, one binary. Names: <impl>_<class>_value_and_grad/N/C/H,
// on square H x H maps: a CIFAR-like resnet stage (N = 64, 64 x 8 x 8) and an ImageNet-like one
// (N = 16, 512 x 7 x 7). BW_share: against a plain pass over the bytes the call must touch (student
// and teacher read, the gradient updated).

#include <mmkd/feature/hint_loss.hpp>

#include "bench_common.hpp"

namespace {

using namespace bench;

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"N", "C", "H"})->Args({64, 64, 8})->Args({16, 512, 7});
  b->Unit(benchmark::kMicrosecond)->UseRealTime();
}

void mmkd_HintLoss_value_and_grad(benchmark::State& st) {
  const Index n = st.range(0), d = st.range(1) * st.range(2) * st.range(2);
  const Mat s = random_matrix(n, d, 1), t = random_matrix(n, d, 2);
  Mat g = Mat::Zero(n, d);
  mmkd::HintLoss<float> hint;
  const double t_call =
      timed_loop(st, [&] { benchmark::DoNotOptimize(hint.value_and_grad(s, t, g)); });
  report_memory_bound(st, t_call, {double(n * d), 2, 0, 1});
}

#ifdef MMKD_BENCH_TORCH
void torch_HintLoss_value_and_grad(benchmark::State& st) {
  torch_threads();
  const Index n = st.range(0), c = st.range(1), h = st.range(2);
  auto s =
      to_tensor(random_matrix(n, c * h * h, 1)).view({n, c, h, h}).detach().requires_grad_(true);
  const auto t = to_tensor(random_matrix(n, c * h * h, 2)).view({n, c, h, h});
  torch_loop(st, [&] {
    auto loss = torch::mse_loss(s, t);
    loss.backward();
    return loss.item<float>();
  });
}
#endif

}  // namespace

BENCHMARK(mmkd_HintLoss_value_and_grad)->Apply(shapes);
#ifdef MMKD_BENCH_TORCH
BENCHMARK(torch_HintLoss_value_and_grad)->Apply(shapes);
#endif

MMKD_BENCHMARK_MAIN()
