#include "alloc/alloc_support.hpp"

#include <mmkd/review/attention_fusion.hpp>
#include <mmkd/review/batch_norm.hpp>
#include <mmkd/review/conv2d.hpp>
#include <mmkd/review/hierarchical_context_loss.hpp>
#include <mmkd/review/review_fusion.hpp>

#include <vector>

using namespace mmkd_test;

TEMPLATE_TEST_CASE("ReviewKD modules and HCL allocate nothing in steady state", "[review][alloc]",
                   float, double) {
  using T = TestType;
  typename mmkd::ReviewFusion<T>::Options o;
  o.in_channels = {3, 4, 4};
  o.out_channels = {2, 3, 4};
  o.shapes = {6, 3, 1};
  o.out_shapes = {8, 3, 1};  // the resize path too
  o.mid_channels = 4;
  mmkd::ReviewFusion<T> review(o);
  mmkd::HierarchicalContextLoss<T> hcl;
  std::vector<mmkd::Tensor4<T>> f, t, d_out, d_f;
  for (std::size_t k = 0; k < 3; ++k) {
    const Index h = o.shapes[k], oh = o.out_shapes[k];
    f.push_back(random_map<T>(2, o.in_channels[k], h, h, 1 + k));
    t.push_back(random_map<T>(2, o.out_channels[k], oh, oh, 5 + k));
    d_out.push_back(random_map<T>(2, o.out_channels[k], oh, oh, 9 + k));
    d_f.push_back(random_map<T>(2, o.in_channels[k], h, h, 13 + k));
  }
  const std::vector<mmkd::ConstTensor4Ref<T>> fv(f.begin(), f.end()), tv(t.begin(), t.end()),
      dov(d_out.begin(), d_out.end());
  const std::vector<mmkd::Tensor4Ref<T>> gv(d_out.begin(), d_out.end()),
      dfv(d_f.begin(), d_f.end());
  for (bool train : {true, false}) {
    review.train(train);
    for (int warm = 0; warm < 2; ++warm) {
      std::unique_ptr<NoMalloc> guard;
      if (warm == 1) guard = std::make_unique<NoMalloc>();
      CHECK_NOTHROW(hcl.value_and_grad(review.forward(fv), tv, gv));
      CHECK_NOTHROW(review.backward(dov, dfv));
      CHECK_NOTHROW(review.zero_grad());
    }
  }
}

TEMPLATE_TEST_CASE("ReviewKD ops, BatchNorm2d and AttentionFusion allocate nothing",
                   "[review][alloc]", float, double) {
  using T = TestType;
  const mmkd::Tensor4<T> x = random_map<T>(2, 8, 6, 6, 1), dy8 = random_map<T>(2, 8, 6, 6, 2);
  const mmkd::Tensor4<T> dy4 = random_map<T>(2, 4, 6, 6, 3), small = random_map<T>(2, 8, 3, 3, 4);
  const Matrix<T> w3 = random_matrix<T>(4, 72, 5), w1 = random_matrix<T>(4, 8, 6),
                  b1 = random_matrix<T>(1, 4, 7);
  mmkd::Tensor4<T> y(2, 4, 6, 6), dx(2, 8, 6, 6), up(2, 8, 6, 6), pooled(2, 8, 3, 3),
      d_small(2, 8, 3, 3);
  dx.setZero();
  d_small.setZero();
  Matrix<T> ws[2], dw3 = Matrix<T>::Zero(4, 72), dw1 = Matrix<T>::Zero(4, 8),
                   db1 = Matrix<T>::Zero(1, 4);
  mmkd::BatchNorm2d<T> bn({8});
  typename mmkd::AttentionFusion<T>::Options ao;
  ao.in_channels = 8;
  ao.mid_channels = 4;
  ao.out_channels = 6;
  ao.fuse = true;
  mmkd::AttentionFusion<T> abf(ao);
  const mmkd::Tensor4<T> residual = random_map<T>(2, 4, 3, 3, 8),
                         d_out = random_map<T>(2, 6, 6, 6, 9),
                         d_res = random_map<T>(2, 4, 6, 6, 10);
  mmkd::Tensor4<T> d_res_in(2, 4, 3, 3);
  d_res_in.setZero();
  for (int warm = 0; warm < 2; ++warm) {
    std::unique_ptr<NoMalloc> guard;
    if (warm == 1) guard = std::make_unique<NoMalloc>();
    // One workspace per algorithm: their sizes differ.
    for (int a = 0; a < 2; ++a) {
      const auto algo = a ? mmkd::Conv3x3Algorithm::Winograd : mmkd::Conv3x3Algorithm::Im2col;
      CHECK_NOTHROW(mmkd::conv2d_3x3<T>(x, w3, y, ws[a], algo));
      CHECK_NOTHROW(mmkd::conv2d_3x3_backward<T>(x, w3, dy4, dx, dw3, ws[a], algo));
    }
    CHECK_NOTHROW(mmkd::conv2d_1x1<T>(x, w1, b1, y));
    CHECK_NOTHROW(mmkd::conv2d_1x1_backward<T>(x, w1, dy4, dx, dw1, db1));
    CHECK_NOTHROW(mmkd::nearest_resize<T>(small, up));
    CHECK_NOTHROW(mmkd::nearest_resize_backward<T>(dy8, d_small));
    CHECK_NOTHROW(mmkd::adaptive_avg_pool2d<T>(x, pooled));
    CHECK_NOTHROW(mmkd::adaptive_avg_pool2d_backward<T>(small, dx));
    CHECK_NOTHROW(bn.forward(x));
    CHECK_NOTHROW(bn.backward(dy8, dx));
    CHECK_NOTHROW(abf.forward(x, residual));
    CHECK_NOTHROW(abf.backward(d_out, d_res, dx, d_res_in));
  }
}
