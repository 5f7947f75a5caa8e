// ReviewKD: the whole student side (ReviewFusion forward + HierarchicalContextLoss + backward,
// train mode) and its parts on their own (one AttentionFusion, BatchNorm2d, the HCL), mmkd against
// the same computation in libtorch (conv2d, batch_norm, interpolate, adaptive_avg_pool2d,
// autograd), on the same thread count, in one binary (with EIGEN_USE_BLAS: mmkd's products on the
// BLAS, reported as "mmkd-blas"). FLOPS counts the flops of the convolutions as direct (im2col)
// convolutions, an effective rate since Winograd does fewer; GEMM_share compares it with a plain
// GEMM of the largest convolution's im2col product, so it can exceed 100%.

#include <mmkd/review/attention_fusion.hpp>
#include <mmkd/review/batch_norm.hpp>
#include <mmkd/review/hierarchical_context_loss.hpp>
#include <mmkd/review/review_fusion.hpp>

#include <array>
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
using bench::random_map;
using Views = std::vector<mmkd::ConstTensor4Ref<float>>;

struct Config {
  std::vector<Index> channels, shapes;  // student = teacher channels, shallow → deep
  Index mid;
};

// resnet20 (reference §1.4), and ImageNet ResNet-18's stages 2–4 + the pooled feature with
// mid 256: the 14x14 and 7x7 stages use overlapping pooling bins.
const Config kConfigs[] = {{{16, 32, 64, 64}, {32, 16, 8, 1}, 64},
                           {{128, 256, 512, 512}, {28, 14, 7, 1}, 256}};

// Flops of one ABF's convolutions (1x1 in → mid, 3x3 mid → out) over the three passes (forward,
// dX, dW) at `px` pixels.
double abf_flops(Index px, Index in, Index mid, Index out) {
  return 3 * 2 * double(px) * (double(in) * double(mid) + 9.0 * double(mid) * double(out));
}

