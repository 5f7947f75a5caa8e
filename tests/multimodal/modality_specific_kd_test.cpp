#include <mmkd/logit/logit_kd.hpp>
#include <mmkd/multimodal/modality_gram_kd.hpp>
#include <mmkd/multimodal/modality_saliency.hpp>
#include <mmkd/multimodal/modality_specific_kd.hpp>
#include <mmkd/multimodal/modality_weighting.hpp>

#include "support.hpp"

using namespace mmkd_test;
using mmkd::ConstTensor3Ref;
using mmkd::Tensor3;
using mmkd::Tensor3Ref;

namespace {

struct Batch {
  Index n, c, m;
  Matrix<double> s, t, w;
  Tensor3<double> zs, zt;
};

Batch make_batch(Index n, Index c, Index m, std::uint64_t seed) {
  Batch b{n,
          c,
          m,
          random_matrix<double>(n, c, seed, 2),
          random_matrix<double>(n, c, seed + 1, 2),
          random_matrix<double>(n, m, seed + 2).cwiseAbs(),
          random_stack<double>(m, n, c, seed + 3, 2),
          random_stack<double>(m, n, c, seed + 4, 2)};
  return b;
}

// The MSD value from its definition, long double.
long double ref_msd(const Batch& b, long double temp, long double beta,
                    const mmkd::PresenceMask* mask) {
  long double full = 0, aux = 0;
  for (Index i = 0; i < b.n; ++i) {
    full += ref_kl(b.s.row(i), b.t.row(i), temp);
    for (Index k = 0; k < b.m; ++k) {
      if (mask && (*mask)(i, k) == 0) continue;
      aux += b.w(i, k) * ref_kl(stack_row(b.zs, k, i), stack_row(b.zt, k, i), temp);
    }
  }
  return temp * temp * (beta * full + aux) / b.n;
}

}  // namespace

TEST_CASE("ModalitySpecificKD matches its definition", "[multimodal][msd]") {
  const Batch b = make_batch(7, 9, 3, 10);
  mmkd::PresenceMask mask = mmkd::PresenceMask::Ones(7, 3);
  mask(0, 1) = 0;
  mask(4, 0) = 0;
  mask(4, 2) = 0;
  for (double temp : {1.0, 4.0}) {
    mmkd::ModalitySpecificKD<double> msd({temp, 0.5});
    CHECK(close<double>(msd.value(b.s, b.t, b.zs, b.zt, b.w),
                        double(ref_msd(b, temp, 0.5, nullptr)), 1e-12));
    CHECK(close<double>(msd.value(b.s, b.t, b.zs, b.zt, b.w, mask),
                        double(ref_msd(b, temp, 0.5, &mask)), 1e-12));
    // The exposed auxiliary losses are T²·KL per sample and modality, 0 where missing.
    const Matrix<double>& aux = msd.auxiliary_losses();
    CHECK(aux(2, 1) ==
          Approx(double(temp * temp * ref_kl(stack_row(b.zs, 1, 2), stack_row(b.zt, 1, 2), temp))));
    CHECK(aux(0, 1) == 0);
    CHECK(msd.auxiliary_losses(b.zs, b.zt, mask).isApprox(aux));
  }
}

TEST_CASE("ModalitySpecificKD with beta 1 and one modality weighted 1 is LogitKD twice",
          "[multimodal][msd]") {
  // Full input and the single modality's input give the same logits: the loss is 2 · LogitKD.
  const Matrix<float> s = random_matrix<float>(5, 8, 1, 2), t = random_matrix<float>(5, 8, 2, 2);
  Tensor3<float> zs(1, 5, 8), zt(1, 5, 8);
  std::copy(s.data(), s.data() + s.size(), zs.data());
  std::copy(t.data(), t.data() + t.size(), zt.data());
  const Matrix<float> w = Matrix<float>::Ones(5, 1);
  mmkd::ModalitySpecificKD<float> msd({4.0f});
  mmkd::LogitKD<float> kd({4.0f});
  Matrix<float> ds = Matrix<float>::Zero(5, 8), g = Matrix<float>::Zero(5, 8);
  Tensor3<float> dzs(1, 5, 8);
  dzs.setZero();
  CHECK(msd.value_and_grad(s, t, zs, zt, w, ds, dzs) ==
        Approx(2 * kd.value_and_grad(s, t, g)).epsilon(1e-5));
  CHECK(ds.isApprox(g));
  CHECK(flat(dzs).isApprox(g));
}

