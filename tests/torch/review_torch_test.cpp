// Cross-checks of ReviewFusion + HierarchicalContextLoss against the same ABF chain and HCL
// built from libtorch's conv2d, batch_norm, interpolate and adaptive_avg_pool2d, with our
// parameters copied in: outputs, loss, feature gradients, parameter gradients and the running
// statistics, in train and eval mode.

#include <mmkd/review/batch_norm.hpp>
#include <mmkd/review/conv2d.hpp>
#include <mmkd/review/hierarchical_context_loss.hpp>
#include <mmkd/review/review_fusion.hpp>

#include "torch/review_reference.hpp"
#include "torch/torch_support.hpp"

using namespace mmkd_test;

namespace {

using Tensor4 = mmkd::Tensor4<double>;

torch::Tensor to_torch4(const Tensor4& t, bool requires_grad = false) {
  const auto& d = t.dimensions();
  return torch::from_blob(const_cast<double*>(t.data()), {d[0], d[1], d[2], d[3]}, torch::kFloat64)
      .clone()
      .set_requires_grad(requires_grad);
}

/// Largest |a − b| / max(1, |b|) over two equally sized buffers.
double max_rel(const double* a, const torch::Tensor& b_in, Index size) {
  const auto b = b_in.detach().contiguous().to(torch::kFloat64);
  REQUIRE(b.numel() == size);
  const Eigen::Map<const Eigen::ArrayXd> x(a, size), y(b.data_ptr<double>(), size);
  return ((x - y).abs() / y.abs().max(1.0)).maxCoeff();
}

struct Config {
  const char* name;
  std::vector<Index> in, out, shapes, out_shapes;
  Index mid, n;
};

void check_against_torch(const Config& cfg, bool train) {
  INFO(cfg.name << (train ? ", train mode" : ", eval mode"));
  mmkd::ReviewFusion<double>::Options o;
  o.in_channels = cfg.in;
  o.out_channels = cfg.out;
  o.shapes = cfg.shapes;
  o.out_shapes = cfg.out_shapes;
  o.mid_channels = cfg.mid;
  o.seed = 7;
  mmkd::ReviewFusion<double> review(o);
  const std::size_t s = cfg.in.size();
  std::vector<Tensor4> feats, teacher, grads, dfeats;
  for (std::size_t k = 0; k < s; ++k) {
    const Index h = cfg.shapes[k], oh = cfg.out_shapes.empty() ? h : cfg.out_shapes[k];
    feats.push_back(random_map<double>(cfg.n, cfg.in[k], h, h, 100 + k));
    teacher.push_back(random_map<double>(cfg.n, cfg.out[k], oh, oh, 200 + k));
    grads.emplace_back(cfg.n, cfg.out[k], oh, oh);
    grads.back().setZero();
    dfeats.emplace_back(cfg.n, cfg.in[k], h, h);
    dfeats.back().setZero();
  }
  const std::vector<mmkd::ConstTensor4Ref<double>> fv(feats.begin(), feats.end()),
      tv(teacher.begin(), teacher.end());
  if (!train) {
    // Move the running statistics away from (0, 1) first, with a train-mode pass.
    review.forward(fv);
    review.eval();
  }
  torch_ref::TorchReview ref(review, torch::kFloat64);

  // mmkd
  const auto& outs = review.forward(fv);
  mmkd::HierarchicalContextLoss<double> hcl;
  const double loss = hcl.value_and_grad(outs, tv, {grads.begin(), grads.end()});
  review.backward({grads.begin(), grads.end()}, {dfeats.begin(), dfeats.end()});

  // libtorch
  std::vector<torch::Tensor> tfeats, tteach;
  for (std::size_t k = 0; k < s; ++k) {
    tfeats.push_back(to_torch4(feats[k], true));
    tteach.push_back(to_torch4(teacher[k]));
  }
  const auto touts = ref.forward(tfeats);
  const auto tloss = torch_ref::torch_hcl(touts, tteach);
  tloss.backward();

  CHECK(loss == Approx(tloss.item<double>()).epsilon(1e-11));
  for (std::size_t k = 0; k < s; ++k) {
    INFO("stage " << k);
    CHECK(max_rel(outs[k].data(), touts[k], outs[k].size()) < 1e-10);
    CHECK(max_rel(dfeats[k].data(), tfeats[k].grad(), dfeats[k].size()) < 1e-9);
  }
  auto grads_view = review.gradients();
  REQUIRE(grads_view.size() == ref.params.size());
  for (auto& g : grads_view) {
    INFO(g.name);
    CHECK(max_rel(g.value.data(), ref.params.at(g.name).grad(), g.value.size()) < 1e-9);
  }
  for (auto& b : review.buffers()) {
    INFO(b.name);
    CHECK(max_rel(b.value.data(), ref.buffers.at(b.name), b.value.size()) < 1e-12);
  }
}

}  // namespace

