// HierarchicalContextLoss: the weight table, the value against a direct implementation of the
// reference loops, finite differences, invariants and errors.

#include <mmkd/review/hierarchical_context_loss.hpp>

#include "support.hpp"

using namespace mmkd_test;

namespace {

using Views = std::vector<mmkd::ConstTensor4Ref<double>>;

// Adaptive average pooling of one plane written from the bin definition
// [floor(i·In/Out), ceil((i+1)·In/Out)), in long double.
std::vector<long double> pool_ref(const double* x, Index h, Index w, Index l) {
  std::vector<long double> out;
  for (Index i = 0; i < l; ++i)
    for (Index j = 0; j < l; ++j) {
      const Index r0 = Index(std::floor(double(i * h) / double(l))),
                  r1 = Index(std::ceil(double((i + 1) * h) / double(l)));
      const Index c0 = Index(std::floor(double(j * w) / double(l))),
                  c1 = Index(std::ceil(double((j + 1) * w) / double(l)));
      long double s = 0;
      for (Index r = r0; r < r1; ++r)
        for (Index c = c0; c < c1; ++c) s += x[r * w + c];
      out.push_back(s / (long double)((r1 - r0) * (c1 - c0)));
    }
  return out;
}

// The reference `hcl` loop: MSE of s and t, then of their pooled maps for l in {4, 2, 1}, l < h.
long double hcl_ref(const std::vector<mmkd::Tensor4<double>>& fs,
                    const std::vector<mmkd::Tensor4<double>>& ft) {
  long double total = 0;
  for (std::size_t k = 0; k < fs.size(); ++k) {
    const Index planes = fs[k].dimension(0) * fs[k].dimension(1), h = fs[k].dimension(2),
                w = fs[k].dimension(3);
    long double mse = 0;
    for (Index e = 0; e < fs[k].size(); ++e) {
      const long double d = (long double)fs[k].data()[e] - ft[k].data()[e];
      mse += d * d;
    }
    long double loss = mse / fs[k].size(), cnt = 1, tot = 1;
    for (Index l : {4, 2, 1}) {
      if (l >= h) continue;
      long double m = 0;
      for (Index p = 0; p < planes; ++p) {
        const auto a = pool_ref(fs[k].data() + p * h * w, h, w, l);
        const auto b = pool_ref(ft[k].data() + p * h * w, h, w, l);
        for (std::size_t q = 0; q < a.size(); ++q) m += (a[q] - b[q]) * (a[q] - b[q]);
      }
      cnt /= 2;
      loss += cnt * m / (planes * l * l);
      tot += cnt;
    }
    total += loss / tot;
  }
  return total;
}

}  // namespace

TEST_CASE("HCL total weights follow the reference table", "[review][hcl]") {
  mmkd::HierarchicalContextLoss<double> hcl;
  CHECK(hcl.total_weight(1) == 1.0);
  CHECK(hcl.total_weight(2) == 1.5);
  CHECK(hcl.total_weight(3) == 1.75);
  CHECK(hcl.total_weight(4) == 1.75);
  for (Index h : {5, 7, 8, 14, 16, 28, 32, 56}) CHECK(hcl.total_weight(h) == 1.875);
}

TEST_CASE("HCL equals the reference loops and its gradient matches finite differences",
          "[review][hcl]") {
  const Index shapes[][4] = {
      {2, 3, 7, 7}, {1, 2, 14, 14}, {2, 2, 3, 3}, {3, 2, 1, 1}, {2, 1, 2, 5}};
  std::vector<mmkd::Tensor4<double>> s, t;
  for (std::size_t k = 0; k < 5; ++k) {
    const auto* d = shapes[k];
    s.push_back(random_map<double>(d[0], d[1], d[2], d[3], 1 + k));
    t.push_back(random_map<double>(d[0], d[1], d[2], d[3], 10 + k));
  }
  mmkd::HierarchicalContextLoss<double> hcl;
  const double v = hcl.value(Views(s.begin(), s.end()), Views(t.begin(), t.end()));
  CHECK(v == Approx(double(hcl_ref(s, t))).epsilon(1e-13));
  std::vector<mmkd::Tensor4<double>> g;
  for (auto& x : s) {
    g.emplace_back(x.dimensions());
    g.back().setConstant(0.25);
  }
  CHECK(hcl.value_and_grad(Views(s.begin(), s.end()), Views(t.begin(), t.end()),
                           {g.begin(), g.end()}) == v);
  for (std::size_t k = 0; k < s.size(); ++k) {
    INFO("stage " << k);
    auto f = [&](const Matrix<double>& x) {
      auto ss = s;
      std::copy(x.data(), x.data() + x.size(), ss[k].data());
      return hcl.value(Views(ss.begin(), ss.end()), Views(t.begin(), t.end()));
    };
    CHECK(mmkd::check_gradient(f, flat(s[k]), Matrix<double>(flat(g[k]).array() - 0.25), tight()));
  }
  // weight scales value and gradient (ReviewKD's per-pair weight and warm-up).
  mmkd::HierarchicalContextLoss<double>::Options wo;
  wo.weight = 0.6;
  mmkd::HierarchicalContextLoss<double> weighted(wo);
  std::vector<mmkd::Tensor4<double>> gw;
  for (auto& x : s) {
    gw.emplace_back(x.dimensions());
    gw.back().setZero();
  }
  CHECK(weighted.value_and_grad(Views(s.begin(), s.end()), Views(t.begin(), t.end()),
                                {gw.begin(), gw.end()}) == Approx(0.6 * v).epsilon(1e-14));
  for (std::size_t k = 0; k < s.size(); ++k) {
    const Matrix<double> expect = 0.6 * (flat(g[k]).array() - 0.25).matrix();
    CHECK((flat(gw[k]) - expect).cwiseAbs().maxCoeff() < 1e-15);
  }
  // Equal inputs: zero loss, zero gradient.
  for (auto& x : g) x.setZero();
  CHECK(hcl.value_and_grad(Views(s.begin(), s.end()), Views(s.begin(), s.end()),
                           {g.begin(), g.end()}) == 0.0);
  for (auto& x : g) CHECK(flat(x).isZero(0));
}

