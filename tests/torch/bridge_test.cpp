// The libtorch bridge (mmkd/torch.hpp): gradients through each wrapped mmkd loss equal
// libtorch's autograd of the same loss written with libtorch ops, including a grad_output other
// than 1 and a graph in front of the loss; bad tensors are refused.

#include <mmkd/torch.hpp>

#include <catch2/catch.hpp>

#include "review_reference.hpp"
#include "torch/torch_losses.hpp"

using namespace torch_ref;
using Tensors = std::vector<torch::Tensor>;

namespace {

torch::Tensor randn(at::IntArrayRef shape, double scale = 1.0) {
  return torch::randn(shape, torch::kFloat64) * scale;
}

// Runs `bridge` and `reference` on separate copies of `inputs` (those flagged in `grad` require
// grad), back-propagates 2.5·loss through both and compares values and every gradient.
template <class Bridge, class Reference>
void compare(const Tensors& inputs, const std::vector<bool>& grad, Bridge&& bridge,
             Reference&& reference) {
  Tensors a, b;
  for (std::size_t k = 0; k < inputs.size(); ++k) {
    a.push_back(inputs[k].clone().set_requires_grad(grad[k]));
    b.push_back(inputs[k].clone().set_requires_grad(grad[k]));
  }
  const torch::Tensor la = bridge(a), lb = reference(b);
  (2.5 * la).backward();
  (2.5 * lb).backward();
  CHECK(la.item<double>() == Approx(lb.item<double>()).epsilon(1e-10));
  for (std::size_t k = 0; k < inputs.size(); ++k) {
    if (!grad[k]) continue;
    INFO("input " << k);
    REQUIRE(a[k].grad().defined());
    CHECK(torch::allclose(a[k].grad(), b[k].grad(), 1e-9, 1e-12));
  }
}

}  // namespace