TEST_CASE("ReviewFusion + HCL equal libtorch: CIFAR resnet56 -> resnet20 (N 4)",
          "[torch][review]") {
  const Config cfg{"resnet20", {16, 32, 64, 64}, {16, 32, 64, 64}, {32, 16, 8, 1}, {}, 64, 4};
  check_against_torch(cfg, true);
  check_against_torch(cfg, false);
}

TEST_CASE("ReviewFusion + HCL equal libtorch: ImageNet-like 28/14/7/1 stages (overlapping bins)",
          "[torch][review]") {
  const Config cfg{"imagenet-like", {8, 16, 32, 32}, {12, 24, 48, 48}, {28, 14, 7, 1}, {}, 16, 2};
  check_against_torch(cfg, true);
  check_against_torch(cfg, false);
}

TEST_CASE("ReviewFusion + HCL equal libtorch: ShuffleNet-like out_shapes (resize before conv2)",
          "[torch][review]") {
  const Config cfg{
      "out_shapes", {12, 24, 48, 48}, {8, 16, 32, 32}, {16, 8, 4, 1}, {32, 16, 8, 1}, 16, 2};
  check_against_torch(cfg, true);
  check_against_torch(cfg, false);
}

TEST_CASE("nearest resize and adaptive pooling index rules equal libtorch", "[torch][review]") {
  namespace F = torch::nn::functional;
  const std::pair<Index, Index> sizes[] = {{1, 8},  {8, 16}, {4, 32}, {3, 7}, {5, 7},  {7, 4},
                                           {14, 4}, {7, 2},  {5, 4},  {3, 2}, {16, 8}, {7, 5}};
  for (auto [in, out] : sizes) {
    INFO(in << " -> " << out);
    const Tensor4 x = random_map<double>(2, 3, in, in + 1, in * 31 + out);
    auto tx = to_torch4(x);
    Tensor4 y(2, 3, out, out);
    mmkd::nearest_resize<double>(x, y);
    auto ty = F::interpolate(
        tx, F::InterpolateFuncOptions().size(std::vector<int64_t>{out, out}).mode(torch::kNearest));
    CHECK(max_rel(y.data(), ty, y.size()) == 0);
    mmkd::adaptive_avg_pool2d<double>(x, y);
    auto tp = F::adaptive_avg_pool2d(tx, F::AdaptiveAvgPool2dFuncOptions({out, out}));
    CHECK(max_rel(y.data(), tp, y.size()) < 1e-15);
  }
}

TEST_CASE("conv2d_3x3 (im2col and Winograd) and conv2d_1x1 equal libtorch's conv2d",
          "[torch][review]") {
  using Algo = mmkd::Conv3x3Algorithm;
  const Index n = 3, c = 48, o = 40;
  for (auto [h, w] : {std::pair<Index, Index>{9, 8}, {14, 14}, {1, 1}, {2, 5}}) {
    const Tensor4 x = random_map<double>(n, c, h, w, h * 7 + w);
    const Matrix<double> wt = random_matrix<double>(o, 9 * c, 3, 0.1);
    const Tensor4 dy = random_map<double>(n, o, h, w, 99);
    auto tx = to_torch4(x, true);
    auto tw = to_torch(wt, true);
    auto ty = torch::conv2d(tx, tw.view({o, c, 3, 3}), {}, 1, 1);
    (ty * to_torch4(dy)).sum().backward();
    for (Algo algo : {Algo::Im2col, Algo::Winograd}) {
      INFO(h << "x" << w << " algorithm " << int(algo));
      Tensor4 y(n, o, h, w), dx(n, c, h, w);
      dx.setZero();
      Matrix<double> dw = Matrix<double>::Zero(o, 9 * c), ws;
      mmkd::conv2d_3x3<double>(x, wt, y, ws, algo);
      mmkd::conv2d_3x3_backward<double>(x, wt, dy, dx, dw, ws, algo);
      CHECK(max_rel(y.data(), ty, y.size()) < 1e-12);
      CHECK(max_rel(dx.data(), tx.grad(), dx.size()) < 1e-12);
      CHECK(max_rel(dw.data(), tw.grad(), dw.size()) < 1e-12);
    }
  }
}

