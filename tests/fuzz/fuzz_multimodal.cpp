// libFuzzer target: ModalitySpecificKD, ModalitySaliency + ModalityWeighting, SaliencyRunningMean,
// ModalityGramKD and ModalityWeightLearner (see fuzz_support.hpp for the contract checked).

#include <mmkd/multimodal/modality_gram_kd.hpp>
#include <mmkd/multimodal/modality_saliency.hpp>
#include <mmkd/multimodal/modality_specific_kd.hpp>
#include <mmkd/multimodal/modality_weight_learner.hpp>
#include <mmkd/multimodal/modality_weighting.hpp>

#include "fuzz_support.hpp"

using namespace mmkd_fuzz;

namespace {

template <class S>
mmkd::Matrix<S> flat(const mmkd::Tensor3<S>& x) {
  return Eigen::Map<const mmkd::Matrix<S>>(x.data(), x.dimension(0) * x.dimension(1),
                                           x.dimension(2));
}

template <class S>
void run(Reader& r) {
  const Index n = r.dim(5), c = r.dim(5), m = r.dim(4);
  const bool same = r.byte() < 220;
  const Index nm = same ? n : r.dim(5), mm = same ? m : r.dim(4);
  const mmkd::Matrix<S> s = r.matrix<S>(n, c), t = r.matrix<S>(nm, c);
  const mmkd::Tensor3<S> zs = r.tensor3<S>(mm, n, c), zt = r.tensor3<S>(mm, nm, c);
  const mmkd::Matrix<S> w = r.matrix<S>(n, same ? m : r.dim(4));
  const mmkd::PresenceMask mask = r.mask<mmkd::PresenceMask>(n, same ? m : r.dim(4));
  const mmkd::Labels y = r.labels(n, c);
  const bool masked = r.flag();
  mmkd::Matrix<S> ds = mmkd::Matrix<S>::Zero(n, c);
  mmkd::Tensor3<S> dzs(mm, n, c);
  dzs.setZero();
  Buffers b;
  b.add(ds);
  b.add_tensor(dzs);
  switch (r.pick(5)) {
    case 0: {
      typename mmkd::ModalitySpecificKD<S>::Options o;
      o.temperature = S(r.option(1));
      o.beta = S(r.option(1));
      o.weight = S(r.option(1));
      // The weights and the mask as strided views (left columns of wider matrices whose other
      // entries are NaN and 7), checked against the dense call when it succeeds.
      const bool strided = r.flag();
      const Index pad = kAlignedPad * (1 + r.pick(2));
      const mmkd::Matrix<S> w_wide = widened(w, pad, std::numeric_limits<S>::quiet_NaN());
      const mmkd::PresenceMask mask_wide = widened(mask, pad, std::uint8_t(7));
      const mmkd::ConstMatrixRef<S> wv =
          strided ? mmkd::ConstMatrixRef<S>(w_wide.leftCols(w.cols())) : mmkd::ConstMatrixRef<S>(w);
      const mmkd::ConstPresenceMaskRef mv =
          strided ? mmkd::ConstPresenceMaskRef(mask_wide.leftCols(mask.cols()))
                  : mmkd::ConstPresenceMaskRef(mask);
      if (strided && (wv.data() != w_wide.data() || mv.data() != mask_wide.data()))
        die("a strided view was copied on binding");
      auto call = [&](const auto& w_, const auto& mask_, mmkd::Matrix<S>& ds_,
                      mmkd::Tensor3<S>& dzs_) {
        mmkd::ModalitySpecificKD<S> msd(o);
        return masked ? msd.value_and_grad(s, t, zs, zt, w_, mask_, ds_, dzs_)
                      : msd.value_and_grad(s, t, zs, zt, w_, ds_, dzs_);
      };
      double v = 0;
      if (b.check("ModalitySpecificKD", [&] { return v = double(call(wv, mv, ds, dzs)); }) &&
          strided) {
        mmkd::Matrix<S> ds2 = mmkd::Matrix<S>::Zero(n, c);
        mmkd::Tensor3<S> dzs2(mm, n, c);
        dzs2.setZero();
        const double v2 = double(call(w, mask, ds2, dzs2));
        const mmkd::Matrix<S> f1 = flat(dzs), f2 = flat(dzs2);
        same_bits<mmkd::Matrix<S>>("ModalitySpecificKD", v, v2, {&ds, &f1}, {&ds2, &f2});
      }
      break;
    }
    case 1: {
      typename mmkd::ModalitySaliency<S>::Options so;
      so.kind = mmkd::SaliencyKind(r.pick(4));  // 3 is not a valid kind
      so.temperature = S(r.option(1));
      typename mmkd::ModalityWeighting<S>::Options wo;
      wo.scheme = mmkd::WeightScheme(r.pick(4));
      wo.normalization = mmkd::WeightNormalization(r.pick(4));
      wo.lambda = S(r.option(1));
      wo.softmax_temperature = S(r.option(0));
      wo.eps = S(r.option(1e-6));
      wo.fixed = r.matrix<S>(r.dim(4), 1);
      wo.population = r.matrix<S>(r.dim(4), 1);
      b.check("ModalitySaliency + ModalityWeighting", [&] {
        mmkd::ModalitySaliency<S> sal(so);
        mmkd::ModalityWeighting<S> weighting(wo);
        const mmkd::Matrix<S>& scores =
            so.kind == mmkd::SaliencyKind::LabelProbability
                ? (masked ? sal.compute(t, zt, y, mask) : sal.compute(t, zt, y))
                : (masked ? sal.compute(t, zt, mask) : sal.compute(t, zt));
        const mmkd::Matrix<S>& weights =
            masked ? weighting.compute(scores, mask) : weighting.compute(scores);
        mmkd::SaliencyRunningMean<S> running;
        running.update(scores);
        if (!scores.allFinite()) die("ModalitySaliency: non-finite scores");
        if (!weights.allFinite()) die("ModalityWeighting: non-finite weights");
        if (!running.mean().allFinite()) die("SaliencyRunningMean: non-finite mean");
      });
      break;
    }
    case 2: {
      typename mmkd::ModalityGramKD<S>::Options o;
      o.normalization = mmkd::GramNormalization(r.pick(4));
      o.scope = mmkd::GramScope(r.pick(3));
      o.eps = S(r.option(1e-12));
      o.weight = S(r.option(1));
      const Index dsw = r.dim(5), dtw = r.dim(5);
      const mmkd::Tensor3<S> fs = r.tensor3<S>(m, n, dsw), ft = r.tensor3<S>(mm, nm, dtw);
      mmkd::Tensor3<S> dfs(m, n, dsw), dft(mm, nm, dtw);
      dfs.setZero();
      dft.setZero();
      b.add_tensor(dfs);
      b.add_tensor(dft);
      const bool teacher_grad = r.flag();
      b.check("ModalityGramKD", [&] {
        mmkd::ModalityGramKD<S> gram(o);
        if (teacher_grad)
          return masked ? gram.value_and_grad(fs, ft, mask, dfs, dft)
                        : gram.value_and_grad(fs, ft, dfs, dft);
        return masked ? gram.value_and_grad(fs, ft, mask, dfs) : gram.value_and_grad(fs, ft, dfs);
      });
      break;
    }
    default: {
      typename mmkd::ModalityWeightLearner<S>::Options o;
      o.hidden = r.dim(8);
      o.use_saliency = r.flag();
      o.onehot_modalities = Index(r.byte() % 4) - 1;
      const Index k = r.dim(8), f = r.dim(4);
      const mmkd::Matrix<S> aux = r.matrix<S>(n, m), sal = r.matrix<S>(n, m);
      const mmkd::Matrix<S> features = r.matrix<S>(k, f), dw = r.matrix<S>(k, 1);
      const mmkd::Matrix<S> g = r.matrix<S>(k, c), h = r.matrix<S>(k, 3);
      const mmkd::Matrix<S> gm = r.matrix<S>(nm, c), hm = r.matrix<S>(nm, 3);
      const S lr = S(r.option(0.1));
      mmkd::Matrix<S> out = mmkd::Matrix<S>::Zero(k, 1), built;
      b.add(out);
      b.check("ModalityWeightLearner", [&] {
        mmkd::ModalityWeightLearner<S> learner(o);
        if (o.use_saliency)
          learner.make_features(aux, sal, built);
        else
          learner.make_features(aux, built);
        const mmkd::Matrix<S>& weights = learner.forward(features);
        learner.backward(dw);
        mmkd::ModalityWeightLearner<S>::hypergradient_linear(g, h, gm, hm, lr, n, out);
        // Each buffer checked on its own: finite gradients can still sum to inf.
        double bad = sum_of(weights);
        for (const auto& p : learner.gradients()) bad += sum_of(p.value);
        return bad;
      });
      // A call of its own: each call is atomic, a sequence of two calls on `out` is not.
      b.check("ModalityWeightLearner::hypergradient",
              [&] { mmkd::ModalityWeightLearner<S>::hypergradient(dw, lr, n, out); });
    }
  }
}

}  // namespace

MMKD_FUZZ_ENTRY(run)