TEST_CASE("ModalitySpecificKD gradients match finite differences", "[multimodal][msd][gradient]") {
  const Batch b = make_batch(4, 5, 3, 20);
  mmkd::PresenceMask mask = mmkd::PresenceMask::Ones(4, 3);
  mask(1, 0) = 0;
  mask(2, 2) = 0;
  mmkd::ModalitySpecificKD<double> msd({2.0, 0.7, 1.5});
  for (bool masked : {false, true}) {
    auto call = [&](const Matrix<double>& s, ConstTensor3Ref<double> zs, Matrix<double>& ds,
                    Tensor3Ref<double> dzs) {
      return masked ? msd.value_and_grad(s, b.t, zs, b.zt, b.w, mask, ds, dzs)
                    : msd.value_and_grad(s, b.t, zs, b.zt, b.w, ds, dzs);
    };
    auto wrt_full = [&](const Matrix<double>& x, Matrix<double>& g) {
      Tensor3<double> dzs(3, 4, 5);
      dzs.setZero();
      return call(x, b.zs, g, dzs);
    };
    auto wrt_modal = [&](const Matrix<double>& x, Matrix<double>& g) {
      Matrix<double> ds = Matrix<double>::Zero(4, 5);
      return call(b.s, ConstTensor3Ref<double>(x.data(), 3, 4, 5), ds,
                  Tensor3Ref<double>(g.data(), 3, 4, 5));
    };
    const auto r1 = mmkd::check_value_and_grad(wrt_full, b.s, tight());
    const auto r2 = mmkd::check_value_and_grad(wrt_modal, flat(b.zs), tight());
    INFO("masked " << masked << "\n" << r1.message() << "\n" << r2.message());
    CHECK(r1.passed);
    CHECK(r2.passed);
  }
}

TEST_CASE("ModalitySpecificKD missing modalities: dropped, never read, zero gradient",
          "[multimodal][msd]") {
  Batch b = make_batch(4, 6, 2, 30);
  mmkd::PresenceMask mask = mmkd::PresenceMask::Ones(4, 2);
  mask(1, 0) = 0;
  mask(3, 1) = 0;
  const double v = mmkd::ModalitySpecificKD<double>().value(b.s, b.t, b.zs, b.zt, b.w, mask);
  // Garbage in the missing rows and weights changes nothing.
  for (Index k = 0; k < 6; ++k) {
    b.zs(0, 1, k) = std::numeric_limits<double>::quiet_NaN();
    b.zt(1, 3, k) = std::numeric_limits<double>::infinity();
  }
  b.w(1, 0) = -5;
  mmkd::ModalitySpecificKD<double> msd;
  Matrix<double> ds = Matrix<double>::Zero(4, 6);
  Tensor3<double> dzs(2, 4, 6);
  dzs.setZero();
  CHECK(msd.value_and_grad(b.s, b.t, b.zs, b.zt, b.w, mask, ds, dzs) == Approx(v).epsilon(1e-14));
  for (Index k = 0; k < 6; ++k) {
    CHECK(dzs(0, 1, k) == 0);
    CHECK(dzs(1, 3, k) == 0);
  }
  SECTION("every sample missing a modality, and one sample missing all") {
    mmkd::PresenceMask none = mmkd::PresenceMask::Zero(4, 2);
    none(0, 0) = 1;
    CHECK(std::isfinite(msd.value(b.s, b.t, b.zs, b.zt, b.w, none)));
    mmkd::PresenceMask all_missing = mmkd::PresenceMask::Zero(4, 2);
    // Only the full-input term remains.
    mmkd::LogitKD<double> kd({1.0});
    CHECK(msd.value(b.s, b.t, b.zs, b.zt, b.w, all_missing) ==
          Approx(kd.value(b.s, b.t)).epsilon(1e-13));
  }
}

TEST_CASE("ModalitySpecificKD degenerate shapes: M = 1, N = 1", "[multimodal][msd]") {
  const Batch b = make_batch(1, 3, 1, 40);
  mmkd::ModalitySpecificKD<double> msd;
  CHECK(close<double>(msd.value(b.s, b.t, b.zs, b.zt, b.w), double(ref_msd(b, 1, 1, nullptr)),
                      1e-12));
}

