// ReviewFusion: the reference's resnet56 -> resnet20 stage table, finite differences of the whole
// chain through HCL for every feature and parameter, stage-naming errors and the strong
// guarantee.

#include <mmkd/review/hierarchical_context_loss.hpp>
#include <mmkd/review/review_fusion.hpp>

#include <memory>

#include "core/parallel_support.hpp"

using namespace mmkd_test;

namespace {

using Review = mmkd::ReviewFusion<double>;
using Views = std::vector<mmkd::ConstTensor4Ref<double>>;

struct Chain {
  std::vector<mmkd::Tensor4<double>> feats, teacher;
};

Chain make_chain(const Review::Options& o, Index n, std::uint64_t seed) {
  Chain c;
  for (std::size_t k = 0; k < o.in_channels.size(); ++k) {
    const Index h = o.shapes[k], oh = o.out_shapes.empty() ? h : o.out_shapes[k];
    c.feats.push_back(random_map<double>(n, o.in_channels[k], h, h, seed + k));
    c.teacher.push_back(random_map<double>(n, o.out_channels[k], oh, oh, seed + 50 + k));
  }
  return c;
}

double hcl_of(Review& review, const std::vector<mmkd::Tensor4<double>>& feats,
              const std::vector<mmkd::Tensor4<double>>& teacher) {
  mmkd::HierarchicalContextLoss<double> hcl;
  return hcl.value(review.forward(Views(feats.begin(), feats.end())),
                   Views(teacher.begin(), teacher.end()));
}

}  // namespace

TEST_CASE("ReviewFusion builds the reference's resnet56 -> resnet20 chain", "[review][fusion]") {
  Review review({{16, 32, 64, 64}, {16, 32, 64, 64}, {32, 16, 8, 1}, {}, 0, 0});
  CHECK(review.options().mid_channels == 64);  // min(512, 64)
  REQUIRE(review.stages() == 4);
  for (Index k = 0; k < 4; ++k) CHECK(review.stage(k).options().fuse == (k < 3));
  CHECK(review.stage(2).options().in_channels == 64);
  CHECK(review.stage(0).options().out_channels == 16);
  const Chain c = make_chain(review.options(), 2, 1);
  const auto& outs = review.forward(Views(c.feats.begin(), c.feats.end()));
  const Index expect[4][4] = {{2, 16, 32, 32}, {2, 32, 16, 16}, {2, 64, 8, 8}, {2, 64, 1, 1}};
  const Index residual[4] = {32, 16, 8, 1};
  for (Index k = 0; k < 4; ++k) {
    INFO("stage " << k);
    for (int d = 0; d < 4; ++d) CHECK(outs[std::size_t(k)].dimension(d) == expect[k][d]);
    CHECK(review.stage(k).residual().dimension(1) == 64);
    CHECK(review.stage(k).residual().dimension(2) == residual[k]);
  }
  auto params = review.parameters();
  CHECK(std::string(params.front().name) == "abfs.0.conv1.0.weight");  // deepest stage first
  CHECK(std::string(params.back().name) == "abfs.3.att_conv.0.bias");
  CHECK(params.size() == 6 + 3 * 8);
  CHECK(review.buffers().size() == 4 * 6);  // 2 BatchNorm2d per stage, 3 buffers each
}

