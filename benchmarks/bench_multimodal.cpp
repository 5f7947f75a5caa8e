// Multimodal losses and modules: mmkd against the same computation in libtorch (forward +
// autograd backward), on the same thread count, in one binary. Names:
// <impl>_<class>_<call>/<shape>. Each mmkd benchmark reports bytes_per_second for what a call must
// touch and BW_share against a plain pass over the same bytes; the softmax-based ones also
// exp_share (see bench_logit.cpp).

#include <mmkd/multimodal/modality_gram_kd.hpp>
#include <mmkd/multimodal/modality_saliency.hpp>
#include <mmkd/multimodal/modality_specific_kd.hpp>
#include <mmkd/multimodal/modality_weight_learner.hpp>
#include <mmkd/multimodal/modality_weighting.hpp>

#include "bench_common.hpp"

namespace {

using namespace bench;

// MSD at N x C with M modalities: instance-wise removal-KL weights computed once (they are
// constants for the gradient); the loss and both gradients are timed. Touched: student, teacher
// and their M single-modality stacks, and the two gradients.
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
  const double t_call = timed_loop(
      st, [&] { benchmark::DoNotOptimize(msd.value_and_grad(s, t, zs, zt, w, ds, dzs)); });
  report_memory_bound(st, t_call, {double((m + 1) * n * c), 2, 0, 1});
  report_exp_bound(st, t_call, (m + 1) * n, c, 2.0 * double(c));
}

// Instance weights from removal-KL saliency: reads the teacher and its M drop-one predictions.
void mmkd_ModalitySaliency_and_Weighting(benchmark::State& st) {
  const Index n = st.range(0), c = st.range(1), m = st.range(2);
  const Mat t = random_matrix(n, c, 2);
  const auto drop = random_stack(m, n, c, 5);
  mmkd::ModalitySaliency<float> saliency;
  mmkd::ModalityWeighting<float> weighting;
  const double t_call = timed_loop(st, [&] {
    benchmark::DoNotOptimize(weighting.compute(saliency.compute_removal(t, drop)).data());
  });
  report_memory_bound(st, t_call, {double((m + 1) * n * c), 1, 0, 0});
  report_exp_bound(st, t_call, m * n, c, 2.0 * double(c));  // the teacher's row again per m
}

// The meta-weight MLP (1 → 100 → 1) on the N·M auxiliary losses: forward and backward for a given
// cotangent. Touched: the K x 100 hidden activations, written forward and read backward.
void mmkd_ModalityWeightLearner_forward_backward(benchmark::State& st) {
  const Index k = st.range(0) * st.range(1);
  const Mat features = random_matrix(k, 1, 1).cwiseAbs(), dw = random_matrix(k, 1, 2);
  mmkd::ModalityWeightLearner<float> learner;
  const double t_call = timed_loop(st, [&] {
    benchmark::DoNotOptimize(learner.forward(features).data());
    learner.backward(dw);
  });
  report_memory_bound(st, t_call, {double(k * learner.options().hidden), 0, 0, 1});
}

void mmkd_ModalityGramKD_value_and_grad(benchmark::State& st) {
  const Index n = st.range(0), m = st.range(1), d = st.range(2);
  const auto fs = random_stack(m, n, d, 1), ft = random_stack(m, n, d, 2);
  mmkd::Tensor3<float> dfs(m, n, d);
  dfs.setZero();
  mmkd::ModalityGramKD<float> gram;
  const double t_call =
      timed_loop(st, [&] { benchmark::DoNotOptimize(gram.value_and_grad(fs, ft, dfs)); });
  report_memory_bound(st, t_call, {double(m * n * d), 2, 0, 1});
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
  torch_threads();
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
}

void torch_ModalitySaliency_and_Weighting(benchmark::State& st) {
  torch_threads();
  const Index n = st.range(0), c = st.range(1), m = st.range(2);
  const auto t = to_tensor(random_matrix(n, c, 2));
  const auto drop = to_tensor(random_stack(m, n, c, 5));
  torch::NoGradGuard no_grad;
  torch_loop(st, [&] {
    const auto pt = torch::softmax(t, -1), log_pt = torch::log_softmax(t, -1);
    const auto kl = (pt * (log_pt - torch::log_softmax(drop, -1))).sum(-1).t();  // N x M
    const auto a = kl + 1e-6;
    const auto w = a * (double(m) / a.sum(1, true));
    return w.sum().item<float>();
  });
}

void torch_ModalityWeightLearner_forward_backward(benchmark::State& st) {
  torch_threads();
  const Index k = st.range(0) * st.range(1), h = 100;
  const auto features = to_tensor(random_matrix(k, 1, 1).cwiseAbs());
  const auto dw = to_tensor(random_matrix(k, 1, 2));
  auto w1 = (torch::rand({h, 1}) - 0.5).set_requires_grad(true);
  auto b1 = (torch::rand({h}) - 0.5).set_requires_grad(true);
  auto w2 = ((torch::rand({1, h}) - 0.5) * 0.2).set_requires_grad(true);
  auto b2 = ((torch::rand({1}) - 0.5) * 0.2).set_requires_grad(true);
  torch_loop(st, [&] {
    auto w = torch::sigmoid(F::linear(torch::relu(F::linear(features, w1, b1)), w2, b2));
    w.backward(dw);
    return w2.grad().sum().item<float>();
  });
}

void torch_ModalityGramKD_value_and_grad(benchmark::State& st) {
  torch_threads();
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
}
#endif

void msd_shapes(benchmark::internal::Benchmark* b) {
  b->Args({256, 1000, 3})->Unit(benchmark::kMicrosecond)->UseRealTime();
}
// N, M: the learner sees N·M rows.
void learner_shapes(benchmark::internal::Benchmark* b) {
  b->Args({256, 3})->Args({4096, 4})->Unit(benchmark::kMicrosecond)->UseRealTime();
}
void gram_shapes(benchmark::internal::Benchmark* b) {
  b->Args({256, 3, 768})->Args({4096, 4, 256})->Unit(benchmark::kMicrosecond)->UseRealTime();
}

}  // namespace

BENCHMARK(mmkd_ModalitySpecificKD_value_and_grad)->Apply(msd_shapes);
BENCHMARK(mmkd_ModalitySaliency_and_Weighting)->Apply(msd_shapes);
BENCHMARK(mmkd_ModalityWeightLearner_forward_backward)->Apply(learner_shapes);
BENCHMARK(mmkd_ModalityGramKD_value_and_grad)->Apply(gram_shapes);
#ifdef MMKD_BENCH_TORCH
BENCHMARK(torch_ModalitySpecificKD_value_and_grad)->Apply(msd_shapes);
BENCHMARK(torch_ModalitySaliency_and_Weighting)->Apply(msd_shapes);
BENCHMARK(torch_ModalityWeightLearner_forward_backward)->Apply(learner_shapes);
BENCHMARK(torch_ModalityGramKD_value_and_grad)->Apply(gram_shapes);
#endif

MMKD_BENCHMARK_MAIN()
