#include <mmkd/contrastive/embedding_queue.hpp>
#include <mmkd/contrastive/info_nce.hpp>
#include <mmkd/contrastive/similarity_distillation.hpp>

#include <vector>

#include "support.hpp"

using namespace mmkd_test;

namespace {

// SEED's soft cross-entropy from the definition, long double: sample i against [v_i; extra]
// (SEED's dictionary) or against [V; extra] (`batch`).
long double ref_seed(const Matrix<double>& s, const Matrix<double>& t, const Matrix<double>& extra,
                     long double tau_s, long double tau_t, bool batch) {
  Matrix<double> dict(t.rows() + extra.rows(), t.cols());
  dict << t, extra;
  for (Index j = 0; j < dict.rows(); ++j) dict.row(j).normalize();
  long double sum = 0;
  for (Index i = 0; i < s.rows(); ++i) {
    std::vector<Index> cols;
    for (Index j = 0; j < dict.rows(); ++j)
      if (batch || j == i || j >= t.rows()) cols.push_back(j);
    Eigen::Matrix<long double, 1, Eigen::Dynamic> a(cols.size()), b(cols.size());
    for (std::size_t c = 0; c < cols.size(); ++c) {
      a(c) = (long double)t.row(i).normalized().dot(dict.row(cols[c])) / tau_t;
      b(c) = (long double)s.row(i).normalized().dot(dict.row(cols[c])) / tau_s;
    }
    const long double la = ref_lse(a, 1.0L), lb = ref_lse(b, 1.0L);
    for (Index c = 0; c < a.size(); ++c) sum -= std::exp(a(c) - la) * (b(c) - lb);
  }
  return sum / s.rows();
}

mmkd::SimilarityDistillation<double> make_seed(double tau_s, double tau_t, bool batch) {
  typename mmkd::SimilarityDistillation<double>::Options o{tau_s, tau_t};
  if (batch) o.dictionary = mmkd::SimilarityDictionary::BatchAndQueue;
  return mmkd::SimilarityDistillation<double>(o);
}

}  // namespace

TEST_CASE("SimilarityDistillation matches SEED's soft cross-entropy and finite differences",
          "[contrastive][seed]") {
  const Matrix<double> s = random_matrix<double>(6, 8, 1), t = random_matrix<double>(6, 8, 2);
  const Matrix<double> extra = random_matrix<double>(5, 8, 3);
  mmkd::EmbeddingQueue<double> queue(5, 8);
  queue.push(extra);
  for (bool batch : {false, true}) {
    INFO("batch dictionary " << batch);
    auto seed = make_seed(0.2, 0.5, batch);
    CHECK(close<double>(seed.value(s, t, queue), double(ref_seed(s, t, extra, 0.2, 0.5, batch)),
                        1e-12));
    CHECK(close<double>(seed.value(s, t),
                        double(ref_seed(s, t, Matrix<double>(0, 8), 0.2, 0.5, batch)), 1e-12));
    auto f = [&](const Matrix<double>& x, Matrix<double>& g) {
      return seed.value_and_grad(x, t, queue, g);
    };
    auto fm = [&](const Matrix<double>& x, Matrix<double>& g) {
      return seed.value_and_grad(x, t, extra, g);
    };
    const auto r = mmkd::check_value_and_grad(f, s, tight()),
               rm = mmkd::check_value_and_grad(fm, s, tight());
    INFO(r.message() << "\n" << rm.message());
    CHECK(r.passed);
    CHECK(rm.passed);
  }
}

TEST_CASE("SimilarityDistillation defaults are SEED's; an empty queue gives 0",
          "[contrastive][seed]") {
  mmkd::SimilarityDistillation<double> seed;
  CHECK(seed.options().tau_s == 0.2);
  CHECK(seed.options().tau_t == 1e-4);
  CHECK(seed.options().dictionary == mmkd::SimilarityDictionary::PositiveAndQueue);
  // One dictionary column per sample (its own teacher): P = Q = 1, CE = 0, gradient 0.
  const Matrix<double> s = random_matrix<double>(3, 4, 1), t = random_matrix<double>(3, 4, 2);
  mmkd::EmbeddingQueue<double> queue(8, 4);
  Matrix<double> g = Matrix<double>::Zero(3, 4);
  CHECK(seed.value_and_grad(s, t, queue, g) == 0);
  CHECK(g.isZero(0));
}