TEST_CASE("ModalitySpecificKD rejects bad input and writes nothing", "[multimodal][msd][errors]") {
  const Batch b = make_batch(4, 5, 2, 50);
  mmkd::ModalitySpecificKD<double> msd;
  Matrix<double> ds = random_matrix<double>(4, 5, 1);
  Tensor3<double> dzs = random_stack<double>(2, 4, 5, 2);
  const Matrix<double> ds0 = ds, dzs0 = flat(dzs);
  const Tensor3<double> wrong_m = random_stack<double>(3, 4, 5, 3),
                        wrong_c = random_stack<double>(2, 4, 6, 3);
  CHECK_THROWS_WITH(
      msd.value_and_grad(b.s, b.t, wrong_m, b.zt, b.w, ds, dzs),
      "ModalitySpecificKD: teacher_modal has shape 2x4x5, expected 3x4x5 (same as student_modal)");
  CHECK_THROWS_WITH(msd.value_and_grad(b.s, b.t, wrong_c, wrong_c, b.w, ds, dzs),
                    "ModalitySpecificKD: student_modal has shape 2x4x6, expected 2x4x5 (modalities "
                    "x samples x classes)");
  Matrix<double> w = b.w;
  w(2, 1) = -0.5;
  CHECK_THROWS_WITH(msd.value_and_grad(b.s, b.t, b.zs, b.zt, w, ds, dzs),
                    "ModalitySpecificKD: weights[2,1] is -0.500000, expected finite and >= 0");
  w(2, 1) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_AS(msd.value_and_grad(b.s, b.t, b.zs, b.zt, w, ds, dzs), mmkd::InvalidArgument);
  CHECK_THROWS_WITH(
      msd.value_and_grad(b.s, b.t, b.zs, b.zt, Matrix<double>(b.w.transpose()), ds, dzs),
      "ModalitySpecificKD: weights has shape 2x4, expected 4x2 (samples x modalities)");
  mmkd::PresenceMask mask = mmkd::PresenceMask::Ones(4, 2);
  mask(3, 0) = 7;
  CHECK_THROWS_WITH(msd.value_and_grad(b.s, b.t, b.zs, b.zt, b.w, mask, ds, dzs),
                    "ModalitySpecificKD: mask[3,0] is 7, expected 0 or 1");
  CHECK_THROWS_WITH(msd.value(b.s, b.t, b.zs, b.zt, b.w, mmkd::PresenceMask::Ones(4, 3)),
                    "ModalitySpecificKD: mask has shape 4x3, expected 4x2 (samples x modalities)");
  Tensor3<double> zs_nan = b.zs;
  zs_nan(1, 2, 3) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(msd.value_and_grad(b.s, b.t, zs_nan, b.zt, b.w, ds, dzs),
                    "ModalitySpecificKD: student_modal[6,3] is NaN (modality 1, sample 2)");
  CHECK(bit_identical(ds, ds0));
  CHECK(bit_identical(flat(dzs), dzs0));
}

TEST_CASE("Presence masks passed as strided views are read with their stride",
          "[multimodal][msd][saliency][gram]") {
  // A view of the first M columns of a wider mask binds to ConstPresenceMaskRef without a copy;
  // every loss must give what the dense copy gives (the other columns are 0 and would drop
  // modalities if read).
  const Batch b = make_batch(6, 5, 3, 40);
  mmkd::PresenceMask wide = mmkd::PresenceMask::Zero(6, 5);
  wide.leftCols(3).setOnes();
  wide(1, 2) = 0;
  wide(4, 0) = 0;
  const mmkd::PresenceMask dense = wide.leftCols(3);
  const mmkd::ConstPresenceMaskRef view = wide.leftCols(3);
  REQUIRE(view.data() == wide.data());  // no copy was made
  mmkd::ModalitySpecificKD<double> msd;
  const double v_dense = msd.value(b.s, b.t, b.zs, b.zt, b.w, dense);
  CHECK(msd.value(b.s, b.t, b.zs, b.zt, b.w, view) == v_dense);
  mmkd::ModalitySaliency<double> saliency({mmkd::SaliencyKind::Sufficiency});  // any M
  const Matrix<double> s_dense = saliency.compute(b.t, b.zt, dense);
  CHECK(bit_identical(saliency.compute(b.t, b.zt, view), s_dense));
  mmkd::ModalityWeighting<double> weighting;
  const Matrix<double> w_dense = weighting.compute(s_dense, dense);
  CHECK(bit_identical(weighting.compute(s_dense, view), w_dense));
  mmkd::ModalityGramKD<double> gram;
  const double g_dense = gram.value(b.zs, b.zt, dense);
  CHECK(gram.value(b.zs, b.zt, view) == g_dense);
}