TEST_CASE("ReviewFusion + HCL gradients match finite differences for features and parameters",
          "[review][fusion]") {
  Review::Options plain{{2, 3, 4}, {3, 2, 2}, {4, 2, 1}, {}, 3, 9};
  Review::Options resized{{2, 3, 2}, {2, 3, 2}, {3, 2, 1}, {5, 3, 1}, 2, 4};
  for (const auto& o : {plain, resized}) {
    for (bool train : {true, false}) {
      INFO("out_shapes " << o.out_shapes.size() << " train " << train);
      Review review(o);
      const Chain c = make_chain(o, 2, 21);
      if (!train) {
        hcl_of(review, c.feats, c.teacher);
        review.eval();
      }
      // Analytic: HCL gradient into the outputs, then the chain's backward.
      mmkd::HierarchicalContextLoss<double> hcl;
      const auto& outs = review.forward(Views(c.feats.begin(), c.feats.end()));
      std::vector<mmkd::Tensor4<double>> d_out, d_feat;
      for (const auto& y : outs) {
        d_out.emplace_back(y.dimension(0), y.dimension(1), y.dimension(2), y.dimension(3));
        d_out.back().setZero();
      }
      for (const auto& f : c.feats) {
        d_feat.emplace_back(f.dimensions());
        d_feat.back().setConstant(1.0);
      }
      hcl.value_and_grad(outs, Views(c.teacher.begin(), c.teacher.end()),
                         {d_out.begin(), d_out.end()});
      review.backward(Views(d_out.begin(), d_out.end()), {d_feat.begin(), d_feat.end()});
      for (std::size_t k = 0; k < c.feats.size(); ++k) {
        INFO("feature " << k);
        auto f = [&](const Matrix<double>& t) {
          auto feats = c.feats;
          std::copy(t.data(), t.data() + t.size(), feats[k].data());
          return hcl_of(review, feats, c.teacher);
        };
        const Matrix<double> g = flat(d_feat[k]).array() - 1.0;
        CHECK(mmkd::check_gradient(f, flat(c.feats[k]), g, tight()));
      }
      auto params = review.parameters();
      auto grads = review.gradients();
      for (std::size_t p = 0; p < params.size(); ++p) {
        INFO(params[p].name);
        const Matrix<double> p0 = params[p].value;
        auto f = [&](const Matrix<double>& t) {
          params[p].value = t;
          const double v = hcl_of(review, c.feats, c.teacher);
          params[p].value = p0;
          return v;
        };
        CHECK(mmkd::check_gradient(f, p0, grads[p].value, tight()));
      }
    }
  }
}

TEST_CASE("ReviewFusion: bad stage lists and features name the stage", "[review][fusion]") {
  using O = Review::Options;
  CHECK_THROWS_WITH(Review(O{{16, 32}, {16}, {}, {}, 0, 0}),
                    Catch::Contains("out_channels has 1 entries, expected 2"));
  CHECK_THROWS_WITH(Review(O{{16, 32, 0}, {16, 32, 64}, {}, {}, 0, 0}),
                    Catch::Contains("stage 2 of 3: in_channels[2] must be >= 1, got 0"));
  CHECK_THROWS_WITH(Review(O{{16, 32}, {16, 32}, {8, 4, 2}, {}, 0, 0}),
                    Catch::Contains("shapes has 3 entries, expected 2"));
  CHECK_THROWS_WITH(Review(O{{}, {}, {}, {}, 0, 0}), Catch::Contains("in_channels is empty"));

  Review review({{2, 3, 4}, {2, 3, 4}, {4, 2, 1}, {}, 3, 0});
  const Chain c = make_chain(review.options(), 2, 3);
  Views v(c.feats.begin(), c.feats.end());
  CHECK_THROWS_WITH(review.forward(Views(v.begin(), v.end() - 1)),
                    Catch::Contains("got 2 features, expected 3"));
  // (A TensorMap's operator= copies data, so each bad list is built afresh.)
  const auto wrong_c = random_map<double>(2, 5, 2, 2, 1);
  CHECK_THROWS_WITH(
      review.forward(Views{v[0], wrong_c, v[2]}),
      Catch::Contains("ReviewFusion: stage 1 of 3: feature has shape 2x5x2x2, "
                      "expected 2x3x2x2 (batch of stage 0, in_channels[1], shapes[1])"));
  const auto wrong_hw = random_map<double>(2, 3, 3, 3, 1);
  CHECK_THROWS_WITH(review.forward(Views{v[0], wrong_hw, v[2]}),
                    Catch::Contains("stage 1 of 3: feature has shape 2x3x3x3"));
  // Train-mode batch norm on the pooled 1x1 stage with one sample.
  Chain one = make_chain(review.options(), 1, 4);
  CHECK_THROWS_WITH(review.forward(Views(one.feats.begin(), one.feats.end())),
                    Catch::Contains("ReviewFusion stage 2 of 3: batch norm in train mode"));
  review.eval();
  CHECK_NOTHROW(review.forward(Views(one.feats.begin(), one.feats.end())));
}

