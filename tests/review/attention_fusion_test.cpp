// AttentionFusion: finite differences for the input, the residual and every parameter (train and
// eval mode, with and without fusion and resize), the initialisation, errors and the strong
// guarantee.

#include <mmkd/review/attention_fusion.hpp>
#include <mmkd/review/batch_norm.hpp>

#include "support.hpp"

using namespace mmkd_test;

namespace {

using Abf = mmkd::AttentionFusion<double>;

struct Case {
  Index n, in, mid, out, h, w, rh, rw, out_size;
  bool fuse;
};

// <u, output> + <v, residual()> for one forward with the module's current parameters.
double scalar(Abf& abf, const Case& k, const Matrix<double>& x, const Matrix<double>& r,
              const Matrix<double>& u, const Matrix<double>& v) {
  const auto xm = map4(x, k.n, k.in, k.h, k.w);
  const auto& y = k.fuse ? abf.forward(xm, map4(r, k.n, k.mid, k.rh, k.rw), k.out_size)
                         : abf.forward(xm, k.out_size);
  return (flat(y).array() * u.array()).sum() + (flat(abf.residual()).array() * v.array()).sum();
}

}  // namespace

TEST_CASE("AttentionFusion gradients match finite differences for inputs and every parameter",
          "[review][abf]") {
  const Case cases[] = {
      {2, 3, 4, 2, 3, 3, 2, 2, 0, true},   // fuse, residual 2x2 upsampled to 3x3
      {2, 2, 3, 3, 2, 2, 1, 1, 4, true},   // fuse with a 1x1 residual, resize 2x2 → 4x4
      {3, 4, 3, 2, 1, 1, 0, 0, 0, false},  // the deepest stage: 1x1 map, centre taps only
      {2, 2, 2, 3, 3, 2, 0, 0, 5, false},  // no fusion, non-square map resized to 5x5
  };
  for (const Case& k : cases) {
    for (bool train : {true, false}) {
      INFO("case in " << k.in << " mid " << k.mid << " " << k.h << "x" << k.w << " fuse " << k.fuse
                      << " out_size " << k.out_size << " train " << train);
      Abf abf({k.in, k.mid, k.out, k.fuse, 3});
      // Non-trivial BN parameters and running statistics.
      for (auto& p : abf.parameters()) {
        if (std::string(p.name).find(".1.") != std::string::npos)
          p.value = random_matrix<double>(p.value.rows(), p.value.cols(), p.value.size(), 0.5);
      }
      const Matrix<double> x = random_matrix<double>(k.n * k.in, k.h * k.w, 11);
      const Matrix<double> r =
          k.fuse ? random_matrix<double>(k.n * k.mid, k.rh * k.rw, 12) : Matrix<double>();
      const Index oh = k.out_size ? k.out_size : k.h, ow = k.out_size ? k.out_size : k.w;
      const Matrix<double> u = random_matrix<double>(k.n * k.out, oh * ow, 13);
      const Matrix<double> v = random_matrix<double>(k.n * k.mid, oh * ow, 14);
      if (!train) {  // a train-mode pass first moves the running statistics
        scalar(abf, k, x, r, u, v);
        abf.eval();
      }
      scalar(abf, k, x, r, u, v);
      Matrix<double> dx = Matrix<double>::Ones(x.rows(), x.cols());
      Matrix<double> dr = Matrix<double>::Ones(r.rows(), r.cols());
      abf.backward(map4(u, k.n, k.out, oh, ow), map4(v, k.n, k.mid, oh, ow),
                   out4(dx, k.n, k.in, k.h, k.w),
                   k.fuse ? out4(dr, k.n, k.mid, k.rh, k.rw)
                          : mmkd::Tensor4Ref<double>(nullptr, 0, 0, 0, 0));
      dx.array() -= 1.0;
      dr.array() -= 1.0;
      CHECK(mmkd::check_gradient(
          [&](const Matrix<double>& t) { return scalar(abf, k, t, r, u, v); }, x, dx, tight()));
      if (k.fuse) {
        CHECK(mmkd::check_gradient(
            [&](const Matrix<double>& t) { return scalar(abf, k, x, t, u, v); }, r, dr, tight()));
      }
      auto params = abf.parameters();
      auto grads = abf.gradients();
      REQUIRE(params.size() == (k.fuse ? 8u : 6u));
      for (std::size_t p = 0; p < params.size(); ++p) {
        INFO(params[p].name);
        CHECK(std::string(params[p].name) == grads[p].name);
        const Matrix<double> p0 = params[p].value;
        auto f = [&](const Matrix<double>& t) {
          params[p].value = t;
          const double s = scalar(abf, k, x, r, u, v);
          params[p].value = p0;
          return s;
        };
        CHECK(mmkd::check_gradient(f, p0, grads[p].value, tight()));
      }
    }
  }
}

