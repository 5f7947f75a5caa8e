#pragma once

// ReviewKD's ABF chain and HCL written with libtorch's own ops (conv2d, batch_norm, interpolate,
// adaptive_avg_pool2d, sigmoid), following the official CIFAR code; the parameters are copied
// from an mmkd::ReviewFusion by name. Used by the cross-check tests and the benchmarks.

#include <mmkd/review/review_fusion.hpp>

#include <map>
#include <string>
#include <vector>

#include <torch/torch.h>

// The core only: each file includes the headers of the losses it uses, so a change to one
// family's header recompiles only the objects that use that family.
#include <mmkd/core/errors.hpp>
#include <mmkd/core/module.hpp>
#include <mmkd/core/normalize.hpp>
#include <mmkd/core/parallel.hpp>
#include <mmkd/core/random.hpp>
#include <mmkd/core/reduction.hpp>
#include <mmkd/core/softmax.hpp>
#include <mmkd/core/tensor.hpp>
#include <mmkd/core/types.hpp>
#include <mmkd/core/version.hpp>
#include <mmkd/gradcheck.hpp>

namespace torch_ref {

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

/// A libtorch copy of an mmkd view: conv weights get PyTorch's (O, C, kh, kw) shape, vectors 1-D.
template <class S>
torch::Tensor to_torch_param(const std::string& name, const Eigen::Map<mmkd::Matrix<S>>& m,
                             torch::Dtype dtype) {
  const auto src_type = std::is_same<S, double>::value ? torch::kFloat64 : torch::kFloat32;
  auto t =
      torch::from_blob(const_cast<S*>(m.data()), {m.rows(), m.cols()}, src_type).to(dtype).clone();
  if (ends_with(name, "conv2.0.weight")) return t.view({m.rows(), m.cols() / 9, 3, 3});
  if (ends_with(name, ".0.weight")) return t.view({m.rows(), m.cols(), 1, 1});
  return t.view({m.rows() * m.cols()});
}

/// The ABF chain of the reference with parameters and buffers copied from `review`.
struct TorchReview {
  std::map<std::string, torch::Tensor> params, buffers;
  std::vector<int64_t> out_shapes;  // per stage, shallow → deep (0 = keep)
  int64_t stages = 0;
  bool training = true;

  TorchReview() = default;

  template <class S>
  TorchReview(mmkd::ReviewFusion<S>& review, torch::Dtype dtype) {
    load(review, dtype);
    stages = review.stages();
    const auto& o = review.options();
    for (int64_t k = 0; k < stages; ++k)
      out_shapes.push_back(o.out_shapes.empty() ? 0 : o.out_shapes[std::size_t(k)]);
  }

  /// Copies the parameters and buffers of an mmkd module (ReviewFusion, or one AttentionFusion
  /// for `abf` with prefix "") by name, and its train/eval mode.
  template <class S, template <class> class Module>
  void load(Module<S>& module, torch::Dtype dtype) {
    for (auto& p : module.parameters())
      params[p.name] = to_torch_param<S>(p.name, p.value, dtype).set_requires_grad(true);
    for (auto& b : module.buffers()) buffers[b.name] = to_torch_param<S>(b.name, b.value, dtype);
    training = module.is_training();
  }

  torch::Tensor bn(const std::string& prefix, const torch::Tensor& x) {
    if (training) buffers[prefix + ".num_batches_tracked"] += 1;  // as nn.BatchNorm2d.forward
    return torch::batch_norm(x, params[prefix + ".weight"], params[prefix + ".bias"],
                             buffers[prefix + ".running_mean"], buffers[prefix + ".running_var"],
                             training, 0.1, 1e-5, false);
  }

  /// One ABF (official CIFAR forward); returns {output, residual}.
  std::pair<torch::Tensor, torch::Tensor> abf(const std::string& p, torch::Tensor x,
                                              const torch::Tensor* residual, int64_t out_shape) {
    namespace F = torch::nn::functional;
    const int64_t h = x.size(2), w = x.size(3);
    x = bn(p + "conv1.1", torch::conv2d(x, params[p + "conv1.0.weight"]));
    if (residual) {
      auto y = F::interpolate(
          *residual,
          F::InterpolateFuncOptions().size(std::vector<int64_t>{h, w}).mode(torch::kNearest));
      auto z = torch::cat({x, y}, 1);
      z = torch::sigmoid(
          torch::conv2d(z, params[p + "att_conv.0.weight"], params[p + "att_conv.0.bias"]));
      x = x * z.narrow(1, 0, 1) + y * z.narrow(1, 1, 1);
    }
    if (out_shape > 0 && (h != out_shape || w != out_shape)) {
      x = F::interpolate(x, F::InterpolateFuncOptions()
                                .size(std::vector<int64_t>{out_shape, out_shape})
                                .mode(torch::kNearest));
    }
    auto y = bn(p + "conv2.1", torch::conv2d(x, params[p + "conv2.0.weight"], {}, 1, 1));
    return {y, x};
  }

  /// Outputs shallow → deep for features shallow → deep.
  std::vector<torch::Tensor> forward(const std::vector<torch::Tensor>& features) {
    std::vector<torch::Tensor> out(static_cast<std::size_t>(stages));
    torch::Tensor res;
    for (int64_t k = stages - 1; k >= 0; --k) {
      const std::string p = "abfs." + std::to_string(stages - 1 - k) + ".";
      auto r = abf(p, features[std::size_t(k)], k == stages - 1 ? nullptr : &res,
                   out_shapes[std::size_t(k)]);
      out[std::size_t(k)] = r.first;
      res = r.second;
    }
    return out;
  }
};

/// The reference `hcl`: per stage MSE plus pooled levels 4, 2, 1 (< h) with halving weights,
/// divided by the total weight, summed over stages.
inline torch::Tensor torch_hcl(const std::vector<torch::Tensor>& fs,
                               const std::vector<torch::Tensor>& ft) {
  namespace F = torch::nn::functional;
  torch::Tensor total;
  for (std::size_t k = 0; k < fs.size(); ++k) {
    const int64_t h = fs[k].size(2);
    auto loss = F::mse_loss(fs[k], ft[k]);
    double cnt = 1.0, tot = 1.0;
    for (int64_t l : {4, 2, 1}) {
      if (l >= h) continue;
      auto ps = F::adaptive_avg_pool2d(fs[k], F::AdaptiveAvgPool2dFuncOptions({l, l}));
      auto pt = F::adaptive_avg_pool2d(ft[k], F::AdaptiveAvgPool2dFuncOptions({l, l}));
      cnt /= 2.0;
      loss = loss + F::mse_loss(ps, pt) * cnt;
      tot += cnt;
    }
    loss = loss / tot;
    total = k == 0 ? loss : total + loss;
  }
  return total;
}

}  // namespace torch_ref