TEST_CASE("SimilarityDistillation tends to one-directional InfoNCE as tau_t -> 0",
          "[contrastive][seed]") {
  const Matrix<double> s = random_matrix<double>(7, 16, 4), t = random_matrix<double>(7, 16, 5);
  const Matrix<double> extra = random_matrix<double>(9, 16, 6);
  SECTION("batch dictionary: InfoNCE against [teacher batch; queue]") {
    Matrix<double> dict(16, 16);
    dict << t, extra;
    auto seed = make_seed(0.3, 1e-4, true);
    mmkd::InfoNCE<double>::Options o;
    o.symmetric = false;
    o.temperature = 0.3;
    mmkd::InfoNCE<double> nce(o);
    Matrix<double> g1 = Matrix<double>::Zero(7, 16), g2 = Matrix<double>::Zero(7, 16);
    CHECK(seed.value_and_grad(s, t, extra, g1) ==
          Approx(nce.value_and_grad(s, dict, g2)).epsilon(1e-9));
    CHECK(g1.isApprox(g2, 1e-9));
  }
  SECTION("SEED's dictionary: MoCo's InfoNCE, the positive against the queue only") {
    auto seed = make_seed(0.3, 1e-4, false);
    long double ref = 0;
    for (Index i = 0; i < 7; ++i) {
      const auto u = s.row(i).normalized();
      const long double pos = std::exp((long double)u.dot(t.row(i).normalized()) / 0.3L);
      long double all = pos;
      for (Index k = 0; k < 9; ++k)
        all += std::exp((long double)u.dot(extra.row(k).normalized()) / 0.3L);
      ref -= std::log(pos / all);
    }
    CHECK(seed.value(s, t, [&] {
      mmkd::EmbeddingQueue<double> q(9, 16);
      q.push(extra);
      return q;
    }()) == Approx(double(ref / 7)).epsilon(1e-9));
  }
}

TEMPLATE_TEST_CASE("SimilarityDistillation in float at SEED's tau_t = 1e-4", "[contrastive][seed]",
                   float, double) {
  // The bound of the fidelity target: 1e-5 relative (the value was built as KL + H(P) before,
  // with H(P) = lse(A) − Σ P·A cancelling at A ≈ 1e4: 2e-4). The comparison with libtorch's own
  // float32 error is in tests/torch/structure_contrastive_torch_test.cpp.
  using T = TestType;
  const Matrix<double> s = random_matrix<double>(16, 32, 1), t = random_matrix<double>(16, 32, 2);
  const Matrix<double> extra = random_matrix<double>(64, 32, 3);
  mmkd::EmbeddingQueue<double> qd(64, 32);
  qd.push(extra.cast<T>().template cast<double>());
  mmkd::EmbeddingQueue<T> qf(64, 32);
  qf.push(extra.cast<T>());
  mmkd::SimilarityDistillation<double> ref;
  mmkd::SimilarityDistillation<T> seed;
  Matrix<double> gd = Matrix<double>::Zero(16, 32);
  Matrix<T> gf = Matrix<T>::Zero(16, 32);
  const Matrix<T> sf = s.cast<T>(), tf = t.cast<T>();
  const double vd =
      ref.value_and_grad(sf.template cast<double>(), tf.template cast<double>(), qd, gd);
  const double vf = double(seed.value_and_grad(sf, tf, qf, gf));
  CHECK(std::abs(vf - vd) <= 1e-5 * std::abs(vd));
  CHECK((gf.template cast<double>() - gd).cwiseAbs().maxCoeff() <= 1e-5 * gd.cwiseAbs().maxCoeff());
}

TEST_CASE("EmbeddingQueue is a fixed-size ring buffer", "[contrastive][queue]") {
  mmkd::EmbeddingQueue<double> queue(3, 2);
  CHECK(queue.size() == 0);
  Matrix<double> a(2, 2), b(2, 2);
  a << 1, 1, 2, 2;
  b << 3, 3, 4, 4;
  queue.push(a);
  CHECK(queue.size() == 2);
  queue.push(b);  // overwrites the oldest row (1, 1)
  CHECK(queue.size() == 3);
  const auto rows = queue.embeddings();
  CHECK(rows(0, 0) == 4);
  CHECK(rows(1, 0) == 2);
  CHECK(rows(2, 0) == 3);
  CHECK_THROWS_WITH(queue.push(Matrix<double>::Ones(1, 3)),
                    "EmbeddingQueue: embeddings has width 3, expected 2");
  CHECK_THROWS_AS(mmkd::EmbeddingQueue<double>(0, 2), mmkd::InvalidArgument);
  queue.clear();
  CHECK(queue.size() == 0);
}