TEST_CASE("AttentionFusion initialisation follows the reference's distributions", "[review][abf]") {
  Abf a({64, 48, 32, true, 1}), b({64, 48, 32, true, 1}), c({64, 48, 32, true, 2});
  auto pa = a.parameters(), pb = b.parameters(), pc = c.parameters();
  const char* names[] = {"conv1.0.weight",    "conv1.1.weight", "conv1.1.bias",
                         "conv2.0.weight",    "conv2.1.weight", "conv2.1.bias",
                         "att_conv.0.weight", "att_conv.0.bias"};
  // kaiming_uniform(a=1): U(±√(3/fan_in)); PyTorch's Conv2d default: U(±1/√fan_in).
  const double bound[] = {
      std::sqrt(3.0 / 64), 0, 0, std::sqrt(3.0 / (9 * 48)), 0, 0, 1 / std::sqrt(96.0),
      1 / std::sqrt(96.0)};
  for (std::size_t k = 0; k < 8; ++k) {
    INFO(names[k]);
    CHECK(std::string(pa[k].name) == names[k]);
    CHECK(bit_identical(Matrix<double>(pa[k].value), Matrix<double>(pb[k].value)));
    const Matrix<double> m = pa[k].value;
    if (k == 1 || k == 4) {
      CHECK(m.isOnes(0));
    } else if (k == 2 || k == 5) {
      CHECK(m.isZero(0));
    } else {
      CHECK(!bit_identical(m, Matrix<double>(pc[k].value)));
      CHECK(m.cwiseAbs().maxCoeff() <= bound[k]);
      if (m.size() > 1000) {  // uniform: variance bound²/3 within 5%, mean ≈ 0
        const double var = m.array().square().mean();
        CHECK(var == Approx(bound[k] * bound[k] / 3).epsilon(0.05));
        CHECK(std::abs(m.mean()) < 0.05 * bound[k]);
      }
    }
  }
  auto buf = a.buffers();
  CHECK(std::string(buf[4].name) == "conv2.1.running_var");
  CHECK(std::string(buf[5].name) == "conv2.1.num_batches_tracked");
  CHECK(Matrix<double>(buf[0].value).isZero(0));
  CHECK(Matrix<double>(buf[4].value).isOnes(0));
  CHECK(buf[5].value(0, 0) == 0);
}

