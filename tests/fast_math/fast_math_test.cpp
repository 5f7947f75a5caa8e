// Built with -ffast-math: the compiler may then assume that no value is NaN or infinite, and
// std::isfinite, std::isnan and Eigen's allFinite() fold to constants. mmkd's checks test the bit
// patterns instead: a NaN or infinite input, a NaN option and an overflowing loss must still
// throw, with the message of the normal build, and leave every caller buffer unchanged.

#include <mmkd/contrastive/info_nce.hpp>
#include <mmkd/logit/logit_kd.hpp>
#include <mmkd/multimodal/modality_gram_kd.hpp>
#include <mmkd/review/batch_norm.hpp>
#include <mmkd/structure/channel_decorrelation.hpp>

#include <cstdint>
#include <cstring>

#include "support.hpp"

#if !defined(__FAST_MATH__)
#error "build this test with -ffast-math"
#endif

using namespace mmkd_test;

namespace {

// A NaN and infinities from their bit patterns (the compiler may fold numeric_limits' NaN
// through arithmetic under fast math, never a memcpy).
template <class T>
T from_bits(std::uint64_t bits) {
  T v;
  if constexpr (sizeof(T) == 4) {
    const auto b = std::uint32_t(bits);
    std::memcpy(&v, &b, 4);
  } else {
    std::memcpy(&v, &bits, 8);
  }
  return v;
}
const float nan_f = from_bits<float>(0x7fc00000u), inf_f = from_bits<float>(0x7f800000u);
const double nan_d = from_bits<double>(0x7ff8000000000000ull);

}  // namespace

TEST_CASE("fast math: the bit-pattern classification", "[core][fast_math]") {
  using mmkd::detail::FloatClass;
  CHECK(mmkd::detail::classify(nan_f) == FloatClass::NaN);
  CHECK(mmkd::detail::classify(inf_f) == FloatClass::PosInf);
  CHECK(mmkd::detail::classify(-inf_f) == FloatClass::NegInf);
  CHECK(mmkd::detail::classify(nan_d) == FloatClass::NaN);
  CHECK(mmkd::detail::classify(3.0e38f) == FloatClass::Finite);
  Matrix<float> m = Matrix<float>::Ones(3, 17);
  CHECK(mmkd::detail::all_finite(m));
  m(2, 16) = nan_f;
  CHECK_FALSE(mmkd::detail::all_finite(m));
  m(2, 16) = -inf_f;
  CHECK_FALSE(mmkd::detail::all_finite(m.rightCols(5)));
}

TEST_CASE("fast math: LogitKD still rejects NaN and Inf inputs, NaN options and overflow",
          "[core][fast_math]") {
  Matrix<float> s = random_matrix<float>(4, 3, 1), t = random_matrix<float>(4, 3, 2);
  Matrix<float> g = Matrix<float>::Zero(4, 3);
  mmkd::LogitKD<float> kd;
  Matrix<float> s2 = s, t2 = t;
  s2(1, 2) = nan_f;
  t2(3, 0) = inf_f;
  CHECK_THROWS_WITH(kd.value_and_grad(s2, t, g), "LogitKD: student[1,2] is NaN");
  CHECK_THROWS_WITH(kd.value_and_grad(s, t2, g), "LogitKD: teacher[3,0] is +Inf");
  CHECK(g.isZero(0));
  mmkd::LogitKD<float>::Options o;
  o.temperature = nan_f;
  CHECK_THROWS_AS(mmkd::LogitKD<float>(o), mmkd::InvalidArgument);
  // The overflow case of the normal build's test: weight 1e37 · T² · KL passes float's maximum
  // for these rows (the student's mass on the teacher's least likely class).
  Matrix<float> a(2, 3), b(2, 3);
  a << 10, 0, -10, -10, 0, 10;
  b << -10, 0, 10, 10, 0, -10;
  kd.options().weight = 1e37f;
  Matrix<float> ga = Matrix<float>::Zero(2, 3);
  CHECK_THROWS_WITH(kd.value_and_grad(a, b, ga), Catch::Contains("the loss overflows"));
  CHECK(ga.isZero(0));
}

TEST_CASE("fast math: the other families still reject NaN inputs, buffers unchanged",
          "[core][fast_math]") {
  {
    Matrix<double> z = random_matrix<double>(6, 3, 3), g = Matrix<double>::Zero(6, 3);
    z(3, 1) = nan_d;
    mmkd::ChannelDecorrelation<double> decor;
    CHECK_THROWS_WITH(decor.value_and_grad(z, g), "ChannelDecorrelation: features[3,1] is NaN");
    CHECK(g.isZero(0));
  }
  {
    Matrix<double> q = random_matrix<double>(4, 5, 4), k = random_matrix<double>(4, 5, 5);
    Matrix<double> g = Matrix<double>::Zero(4, 5);
    q(2, 0) = nan_d;
    mmkd::InfoNCE<double> nce;
    CHECK_THROWS_WITH(nce.value_and_grad(q, k, g), "InfoNCE: queries[2,0] is NaN");
    CHECK(g.isZero(0));
  }
  {
    mmkd::Tensor3<double> s = random_stack<double>(3, 4, 5, 6),
                          t = random_stack<double>(3, 4, 7, 7);
    mmkd::Tensor3<double> ds(3, 4, 5);
    ds.setZero();
    s(2, 1, 0) = nan_d;
    mmkd::ModalityGramKD<double> gram;
    CHECK_THROWS_WITH(gram.value_and_grad(s, t, ds),
                      "ModalityGramKD: student[9,0] is NaN (modality 2, sample 1)");
    CHECK(flat(ds).isZero(0));
  }
  {
    mmkd::Tensor4<float> x = random_map<float>(2, 2, 1, 3, 8);
    x(1, 1, 0, 1) = nan_f;
    mmkd::BatchNorm2d<float> bn({2});
    const Matrix<float> mean = bn.buffers()[0].value;
    CHECK_THROWS_WITH(bn.forward(x), Catch::Contains("x[1,1,0,1] is NaN"));
    CHECK(bn.buffers()[0].value == mean);
  }
}
