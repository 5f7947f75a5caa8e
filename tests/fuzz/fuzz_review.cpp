// libFuzzer target: the ReviewKD ops (conv2d_1x1/3x3 both algorithms, nearest_resize,
// adaptive_avg_pool2d, with their backward passes), BatchNorm2d, AttentionFusion, ReviewFusion
// and HierarchicalContextLoss (see fuzz_support.hpp for the contract checked).

#include <mmkd/review/attention_fusion.hpp>
#include <mmkd/review/batch_norm.hpp>
#include <mmkd/review/conv2d.hpp>
#include <mmkd/review/hierarchical_context_loss.hpp>
#include <mmkd/review/review_fusion.hpp>

#include <memory>

#include "fuzz_support.hpp"

using namespace mmkd_fuzz;

namespace {

// A module's parameters, gradients and running statistics are the caller's state too.
template <class S>
void add_module(Buffers& b, const std::vector<mmkd::ParameterView<S>>& p,
                const std::vector<mmkd::ParameterView<S>>& g,
                const std::vector<mmkd::ParameterView<S>>& buffers) {
  b.add_views(p);
  b.add_views(g);
  b.add_views(buffers);
}

// Constructs a module or loss; bad options must throw InvalidArgument (then: null).
template <class T, class O>
std::unique_ptr<T> make(const O& options) {
  try {
    return std::make_unique<T>(options);
  } catch (const mmkd::InvalidArgument&) {
    return nullptr;
  }
}

template <class S>
void run(Reader& r) {
  const Index n = r.dim(3), c = r.dim(4), h = r.dim(6), w = r.dim(6), o = r.dim(4);
  const mmkd::Tensor4<S> x = r.tensor4<S>(n, c, h, w);
  Buffers b;
  switch (r.pick(5)) {
    case 0: {  // convolutions
      const bool three = r.flag();
      const auto algo = mmkd::Conv3x3Algorithm(r.pick(3));
      const mmkd::Matrix<S> weight = r.matrix<S>(o, (three ? 9 : 1) * c + (r.byte() > 240));
      const mmkd::Matrix<S> bias = r.matrix<S>(r.flag() ? 1 : 0, o);
      const mmkd::Tensor4<S> dy = r.tensor4<S>(n, o, h, w);
      mmkd::Tensor4<S> y(n, o, h, w), dx(n, c, h, w);
      y.setZero();
      dx.setZero();
      mmkd::Matrix<S> dweight = mmkd::Matrix<S>::Zero(weight.rows(), weight.cols()),
                      dbias = mmkd::Matrix<S>::Zero(bias.rows(), bias.cols()), ws;
      b.add_tensor(y);
      b.add_tensor(dx);
      // The weight, the bias and their gradients dense, or strided views of wider matrices.
      const bool strided = r.flag();
      const Index pad = kAlignedPad * (1 + r.pick(2));
      auto conv = [&](const mmkd::ConstMatrixRef<S>& wv, const mmkd::ConstMatrixRef<S>& bv,
                      mmkd::MatrixRef<S> dwv, mmkd::MatrixRef<S> dbv) {
        dx.setZero();  // each run from zero: a rerun must give the same bits
        if (three) {
          mmkd::conv2d_3x3<S>(x, wv, y, ws, algo);
          mmkd::conv2d_3x3_backward<S>(x, wv, dy, dx, dwv, ws, algo);
        } else {
          mmkd::conv2d_1x1<S>(x, wv, bv, y);
          mmkd::conv2d_1x1_backward<S>(x, wv, dy, dx, dwv, dbv);
        }
        return fingerprint(y, dx);
      };
      dense_or_strided<S>("conv2d", b, strided, pad, conv, weight, bias, dweight, dbias, false);
      break;
    }
    case 1: {  // resampling
      const Index oh = r.dim(6), ow = r.dim(6);
      const mmkd::Tensor4<S> dy = r.tensor4<S>(n, c, oh, ow);
      mmkd::Tensor4<S> y(n, c, oh, ow), dx(n, c, h, w);
      y.setZero();
      dx.setZero();
      b.add_tensor(y);
      b.add_tensor(dx);
      const bool pool = r.flag();
      b.check(
          "resample",
          [&] {
            if (pool) {
              mmkd::adaptive_avg_pool2d<S>(x, y);
              mmkd::adaptive_avg_pool2d_backward<S>(dy, dx);
            } else {
              mmkd::nearest_resize<S>(x, y);
              mmkd::nearest_resize_backward<S>(dy, dx);
            }
          },
          false);
      break;
    }
    case 2: {  // batch norm
      typename mmkd::BatchNorm2d<S>::Options bo;
      bo.channels = r.byte() < 220 ? c : r.dim(4);
      bo.eps = r.option(1e-5);
      bo.momentum = r.option(0.1);
      const auto bn = make<mmkd::BatchNorm2d<S>>(bo);
      if (!bn) return;
      bn->train(r.flag());
      const mmkd::Tensor4<S> dy = r.tensor4<S>(n, c, h, w);
      mmkd::Tensor4<S> dx(n, c, h, w);
      dx.setZero();
      b.add_tensor(dx);
      add_module(b, bn->parameters(), bn->gradients(), bn->buffers());
      // Forward and backward are separate calls: a failed backward keeps a forward's effects.
      if (b.check("BatchNorm2d forward", [&] { return sum_of(bn->forward(x)); }))
        b.check("BatchNorm2d backward", [&] { bn->backward(dy, dx); });
      break;
    }
    case 3: {  // one attention-based fusion stage
      typename mmkd::AttentionFusion<S>::Options ao;
      ao.in_channels = r.byte() < 220 ? c : r.dim(4);
      ao.mid_channels = r.dim(3);
      ao.out_channels = o;
      ao.fuse = r.flag();
      ao.seed = r.byte();
      const auto abf = make<mmkd::AttentionFusion<S>>(ao);
      if (!abf) return;
      if (r.flag()) abf->eval();
      const Index rh = r.dim(4), out_size = Index(r.byte() % 5);
      const mmkd::Tensor4<S> residual = r.tensor4<S>(n, ao.mid_channels, rh, rh);
      mmkd::Tensor4<S> dx(n, c, h, w), dri(residual.dimensions());
      dx.setZero();
      dri.setZero();
      b.add_tensor(dx);
      b.add_tensor(dri);
      add_module(b, abf->parameters(), abf->gradients(), abf->buffers());
      const mmkd::Tensor4<S>* y = nullptr;
      if (!b.check("AttentionFusion forward", [&] {
            y = ao.fuse ? &abf->forward(x, residual, out_size) : &abf->forward(x, out_size);
            return sum_of(*y);
          }))
        return;
      const auto& res = abf->residual();
      const mmkd::Tensor4<S> dy =
          r.tensor4<S>(y->dimension(0), y->dimension(1), y->dimension(2), y->dimension(3));
      const mmkd::Tensor4<S> dres =
          r.tensor4<S>(res.dimension(0), res.dimension(1), res.dimension(2), res.dimension(3));
      b.check("AttentionFusion backward", [&] {
        if (ao.fuse)
          abf->backward(dy, dres, dx, dri);
        else
          abf->backward(dy, dx);
      });
      break;
    }
    default: {  // the ReviewFusion chain through the hierarchical context loss
      typename mmkd::ReviewFusion<S>::Options ro;
      const Index stages = 1 + r.pick(3);
      std::vector<mmkd::Tensor4<S>> f, t, d_out, d_f;
      Index size = 1 + r.pick(6);
      for (Index k = 0; k < stages; ++k) {
        ro.in_channels.push_back(r.dim(3));
        ro.out_channels.push_back(r.dim(3));
        ro.shapes.push_back(r.byte() < 230 ? size : r.dim(6));
        ro.out_shapes.push_back(r.byte() < 200 ? ro.shapes.back() : r.dim(6));
        size = std::max<Index>(1, size / 2);
      }
      if (r.byte() > 230) ro.out_shapes.pop_back();
      ro.mid_channels = Index(r.byte() % 4);
      ro.seed = r.byte();
      for (Index k = 0; k < stages; ++k) {
        const std::size_t i = std::size_t(k);
        const Index hk = ro.shapes[i], ok = i < ro.out_shapes.size() ? ro.out_shapes[i] : hk;
        f.push_back(r.tensor4<S>(n, ro.in_channels[i], hk, hk));
        t.push_back(r.tensor4<S>(n, ro.out_channels[i], ok, ok));
        d_out.push_back(mmkd::Tensor4<S>(n, ro.out_channels[i], ok, ok).setZero());
        d_f.push_back(mmkd::Tensor4<S>(n, ro.in_channels[i], hk, hk).setZero());
      }
      typename mmkd::HierarchicalContextLoss<S>::Options ho;
      if (r.flag()) ho.levels = {Index(r.byte() % 5), 1};
      ho.weight = S(r.option(1));
      const auto review = make<mmkd::ReviewFusion<S>>(ro);
      const auto hcl = make<mmkd::HierarchicalContextLoss<S>>(ho);
      if (!review || !hcl) return;
      if (r.flag()) review->eval();
      for (auto& v : d_f) b.add_tensor(v);
      for (auto& v : d_out) b.add_tensor(v);
      add_module(b, review->parameters(), review->gradients(), review->buffers());
      if (!b.check("ReviewFusion forward", [&] {
            const auto& outs = review->forward({f.begin(), f.end()});
            double total = 0;
            for (const auto& v : outs) total += sum_of(v);
            return total;
          }))
        return;
      if (!b.check("HierarchicalContextLoss", [&] {
            return hcl->value_and_grad(review->outputs(), {t.begin(), t.end()},
                                       {d_out.begin(), d_out.end()});
          }))
        return;
      b.check("ReviewFusion backward", [&] {
        review->backward({d_out.begin(), d_out.end()}, {d_f.begin(), d_f.end()});
      });
    }
  }
}

}  // namespace

MMKD_FUZZ_ENTRY(run)
