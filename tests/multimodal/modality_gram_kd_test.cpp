#include <mmkd/multimodal/modality_gram_kd.hpp>

#include "support.hpp"

#include <vector>

using namespace mmkd_test;
using mmkd::ConstTensor3Ref;
using mmkd::GramNormalization;
using mmkd::GramScope;
using mmkd::Tensor3;
using mmkd::Tensor3Ref;

namespace {

using LMat = Eigen::Matrix<long double, Eigen::Dynamic, Eigen::Dynamic>;

// Gram of sample i from the definition (present entries only), long double.
LMat ref_gram(const Tensor3<double>& f, Index i, GramNormalization norm,
              const mmkd::PresenceMask* mask) {
  const Index m = f.dimension(0), d = f.dimension(2);
  LMat g = LMat::Zero(m, m);
  for (Index a = 0; a < m; ++a) {
    for (Index b = 0; b < m; ++b) {
      if (mask && ((*mask)(i, a) == 0 || (*mask)(i, b) == 0)) continue;
      long double dot = 0, na = 0, nb = 0;
      for (Index k = 0; k < d; ++k) {
        dot += (long double)f(a, i, k) * f(b, i, k);
        na += (long double)f(a, i, k) * f(a, i, k);
        nb += (long double)f(b, i, k) * f(b, i, k);
      }
      g(a, b) = norm == GramNormalization::Cosine ? dot / (std::sqrt(na) * std::sqrt(nb))
                : norm == GramNormalization::Raw  ? dot / d
                                                  : dot;
    }
  }
  return g;
}

long double ref_loss(const Tensor3<double>& s, const Tensor3<double>& t, GramNormalization norm,
                     GramScope scope, const mmkd::PresenceMask* mask) {
  const Index m = s.dimension(0), n = s.dimension(1);
  auto fro = [&](LMat g) { return norm == GramNormalization::Frobenius ? LMat(g / g.norm()) : g; };
  if (scope == GramScope::PerSample) {
    long double sum = 0, pairs = 0;
    for (Index i = 0; i < n; ++i) {
      sum += (fro(ref_gram(s, i, norm, mask)) - fro(ref_gram(t, i, norm, mask))).squaredNorm();
      Index k = 0;
      for (Index a = 0; a < m; ++a) k += (!mask || (*mask)(i, a)) ? 1 : 0;
      pairs += k * k;
    }
    return sum / pairs;
  }
  LMat gs = LMat::Zero(m, m), gt = LMat::Zero(m, m), cnt = LMat::Zero(m, m);
  for (Index i = 0; i < n; ++i) {
    gs += ref_gram(s, i, norm, mask);
    gt += ref_gram(t, i, norm, mask);
    for (Index a = 0; a < m; ++a) {
      for (Index b = 0; b < m; ++b)
        cnt(a, b) += (!mask || ((*mask)(i, a) && (*mask)(i, b))) ? 1 : 0;
    }
  }
  long double entries = 0;
  for (Index e = 0; e < m * m; ++e) {
    if (cnt(e) > 0) {
      gs(e) /= cnt(e);
      gt(e) /= cnt(e);
      entries += 1;
    }
  }
  return (fro(gs) - fro(gt)).squaredNorm() / entries;
}

mmkd::ModalityGramKD<double> make(GramNormalization norm, GramScope scope) {
  mmkd::ModalityGramKD<double>::Options o;
  o.normalization = norm;
  o.scope = scope;
  return mmkd::ModalityGramKD<double>(o);
}

const std::vector<GramNormalization> kNorms = {GramNormalization::Cosine, GramNormalization::Raw,
                                               GramNormalization::Frobenius};
const std::vector<GramScope> kScopes = {GramScope::PerSample, GramScope::Batch};

}  // namespace

TEST_CASE("ModalityGramKD matches its definition for every normalisation and scope",
          "[multimodal][gram]") {
  const Tensor3<double> s = random_stack<double>(3, 6, 5, 1), t = random_stack<double>(3, 6, 8, 2);
  mmkd::PresenceMask mask = mmkd::PresenceMask::Ones(6, 3);
  mask(0, 2) = 0;
  mask(4, 0) = 0;
  mask(4, 1) = 0;
  for (auto norm : kNorms) {
    for (auto scope : kScopes) {
      auto gram = make(norm, scope);
      INFO("normalisation " << int(norm) << " scope " << int(scope));
      CHECK(close<double>(gram.value(s, t), double(ref_loss(s, t, norm, scope, nullptr)), 1e-12));
      CHECK(
          close<double>(gram.value(s, t, mask), double(ref_loss(s, t, norm, scope, &mask)), 1e-12));
    }
  }
}