TEST_CASE("SimilarityDistillation rejects bad input and writes nothing",
          "[contrastive][seed][errors]") {
  const Matrix<double> s = random_matrix<double>(4, 3, 1), t = random_matrix<double>(4, 3, 2);
  Matrix<double> g = random_matrix<double>(4, 3, 3);
  const Matrix<double> g0 = g;
  mmkd::SimilarityDistillation<double> seed;
  CHECK_THROWS_WITH(
      seed.value_and_grad(s, random_matrix<double>(5, 3, 4), g),
      "SimilarityDistillation: teacher has shape 5x3, expected 4x3 (same as student)");
  CHECK_THROWS_WITH(seed.value_and_grad(s, t, random_matrix<double>(2, 4, 5), g),
                    "SimilarityDistillation: queue has width 4, expected 3 (same as student)");
  CHECK_THROWS_WITH(mmkd::SimilarityDistillation<double>({0.1, -1.0}),
                    "SimilarityDistillation: option tau_t must be finite and > 0, got -1.000000");
  Matrix<double> bad = t;
  bad(1, 1) = std::numeric_limits<double>::infinity();
  CHECK_THROWS_WITH(seed.value_and_grad(s, bad, g), "SimilarityDistillation: teacher[1,1] is +Inf");
  Matrix<double> extra = random_matrix<double>(3, 3, 6);
  extra(2, 0) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(seed.value_and_grad(s, t, extra, g),
                    "SimilarityDistillation: extra[2,0] is NaN");
  CHECK(bit_identical(g, g0));
}

TEST_CASE("EmbeddingQueue::push of its own rows", "[contrastive][queue]") {
  mmkd::EmbeddingQueue<double> queue(4, 1);
  Matrix<double> a(2, 1), b(4, 1);
  a << 1, 2;
  b << 5, 6, 7, 8;
  queue.push(a);
  queue.push(b);  // storage 7 8 5 6, the oldest (5) at row 2
  Matrix<double> expect(4, 1);
  expect << 7, 8, 5, 6;
  REQUIRE(bit_identical(Matrix<double>(queue.embeddings()), expect));
  // Pushing the stored rows in storage order writes 7, 8, 5, 6 from row 2 on: 5 6 7 8. Read in
  // place instead, row 2 would be overwritten before it is read (7 8 7 8).
  queue.push(queue.embeddings());
  expect << 5, 6, 7, 8;
  CHECK(bit_identical(Matrix<double>(queue.embeddings()), expect));
  // An empty batch (its data() may be null) changes nothing.
  queue.push(Matrix<double>(0, 1));
  CHECK(bit_identical(Matrix<double>(queue.embeddings()), expect));
}

TEST_CASE("Copies of EmbeddingQueue and of a learnable-temperature InfoNCE are deep",
          "[contrastive][queue]") {
  mmkd::EmbeddingQueue<double> queue(3, 1);
  Matrix<double> a(2, 1), b(2, 1);
  a << 1, 2;
  b << 3, 4;
  queue.push(a);
  mmkd::EmbeddingQueue<double> copy(queue);
  queue.push(b);  // the original wraps: 4 2 3; the copy still holds 1 2
  copy.push(b.topRows(1));
  Matrix<double> expect(3, 1);
  expect << 1, 2, 3;
  CHECK(bit_identical(Matrix<double>(copy.embeddings()), expect));

  mmkd::InfoNCE<double>::Options o;
  o.learn_temperature = true;
  mmkd::InfoNCE<double> nce(o);
  const Matrix<double> q = random_matrix<double>(4, 3, 1), k = random_matrix<double>(4, 3, 2);
  Matrix<double> dq = Matrix<double>::Zero(4, 3);
  nce.value_and_grad(q, k, dq);
  mmkd::InfoNCE<double> nce_copy(nce);
  const double theta = nce.parameters()[0].value(0, 0), grad = nce.gradients()[0].value(0, 0);
  nce.parameters()[0].value(0, 0) = 2;
  nce.zero_grad();
  CHECK(nce_copy.parameters()[0].value(0, 0) == theta);
  CHECK(nce_copy.gradients()[0].value(0, 0) == grad);
}