TEST_CASE("ReviewFusion: a failed forward or backward changes nothing", "[review][fusion]") {
  Review review({{2, 3, 4}, {2, 3, 4}, {4, 2, 1}, {}, 3, 0});
  Chain c = make_chain(review.options(), 2, 5);
  const auto& outs = review.forward(Views(c.feats.begin(), c.feats.end()));
  std::vector<mmkd::Tensor4<double>> d_out, d_feat;
  for (std::size_t k = 0; k < outs.size(); ++k) {
    d_out.push_back(random_map<double>(2, outs[k].dimension(1), outs[k].dimension(2),
                                       outs[k].dimension(3), 70 + k));
    d_feat.push_back(random_map<double>(2, c.feats[k].dimension(1), c.feats[k].dimension(2),
                                        c.feats[k].dimension(3), 80 + k));
  }
  review.backward(Views(d_out.begin(), d_out.end()), {d_feat.begin(), d_feat.end()});
  auto snapshot = [&] {
    std::vector<Matrix<double>> s;
    for (auto& x : review.parameters()) s.emplace_back(x.value);
    for (auto& x : review.gradients()) s.emplace_back(x.value);
    for (auto& x : review.buffers()) s.emplace_back(x.value);
    for (auto& x : d_feat) s.push_back(flat(x));
    return s;
  };
  const auto before = snapshot();
  auto same = [&] {
    const auto now = snapshot();
    for (std::size_t k = 0; k < now.size(); ++k) CHECK(bit_identical(now[k], before[k]));
  };
  // A NaN in the deepest feature: found before any stage commits its running statistics.
  c.feats[2].data()[5] = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(review.forward(Views(c.feats.begin(), c.feats.end())),
                    Catch::Contains("input[1,1,0,0] is NaN"));
  same();
  // The chain's caches were overwritten by the failed forward: backward is refused.
  CHECK_THROWS_WITH(
      review.backward(Views(d_out.begin(), d_out.end()), {d_feat.begin(), d_feat.end()}),
      Catch::Contains("backward called before forward"));
  same();
  // A NaN in a shallow feature: the deeper stages already ran, nothing is committed.
  c.feats[2].data()[5] = 0.5;
  c.feats[0].data()[3] = std::numeric_limits<double>::infinity();
  CHECK_THROWS_AS(review.forward(Views(c.feats.begin(), c.feats.end())), mmkd::NumericalError);
  same();
  c.feats[0].data()[3] = 0.5;
  review.forward(Views(c.feats.begin(), c.feats.end()));
  const auto mid_before = review.buffers();
  d_out[1].data()[0] = std::numeric_limits<double>::quiet_NaN();
  const auto grads_before = snapshot();
  CHECK_THROWS_WITH(
      review.backward(Views(d_out.begin(), d_out.end()), {d_feat.begin(), d_feat.end()}),
      Catch::Contains("d_outputs[1][0,0,0,0] is NaN"));
  const auto now = snapshot();
  for (std::size_t k = 0; k < now.size(); ++k) CHECK(bit_identical(now[k], grads_before[k]));
}

#if MMKD_HAS_OPENMP
// Every product of the ReviewKD ops runs single-threaded inside mmkd's parallel regions, with
// Eigen's own threading left at its default: the results must not depend on the thread count.
TEST_CASE("ReviewFusion + HCL give bit-identical results with 1 and 2 threads",
          "[review][fusion][parallel]") {
  mmkd::ReviewFusion<float>::Options o;
  o.in_channels = {32, 64, 64};
  o.out_channels = {128, 64, 64};
  o.shapes = {16, 8, 1};
  o.mid_channels = 128;  // Winograd on the 16x16 stage, im2col on the 8x8 one, 1x1 on the last
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    mmkd::ReviewFusion<float> review(o);
    mmkd::HierarchicalContextLoss<float> hcl;
    std::vector<mmkd::Tensor4<float>> f, t, d_out, d_f;
    for (std::size_t k = 0; k < 3; ++k) {
      const Index h = o.shapes[k];
      f.push_back(random_map<float>(4, o.in_channels[k], h, h, 1 + k));
      t.push_back(random_map<float>(4, o.out_channels[k], h, h, 5 + k));
      d_out.emplace_back(t.back().dimensions());
      d_out.back().setZero();
      d_f.emplace_back(f.back().dimensions());
      d_f.back().setZero();
    }
    const float v = hcl.value_and_grad(review.forward({f.begin(), f.end()}), {t.begin(), t.end()},
                                       {d_out.begin(), d_out.end()});
    review.backward({d_out.begin(), d_out.end()}, {d_f.begin(), d_f.end()});
    std::vector<Matrix<float>> out{Matrix<float>::Constant(1, 1, v)};
    for (auto& x : d_f) out.push_back(flat(x));
    for (auto& g : review.gradients()) out.emplace_back(g.value);
    for (auto& b : review.buffers()) out.emplace_back(b.value);
    return out;
  };
  using Mode = mmkd::detail::ContentionGuard::Mode;
  const auto one = run(1);
  std::vector<Matrix<float>> two, serial;
  {
    const mmkd_test::GuardMode guard(Mode::Parallel);
    two = run(2);
  }
  {
    const mmkd_test::GuardMode guard(Mode::Serial);  // the contention guard backing off
    serial = run(2);
  }
  REQUIRE(one.size() == two.size());
  REQUIRE(one.size() == serial.size());
  for (std::size_t k = 0; k < one.size(); ++k) {
    CHECK(bit_identical(one[k], two[k]));
    CHECK(bit_identical(one[k], serial[k]));
  }
}
#endif

