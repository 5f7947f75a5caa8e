// ReviewKD: the convolutions, batch norm, the hierarchical context loss and attention fusion
// give bit-identical values and gradients with 1 and 2 OpenMP threads.

#include <mmkd/review/attention_fusion.hpp>
#include <mmkd/review/batch_norm.hpp>
#include <mmkd/review/conv2d.hpp>
#include <mmkd/review/hierarchical_context_loss.hpp>

#include "core/parallel_support.hpp"

#if MMKD_HAS_OPENMP
using namespace mmkd_test;

namespace {

// Batch norm forward and backward and the HCL on one N x C x H x W map, as plane matrices.
template <class T>
T batch_norm_and_hcl(Index n, Index c, Index h, std::uint64_t seed, std::vector<Matrix<T>>& g) {
  const mmkd::Tensor4<T> x = random_map<T>(n, c, h, h, seed),
                         dy = random_map<T>(n, c, h, h, seed + 1),
                         t = random_map<T>(n, c, h, h, seed + 2);
  mmkd::BatchNorm2d<T> bn({c});
  const mmkd::Tensor4<T> y = bn.forward(x);
  mmkd::Tensor4<T> dx(x.dimensions()), dh(x.dimensions());
  dx.setZero();
  dh.setZero();
  bn.backward(dy, dx);
  mmkd::HierarchicalContextLoss<T> hcl;
  const T v = hcl.value_and_grad({x}, {t}, {dh});
  g = {flat(y), flat(dx), flat(dh)};
  for (auto& p : bn.gradients()) g.emplace_back(p.value);
  for (auto& b : bn.buffers()) g.emplace_back(b.value);
  return v;
}

// conv2d_1x1 and conv2d_3x3 (one algorithm) forward and backward on N x C x H x W float maps.
std::vector<Matrix<float>> convolutions(Index n, Index c, Index o, Index h, Index w,
                                        mmkd::Conv3x3Algorithm algo) {
  const mmkd::Tensor4<float> x = random_map<float>(n, c, h, w, 21),
                             dy = random_map<float>(n, o, h, w, 22);
  const Matrix<float> w1 = random_matrix<float>(o, c, 23), b1 = random_matrix<float>(1, o, 24),
                      w3 = random_matrix<float>(o, 9 * c, 25);
  mmkd::Tensor4<float> y1(n, o, h, w), y3(n, o, h, w), dx1(n, c, h, w), dx3(n, c, h, w);
  dx1.setZero();
  dx3.setZero();
  Matrix<float> dw1 = Matrix<float>::Zero(o, c), db1 = Matrix<float>::Zero(1, o),
                dw3 = Matrix<float>::Zero(o, 9 * c), ws;
  mmkd::conv2d_1x1<float>(x, w1, b1, y1);
  mmkd::conv2d_1x1_backward<float>(x, w1, dy, dx1, dw1, db1);
  mmkd::conv2d_3x3<float>(x, w3, y3, ws, algo);
  mmkd::conv2d_3x3_backward<float>(x, w3, dy, dx3, dw3, ws, algo);
  return {flat(y1), flat(dx1), dw1, db1, flat(y3), flat(dx3), dw3};
}

}  // namespace

TEST_CASE("the convolutions in float are bit-identical with 1 and 2 threads at odd sizes",
          "[core][parallel][review]") {
  // Odd H·W and channel counts put each thread's im2col and Winograd buffers at another
  // alignment than the single thread's.
  using Algo = mmkd::Conv3x3Algorithm;
  for (Algo algo : {Algo::Im2col, Algo::Winograd})
    for (Index h : {7, 15})
      for (Index c : {3, 5}) {
        INFO("algorithm " << int(algo) << ", H = " << h << ", W = " << h + 2 << ", C = " << c);
        same_with_1_and_2_threads<float>([&](std::vector<Matrix<float>>& g) {
          g = convolutions(6, c, 7, h, h + 2, algo);
          return 0.0f;
        });
      }
}

TEST_CASE("batch norm and HCL give bit-identical results with 1 and 2 threads",
          "[core][parallel][review]") {
  same_with_1_and_2_threads(
      [&](std::vector<Matrix<double>>& g) { return batch_norm_and_hcl<double>(8, 16, 16, 12, g); });
  // Odd H·W puts per-thread scratch rows at different alignments, where a vectorised reduction
  // would round differently unless the scratch is padded.
  for (Index h : {7, 15}) {
    INFO("float, H = W = " << h);
    same_with_1_and_2_threads<float>(
        [&](std::vector<Matrix<float>>& g) { return batch_norm_and_hcl<float>(8, 6, h, 12, g); });
  }
}

TEST_CASE("AttentionFusion in float is bit-identical with 1 and 2 threads at odd H·W",
          "[core][parallel][review]") {
  // Odd H·W puts each thread's scratch at a different alignment unless it is padded.
  for (Index h : {7, 15}) {
    INFO("H = W = " << h);
    const mmkd::Tensor4<float> x = random_map<float>(6, 8, h, h, 1),
                               res = random_map<float>(6, 8, h, h, 2),
                               dy = random_map<float>(6, 4, h, h, 3);
    auto run = [&](int threads, std::vector<Matrix<float>>& out) {
      omp_set_num_threads(threads);
      mmkd::AttentionFusion<float> abf({8, 8, 4, true, 5});
      const mmkd::Tensor4<float> y = abf.forward(x, res);
      mmkd::Tensor4<float> dx(x.dimensions()), dr(res.dimensions());
      dx.setZero();
      dr.setZero();
      const mmkd::ConstTensor4Ref<float> none(nullptr, 0, 0, 0, 0);
      abf.backward(dy, none, dx, dr);
      out = {flat(y), flat(dx), flat(dr)};
      for (auto& p : abf.gradients()) out.emplace_back(p.value);
    };
    std::vector<Matrix<float>> g1, g2;
    run(1, g1);
    const GuardMode parallel(mmkd::detail::ContentionGuard::Mode::Parallel);
    run(2, g2);
    REQUIRE(g1.size() == g2.size());
    for (std::size_t k = 0; k < g1.size(); ++k) CHECK(bit_identical(g1[k], g2[k]));
  }
}
#endif
