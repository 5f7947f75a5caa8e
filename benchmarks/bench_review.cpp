// ReviewKD: ReviewFusion forward + HierarchicalContextLoss + backward (train mode), mmkd against
// the same pipeline in libtorch (conv2d, batch_norm, interpolate, adaptive_avg_pool2d, autograd),
// single thread, in one binary (with EIGEN_USE_BLAS: mmkd's products on the BLAS, reported as
// "mmkd-blas"). The argument is the batch size. FLOPS counts the flops of the convolutions as
// direct (im2col) convolutions: an effective rate, since Winograd does fewer.

#include <vector>

#include "bench_common.hpp"

#ifdef MMKD_BENCH_TORCH
#include "torch/review_reference.hpp"
#endif

#ifdef EIGEN_USE_BLAS
#define MMKD_IMPL "mmkd-blas"
#else
#define MMKD_IMPL "mmkd"
#endif

namespace {

using bench::Index;
using Views = std::vector<mmkd::ConstTensor4Ref<float>>;

struct Config {
  std::vector<Index> channels, shapes;  // student = teacher channels, shallow → deep
  Index mid;
};

// resnet20 (reference §1.4), and ImageNet ResNet-18's stages 2–4 + the pooled feature with
// mid 256: the 14x14 and 7x7 stages use overlapping pooling bins.
const Config kConfigs[] = {{{16, 32, 64, 64}, {32, 16, 8, 1}, 64},
                           {{128, 256, 512, 512}, {28, 14, 7, 1}, 256}};

mmkd::Tensor4<float> random_map(Index n, Index c, Index h, std::uint64_t seed) {
  const bench::Mat m = bench::random_matrix(n * c, h * h, seed, 1.0);
  mmkd::Tensor4<float> t(n, c, h, h);
  std::copy(m.data(), m.data() + m.size(), t.data());
  return t;
}

struct Inputs {
  std::vector<mmkd::Tensor4<float>> feats, teacher;
  double conv_flops = 0;  // multiply-adds ×2 of the three conv passes (forward, dX, dW)
  Inputs(const Config& c, Index n) {
    for (std::size_t k = 0; k < c.channels.size(); ++k) {
      const Index ch = c.channels[k], h = c.shapes[k];
      feats.push_back(random_map(n, ch, h, 10 + k));
      teacher.push_back(random_map(n, ch, h, 20 + k));
      const double px = double(n * h * h);
      conv_flops += 3 * 2 * px * (double(ch) * double(c.mid) + 9.0 * double(c.mid) * double(ch));
    }
  }
};

mmkd::ReviewFusion<float>::Options options(const Config& c) {
  mmkd::ReviewFusion<float>::Options o;
  o.in_channels = o.out_channels = c.channels;
  o.shapes = c.shapes;
  o.mid_channels = c.mid;
  return o;
}

void mmkd_review(benchmark::State& st, int config) {
  const Config& cfg = kConfigs[config];
  const Index n = st.range(0);
  Inputs in(cfg, n);
  mmkd::ReviewFusion<float> review(options(cfg));
  mmkd::HierarchicalContextLoss<float> hcl;
  std::vector<mmkd::Tensor4<float>> d_out, d_feat;
  for (auto& f : in.feats) {
    d_out.emplace_back(n, f.dimension(1), f.dimension(2), f.dimension(3));
    d_feat.emplace_back(f.dimensions());
  }
  const Views fv(in.feats.begin(), in.feats.end()), tv(in.teacher.begin(), in.teacher.end());
  const std::vector<mmkd::Tensor4Ref<float>> gv(d_out.begin(), d_out.end()),
      dfv(d_feat.begin(), d_feat.end());
  const Views gcv(d_out.begin(), d_out.end());
  auto step = [&] {
    for (auto& d : d_out) d.setZero();
    for (auto& d : d_feat) d.setZero();
    review.zero_grad();
    const float loss = hcl.value_and_grad(review.forward(fv), tv, gv);
    review.backward(gcv, dfv);
    return loss;
  };
  step();  // warm-up: buffers sized and touched, as in a training loop's steady state
  for (auto _ : st) benchmark::DoNotOptimize(step());
  st.counters["FLOPS"] =
      benchmark::Counter(in.conv_flops * double(st.iterations()), benchmark::Counter::kIsRate);
}

#ifdef MMKD_BENCH_TORCH
void torch_review(benchmark::State& st, int config) {
  torch::set_num_threads(1);
  const Config& cfg = kConfigs[config];
  const Index n = st.range(0);
  Inputs in(cfg, n);
  mmkd::ReviewFusion<float> review(options(cfg));
  mmkd_torch::TorchReview ref(review, torch::kFloat32);
  std::vector<torch::Tensor> feats, teacher;
  for (std::size_t k = 0; k < in.feats.size(); ++k) {
    const auto& d = in.feats[k].dimensions();
    feats.push_back(
        bench::to_tensor(in.feats[k].data(), {d[0], d[1], d[2], d[3]}).set_requires_grad(true));
    teacher.push_back(bench::to_tensor(in.teacher[k].data(), {d[0], d[1], d[2], d[3]}));
  }
  auto step = [&] {
    for (auto& f : feats) f.mutable_grad().reset();
    for (auto& p : ref.params) p.second.mutable_grad().reset();
    auto loss = mmkd_torch::torch_hcl(ref.forward(feats), teacher);
    loss.backward();
    return loss.item<float>();
  };
  step();  // warm-up
  for (auto _ : st) benchmark::DoNotOptimize(step());
  st.counters["FLOPS"] =
      benchmark::Counter(in.conv_flops * double(st.iterations()), benchmark::Counter::kIsRate);
}
#endif

void setup(benchmark::internal::Benchmark* b) {
  b->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2.0);
}

}  // namespace

// Names: <impl>_ReviewKD-<config>_forward+backward/<N>.
BENCHMARK_CAPTURE(mmkd_review, resnet20, 0)
    ->Name(MMKD_IMPL "_ReviewKD-resnet20_forward+backward")
    ->Arg(4)
    ->Arg(64)
    ->Apply(setup);
BENCHMARK_CAPTURE(mmkd_review, imagenet, 1)
    ->Name(MMKD_IMPL "_ReviewKD-ImageNet-like_forward+backward")
    ->Arg(16)
    ->Apply(setup);
#if defined(MMKD_BENCH_TORCH) && !defined(EIGEN_USE_BLAS)
BENCHMARK_CAPTURE(torch_review, resnet20, 0)
    ->Name("torch_ReviewKD-resnet20_forward+backward")
    ->Arg(4)
    ->Arg(64)
    ->Apply(setup);
BENCHMARK_CAPTURE(torch_review, imagenet, 1)
    ->Name("torch_ReviewKD-ImageNet-like_forward+backward")
    ->Arg(16)
    ->Apply(setup);
#endif

BENCHMARK_MAIN();
