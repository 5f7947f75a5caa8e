// Structure and contrastive losses: bit-identical values and gradients with 1 and 2 OpenMP
// threads.

#include <mmkd/contrastive/info_nce.hpp>
#include <mmkd/contrastive/similarity_distillation.hpp>
#include <mmkd/structure/channel_decorrelation.hpp>
#include <mmkd/structure/uniformity.hpp>

#include "core/parallel_support.hpp"

#if MMKD_HAS_OPENMP
using namespace mmkd_test;

TEST_CASE("structure and contrastive losses give bit-identical results with 1 and 2 threads",
          "[core][parallel]") {
  // Wide enough that every product is split into tiles (uneven ones: 300 is no multiple of the
  // tile edge), where Eigen's parallel GEMM would change the rounding with the threads.
  const Index n = 512, wide = 300;
  const Matrix<double> e = random_matrix<double>(n, wide, 8), k = random_matrix<double>(n, wide, 9);
  same_with_1_and_2_threads([&](std::vector<Matrix<double>>& g) {
    g.assign(2, Matrix<double>::Zero(n, wide));
    mmkd::ChannelDecorrelation<double> decor;
    mmkd::Uniformity<double> unif;
    mmkd::InfoNCE<double> nce;
    mmkd::SimilarityDistillation<double> seed;
    return decor.value_and_grad(e, g[0]) + unif.value_and_grad(e, g[0]) +
           nce.value_and_grad(e, k, g[0], g[1]) + seed.value_and_grad(e, k, g[1]);
  });
}
#endif
