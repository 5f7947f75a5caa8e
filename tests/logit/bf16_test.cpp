// bfloat16 storage for the logit losses: the conversions against Eigen's own bfloat16, and each
// loss on bfloat16 inputs against the same loss on the float values those inputs hold.

#include <mmkd/detail/bf16.hpp>
#include <mmkd/logit/cross_entropy.hpp>
#include <mmkd/logit/fused_linear_kd.hpp>
#include <mmkd/logit/logit_divergence.hpp>
#include <mmkd/logit/logit_kd.hpp>
#include <mmkd/logit/sparse_logit_kd.hpp>

#include <cstring>

#include "support.hpp"

using namespace mmkd_test;
using mmkd::bfloat16;
using mmkd::Divergence;

namespace {

using Bf = Matrix<bfloat16>;

std::uint16_t bits(bfloat16 x) {
  std::uint16_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}
bfloat16 from_bits(std::uint16_t b) {
  bfloat16 x;
  std::memcpy(&x, &b, sizeof b);
  return x;
}
std::uint32_t bits(float x) {
  std::uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

// A bfloat16 matrix of random values at `scale` (rounded by Eigen's conversion).
Bf random_bf16(Index n, Index c, std::uint64_t seed, double scale = 3.0) {
  return random_matrix<float>(n, c, seed, scale).cast<bfloat16>();
}

Matrix<float> widen(const Bf& m) {
  return m.cast<float>();
}

// Every element of `got` is Eigen's round-to-nearest-even of the float in `want`.
bool rounds_to(const Bf& got, const Matrix<float>& want) {
  for (Index k = 0; k < got.size(); ++k)
    if (bits(got.data()[k]) != bits(bfloat16(want.data()[k]))) return false;
  return true;
}

}  // namespace

TEST_CASE("bfloat16 reads are exact and writes round to nearest even, as Eigen's bfloat16",
          "[logit][bf16]") {
  // Every bit pattern, read in runs whose lengths cover the vector body and the scalar tail.
  std::vector<bfloat16> all(65536);
  for (std::uint32_t b = 0; b < 65536; ++b) all[b] = from_bits(std::uint16_t(b));
  std::vector<float> out(65536);
  for (Index n : {Index(65536), Index(13), Index(7)}) {
    mmkd::detail::load_bf16(all.data(), out.data(), n);
    for (Index k = 0; k < n; ++k) {
      const float want = float(all[std::size_t(k)]);
      INFO(k);
      CHECK(bits(out[std::size_t(k)]) == bits(want));  // NaN payloads included
    }
  }
  // Sums d + g: random pairs, ties (the dropped half exactly 0x8000, odd and even kept bits),
  // overflow to ±inf, subnormals, NaN and infinities.
  std::vector<float> g;
  std::vector<bfloat16> d;
  mmkd::SplitMix64 rng(11);
  for (int k = 0; k < 2000; ++k) {
    d.push_back(bfloat16(float(rng.normal() * 10)));
    g.push_back(float(rng.normal() * std::pow(10.0, double(k % 7) - 3)));
  }
  for (std::uint32_t hi : {0x3F80u, 0x3F81u, 0x4000u, 0x4001u, 0x7F7Fu, 0x0001u, 0x8001u}) {
    for (std::uint32_t lo : {0x8000u, 0x7FFFu, 0x8001u, 0x0000u, 0xFFFFu}) {
      const std::uint32_t u = (hi << 16) | lo;
      float f;
      std::memcpy(&f, &u, sizeof f);
      d.push_back(bfloat16(0.0f));
      g.push_back(f);
    }
  }
  for (float f : {std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(),
                  std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::infinity(),
                  -std::numeric_limits<float>::infinity()}) {
    d.push_back(bfloat16(0.0f));
    g.push_back(f);
  }
  d.push_back(bfloat16(1.0f));
  g.push_back(std::numeric_limits<float>::quiet_NaN());
  d.push_back(from_bits(0xFFC1));  // a negative NaN in the buffer stays a negative NaN
  g.push_back(1.0f);
  std::vector<bfloat16> got = d;
  mmkd::detail::add_to_bf16(got.data(), g.data(), Index(got.size()));
  for (std::size_t k = 0; k < got.size(); ++k) {
    const float sum = float(d[k]) + g[k];
    INFO(k << ": " << float(d[k]) << " + " << g[k]);
    if (std::isnan(sum)) {
      CHECK(std::isnan(float(got[k])));
      CHECK(std::signbit(float(got[k])) == std::signbit(sum));
    } else {
      CHECK(bits(got[k]) == bits(bfloat16(sum)));
    }
  }
}

TEST_CASE("LogitKD and LogitDivergence on bfloat16 logits equal float on the same values",
          "[logit][bf16]") {
  // V = 48 keeps every row of the float copies on a 16-byte boundary, as the staged rows are:
  // the same vector code runs on the same values, so the results are bit-identical. V = 37
  // leaves rows unaligned, where the order of a sum may differ in the last bit.
  for (const Index v : {Index(48), Index(37)}) {
    const Index n = 9;
    const Bf s = random_bf16(n, v, 1), t = random_bf16(n, v, 2);
    const Matrix<float> sf = widen(s), tf = widen(t);
    mmkd::RowMask mask = mmkd::RowMask::Ones(n);
    mask(3) = 0;
    const Bf d0 = random_bf16(n, v, 3, 0.01);  // gradient buffers' previous contents
    const float tol = v % 16 == 0 ? 0.0f : 4e-6f;
    auto same = [&](float a, float b) {
      return tol == 0 ? bits(a) == bits(b) : close<float>(a, b, tol);
    };
    auto check_grads = [&](const Matrix<float>& ref, const Matrix<float>& got, const Bf& got16) {
      if (tol == 0) {
        CHECK(bit_identical(got, ref));
        CHECK(rounds_to(got16, ref));
      } else {
        CHECK(max_rel_diff(got, ref) < tol);
        // one bf16 ulp (2^-8 relative) at most, from a last-bit difference next to a tie
        CHECK(max_rel_diff(widen(got16), ref) < 1.0 / 128);
      }
    };
    for (int k = -1; k < 6; ++k) {
      INFO("V " << v << ", " << (k < 0 ? "LogitKD" : "LogitDivergence ") << k);
      mmkd::LogitKD<float> kd({2.0f});
      typename mmkd::LogitDivergence<float>::Options o;
      o.divergence = Divergence(std::max(k, 0));
      o.temperature = 2.0f;
      mmkd::LogitDivergence<float> div(o);
      auto call = [&](auto&& s_in, auto&& t_in, auto& ds, auto& dt, bool masked) {
        if (k < 0)
          return masked ? kd.value_and_grad(s_in, t_in, mask, ds, dt)
                        : kd.value_and_grad(s_in, t_in, ds, dt);
        return masked ? div.value_and_grad(s_in, t_in, mask, ds, dt)
                      : div.value_and_grad(s_in, t_in, ds, dt);
      };
      for (const bool masked : {false, true}) {
        Matrix<float> ds_ref = widen(d0), dt_ref = widen(d0), ds = ds_ref, dt = dt_ref;
        Bf ds16 = d0, dt16 = d0;
        const float ref = call(sf, tf, ds_ref, dt_ref, masked);
        CHECK(same(call(s, t, ds, dt, masked), ref));
        CHECK(same(call(s, t, ds16, dt16, masked), ref));
        check_grads(ds_ref, ds, ds16);
        check_grads(dt_ref, dt, dt16);
        // The one-gradient and value-only overloads.
        Matrix<float> g_ref = widen(d0), g = g_ref;
        Bf g16 = d0;
        const float r1 =
            k < 0 ? kd.value_and_grad(sf, tf, g_ref) : div.value_and_grad(sf, tf, g_ref);
        CHECK(same(k < 0 ? kd.value_and_grad(s, t, g) : div.value_and_grad(s, t, g), r1));
        CHECK(same(k < 0 ? kd.value_and_grad(s, t, g16) : div.value_and_grad(s, t, g16), r1));
        check_grads(g_ref, g, g16);
        CHECK(same(k < 0 ? kd.value(s, t, mask) : div.value(s, t, mask),
                   k < 0 ? kd.value(sf, tf, mask) : div.value(sf, tf, mask)));
        // Masked rows are left alone, bit for bit, in a bfloat16 buffer.
        if (masked) CHECK(bits(ds16(3, 5)) == bits(d0(3, 5)));
      }
    }
  }
}

TEST_CASE("CrossEntropy on bfloat16 logits equals float on the same values", "[logit][bf16]") {
  const Index n = 7, v = 64;
  const Bf z = random_bf16(n, v, 4);
  const Matrix<float> zf = widen(z);
  const mmkd::Labels y = random_labels(n, v, 5);
  mmkd::RowMask mask = mmkd::RowMask::Ones(n);
  mask(0) = 0;
  const Bf d0 = random_bf16(n, v, 6, 0.01);
  for (const float eps : {0.0f, 0.1f}) {
    mmkd::CrossEntropy<float> ce({eps});
    Matrix<float> ref = widen(d0), g = ref;
    Bf g16 = d0;
    const float r = ce.value_and_grad(zf, y, mask, ref);
    CHECK(bits(ce.value_and_grad(z, y, mask, g)) == bits(r));
    CHECK(bits(ce.value_and_grad(z, y, mask, g16)) == bits(r));
    CHECK(bit_identical(g, ref));
    CHECK(rounds_to(g16, ref));
    CHECK(bits(ce.value(z, y)) == bits(ce.value(zf, y)));
  }
}

TEST_CASE("SparseLogitKD on bfloat16 inputs equals float on the same values", "[logit][bf16]") {
  const Index n = 6, v = 48, k = 5;
  const Bf s = random_bf16(n, v, 13);
  const mmkd::IndexMatrix idx = random_indices(n, v, k, 14);
  // The teacher's top-k log-probabilities: a log-softmax over k + 3 values, its first k kept.
  Matrix<float> lpf = random_matrix<float>(n, k + 3, 15, 2.0);
  for (Index i = 0; i < n; ++i)
    lpf.row(i).array() -= mmkd::detail::log_sum_exp_row(lpf.row(i).array(), 1.0f);
  const Bf lp = lpf.leftCols(k).cast<bfloat16>();
  mmkd::RowMask mask = mmkd::RowMask::Ones(n);
  mask(4) = 0;
  const Bf d0 = random_bf16(n, v, 16, 0.01);
  for (const auto support : {mmkd::SparseSupport::TailBucket, mmkd::SparseSupport::Renormalized}) {
    INFO(int(support));
    mmkd::SparseLogitKD<float> kd({support, 2.0f});
    Matrix<float> ref = widen(d0), g = ref;
    Bf g16 = d0;
    const float r = kd.value_and_grad(widen(s), idx, widen(lp), mask, ref);
    CHECK(bits(kd.value_and_grad(s, idx, lp, mask, g)) == bits(r));
    CHECK(bits(kd.value_and_grad(s, idx, lp, mask, g16)) == bits(r));
    CHECK(bit_identical(g, ref));
    CHECK(rounds_to(g16, ref));
    CHECK(bits(kd.value(s, idx, lp)) == bits(kd.value(widen(s), idx, widen(lp))));
  }
}

TEST_CASE("bfloat16 logits in a double loss, and extreme bfloat16 rows", "[logit][bf16]") {
  // Double compute reads the same values: equal to the double loss on their double copies.
  const Bf s = random_bf16(5, 32, 7), t = random_bf16(5, 32, 8);
  const Matrix<double> sd = widen(s).cast<double>(), td = widen(t).cast<double>();
  mmkd::LogitKD<double> kd;
  Matrix<double> g_ref = Matrix<double>::Zero(5, 32), g = g_ref;
  CHECK(kd.value_and_grad(s, t, g) == kd.value_and_grad(sd, td, g_ref));
  CHECK(bit_identical(g, g_ref));

  // Logits around 1e4 (a bfloat16 ulp there is 64) and a one-hot teacher (−inf elsewhere).
  Bf big = (random_matrix<float>(4, 32, 9, 300.0).array() + 1e4f).matrix().cast<bfloat16>();
  Bf one_hot = Bf::Constant(4, 32, bfloat16(-std::numeric_limits<float>::infinity()));
  for (Index i = 0; i < 4; ++i) one_hot(i, i) = bfloat16(0.0f);
  for (int k = 0; k < 6; ++k) {
    if (k == 1 || k == 4) continue;  // ReverseKL, SkewReverseKL (λ > 0 is fine, keep it simple)
    typename mmkd::LogitDivergence<float>::Options o;
    o.divergence = Divergence(k);
    mmkd::LogitDivergence<float> div(o);
    Matrix<float> ref = Matrix<float>::Zero(4, 32), got = ref;
    const float r = div.value_and_grad(widen(big), widen(one_hot), ref);
    INFO(k);
    CHECK(std::isfinite(r));
    CHECK(bits(div.value_and_grad(big, one_hot, got)) == bits(r));
    CHECK(bit_identical(got, ref));
  }
}

TEST_CASE("bfloat16 inputs: errors name the element and leave bfloat16 buffers untouched",
          "[logit][bf16][errors]") {
  Bf s = random_bf16(4, 16, 10), t = random_bf16(4, 16, 11);
  s(2, 7) = bfloat16(std::numeric_limits<float>::quiet_NaN());
  Bf ds = Bf::Constant(4, 16, bfloat16(0.5f));
  mmkd::LogitKD<float> kd;
  CHECK_THROWS_WITH(kd.value_and_grad(s, t, ds), Catch::Contains("student[2,7] is NaN"));
  CHECK((widen(ds).array() == 0.5f).all());
  mmkd::LogitDivergence<float> div;
  CHECK_THROWS_WITH(div.value_and_grad(s, t, ds), Catch::Contains("student[2,7] is NaN"));
  CHECK((widen(ds).array() == 0.5f).all());
  mmkd::CrossEntropy<float> ce;
  mmkd::Labels y = random_labels(4, 16, 12);
  CHECK_THROWS_WITH(ce.value_and_grad(s, y, ds), Catch::Contains("logits[2,7] is NaN"));
  CHECK((widen(ds).array() == 0.5f).all());
  Bf wrong(4, 15);
  CHECK_THROWS_WITH(kd.value_and_grad(t, t, wrong), Catch::Contains("d_student has shape 4x15"));
}

TEST_CASE("The README's bfloat16 lines give the gradient of the loss of their values",
          "[logit][bf16]") {
  const Index n = 8, v = 32;
  const Bf student_logits_bf16 = random_bf16(n, v, 20), teacher_logits_bf16 = random_bf16(n, v, 21);
  mmkd::RowMask mask = mmkd::RowMask::Ones(n);
  mask(7) = 0;  // padding
  mmkd::LogitDivergence<float>::Options o;
  o.divergence = mmkd::Divergence::GeneralizedJSD;
  mmkd::LogitDivergence<float> jsd(o);
  // The README's lines.
  mmkd::Matrix<mmkd::bfloat16> s16 = student_logits_bf16, t16 = teacher_logits_bf16;
  mmkd::Matrix<mmkd::bfloat16> d_s16 = mmkd::Matrix<mmkd::bfloat16>::Zero(s16.rows(), s16.cols());
  float l4 = jsd.value_and_grad(s16, t16, mask, d_s16);  // computed in float
  // Central differences of the double loss on the same values: the gradient to bfloat16's
  // rounding (2^-9 relative, plus a little for float).
  mmkd::LogitDivergence<double>::Options od;
  od.divergence = mmkd::Divergence::GeneralizedJSD;
  mmkd::LogitDivergence<double> exact(od);
  const Matrix<double> sd = widen(s16).cast<double>(), td = widen(t16).cast<double>();
  CHECK(l4 == Approx(exact.value(sd, td, mask)).epsilon(1e-6));
  Matrix<double> fd(n, v);
  for (Index k = 0; k < sd.size(); ++k) {
    Matrix<double> a = sd, b = sd;
    a.data()[k] += 1e-6;
    b.data()[k] -= 1e-6;
    fd.data()[k] = (exact.value(a, td, mask) - exact.value(b, td, mask)) / 2e-6;
  }
  const double scale = fd.cwiseAbs().maxCoeff();
  CHECK(scale > 1e-3);
  CHECK((widen(d_s16).cast<double>() - fd).cwiseAbs().maxCoeff() < scale / 256);
  CHECK(d_s16.row(7).cast<float>().isZero(0));
}

TEST_CASE("FusedLinearKD on bfloat16 hidden states and heads equals float on the same values",
          "[logit][bf16][fused]") {
  // V = 4100: two blocks of head rows; chunks of 2 rows; a row labelled -100.
  const Index n = 5, d = 6, d_t = 4, v = 4100;
  const Bf hs = random_bf16(n, d, 30, 1.0), ws = random_bf16(v, d, 31, 0.5),
           ht = random_bf16(n, d_t, 32, 1.0), wt = random_bf16(v, d_t, 33, 0.5);
  const Bf bs = random_bf16(v, 1, 34, 0.2), bt = random_bf16(v, 1, 35, 0.2);
  const Bf tl = random_bf16(n, v, 36, 2.0);
  const mmkd::Vector<bfloat16> b_s = bs, b_t = bt;
  const mmkd::Vector<float> b_sf = widen(bs), b_tf = widen(bt);
  mmkd::Labels y = random_labels(n, v, 37);
  y(1) = -100;
  mmkd::FusedLinearKD<float>::Options o;
  o.hard_weight = 0.5f;
  o.chunk_rows = 2;
  o.divergence.divergence = Divergence::GeneralizedJSD;
  mmkd::FusedLinearKD<float> kd(o);
  const Bf dh0 = random_bf16(n, d, 38, 0.01), dw0 = random_bf16(v, d, 39, 0.01);
  const mmkd::Vector<bfloat16> db0 = random_bf16(v, 1, 40, 0.01);
  // Within bfloat16's rounding of each element, plus the float sums' own order.
  auto near = [](const auto& got16, const auto& want) {
    const Matrix<float> g = widen(Bf(got16)), w = want;
    const float floor = 1e-5f * std::max(1.0f, w.cwiseAbs().maxCoeff());
    return ((g - w).array().abs() <= w.array().abs() / 128 + floor).all();
  };
  for (int form = 0; form < 2; ++form) {
    INFO((form == 0 ? "heads and biases" : "teacher logits and bias"));
    Matrix<float> dh = widen(dh0), dw = widen(dw0), dh_ref = dh, dw_ref = dw;
    mmkd::Vector<float> db = widen(Bf(db0)), db_ref = db;
    Bf dh16 = dh0, dw16 = dw0;
    mmkd::Vector<bfloat16> db16 = db0;
    float ref, got, got16;
    if (form == 0) {
      ref = kd.value_and_grad(widen(hs), widen(ws), widen(ht), widen(wt), y, b_sf, b_tf, dh_ref,
                              dw_ref, db_ref);
      got = kd.value_and_grad(hs, ws, ht, wt, y, b_s, b_t, dh, dw, db);
      got16 = kd.value_and_grad(hs, ws, ht, wt, y, b_s, b_t, dh16, dw16, db16);
      CHECK(bits(kd.value(hs, ws, ht, wt, y)) ==
            bits(kd.value(widen(hs), widen(ws), widen(ht), widen(wt), y)));
    } else {
      ref = kd.value_and_grad(widen(hs), widen(ws), widen(tl), y, b_sf, dh_ref, dw_ref, db_ref);
      got = kd.value_and_grad(hs, ws, tl, y, b_s, dh, dw, db);
      got16 = kd.value_and_grad(hs, ws, tl, y, b_s, dh16, dw16, db16);
      CHECK(bits(kd.value(hs, ws, tl, y)) == bits(kd.value(widen(hs), widen(ws), widen(tl), y)));
    }
    // The same products and row kernels on the same values: bit for bit in float.
    CHECK(bits(got) == bits(ref));
    CHECK(bits(got16) == bits(ref));
    CHECK(bit_identical(dh, dh_ref));
    CHECK(bit_identical(dw, dw_ref));
    CHECK((db.array() == db_ref.array()).all());
    // d_h_s and d_b_s are rounded once; d_w_s once per chunk (three here): within an error
    // model of round-to-nearest, 2^-8 of the running sum per rounding, the running sums bounded
    // by |d_w0| + Σ_c |chunk c's share| (each share the float loss on that chunk's labels alone,
    // rescaled to the whole batch's count).
    CHECK(near(dh16, dh_ref));
    CHECK(near(Bf(db16), Matrix<float>(db_ref)));
    Matrix<float> bound = widen(dw0).cwiseAbs();
    const Index used = (y.array() != -100).count();
    for (Index c0 = 0; c0 < n; c0 += 2) {
      mmkd::Labels yc = mmkd::Labels::Constant(n, -100);
      yc.segment(c0, std::min<Index>(2, n - c0)) = y.segment(c0, std::min<Index>(2, n - c0));
      const Index used_c = (yc.array() != -100).count();
      if (used_c == 0) continue;
      Matrix<float> dhc = Matrix<float>::Zero(n, d), dwc = Matrix<float>::Zero(v, d);
      mmkd::Vector<float> dbc = mmkd::Vector<float>::Zero(v);
      if (form == 0)
        kd.value_and_grad(widen(hs), widen(ws), widen(ht), widen(wt), yc, b_sf, b_tf, dhc, dwc,
                          dbc);
      else
        kd.value_and_grad(widen(hs), widen(ws), widen(tl), yc, b_sf, dhc, dwc, dbc);
      bound += dwc.cwiseAbs() * (float(used_c) / float(used));
    }
    const Matrix<float> err = (widen(dw16) - dw_ref).cwiseAbs();
    CHECK((err.array() <= 3.0f / 256 * bound.array() + 1e-6f).all());
    CHECK(bits(dh16(1, 2)) == bits(dh0(1, 2)));  // the -100 row: nothing added
  }
  // Errors name the bfloat16 element and leave bfloat16 buffers as they were.
  Bf bad = ws;
  bad(4, 1) = bfloat16(std::numeric_limits<float>::quiet_NaN());
  Bf dh16 = dh0, dw16 = dw0;
  CHECK_THROWS_WITH(kd.value_and_grad(hs, bad, ht, wt, y, dh16, dw16),
                    Catch::Contains("w_s[4,1] is NaN"));
  CHECK(bit_identical(widen(dh16), widen(dh0)));
  CHECK(bit_identical(widen(dw16), widen(dw0)));
}