TEST_CASE("BatchNorm2d buffers are nn.BatchNorm2d's state_dict buffers, num_batches_tracked too",
          "[torch][review][batchnorm]") {
  torch::nn::BatchNorm2d tbn(3);
  tbn->to(torch::kFloat64);
  mmkd::BatchNorm2d<double> bn({3});
  std::vector<std::string> names, tnames;
  for (auto& b : bn.buffers()) names.emplace_back(b.name);
  for (auto& b : tbn->named_buffers()) tnames.push_back(b.key());
  CHECK(names == tnames);
  const Matrix<double> x = random_matrix<double>(2 * 3, 4 * 5, 1);
  const auto tx = torch::from_blob(const_cast<double*>(x.data()), {2, 3, 4, 5}, torch::kFloat64);
  for (int step = 0; step < 3; ++step) {
    bn.forward(mmkd::ConstTensor4Ref<double>(x.data(), 2, 3, 4, 5));
    tbn->forward(tx);
  }
  bn.eval();
  tbn->eval();
  bn.forward(mmkd::ConstTensor4Ref<double>(x.data(), 2, 3, 4, 5));
  tbn->forward(tx);
  const auto tbuf = tbn->named_buffers();
  for (auto& b : bn.buffers()) {
    INFO(b.name);
    const auto t = tbuf[b.name].to(torch::kFloat64).flatten().contiguous();
    for (Index k = 0; k < b.value.size(); ++k)
      CHECK(b.value.data()[k] == Approx(t[k].item<double>()).epsilon(1e-12));
  }
}

TEST_CASE("HierarchicalContextLoss in float32 is as accurate as libtorch's",
          "[torch][review][float32]") {
  // Feature maps with a common offset of 1e4 (the MSE of two large, close maps) and without.
  for (double offset : {0.0, 1e4}) {
    INFO("offset " << offset);
    Tensor4 fs = random_map<double>(2, 3, 8, 8, 1), ft = random_map<double>(2, 3, 8, 8, 2);
    for (Index k = 0; k < fs.size(); ++k) {
      fs.data()[k] = double(float(fs.data()[k] + offset));
      ft.data()[k] = double(float(ft.data()[k] + offset));
    }
    const mmkd::Tensor4<float> fsf = fs.cast<float>(), ftf = ft.cast<float>();
    Tensor4 g64(2, 3, 8, 8);
    mmkd::Tensor4<float> g32(2, 3, 8, 8);
    g64.setZero();
    g32.setZero();
    mmkd::HierarchicalContextLoss<double> hcl64;
    mmkd::HierarchicalContextLoss<float> hcl32;
    const double v64 = hcl64.value_and_grad({fs}, {ft}, {g64});
    const double v32 = hcl32.value_and_grad({fsf}, {ftf}, {g32});
    const mmkd::Tensor4<double> g32d = g32.cast<double>();
    const FloatError ours = float_error(v32, v64, flat(g32d), flat(g64));
    auto x64 = to_torch4(fs, true);
    auto x32 = to_torch4(fs).to(torch::kFloat32).set_requires_grad(true);
    const auto l64 = torch_ref::torch_hcl({x64}, {to_torch4(ft)});
    const auto l32 = torch_ref::torch_hcl({x32}, {to_torch4(ft).to(torch::kFloat32)});
    l64.backward();
    l32.backward();
    const FloatError ref =
        float_error(l32.item<double>(), l64.item<double>(), from_torch(x32.grad().reshape({6, 64})),
                    from_torch(x64.grad().reshape({6, 64})));
    INFO("value error " << ours.value << " (libtorch " << ref.value << "), gradient " << ours.grad
                        << " (libtorch " << ref.grad << ")");
    CHECK(within_torch(ours.value, ref.value));
    CHECK(within_torch(ours.grad, ref.grad));
  }
}