TEST_CASE("ModalityGramKD gradients match finite differences", "[multimodal][gram][gradient]") {
  const Tensor3<double> s = random_stack<double>(3, 4, 5, 3), t = random_stack<double>(3, 4, 7, 4);
  mmkd::PresenceMask mask = mmkd::PresenceMask::Ones(4, 3);
  mask(1, 1) = 0;
  mask(3, 0) = 0;
  for (auto norm : kNorms) {
    for (auto scope : kScopes) {
      auto gram = make(norm, scope);
      gram.options().weight = 1.7;
      auto wrt_student = [&](const Matrix<double>& x, Matrix<double>& g) {
        return gram.value_and_grad(ConstTensor3Ref<double>(x.data(), 3, 4, 5), t, mask,
                                   Tensor3Ref<double>(g.data(), 3, 4, 5));
      };
      auto wrt_teacher = [&](const Matrix<double>& x, Matrix<double>& g) {
        Tensor3<double> ds(3, 4, 5);
        ds.setZero();
        return gram.value_and_grad(s, ConstTensor3Ref<double>(x.data(), 3, 4, 7), mask, ds,
                                   Tensor3Ref<double>(g.data(), 3, 4, 7));
      };
      auto unmasked = [&](const Matrix<double>& x, Matrix<double>& g) {
        return gram.value_and_grad(ConstTensor3Ref<double>(x.data(), 3, 4, 5), t,
                                   Tensor3Ref<double>(g.data(), 3, 4, 5));
      };
      const auto r1 = mmkd::check_value_and_grad(wrt_student, flat(s), tight());
      const auto r2 = mmkd::check_value_and_grad(wrt_teacher, flat(t), tight());
      const auto r3 = mmkd::check_value_and_grad(unmasked, flat(s), tight());
      INFO("normalisation " << int(norm) << " scope " << int(scope) << "\n"
                            << r1.message() << "\n"
                            << r2.message() << "\n"
                            << r3.message());
      CHECK(r1.passed);
      CHECK(r2.passed);
      CHECK(r3.passed);
    }
  }
}

TEMPLATE_TEST_CASE("ModalityGramKD invariants and degenerate input", "[multimodal][gram]", float,
                   double) {
  using T = TestType;
  const Tensor3<T> s = random_stack<T>(3, 5, 6, 5);
  mmkd::ModalityGramKD<T> gram;

  SECTION("student == teacher: zero loss and gradient") {
    Tensor3<T> ds(3, 5, 6);
    ds.setZero();
    CHECK(gram.value_and_grad(s, s, ds) == T(0));
    CHECK(flat(ds).isZero(0));
  }
  SECTION("cosine: scaling an embedding changes nothing") {
    const Tensor3<T> t = random_stack<T>(3, 5, 4, 6);
    Tensor3<T> s2 = s;
    for (Index k = 0; k < 6; ++k) s2(1, 2, k) *= T(250);
    CHECK(gram.value(s2, t) == Approx(gram.value(s, t)).epsilon(Tol<T>::rel * 100));
  }
  SECTION("M = 1 with cosine rows: nothing to match (both Grams are 1 up to rounding)") {
    const Tensor3<T> one = random_stack<T>(1, 4, 3, 7), other = random_stack<T>(1, 4, 9, 8);
    const T eps = std::numeric_limits<T>::epsilon();
    CHECK(gram.value(one, other) <= 16 * eps * eps);
  }
  SECTION("zero-norm rows and N = 1 stay finite") {
    Tensor3<T> z = random_stack<T>(2, 1, 4, 9);
    for (Index k = 0; k < 4; ++k) z(0, 0, k) = 0;
    const Tensor3<T> t = random_stack<T>(2, 1, 3, 10);
    Tensor3<T> ds(2, 1, 4);
    ds.setZero();
    for (auto norm : kNorms) {
      gram.options().normalization = norm;
      CHECK(std::isfinite(gram.value_and_grad(z, t, ds)));
      CHECK(flat(ds).allFinite());
    }
  }
  SECTION("every sample missing a modality") {
    const Tensor3<T> t = random_stack<T>(3, 5, 4, 11);
    mmkd::PresenceMask mask = mmkd::PresenceMask::Ones(5, 3);
    mask.col(1).setZero();
    Tensor3<T> ds(3, 5, 6);
    ds.setZero();
    CHECK(std::isfinite(gram.value_and_grad(s, t, mask, ds)));
    for (Index i = 0; i < 5; ++i) {
      for (Index k = 0; k < 6; ++k) CHECK(ds(1, i, k) == T(0));
    }
    mmkd::PresenceMask none = mmkd::PresenceMask::Zero(5, 3);
    CHECK(gram.value(s, t, none) == T(0));
  }
}

TEST_CASE("ModalityGramKD rejects bad input and writes nothing", "[multimodal][gram][errors]") {
  const Tensor3<double> s = random_stack<double>(3, 4, 5, 1), t = random_stack<double>(3, 4, 6, 2);
  Tensor3<double> ds = random_stack<double>(3, 4, 5, 3);
  const Matrix<double> ds0 = flat(ds);
  mmkd::ModalityGramKD<double> gram;
  const Tensor3<double> wrong = random_stack<double>(2, 4, 6, 4);
  CHECK_THROWS_WITH(gram.value_and_grad(s, wrong, ds),
                    "ModalityGramKD: teacher has shape 2x4x6, expected 3x4x6 (same modalities and "
                    "samples as student, any width >= 1)");
  Tensor3<double> bad_grad(3, 4, 6);
  CHECK_THROWS_WITH(gram.value_and_grad(s, t, bad_grad),
                    "ModalityGramKD: d_student has shape 3x4x6, expected 3x4x5 (same as student)");
  mmkd::PresenceMask mask = mmkd::PresenceMask::Ones(4, 3);
  mask(2, 2) = 3;
  CHECK_THROWS_WITH(gram.value_and_grad(s, t, mask, ds),
                    "ModalityGramKD: mask[2,2] is 3, expected 0 or 1");
  Tensor3<double> nan = s;
  nan(2, 1, 0) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(gram.value_and_grad(nan, t, ds),
                    "ModalityGramKD: student[9,0] is NaN (modality 2, sample 1)");
  mmkd::ModalityGramKD<double>::Options o;
  o.eps = 0;
  CHECK_THROWS_AS(mmkd::ModalityGramKD<double>(o), mmkd::InvalidArgument);
  CHECK(bit_identical(flat(ds), ds0));
}