TEST_CASE("A copied ReviewFusion's outputs are its own", "[review][fusion]") {
  auto original = std::make_unique<Review>(Review::Options{{4, 8}, {4, 8}, {8, 4}, {}, 8, 0});
  const Chain c = make_chain(original->options(), 2, 3);
  original->forward(Views(c.feats.begin(), c.feats.end()));
  std::vector<Matrix<double>> expect;
  for (const auto& o : original->outputs())
    expect.push_back(Eigen::Map<const Matrix<double>>(o.data(), 1, o.size()));
  Review copy(*original);
  Review assigned({{4, 8}, {4, 8}, {8, 4}, {}, 8, 0});
  assigned = *original;
  original.reset();  // the copies must not view its freed buffers (ASan checks the reads)
  for (const Review* r : {&copy, &assigned}) {
    REQUIRE(r->outputs().size() == expect.size());
    for (std::size_t k = 0; k < expect.size(); ++k) {
      const auto& o = r->outputs()[k];
      CHECK(o.data() == r->stage(Index(k)).output().data());
      CHECK(bit_identical(Matrix<double>(Eigen::Map<const Matrix<double>>(o.data(), 1, o.size())),
                          expect[k]));
    }
  }
}

TEST_CASE(
    "The ReviewKD snippet of docs/review.md: its gradient along a direction matches differences",
    "[review][fusion]") {
  // The snippet's lines, in double, on two samples of the resnet20 shapes.
  mmkd::ReviewFusion<double>::Options o;
  o.in_channels = {16, 32, 64, 64};
  o.out_channels = {16, 32, 64, 64};
  o.shapes = {32, 16, 8, 1};
  std::vector<mmkd::Tensor4<double>> f, t, df;
  for (std::size_t k = 0; k < 4; ++k) {
    const Index h = o.shapes[k];
    f.push_back(random_map<double>(2, o.in_channels[k], h, h, 10 + k));
    t.push_back(random_map<double>(2, o.out_channels[k], h, h, 20 + k));
    df.push_back(mmkd::Tensor4<double>(f.back().dimensions()).setZero());
  }
  auto snippet = [&](const std::vector<mmkd::Tensor4<double>>& feats, bool grad) {
    mmkd::ReviewFusion<double> review(o);
    mmkd::HierarchicalContextLoss<double> hcl;
    const std::vector<mmkd::ConstTensor4Ref<double>> features(feats.begin(), feats.end()),
        teacher(t.begin(), t.end());
    std::vector<mmkd::Tensor4Ref<double>> d_features(df.begin(), df.end());
    const auto& outs = review.forward(features);
    std::vector<mmkd::Tensor4<double>> d_outs;
    for (const auto& y : outs) {
      d_outs.emplace_back(y.dimensions());
      d_outs.back().setZero();
    }
    const double loss = hcl.value_and_grad(outs, teacher, {d_outs.begin(), d_outs.end()});
    if (grad) review.backward({d_outs.begin(), d_outs.end()}, d_features);
    return loss;
  };
  snippet(f, true);
  // (L(f + εu) − L(f − εu)) / 2ε against ⟨d_features, u⟩ for a random direction u.
  const double eps = 1e-5;
  std::vector<mmkd::Tensor4<double>> plus = f, minus = f;
  double along = 0;
  for (std::size_t k = 0; k < 4; ++k) {
    const auto& d = f[k].dimensions();
    const mmkd::Tensor4<double> u = random_map<double>(d[0], d[1], d[2], d[3], 30 + k);
    plus[k] = f[k] + eps * u;
    minus[k] = f[k] - eps * u;
    for (Index i = 0; i < u.size(); ++i) along += df[k].data()[i] * u.data()[i];
  }
  const double numeric = (snippet(plus, false) - snippet(minus, false)) / (2 * eps);
  CHECK(along == Approx(numeric).epsilon(1e-6));
  CHECK(along != 0.0);
}