struct Inputs {
  std::vector<mmkd::Tensor4<float>> feats, teacher;
  double conv_flops = 0;
  std::array<Index, 3> dominant{};  // (m, n, k) of the largest 3x3 convolution's product
  Inputs(const Config& c, Index n) {
    double largest = 0;
    for (std::size_t k = 0; k < c.channels.size(); ++k) {
      const Index ch = c.channels[k], h = c.shapes[k];
      feats.push_back(random_map(n, ch, h, 10 + k));
      teacher.push_back(random_map(n, ch, h, 20 + k));
      conv_flops += abf_flops(n * h * h, ch, c.mid, ch);
      const double conv3 = double(h * h) * double(ch);
      if (conv3 > largest) {
        largest = conv3;
        dominant = {ch, h * h, 9 * c.mid};
      }
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
  // A training step's steady state: buffers cleared, loss, backward.
  const double t_call = bench::timed_loop(st, [&] {
    for (auto& d : d_out) d.setZero();
    for (auto& d : d_feat) d.setZero();
    review.zero_grad();
    benchmark::DoNotOptimize(hcl.value_and_grad(review.forward(fv), tv, gv));
    review.backward(gcv, dfv);
  });
  const auto& g = in.dominant;
  bench::report_gemm_bound(st, t_call, in.conv_flops, g[0], g[1], g[2]);
}

// One fusing ABF of resnet20's shallowest stage: x N x in x H x H, the deeper stage's residual
// N x mid x H/2 x H/2; forward and backward for a given cotangent.
struct AbfInputs {
  Index n, in, mid, h;
  mmkd::Tensor4<float> x, residual, dy;
  explicit AbfInputs(const benchmark::State& st)
      : n(st.range(0)),
        in(st.range(1)),
        mid(st.range(2)),
        h(st.range(3)),
        x(random_map(n, in, h, 1)),
        residual(random_map(n, mid, h / 2, 2)),
        dy(random_map(n, in, h, 3)) {}
};

void mmkd_AttentionFusion_forward_backward(benchmark::State& st) {
  AbfInputs a(st);
  mmkd::AttentionFusion<float> abf({a.in, a.mid, a.in, true, 7});
  mmkd::Tensor4<float> dx(a.x.dimensions()), dres(a.residual.dimensions());
  dx.setZero();
  dres.setZero();
  const mmkd::ConstTensor4Ref<float> none(nullptr, 0, 0, 0, 0);
  const double t_call = bench::timed_loop(st, [&] {
    benchmark::DoNotOptimize(abf.forward(a.x, a.residual).data());
    abf.backward(a.dy, none, dx, dres);
  });
  bench::report_gemm_bound(st, t_call, abf_flops(a.n * a.h * a.h, a.in, a.mid, a.in), a.in,
                           a.h * a.h, 9 * a.mid);
}

// Train-mode batch norm, forward and backward: x, dy read, y written, dx added to.
void mmkd_BatchNorm2d_forward_backward(benchmark::State& st) {
  const Index n = st.range(0), c = st.range(1), h = st.range(2);
  const auto x = random_map(n, c, h, 1), dy = random_map(n, c, h, 2);
  mmkd::Tensor4<float> dx(x.dimensions());
  dx.setZero();
  mmkd::BatchNorm2d<float> bn({c});
  const double t_call = bench::timed_loop(st, [&] {
    benchmark::DoNotOptimize(bn.forward(x).data());
    bn.backward(dy, dx);
  });
  bench::report_memory_bound(st, t_call, {double(x.size()), 2, 1, 1});
}

// HCL alone on resnet20's stage shapes (student, teacher read, gradient added to).
void mmkd_HierarchicalContextLoss_value_and_grad(benchmark::State& st) {
  const Config& cfg = kConfigs[0];
  Inputs in(cfg, st.range(0));
  std::vector<mmkd::Tensor4<float>> grads;
  double elements = 0;
  for (auto& f : in.feats) {
    grads.emplace_back(f.dimensions());
    grads.back().setZero();
    elements += double(f.size());
  }
  mmkd::HierarchicalContextLoss<float> hcl;
  const Views fv(in.feats.begin(), in.feats.end()), tv(in.teacher.begin(), in.teacher.end());
  const std::vector<mmkd::Tensor4Ref<float>> gv(grads.begin(), grads.end());
  const double t_call =
      bench::timed_loop(st, [&] { benchmark::DoNotOptimize(hcl.value_and_grad(fv, tv, gv)); });
  bench::report_memory_bound(st, t_call, {elements, 2, 0, 1});
}

#ifdef MMKD_BENCH_TORCH
std::vector<torch::Tensor> to_tensors(const std::vector<mmkd::Tensor4<float>>& v, bool grad) {
  std::vector<torch::Tensor> out;
  for (const auto& x : v) out.push_back(bench::to_tensor(x).set_requires_grad(grad));
  return out;
}

void torch_review(benchmark::State& st, int config) {
  bench::torch_threads();
  const Config& cfg = kConfigs[config];
  Inputs in(cfg, st.range(0));
  mmkd::ReviewFusion<float> review(options(cfg));
  torch_ref::TorchReview ref(review, torch::kFloat32);
  const auto feats = to_tensors(in.feats, true), teacher = to_tensors(in.teacher, false);
  bench::torch_loop(st, [&] {
    for (auto f : feats) f.mutable_grad().reset();
    for (auto& p : ref.params) p.second.mutable_grad().reset();
    auto loss = torch_ref::torch_hcl(ref.forward(feats), teacher);
    loss.backward();
    return loss.item<float>();
  });
}

void torch_AttentionFusion_forward_backward(benchmark::State& st) {
  bench::torch_threads();
  AbfInputs a(st);
  mmkd::AttentionFusion<float> abf({a.in, a.mid, a.in, true, 7});
  torch_ref::TorchReview ref;
  ref.load(abf, torch::kFloat32);
  auto x = bench::to_tensor(a.x).set_requires_grad(true);
  auto residual = bench::to_tensor(a.residual).set_requires_grad(true);
  const auto dy = bench::to_tensor(a.dy);
  bench::torch_loop(st, [&] {
    auto y = ref.abf("", x, &residual, 0).first;
    y.backward(dy);
    return x.grad().data_ptr<float>()[0];
  });
}

void torch_BatchNorm2d_forward_backward(benchmark::State& st) {
  bench::torch_threads();
  const Index n = st.range(0), c = st.range(1), h = st.range(2);
  auto x = bench::to_tensor(random_map(n, c, h, 1)).set_requires_grad(true);
  const auto dy = bench::to_tensor(random_map(n, c, h, 2));
  auto weight = torch::ones({c}).set_requires_grad(true);
  auto bias = torch::zeros({c}).set_requires_grad(true);
  auto running_mean = torch::zeros({c}), running_var = torch::ones({c});
  bench::torch_loop(st, [&] {
    auto y = torch::batch_norm(x, weight, bias, running_mean, running_var, true, 0.1, 1e-5, false);
    y.backward(dy);
    return x.grad().data_ptr<float>()[0];
  });
}

void torch_HierarchicalContextLoss_value_and_grad(benchmark::State& st) {
  bench::torch_threads();
  Inputs in(kConfigs[0], st.range(0));
  const auto feats = to_tensors(in.feats, true), teacher = to_tensors(in.teacher, false);
  bench::torch_loop(st, [&] {
    auto loss = torch_ref::torch_hcl(feats, teacher);
    loss.backward();
    return loss.item<float>();
  });
}
#endif

void setup(benchmark::internal::Benchmark* b) {
  b->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2.0);
}
void abf_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"N", "C", "mid", "H"})->Args({64, 16, 64, 32});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}
void bn_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"N", "C", "H"})->Args({64, 64, 32})->Args({16, 256, 28});
  b->Unit(benchmark::kMicrosecond)->UseRealTime();
}
void hcl_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"N"})->Arg(64)->Unit(benchmark::kMicrosecond)->UseRealTime();
}

}  // namespace