TEST_CASE("AttentionFusion: errors name the problem and a failed call changes nothing",
          "[review][abf]") {
  Abf abf({2, 3, 2, true, 0});
  const Matrix<double> x = random_matrix<double>(2 * 2, 4, 1),
                       r = random_matrix<double>(2 * 3, 1, 2);
  CHECK_THROWS_WITH(abf.forward(map4(x, 2, 2, 2, 2)), Catch::Contains("fuse is set"));
  CHECK_THROWS_WITH(abf.forward(map4(x, 4, 1, 2, 2), map4(r, 2, 3, 1, 1)),
                    Catch::Contains("AttentionFusion: input has shape 4x1x2x2, expected Nx2xHxW"));
  CHECK_THROWS_WITH(abf.forward(map4(x, 2, 2, 2, 2), map4(r, 2, 1, 3, 1)),
                    Catch::Contains("residual has shape 2x1x3x1, expected 2x3xHxW"));
  Matrix<double> dx = Matrix<double>::Zero(4, 4), dr = Matrix<double>::Zero(6, 1);
  const Matrix<double> u = random_matrix<double>(4, 4, 3);
  CHECK_THROWS_WITH(abf.backward(map4(u, 2, 2, 2, 2), map4(u, 0, 0, 0, 0), out4(dx, 2, 2, 2, 2),
                                 out4(dr, 2, 3, 1, 1)),
                    Catch::Contains("backward called before forward"));
  Matrix<double> one = random_matrix<double>(2, 1, 4);
  Abf deep({2, 3, 2, false, 0});
  CHECK_THROWS_WITH(deep.forward(map4(one, 1, 2, 1, 1)),
                    Catch::Contains("train mode needs at least 2 values per channel"));

  // Strong guarantee: a NaN input or cotangent changes no buffer, gradient or caller buffer.
  abf.forward(map4(x, 2, 2, 2, 2), map4(r, 2, 3, 1, 1));
  abf.backward(map4(u, 2, 2, 2, 2), map4(u, 0, 0, 0, 0), out4(dx, 2, 2, 2, 2),
               out4(dr, 2, 3, 1, 1));
  auto snapshot = [&] {
    std::vector<Matrix<double>> s;
    for (auto& v : abf.parameters()) s.emplace_back(v.value);
    for (auto& v : abf.gradients()) s.emplace_back(v.value);
    for (auto& v : abf.buffers()) s.emplace_back(v.value);
    s.push_back(dx);
    s.push_back(dr);
    return s;
  };
  const auto before = snapshot();
  auto same = [&](const std::vector<Matrix<double>>& now) {
    for (std::size_t k = 0; k < before.size(); ++k) CHECK(bit_identical(now[k], before[k]));
  };
  Matrix<double> bad = x;
  bad(3, 1) = std::numeric_limits<double>::infinity();
  CHECK_THROWS_WITH(abf.forward(map4(bad, 2, 2, 2, 2), map4(r, 2, 3, 1, 1)),
                    Catch::Contains("input[1,1,0,1] is +Inf"));
  same(snapshot());
  Matrix<double> badu = u;
  badu(0, 2) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(abf.backward(map4(badu, 2, 2, 2, 2), map4(u, 0, 0, 0, 0), out4(dx, 2, 2, 2, 2),
                                 out4(dr, 2, 3, 1, 1)),
                    Catch::Contains("d_output[0,0,1,0] is NaN"));
  same(snapshot());
  // Overflow inside the module (finite input, huge weights): NumericalError, nothing committed.
  auto w2 = abf.parameters()[3].value;
  const Matrix<double> w2_saved = w2;
  w2.setConstant(std::numeric_limits<double>::max());
  CHECK_THROWS_AS(abf.forward(map4(x, 2, 2, 2, 2), map4(r, 2, 3, 1, 1)), mmkd::NumericalError);
  CHECK_THROWS_WITH(abf.backward(map4(u, 2, 2, 2, 2), map4(u, 0, 0, 0, 0), out4(dx, 2, 2, 2, 2),
                                 out4(dr, 2, 3, 1, 1)),
                    Catch::Contains("backward called before forward"));
  w2 = w2_saved;
  same(snapshot());
  // A non-finite parameter, or a negative running variance in eval mode, is named.
  w2(1, 4) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(abf.forward(map4(x, 2, 2, 2, 2), map4(r, 2, 3, 1, 1)),
                    Catch::Contains("parameter conv2.0.weight[1,4] is NaN"));
  w2 = w2_saved;
  auto running_var = abf.buffers()[4].value;  // conv2.1.running_var
  REQUIRE(std::string(abf.buffers()[4].name) == "conv2.1.running_var");
  const Matrix<double> var_saved = running_var;
  running_var(0, 1) = -2;
  abf.eval();
  CHECK_THROWS_WITH(abf.forward(map4(x, 2, 2, 2, 2), map4(r, 2, 3, 1, 1)),
                    Catch::Contains("buffer conv2.1.running_var[0,1] is negative (-2"));
  running_var = var_saved;
  abf.train();
  same(snapshot());
}