TEST_CASE("Multimodal enum options out of range are rejected", "[multimodal][errors]") {
  mmkd::ModalityGramKD<double>::Options g;
  g.normalization = mmkd::GramNormalization(7);
  CHECK_THROWS_WITH(mmkd::ModalityGramKD<double>(g),
                    "ModalityGramKD: option normalization holds no valid value (7)");
  g = {};
  g.scope = mmkd::GramScope(7);
  CHECK_THROWS_WITH(mmkd::ModalityGramKD<double>(g),
                    "ModalityGramKD: option scope holds no valid value (7)");
  mmkd::ModalitySaliency<double>::Options s;
  s.kind = mmkd::SaliencyKind(7);
  CHECK_THROWS_WITH(mmkd::ModalitySaliency<double>(s),
                    "ModalitySaliency: option kind holds no valid value (7)");
  mmkd::ModalityWeighting<double>::Options w;
  w.scheme = mmkd::WeightScheme(7);
  CHECK_THROWS_WITH(mmkd::ModalityWeighting<double>(w),
                    "ModalityWeighting: option scheme holds no valid value (7)");
  w = {};
  w.normalization = mmkd::WeightNormalization(7);
  CHECK_THROWS_WITH(mmkd::ModalityWeighting<double>(w),
                    "ModalityWeighting: option normalization holds no valid value (7)");
}

TEST_CASE("ModalityGramKD value() throws instead of returning inf", "[multimodal][gram][errors]") {
  // Raw Grams of embeddings of size 1e3 are about 1e5; their squared differences (finite) times
  // a weight of 1e30 are not.
  const Tensor3<float> s = random_stack<float>(3, 4, 5, 1, 1e3),
                       t = random_stack<float>(3, 4, 6, 2, 1e3);
  mmkd::ModalityGramKD<float>::Options o;
  o.normalization = mmkd::GramNormalization::Raw;
  mmkd::ModalityGramKD<float> gram(o);
  REQUIRE(gram.value(s, t) > 1e8f);
  gram.options().weight = 1e30f;
  CHECK_THROWS_WITH(gram.value(s, t), Catch::Contains("the loss overflows"));
}

TEST_CASE("ModalitySpecificKD: a huge beta times T² overflows, its gradient scale does not",
          "[multimodal][msd][errors]") {
  // fuzz_multimodal input cbdbb5cc…: N = 1, C = 1, M = 2, both modalities missing, T = 1e6,
  // beta = 1e300. weight·T²·beta = 1e312 is out of range, but the gradient's scale
  // weight·beta·T/N = 1e306 is not; with one class both softmaxes are 1, so the loss and its
  // gradient are exactly 0 (it used to write NaN).
  mmkd::ModalitySpecificKD<double>::Options o;
  o.temperature = 1e6;
  o.beta = 1e300;
  mmkd::ModalitySpecificKD<double> msd(o);
  Matrix<double> s(1, 1), t(1, 1), w(1, 2);
  s << -1.125;
  t << 3968.75;
  w << -1000, 3750;  // unused: both modalities are missing
  Tensor3<double> zs(2, 1, 1), zt(2, 1, 1), dzs(2, 1, 1);
  zs.setConstant(3968.75);
  zt.setConstant(3968.75);
  dzs.setZero();
  const mmkd::PresenceMask mask = mmkd::PresenceMask::Zero(1, 2);
  Matrix<double> ds = Matrix<double>::Zero(1, 1);
  CHECK(msd.value_and_grad(s, t, zs, zt, w, mask, ds, dzs) == 0.0);
  CHECK(ds(0, 0) == 0.0);
  CHECK(dzs(0, 0, 0) == 0.0);
  CHECK(dzs(1, 0, 0) == 0.0);

  // Two classes: dL/ds = beta·(T/N)·(p_s − p_t), p = softmax(x/T), by hand from the sigmoid.
  Matrix<double> s2(1, 2), t2(1, 2), ds2 = Matrix<double>::Zero(1, 2);
  s2 << 0, -1000;
  t2 << 0, 1000;
  const double ps0 = 1 / (1 + std::exp(-1000 / 1e6)), pt0 = 1 / (1 + std::exp(1000 / 1e6));
  Tensor3<double> z2(2, 1, 2), dz2(2, 1, 2);
  z2.setZero();
  dz2.setZero();
  const Matrix<double> w2 = Matrix<double>::Zero(1, 2);
  msd.value_and_grad(s2, t2, z2, z2, w2, mask, ds2, dz2);
  const double expected = 1e300 * 1e6 * (ps0 - pt0);  // about 2e303
  CHECK(ds2(0, 0) == Approx(expected).epsilon(1e-9));
  CHECK(ds2(0, 1) == Approx(-expected).epsilon(1e-9));
}
