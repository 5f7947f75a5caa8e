// libFuzzer target: ChannelDecorrelation, Uniformity (samples, spatial tokens, spatial entropy),
// InfoNCE (incl. learned temperature, sharding options, streaming) and SimilarityDistillation with
// an EmbeddingQueue (see fuzz_support.hpp for the contract checked).

#include <mmkd/contrastive/embedding_queue.hpp>
#include <mmkd/contrastive/info_nce.hpp>
#include <mmkd/contrastive/similarity_distillation.hpp>
#include <mmkd/structure/channel_decorrelation.hpp>
#include <mmkd/structure/uniformity.hpp>

#include "fuzz_support.hpp"

using namespace mmkd_fuzz;

namespace {

template <class S>
void run(Reader& r) {
  const Index n = r.dim(7), d = r.dim(6);
  const bool same = r.byte() < 220;
  const Index nt = r.dim(7), dt = same ? d : r.dim(6);
  const mmkd::Matrix<S> x = r.matrix<S>(n, d), t = r.matrix<S>(nt, dt);
  mmkd::Matrix<S> dx = mmkd::Matrix<S>::Zero(n, d), ddt = mmkd::Matrix<S>::Zero(nt, dt);
  // Both embeddings and both gradients dense, or strided views of wider matrices.
  const bool strided = r.flag();
  const Index pad = kAlignedPad * (1 + r.pick(2));
  Buffers b;
  using CRef = mmkd::ConstMatrixRef<S>;
  using Ref = mmkd::MatrixRef<S>;
  auto check = [&](const char* what, auto&& call) {
    dense_or_strided<S>(what, b, strided, pad, call, x, t, dx, ddt);
  };
  switch (r.pick(4)) {
    case 0: {
      typename mmkd::ChannelDecorrelation<S>::Options o;
      o.statistic = mmkd::ChannelStatistic(r.pick(3));
      o.target = mmkd::DecorrelationTarget(r.pick(3));
      o.mean_off_diagonal = r.flag();
      o.eps = S(r.option(1e-5));
      o.weight = S(r.option(1));
      const bool with_teacher = r.flag();
      check("ChannelDecorrelation", [&](const CRef& xv, const CRef& tv, Ref dxv, Ref) {
        mmkd::ChannelDecorrelation<S> decor(o);
        return with_teacher ? decor.value_and_grad(xv, tv, dxv) : decor.value_and_grad(xv, dxv);
      });
      break;
    }
    case 1: {
      typename mmkd::Uniformity<S>::Options o;
      o.mode = mmkd::UniformityMode(r.pick(4));
      o.t = S(r.option(2));
      o.spatial_temperature = S(r.option(1));
      o.eps = S(r.option(1e-12));
      o.weight = S(r.option(1));
      const Index c = r.dim(3), h = r.dim(4), w = r.dim(4);
      const mmkd::Tensor4<S> maps = r.tensor4<S>(n, c, h, w);
      mmkd::Tensor4<S> dmaps(n, c, h, w);
      dmaps.setZero();
      const bool on_maps = r.flag();
      if (on_maps) {  // a TensorMap is always dense
        b.add_tensor(dmaps);
        b.check("Uniformity", [&] { return mmkd::Uniformity<S>(o).value_and_grad(maps, dmaps); });
        break;
      }
      check("Uniformity", [&](const CRef& xv, const CRef&, Ref dxv, Ref) {
        return mmkd::Uniformity<S>(o).value_and_grad(xv, dxv);
      });
      break;
    }
    case 2: {
      typename mmkd::InfoNCE<S>::Options o;
      o.temperature = S(r.option(0.07));
      o.learn_temperature = r.flag();
      o.normalize = r.byte() < 200;
      o.symmetric = r.flag();
      o.offset = Index(r.byte() % 8) - 1;
      o.global_batch = Index(r.byte() % 10) - 1;
      o.stream = r.flag();
      o.block_rows = Index(r.byte() % 5) - 1;
      o.eps = S(r.option(1e-12));
      o.weight = S(r.option(1));
      const bool key_grad = r.flag();
      check("InfoNCE", [&](const CRef& xv, const CRef& tv, Ref dxv, Ref dtv) {
        mmkd::InfoNCE<S> nce(o);
        const S v =
            key_grad ? nce.value_and_grad(xv, tv, dxv, dtv) : nce.value_and_grad(xv, tv, dxv);
        for (const auto& p : nce.gradients())
          if (!p.value.allFinite()) die("InfoNCE: non-finite temperature gradient");
        return v;
      });
      break;
    }
    default: {
      typename mmkd::SimilarityDistillation<S>::Options o;
      o.tau_s = S(r.option(0.07));
      o.tau_t = S(r.option(0.07));
      o.normalize = r.byte() < 200;
      o.eps = S(r.option(1e-12));
      o.weight = S(r.option(1));
      o.dictionary = mmkd::SimilarityDictionary(r.pick(3));  // 2 is not a valid dictionary
      const Index capacity = r.dim(6);
      const mmkd::Matrix<S> past = r.matrix<S>(r.dim(6), dt);
      // The extra dictionary rows too: dense, or a strided view.
      const mmkd::Matrix<S> past_wide = widened(past, pad, std::numeric_limits<S>::quiet_NaN());
      const CRef past_view = strided ? CRef(past_wide.leftCols(dt)) : CRef(past);
      const int variant = int(r.pick(3));
      check("SimilarityDistillation + EmbeddingQueue",
            [&](const CRef& xv, const CRef& tv, Ref dxv, Ref) {
              mmkd::SimilarityDistillation<S> seed(o);
              mmkd::EmbeddingQueue<S> queue(capacity, dt);
              const CRef pv = xv.data() == x.data() ? CRef(past) : past_view;  // the dense rerun
              queue.push(pv);
              if (variant == 0) return seed.value_and_grad(xv, tv, queue, dxv);
              if (variant == 1) return seed.value_and_grad(xv, tv, pv, dxv);
              return seed.value_and_grad(xv, tv, dxv);
            });
    }
  }
}

}  // namespace

MMKD_FUZZ_ENTRY(run)