TEST_CASE("AttentionFusion in float agrees with double", "[review][abf]") {
  mmkd::AttentionFusion<float> af({3, 4, 2, true, 5});
  Abf ad({3, 4, 2, true, 5});
  const Matrix<double> x = random_matrix<double>(2 * 3, 16, 1),
                       r = random_matrix<double>(2 * 4, 4, 2);
  const Matrix<float> xf = x.cast<float>(), rf = r.cast<float>();
  const auto& yd = ad.forward(map4(x, 2, 3, 4, 4), map4(r, 2, 4, 2, 2));
  const auto& yf = af.forward(map4(xf, 2, 3, 4, 4), map4(rf, 2, 4, 2, 2));
  CHECK((flat(yd) - flat(yf).cast<double>()).cwiseAbs().maxCoeff() < 1e-4);
}

TEST_CASE("Copies and moves of AttentionFusion and BatchNorm2d are deep", "[review][abf]") {
  const Matrix<double> x = random_matrix<double>(2 * 2, 4, 1),
                       r = random_matrix<double>(2 * 3, 1, 2);
  const Matrix<double> u = random_matrix<double>(2 * 2, 4, 3);
  const Matrix<double> none;
  // Forward, then backward: the output, dx and every gradient and buffer.
  auto backward = [&](Abf& abf) {
    Matrix<double> dx = Matrix<double>::Zero(4, 4), dr = Matrix<double>::Zero(6, 1);
    abf.backward(map4(u, 2, 2, 2, 2), map4(none, 0, 0, 0, 0), out4(dx, 2, 2, 2, 2),
                 out4(dr, 2, 3, 1, 1));
    std::vector<Matrix<double>> s = {flat(abf.output()), dx, dr};
    for (auto& v : abf.gradients()) s.emplace_back(v.value);
    for (auto& v : abf.buffers()) s.emplace_back(v.value);
    return s;
  };
  Abf reference({2, 3, 2, true, 7});
  reference.forward(map4(x, 2, 2, 2, 2), map4(r, 2, 3, 1, 1));
  const auto expect = backward(reference);

  auto original = std::make_unique<Abf>(Abf::Options{2, 3, 2, true, 7});
  original->forward(map4(x, 2, 2, 2, 2), map4(r, 2, 3, 1, 1));
  Abf copy(*original);
  Abf assigned({2, 3, 2, true, 8});
  assigned = *original;
  Abf temporary(*original);
  Abf moved(std::move(temporary));
  original->parameters()[0].value.setConstant(5);  // must not reach the copies
  original.reset();
  for (Abf* a : {&copy, &assigned, &moved}) {
    const auto got = backward(*a);
    REQUIRE(got.size() == expect.size());
    for (std::size_t k = 0; k < got.size(); ++k) CHECK(bit_identical(got[k], expect[k]));
  }

  mmkd::BatchNorm2d<double> bn({2}), bn_reference({2});
  bn.forward(map4(x, 2, 2, 2, 2));
  bn_reference.forward(map4(x, 2, 2, 2, 2));
  mmkd::BatchNorm2d<double> bn_copy(bn);
  bn.buffers()[1].value.setConstant(9);
  bn.parameters()[0].value.setConstant(9);
  bn.forward(map4(u, 2, 2, 2, 2));  // the original's next forward must not reach the copy either
  Matrix<double> dx = Matrix<double>::Zero(4, 4), dx_reference = Matrix<double>::Zero(4, 4);
  bn_copy.backward(map4(u, 2, 2, 2, 2), out4(dx, 2, 2, 2, 2));
  bn_reference.backward(map4(u, 2, 2, 2, 2), out4(dx_reference, 2, 2, 2, 2));
  CHECK(bit_identical(dx, dx_reference));
  CHECK(bit_identical(flat(bn_copy.output()), flat(bn_reference.output())));
  CHECK(bit_identical(Matrix<double>(bn_copy.buffers()[1].value),
                      Matrix<double>(bn_reference.buffers()[1].value)));
}
