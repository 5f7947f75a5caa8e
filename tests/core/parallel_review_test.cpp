// ReviewKD: batch norm, the hierarchical context loss and attention fusion give bit-identical
// values and gradients with 1 and 2 OpenMP threads.

#include <mmkd/review/attention_fusion.hpp>
#include <mmkd/review/batch_norm.hpp>
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

}  // namespace

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