TEST_CASE("bridge: logit losses equal libtorch autograd", "[torch][bridge]") {
  torch::manual_seed(1);
  const auto y = torch::randint(7, {6}, torch::kLong);
  mmkd::LogitKD<double> kd;
  for (bool teacher_grad : {false, true}) {
    compare(
        {randn({6, 7}, 3), randn({6, 7}, 3)}, {true, teacher_grad},
        [&](const Tensors& x) { return mmkd_torch::logit_kd(kd, x[0], x[1]); },
        [&](const Tensors& x) {
          return torch_kd(x[0], x[1], 4.0, mmkd::Reduction::BatchMean,
                          torch::ones({6}, torch::kFloat64));
        });
  }
  for (int kind = 0; kind < 6; ++kind) {
    mmkd::LogitDivergence<double>::Options o;
    o.divergence = static_cast<mmkd::Divergence>(kind);
    o.temperature = 2;
    mmkd::LogitDivergence<double> div(o);
    const auto mask = torch::tensor({1, 0, 1, 1, 1, 0}, torch::kBool);
    compare(
        {randn({6, 7}, 3), randn({6, 7}, 3)}, {true, kind % 2 == 0},
        [&](const Tensors& x) { return mmkd_torch::logit_divergence(div, x[0], x[1], mask); },
        [&](const Tensors& x) {
          const auto rows = torch_divergence_rows(
              o.divergence, o.divergence == mmkd::Divergence::GeneralizedJSD ? 0.5 : 0.1, x[0],
              x[1], 2.0);
          return (rows * mask.to(torch::kFloat64)).sum() / 4;
        });
  }
  // a top-3 teacher as torch::topk gives it (int64 indices), with and without a mask
  const auto teacher_lp = torch::log_softmax(randn({6, 7}, 3), 1);
  const auto top = teacher_lp.topk(3, 1);
  const auto top_lp = std::get<0>(top), top_idx = std::get<1>(top);
  for (bool tail : {true, false}) {
    mmkd::SparseLogitKD<double> sparse(
        {tail ? mmkd::SparseSupport::TailBucket : mmkd::SparseSupport::Renormalized});
    const auto mask = torch::tensor({1, 1, 0, 1, 0, 1}, torch::kBool);
    compare(
        {randn({6, 7}, 3)}, {true},
        [&](const Tensors& x) {
          return mmkd_torch::sparse_logit_kd(sparse, x[0], top_idx, top_lp, mask);
        },
        [&](const Tensors& x) {
          const auto rows = torch_sparse_kd_rows(x[0], top_idx, top_lp, 1.0, tail);
          return (rows * mask.to(torch::kFloat64)).sum() / 4;
        });
  }
  // the fused head: student hidden states, weight and bias get gradients; labels with -100
  {
    const auto ht = randn({6, 3}), wt = randn({7, 3});
    const auto yi = torch::tensor({1, -100, 4, 0, -100, 6}, torch::kLong);
    mmkd::FusedLinearKD<double>::Options fo;
    fo.hard_weight = 0.5;
    fo.chunk_rows = 4;
    fo.divergence.divergence = mmkd::Divergence::ReverseKL;
    mmkd::FusedLinearKD<double> fused(fo);
    auto unfused = [&](const Tensors& x, const torch::Tensor& t) {
      const auto s = torch::matmul(x[0], x[1].t()) +
                     (x.size() > 2 ? x[2] : torch::zeros({7}, torch::kFloat64));
      const auto m = (yi != -100).to(torch::kFloat64);
      const auto hard = torch::nn::functional::cross_entropy(
          s, yi, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
      return (0.5 * hard +
              (torch_divergence_rows(mmkd::Divergence::ReverseKL, 0.1, s, t, 1.0) * m).sum()) /
             4;
    };
    compare(
        {randn({6, 5}), randn({7, 5}), randn({7})}, {true, true, true},
        [&](const Tensors& x) {
          return mmkd_torch::fused_linear_kd(fused, x[0], x[1], ht, wt, yi, x[2]);
        },
        [&](const Tensors& x) { return unfused(x, torch::matmul(ht, wt.t())); });
    const auto tl = randn({6, 7}, 2);
    compare(
        {randn({6, 5}), randn({7, 5})}, {true, true},
        [&](const Tensors& x) {
          return mmkd_torch::fused_linear_kd_with_logits(fused, x[0], x[1], tl, yi);
        },
        [&](const Tensors& x) { return unfused(x, tl); });
  }
  mmkd::DecoupledKD<double> dkd;
  compare(
      {randn({6, 7}, 3), randn({6, 7}, 3)}, {true, false},
      [&](const Tensors& x) { return mmkd_torch::decoupled_kd(dkd, x[0], x[1], y); },
      [&](const Tensors& x) { return torch_dkd(x[0], x[1], y, 1.0, 8.0, 4.0); });
  mmkd::CrossEntropy<double> ce({0.1});
  compare(
      {randn({6, 7}, 3)}, {true},
      [&](const Tensors& x) { return mmkd_torch::cross_entropy(ce, x[0], y); },
      [&](const Tensors& x) {
        return torch::nn::functional::cross_entropy(
            x[0], y, torch::nn::functional::CrossEntropyFuncOptions().label_smoothing(0.1));
      });
}

TEST_CASE("bridge: bfloat16 logits give the float results of their values, bfloat16 gradients",
          "[torch][bridge][bf16]") {
  // Float losses on BFloat16 tensors: the value equals libtorch's float formula on the same
  // (rounded) values, and each gradient, BFloat16 like its input, is that float gradient rounded
  // (exactly mmkd's own float gradient rounded: V = 48 keeps the rows aligned alike).
  torch::manual_seed(3);
  const int64_t n = 6, v = 48;
  const auto mask = torch::tensor({1, 1, 0, 1, 1, 1}, torch::kBool);
  const auto y = torch::randint(v, {n}, torch::kLong);
  auto bf16 = [&](double scale) {
    return (torch::randn({n, v}, torch::kFloat32) * scale).to(torch::kBFloat16);
  };
  // bridge(inputs) → loss; reference(float inputs) → loss of libtorch ops.
  auto check = [&](const Tensors& inputs, const std::vector<bool>& grad, auto&& bridge,
                   auto&& reference) {
    Tensors a, f, r;
    for (std::size_t k = 0; k < inputs.size(); ++k) {
      a.push_back(inputs[k].clone().set_requires_grad(grad[k]));
      f.push_back(inputs[k].to(torch::kFloat32).set_requires_grad(grad[k]));
      r.push_back(inputs[k].to(torch::kFloat32).set_requires_grad(grad[k]));
    }
    const torch::Tensor la = bridge(a), lf = bridge(f), lr = reference(r);
    la.backward();
    lf.backward();
    lr.backward();
    CHECK(la.scalar_type() == torch::kFloat32);  // the loss's scalar type, not rounded
    CHECK(la.item<float>() == lf.item<float>());
    CHECK(lf.item<float>() == Approx(lr.item<float>()).epsilon(1e-5));
    for (std::size_t k = 0; k < inputs.size(); ++k) {
      if (!grad[k]) continue;
      INFO("input " << k);
      REQUIRE(a[k].grad().scalar_type() == torch::kBFloat16);
      CHECK(torch::equal(a[k].grad(), f[k].grad().to(torch::kBFloat16)));
      CHECK(torch::allclose(a[k].grad().to(torch::kFloat32), r[k].grad(), 1.0 / 128, 1e-6));
    }
  };
  mmkd::LogitKD<float> kd;
  check(
      {bf16(3), bf16(3)}, {true, true},
      [&](const Tensors& x) { return mmkd_torch::logit_kd(kd, x[0], x[1], mask); },
      [&](const Tensors& x) {
        return torch_kd(x[0], x[1], 4.0, mmkd::Reduction::BatchMean, mask.to(torch::kFloat32));
      });
  for (const auto kind : {mmkd::Divergence::GeneralizedJSD, mmkd::Divergence::ReverseKL}) {
    mmkd::LogitDivergence<float>::Options o;
    o.divergence = kind;
    mmkd::LogitDivergence<float> div(o);
    check(
        {bf16(3), bf16(3)}, {true, false},
        [&](const Tensors& x) { return mmkd_torch::logit_divergence(div, x[0], x[1]); },
        [&](const Tensors& x) {
          return torch_divergence_rows(kind, kind == mmkd::Divergence::GeneralizedJSD ? 0.5 : 0.1,
                                       x[0], x[1], 1.0)
                     .sum() /
                 n;
        });
  }
  mmkd::CrossEntropy<float> ce({0.1f});
  check(
      {bf16(3)}, {true}, [&](const Tensors& x) { return mmkd_torch::cross_entropy(ce, x[0], y); },
      [&](const Tensors& x) {
        return torch::nn::functional::cross_entropy(
            x[0], y, torch::nn::functional::CrossEntropyFuncOptions().label_smoothing(0.1));
      });
  // a top-5 teacher
  const auto top = torch::log_softmax(torch::randn({n, v}) * 3, 1).topk(5, 1);
  const auto top_lp = std::get<0>(top).to(torch::kBFloat16), top_idx = std::get<1>(top);
  for (bool tail : {true, false}) {
    mmkd::SparseLogitKD<float> sparse(
        {tail ? mmkd::SparseSupport::TailBucket : mmkd::SparseSupport::Renormalized});
    check(
        {bf16(3), top_lp}, {true, false},
        [&](const Tensors& x) { return mmkd_torch::sparse_logit_kd(sparse, x[0], top_idx, x[1]); },
        [&](const Tensors& x) {
          return torch_sparse_kd_rows(x[0], top_idx, x[1], 1.0, tail).mean();
        });
  }
  // the fused head, one chunk (d_w_s then rounds once, as the float gradient's rounding)
  {
    auto bf = [](at::IntArrayRef shape) { return torch::randn(shape).to(torch::kBFloat16); };
    const auto ht = bf({n, 3}), wt = bf({v, 3});
    const auto yi = torch::tensor({1, -100, 4, 0, -100, 6}, torch::kLong);
    mmkd::FusedLinearKD<float>::Options fo;
    fo.hard_weight = 0.5f;
    fo.chunk_rows = 8;
    mmkd::FusedLinearKD<float> fused(fo);
    check(
        {bf({n, 5}), bf({v, 5}), bf({v})}, {true, true, true},
        [&](const Tensors& x) {
          const auto dtype = x[0].scalar_type();  // the teacher's head in the student's dtype
          return mmkd_torch::fused_linear_kd(fused, x[0], x[1], ht.to(dtype), wt.to(dtype), yi,
                                             x[2]);
        },
        [&](const Tensors& x) {
          const auto s = torch::matmul(x[0], x[1].t()) + x[2];
          const auto t = torch::matmul(ht.to(torch::kFloat32), wt.to(torch::kFloat32).t());
          const auto keep = (yi != -100).to(torch::kFloat32);
          const auto hard = torch::nn::functional::cross_entropy(
              s, yi, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
          return (0.5 * hard +
                  (torch_divergence_rows(mmkd::Divergence::ForwardKL, 0.1, s, t, 1.0) * keep)
                      .sum()) /
                 4;
        });
  }
  CHECK_THROWS_WITH(mmkd_torch::logit_kd(kd, bf16(1), bf16(1).to(torch::kFloat32)),
                    Catch::Contains("teacher has dtype Float, expected BFloat16 (the student's)"));
}

TEST_CASE("bridge: multimodal losses equal libtorch autograd", "[torch][bridge]") {
  torch::manual_seed(2);
  const int64_t m = 3, n = 5, c = 6;
  const auto w = torch::rand({n, m}, torch::kFloat64);
  mmkd::ModalitySpecificKD<double> msd({2.0, 0.5});
  compare(
      {randn({n, c}, 2), randn({n, c}, 2), randn({m, n, c}, 2), randn({m, n, c}, 2)},
      {true, false, true, false},
      [&](const Tensors& x) {
        return mmkd_torch::modality_specific_kd(msd, x[0], x[1], x[2], x[3], w);
      },
      [&](const Tensors& x) { return torch_msd(x[0], x[1], x[2], x[3], w, 2.0, 0.5); });
  mmkd::ModalityGramKD<double> gram;
  for (bool teacher_grad : {false, true}) {
    compare(
        {randn({m, n, 4}), randn({m, n, 9})}, {true, teacher_grad},
        [&](const Tensors& x) { return mmkd_torch::modality_gram_kd(gram, x[0], x[1]); },
        [&](const Tensors& x) { return torch_gram(x[0], x[1]); });
  }
}

TEST_CASE("bridge: structure and contrastive losses equal libtorch autograd", "[torch][bridge]") {
  torch::manual_seed(3);
  mmkd::ChannelDecorrelation<double> decor;
  compare(
      {randn({9, 5})}, {true},
      [&](const Tensors& x) { return mmkd_torch::channel_decorrelation(decor, x[0]); },
      [&](const Tensors& x) {
        return torch_decorrelation(x[0], mmkd::ChannelStatistic::Correlation);
      });
  mmkd::Uniformity<double> unif;
  compare(
      {randn({9, 5})}, {true}, [&](const Tensors& x) { return mmkd_torch::uniformity(unif, x[0]); },
      [&](const Tensors& x) { return torch_uniformity(x[0]); });
  mmkd::InfoNCE<double> nce;
  for (bool key_grad : {false, true}) {
    compare(
        {randn({7, 5}), randn({7, 5})}, {true, key_grad},
        [&](const Tensors& x) { return mmkd_torch::info_nce(nce, x[0], x[1]); },
        [&](const Tensors& x) { return torch_clip(x[0], x[1], 0.07, true, 0); });
  }
  mmkd::SimilarityDistillation<double> seed({0.2, 0.05});  // SEED's dictionary
  const auto queue = randn({11, 5});
  compare(
      {randn({7, 5}), randn({7, 5})}, {true, false},
      [&](const Tensors& x) {
        return mmkd_torch::similarity_distillation(seed, x[0], x[1], queue);
      },
      [&](const Tensors& x) { return torch_seed(x[0], x[1], queue, 0.2, 0.05); });
  seed.options().dictionary = mmkd::SimilarityDictionary::BatchAndQueue;
  compare(
      {randn({7, 5}), randn({7, 5})}, {true, false},
      [&](const Tensors& x) { return mmkd_torch::similarity_distillation(seed, x[0], x[1]); },
      [&](const Tensors& x) {
        return torch_seed_batch(x[0], x[1], torch::zeros({0, 5}, torch::kFloat64), 0.2, 0.05);
      });
}

TEST_CASE("bridge: HierarchicalContextLoss equals libtorch autograd", "[torch][bridge]") {
  torch::manual_seed(4);
  mmkd::HierarchicalContextLoss<double> hcl;
  compare(
      {randn({2, 3, 8, 8}), randn({2, 4, 2, 2}), randn({2, 3, 8, 8}), randn({2, 4, 2, 2})},
      {true, true, false, false},
      [&](const Tensors& x) {
        return mmkd_torch::hierarchical_context_loss(hcl, {x[0], x[1]}, {x[2], x[3]});
      },
      [&](const Tensors& x) {
        return torch_hcl({x[0], x[1]}, {x[2], x[3]});
      });
}

TEST_CASE("bridge: row masks and PyTorch's -100 labels", "[torch][bridge]") {
  torch::manual_seed(6);
  const int64_t n = 7, c = 5;
  // Rows 1 and 4 ignored: by a bool mask, a uint8 mask, or the label -100.
  const auto keep = torch::tensor({1, 0, 1, 1, 0, 1, 1}, torch::kBool);
  auto y = torch::randint(c, {n}, torch::kLong);
  auto y_ignored = y.clone();
  y_ignored.index_put_({1}, -100);
  y_ignored.index_put_({4}, -100);
  const auto kept = torch::tensor({0, 2, 3, 5, 6}, torch::kLong);
  mmkd::LogitKD<double> kd;
  for (const auto& m : {keep, keep.to(torch::kByte)}) {
    compare(
        {randn({n, c}, 3), randn({n, c}, 3)}, {true, true},
        [&](const Tensors& x) { return mmkd_torch::logit_kd(kd, x[0], x[1], m); },
        [&](const Tensors& x) {
          return torch_kd(x[0], x[1], 4.0, mmkd::Reduction::BatchMean, keep.to(torch::kFloat64));
        });
  }
  mmkd::CrossEntropy<double> ce({0.1});
  compare(  // libtorch's cross_entropy ignores -100 by default
      {randn({n, c}, 3)}, {true},
      [&](const Tensors& x) { return mmkd_torch::cross_entropy(ce, x[0], y_ignored); },
      [&](const Tensors& x) {
        return torch::nn::functional::cross_entropy(
            x[0], y_ignored, torch::nn::functional::CrossEntropyFuncOptions().label_smoothing(0.1));
      });
  compare(  // a mask and the labels of the same rows
      {randn({n, c}, 3)}, {true},
      [&](const Tensors& x) { return mmkd_torch::cross_entropy(ce, x[0], y, keep); },
      [&](const Tensors& x) {
        return torch::nn::functional::cross_entropy(
            x[0].index_select(0, kept), y.index_select(0, kept),
            torch::nn::functional::CrossEntropyFuncOptions().label_smoothing(0.1));
      });
  mmkd::DecoupledKD<double> dkd;
  compare(
      {randn({n, c}, 3), randn({n, c}, 3)}, {true, false},
      [&](const Tensors& x) { return mmkd_torch::decoupled_kd(dkd, x[0], x[1], y_ignored); },
      [&](const Tensors& x) {
        return torch_dkd(x[0].index_select(0, kept), x[1].index_select(0, kept),
                         y.index_select(0, kept), 1.0, 8.0, 4.0);
      });
  CHECK_THROWS_WITH(mmkd_torch::logit_kd(kd, randn({n, c}), randn({n, c}), keep.to(torch::kFloat)),
                    "mmkd_torch: LogitKD: mask has dtype Float, expected Bool or Byte");
  CHECK_THROWS_WITH(
      mmkd_torch::cross_entropy(ce, randn({n, c}), y, keep.narrow(0, 0, 3)),
      "mmkd_torch: CrossEntropy: mask must be a 1-D tensor of 7 entries (one per row)");
}

TEST_CASE("bridge: a graph in front of the loss gets libtorch's gradients", "[torch][bridge]") {
  torch::manual_seed(5);
  const auto input = randn({8, 4}), target = randn({8, 6}, 2);
  mmkd::LogitKD<double> kd;
  mmkd::InfoNCE<double> nce;
  // logits = tanh(x W): the bridge's gradient flows on into W through libtorch's autograd.
  compare(
      {randn({4, 6})}, {true},
      [&](const Tensors& w) {
        const auto z = torch::tanh(input.mm(w[0])) * 3;
        return mmkd_torch::logit_kd(kd, z, target) + 0.5 * mmkd_torch::info_nce(nce, z, target);
      },
      [&](const Tensors& w) {
        const auto z = torch::tanh(input.mm(w[0])) * 3;
        return torch_kd(z, target, 4.0, mmkd::Reduction::BatchMean,
                        torch::ones({8}, torch::kFloat64)) +
               0.5 * torch_clip(z, target, 0.07, true, 0);
      });
}

TEST_CASE("bridge: refuses tensors it cannot view or differentiate", "[torch][bridge]") {
  mmkd::LogitKD<double> kd;
  mmkd::DecoupledKD<double> dkd;
  const auto s = randn({4, 5}), t = randn({4, 5});
  const auto y = torch::zeros({4}, torch::kLong);
  CHECK_THROWS_WITH(mmkd_torch::logit_kd(kd, s.to(torch::kFloat32), t),
                    "mmkd_torch: LogitKD: student has dtype Float, expected Double (the loss's "
                    "scalar type)");
  CHECK_THROWS_AS(mmkd_torch::logit_kd(kd, s.to(torch::kFloat32), t), mmkd::InvalidArgument);
  CHECK_THROWS_WITH(mmkd_torch::logit_kd(kd, randn({5, 4}).t(), t),
                    Catch::Contains("student is not contiguous"));
  CHECK_THROWS_WITH(mmkd_torch::logit_kd(kd, randn({4, 5, 1}), t),
                    Catch::Contains("student has 3 dimensions, expected 2"));
  CHECK_THROWS_WITH(
      mmkd_torch::decoupled_kd(dkd, s.clone().requires_grad_(), t.clone().requires_grad_(), y),
      Catch::Contains("teacher requires grad, but the loss gives no gradient for it"));
  // mmkd's own errors pass through unchanged.
  CHECK_THROWS_AS(mmkd_torch::logit_kd(kd, s, randn({4, 6})), mmkd::InvalidArgument);
}
