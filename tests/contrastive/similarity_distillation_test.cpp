#include "support.hpp"

using namespace mmkd_test;

namespace {

// SEED's soft cross-entropy from the definition, long double.
long double ref_seed(const Matrix<double>& s, const Matrix<double>& t, const Matrix<double>& extra,
                     long double tau_s, long double tau_t) {
  Matrix<double> dict(t.rows() + extra.rows(), t.cols());
  dict << t, extra;
  for (Index j = 0; j < dict.rows(); ++j) dict.row(j).normalize();
  long double sum = 0;
  for (Index i = 0; i < s.rows(); ++i) {
    Eigen::Matrix<long double, 1, Eigen::Dynamic> a(dict.rows()), b(dict.rows());
    for (Index j = 0; j < dict.rows(); ++j) {
      a(j) = (long double)t.row(i).normalized().dot(dict.row(j)) / tau_t;
      b(j) = (long double)s.row(i).normalized().dot(dict.row(j)) / tau_s;
    }
    const long double la = ref_lse(a, 1.0L), lb = ref_lse(b, 1.0L);
    for (Index j = 0; j < dict.rows(); ++j) sum -= std::exp(a(j) - la) * (b(j) - lb);
  }
  return sum / s.rows();
}

}  // namespace

TEST_CASE("SimilarityDistillation matches SEED's soft cross-entropy and finite differences",
          "[contrastive][seed]") {
  const Matrix<double> s = random_matrix<double>(6, 8, 1), t = random_matrix<double>(6, 8, 2);
  const Matrix<double> extra = random_matrix<double>(5, 8, 3);
  mmkd::EmbeddingQueue<double> queue(5, 8);
  queue.push(extra);
  mmkd::SimilarityDistillation<double> seed({0.2, 0.5});
  CHECK(close<double>(seed.value(s, t, queue), double(ref_seed(s, t, extra, 0.2, 0.5)), 1e-12));
  CHECK(close<double>(seed.value(s, t), double(ref_seed(s, t, Matrix<double>(0, 8), 0.2, 0.5)),
                      1e-12));
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

TEST_CASE("SimilarityDistillation tends to one-directional InfoNCE as tau_t -> 0",
          "[contrastive][seed]") {
  const Matrix<double> s = random_matrix<double>(7, 16, 4), t = random_matrix<double>(7, 16, 5);
  const Matrix<double> extra = random_matrix<double>(9, 16, 6);
  Matrix<double> dict(16, 16);
  dict << t, extra;
  mmkd::SimilarityDistillation<double> seed({0.3, 1e-4});
  mmkd::InfoNCE<double>::Options o;
  o.symmetric = false;
  o.temperature = 0.3;
  mmkd::InfoNCE<double> nce(o);
  Matrix<double> g1 = Matrix<double>::Zero(7, 16), g2 = Matrix<double>::Zero(7, 16);
  CHECK(seed.value_and_grad(s, t, extra, g1) ==
        Approx(nce.value_and_grad(s, dict, g2)).epsilon(1e-9));
  CHECK(g1.isApprox(g2, 1e-9));
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
  CHECK(bit_identical(g, g0));
}