// Names: <impl>_ReviewKD-<config>_forward+backward/N:<N>, <impl>_<class>_<call>/<arg>:<value>...
BENCHMARK_CAPTURE(mmkd_review, resnet20, 0)
    ->Name(MMKD_IMPL "_ReviewKD-resnet20_forward+backward")
    ->ArgName("N")
    ->Arg(4)
    ->Arg(64)
    ->Apply(setup);
BENCHMARK_CAPTURE(mmkd_review, imagenet, 1)
    ->Name(MMKD_IMPL "_ReviewKD-ImageNet-like_forward+backward")
    ->ArgName("N")
    ->Arg(16)
    ->Apply(setup);
BENCHMARK(mmkd_AttentionFusion_forward_backward)
    ->Name(MMKD_IMPL "_AttentionFusion_forward+backward")
    ->Apply(abf_shapes);
BENCHMARK(mmkd_BatchNorm2d_forward_backward)
    ->Name(MMKD_IMPL "_BatchNorm2d_forward+backward")
    ->Apply(bn_shapes);
BENCHMARK(mmkd_HierarchicalContextLoss_value_and_grad)
    ->Name(MMKD_IMPL "_HierarchicalContextLoss_value_and_grad")
    ->Apply(hcl_shapes);
#if defined(MMKD_BENCH_TORCH) && !defined(EIGEN_USE_BLAS)
BENCHMARK_CAPTURE(torch_review, resnet20, 0)
    ->Name("torch_ReviewKD-resnet20_forward+backward")
    ->ArgName("N")
    ->Arg(4)
    ->Arg(64)
    ->Apply(setup);
BENCHMARK_CAPTURE(torch_review, imagenet, 1)
    ->Name("torch_ReviewKD-ImageNet-like_forward+backward")
    ->ArgName("N")
    ->Arg(16)
    ->Apply(setup);
BENCHMARK(torch_AttentionFusion_forward_backward)
    ->Name("torch_AttentionFusion_forward+backward")
    ->Apply(abf_shapes);
BENCHMARK(torch_BatchNorm2d_forward_backward)
    ->Name("torch_BatchNorm2d_forward+backward")
    ->Apply(bn_shapes);
BENCHMARK(torch_HierarchicalContextLoss_value_and_grad)
    ->Name("torch_HierarchicalContextLoss_value_and_grad")
    ->Apply(hcl_shapes);
#endif

MMKD_BENCHMARK_MAIN()
