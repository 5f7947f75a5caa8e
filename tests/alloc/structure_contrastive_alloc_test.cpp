#include "alloc/alloc_support.hpp"

#include <mmkd/contrastive/embedding_queue.hpp>
#include <mmkd/contrastive/info_nce.hpp>
#include <mmkd/contrastive/similarity_distillation.hpp>
#include <mmkd/structure/channel_decorrelation.hpp>
#include <mmkd/structure/uniformity.hpp>

using namespace mmkd_test;

TEMPLATE_TEST_CASE("structure and contrastive losses allocate nothing in steady state",
                   "[structure][contrastive][alloc]", float, double) {
  using T = TestType;
  const Index n = 24, d = 20;
  const Matrix<T> z = random_matrix<T>(n, d, 1), zt = random_matrix<T>(n + 2, d, 2);
  const Matrix<T> q = random_matrix<T>(n, d, 3), k = random_matrix<T>(n + 4, d, 4);
  mmkd::Tensor4<T> maps(4, 3, 4, 5), dmaps(4, 3, 4, 5);
  maps.setRandom();
  dmaps.setZero();
  Matrix<T> dz = Matrix<T>::Zero(n, d), dq = Matrix<T>::Zero(n, d), dk = Matrix<T>::Zero(n + 4, d);
  mmkd::ChannelDecorrelation<T> decor;
  mmkd::ChannelDecorrelation<T> decor_t(
      {mmkd::ChannelStatistic::Covariance, mmkd::DecorrelationTarget::Teacher});
  mmkd::Uniformity<T> unif;
  mmkd::Uniformity<T> tokens({mmkd::UniformityMode::SpatialTokens});
  mmkd::Uniformity<T> entropy({mmkd::UniformityMode::SpatialEntropy});
  typename mmkd::InfoNCE<T>::Options o;
  o.offset = 4;
  o.learn_temperature = true;
  mmkd::InfoNCE<T> nce(o);
  o.stream = true;
  o.block_rows = 7;
  mmkd::InfoNCE<T> nce_stream(o);
  mmkd::SimilarityDistillation<T> seed;
  typename mmkd::SimilarityDistillation<T>::Options batch_dict;
  batch_dict.dictionary = mmkd::SimilarityDictionary::BatchAndQueue;
  mmkd::SimilarityDistillation<T> seed_batch(batch_dict);
  mmkd::EmbeddingQueue<T> queue(16, d);
  queue.push(zt);
  for (int warm = 0; warm < 2; ++warm) {
    std::unique_ptr<NoMalloc> guard;
    if (warm == 1) guard = std::make_unique<NoMalloc>();
    CHECK_NOTHROW(decor.value_and_grad(z, dz));
    CHECK_NOTHROW(decor_t.value_and_grad(z, zt, dz));
    CHECK_NOTHROW(unif.value_and_grad(z, dz));
    CHECK_NOTHROW(tokens.value_and_grad(maps, dmaps));
    CHECK_NOTHROW(entropy.value_and_grad(maps, dmaps));
    CHECK_NOTHROW(nce.value_and_grad(q, k, dq, dk));
    CHECK_NOTHROW(nce_stream.value_and_grad(q, k, dq, dk));
    CHECK_NOTHROW(seed.value_and_grad(q, z, queue, dq));
    CHECK_NOTHROW(seed_batch.value_and_grad(q, z, queue, dq));
    CHECK_NOTHROW(queue.push(z.topRows(3)));
  }
}

// A one-row last block: Eigen's matrix product of a one-row left operand slices the row out of
// alpha · lhs and copies it to the heap, unless mmkd's tiled product makes it a matrix-vector one.
TEST_CASE("streaming InfoNCE with a one-row last block allocates nothing in steady state",
          "[contrastive][alloc]") {
  const Index n = 5, d = 4, kk = 28;
  const Matrix<double> q = random_matrix<double>(n, d, 1), k = random_matrix<double>(kk, d, 2);
  Matrix<double> dq = Matrix<double>::Zero(n, d), dk = Matrix<double>::Zero(kk, d);
  for (bool sym : {false, true}) {
    mmkd::InfoNCE<double>::Options o;
    o.symmetric = sym;
    o.offset = sym ? 0 : 7;
    o.stream = true;
    o.block_rows = 4;  // blocks of 4 and 1 rows
    o.learn_temperature = true;
    mmkd::InfoNCE<double> nce(o);
    for (int warm = 0; warm < 2; ++warm) {
      std::unique_ptr<NoMalloc> guard;
      if (warm == 1) guard = std::make_unique<NoMalloc>();
      CHECK_NOTHROW(nce.value_and_grad(q, k, dq, dk));
      CHECK_NOTHROW(nce.value(q, k));
    }
  }
}