TEST_CASE("HCL with custom levels; float agrees with double", "[review][hcl]") {
  const auto s = random_map<double>(2, 3, 6, 6, 1), t = random_map<double>(2, 3, 6, 6, 2);
  mmkd::HierarchicalContextLoss<double>::Options no_levels, level_one;
  no_levels.levels = {};
  level_one.levels = {1};
  mmkd::HierarchicalContextLoss<double> only_full(no_levels), one(level_one);
  const Matrix<double> d = flat(s) - flat(t);
  CHECK(only_full.value({s}, {t}) == Approx(d.squaredNorm() / d.size()).epsilon(1e-14));
  // Level 1 alone: (mse + ½·mean of the squared plane means) / 1.5.
  const double pooled = (d.rowwise().mean()).squaredNorm() / double(d.rows());
  CHECK(one.value({s}, {t}) ==
        Approx((d.squaredNorm() / d.size() + 0.5 * pooled) / 1.5).epsilon(1e-14));
  mmkd::HierarchicalContextLoss<float> hf;
  mmkd::HierarchicalContextLoss<double> hd;
  const mmkd::Tensor4<float> sf = s.cast<float>(), tf = t.cast<float>();
  CHECK(double(hf.value({sf}, {tf})) == Approx(hd.value({s}, {t})).epsilon(1e-5));
}

TEST_CASE("HCL errors and non-finite input", "[review][hcl]") {
  mmkd::HierarchicalContextLoss<double> hcl;
  const auto s = random_map<double>(2, 3, 4, 4, 1), t = random_map<double>(2, 3, 4, 2, 2);
  CHECK_THROWS_WITH(hcl.value({s}, {t}),
                    Catch::Contains("stage 0: teacher[0] has shape 2x3x4x2, expected 2x3x4x4"));
  CHECK_THROWS_WITH(hcl.value({s, s}, {s}), Catch::Contains("teacher has 1 stages, expected 2"));
  CHECK_THROWS_WITH(hcl.value({}, {}), Catch::Contains("student is empty"));
  mmkd::HierarchicalContextLoss<double>::Options zero_level;
  zero_level.levels = {4, 0};
  CHECK_THROWS_WITH(mmkd::HierarchicalContextLoss<double>(zero_level),
                    Catch::Contains("each level must be >= 1"));
  auto bad = s;
  bad(1, 2, 3, 0) = std::numeric_limits<double>::quiet_NaN();
  mmkd::Tensor4<double> g(2, 3, 4, 4);
  g.setConstant(3.0);
  const Matrix<double> g0 = flat(g);
  CHECK_THROWS_WITH(hcl.value_and_grad({s, bad}, {s, s}, {g, g}),
                    Catch::Contains("HierarchicalContextLoss: student[1][1,2,3,0] is NaN"));
  CHECK(bit_identical(flat(g), g0));
  CHECK_THROWS_WITH(hcl.value_and_grad({s}, {s}, {}), Catch::Contains("grad has 0 entries"));
}

TEST_CASE("HCL throws instead of writing an overflowing gradient", "[review][hcl][errors]") {
  // weight 2e38 in float: the value (weight · a small MSE) is finite, but the gradient
  // 2·weight/tot · d / numel is not (and s = t would make it 0·inf = NaN).
  const mmkd::Tensor4<float> s = random_map<double>(1, 2, 4, 4, 1).cast<float>(),
                             t = random_map<double>(1, 2, 4, 4, 2).cast<float>();
  mmkd::HierarchicalContextLoss<float>::Options o;
  o.weight = 2e38f;
  mmkd::HierarchicalContextLoss<float> hcl(o);
  mmkd::Tensor4<float> g(1, 2, 4, 4);
  g.setConstant(1.0f);
  const Matrix<float> g0 = flat(g);
  CHECK(std::isfinite(hcl.value({s}, {t}) / 2e38f));
  for (const auto* teacher : {&t, &s}) {
    CHECK_THROWS_WITH(hcl.value_and_grad({s}, {*teacher}, {g}),
                      Catch::Contains("the gradient of stage 0 overflows"));
    CHECK(bit_identical(flat(g), g0));
  }
}
