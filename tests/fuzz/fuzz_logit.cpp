// libFuzzer target: LogitKD, DecoupledKD, CrossEntropy (hard labels or soft targets, class
// weights), LogitDivergence (every divergence), SparseLogitKD (both supports) and FusedLinearKD
// (heads or teacher logits, biases, chunk sizes) with shapes,
// options, labels, masks and values decoded from the input (see fuzz_support.hpp for the contract
// checked).

#include <mmkd/logit/cross_entropy.hpp>
#include <mmkd/logit/decoupled_kd.hpp>
#include <mmkd/logit/fused_linear_kd.hpp>
#include <mmkd/logit/logit_divergence.hpp>
#include <mmkd/logit/logit_kd.hpp>
#include <mmkd/logit/sparse_logit_kd.hpp>

#include "fuzz_support.hpp"

using namespace mmkd_fuzz;

namespace {

template <class S>
void run(Reader& r) {
  const Index n = r.dim(6), c = r.dim(6);
  const bool same = r.byte() < 200;
  const Index nt = same ? n : r.dim(6), ct = same ? c : r.dim(6);
  const mmkd::Matrix<S> s = r.matrix<S>(n, c), t = r.matrix<S>(nt, ct);
  const mmkd::Labels y = r.labels(r.byte() < 240 ? n : r.dim(6), c);
  const mmkd::RowMask mask = r.mask<mmkd::RowMask>(r.byte() < 240 ? n : r.dim(6), 1);
  const bool masked = r.flag();
  // Student, teacher and both gradients dense, or strided views of wider matrices.
  const bool strided = r.flag();
  const Index pad = kAlignedPad * (1 + r.pick(2));
  const auto reduction = mmkd::Reduction(r.pick(4));  // 3 is not a valid reduction
  mmkd::Matrix<S> ds = mmkd::Matrix<S>::Zero(n, c), dt = mmkd::Matrix<S>::Zero(nt, ct);
  using CRef = mmkd::ConstMatrixRef<S>;
  using Ref = mmkd::MatrixRef<S>;
  auto check = [&](const char* what, auto&& call) {
    dense_or_strided<S>(what, Buffers(), strided, pad, call, s, t, ds, dt);
  };
  switch (r.pick(6)) {
    case 0: {
      typename mmkd::LogitKD<S>::Options o;
      o.temperature = S(r.option(4));
      o.scale_by_t2 = r.flag();
      o.reduction = reduction;
      o.weight = S(r.option(1));
      const bool teacher_grad = r.flag();
      check("LogitKD", [&](const CRef& s, const CRef& t, Ref ds, Ref dt) {
        mmkd::LogitKD<S> kd(o);
        if (teacher_grad)
          return masked ? kd.value_and_grad(s, t, mask, ds, dt) : kd.value_and_grad(s, t, ds, dt);
        return masked ? kd.value_and_grad(s, t, mask, ds) : kd.value_and_grad(s, t, ds);
      });
      break;
    }
    case 1: {
      typename mmkd::DecoupledKD<S>::Options o;
      o.alpha = S(r.option(1));
      o.beta = S(r.option(8));
      o.temperature = S(r.option(4));
      o.reduction = reduction;
      o.weight = S(r.option(1));
      check("DecoupledKD", [&](const CRef& s, const CRef& t, Ref ds, Ref) {
        mmkd::DecoupledKD<S> dkd(o);
        return masked ? dkd.value_and_grad(s, t, y, mask, ds) : dkd.value_and_grad(s, t, y, ds);
      });
      break;
    }
    case 2: {
      typename mmkd::LogitDivergence<S>::Options o;
      o.divergence = mmkd::Divergence(r.pick(7));  // 6 is not a valid divergence
      o.beta = S(r.option(0.5));
      o.skew = S(r.option(0.1));
      o.temperature = S(r.option(1));
      o.scale_by_t2 = r.flag();
      o.reduction = reduction;
      o.weight = S(r.option(1));
      const bool teacher_grad = r.flag();
      check("LogitDivergence", [&](const CRef& s, const CRef& t, Ref ds, Ref dt) {
        mmkd::LogitDivergence<S> d(o);
        if (teacher_grad)
          return masked ? d.value_and_grad(s, t, mask, ds, dt) : d.value_and_grad(s, t, ds, dt);
        return masked ? d.value_and_grad(s, t, mask, ds) : d.value_and_grad(s, t, ds);
      });
      break;
    }
    case 3: {
      typename mmkd::SparseLogitKD<S>::Options o;
      o.support = mmkd::SparseSupport(r.pick(3));  // 2 is not a valid support
      o.temperature = S(r.option(1));
      o.scale_by_t2 = r.flag();
      o.reduction = reduction;
      o.weight = S(r.option(1));
      // The teacher's top-k: consecutive classes from a per-row start (distinct when k ≤ C),
      // now and then a byte instead (duplicates, out of range); the log-probabilities the
      // teacher matrix's log-softmax over its k columns, lowered, or its raw values.
      mmkd::IndexMatrix idx(nt, ct);
      mmkd::Matrix<S> lp = t;
      const bool normalised = r.byte() < 200;
      for (Index i = 0; i < nt; ++i) {
        const Index start = Index(r.byte());
        for (Index j = 0; j < ct; ++j) {
          const std::uint8_t b = r.byte();
          idx(i, j) = b < 240 ? int((start + j) % std::max<Index>(c, 1)) : int(b) - 245;
        }
        if (normalised && ct > 0)
          lp.row(i).array() -=
              mmkd::detail::log_sum_exp_row(t.row(i).array(), S(1)) + S(r.byte()) / S(32);
      }
      auto call = [&](const CRef& s, const CRef& l, Ref ds, Ref) {
        mmkd::SparseLogitKD<S> kd(o);
        return masked ? kd.value_and_grad(s, idx, l, mask, ds) : kd.value_and_grad(s, idx, l, ds);
      };
      dense_or_strided<S>("SparseLogitKD", Buffers(), strided, pad, call, s, lp, ds, dt);
      break;
    }
    case 4: {
      // Hidden states and heads of their own shapes: rows n, classes c (the student's), widths
      // decoded here; the teacher as a head or as the logits matrix t.
      typename mmkd::FusedLinearKD<S>::Options o;
      o.divergence.divergence = mmkd::Divergence(r.pick(6));
      o.divergence.beta = S(r.option(0.5));
      o.divergence.skew = S(r.option(0.1));
      o.divergence.temperature = S(r.option(1));
      o.divergence.scale_by_t2 = r.flag();
      o.divergence.reduction = r.byte() < 240 ? mmkd::Reduction::BatchMean : reduction;
      o.soft_weight = S(r.option(1));
      o.hard_weight = S(r.option(0.5));
      o.chunk_rows = Index(r.byte()) % 9;  // 0 is invalid
      const Index d = r.dim(5), dt = r.dim(5);
      const mmkd::Matrix<S> h = r.matrix<S>(n, d),
                            w = r.matrix<S>(r.byte() < 240 ? c : r.dim(6), d),
                            ht = r.matrix<S>(n, dt), wt = r.matrix<S>(c, dt);
      const mmkd::Vector<S> b = r.flag()
                                    ? mmkd::Vector<S>(r.matrix<S>(r.byte() < 240 ? c : r.dim(6), 1))
                                    : mmkd::Vector<S>();
      mmkd::Labels yl = y;
      for (Index i = 0; i < yl.size(); ++i)
        if (r.byte() < 60) yl(i) = -100;
      mmkd::Matrix<S> dh = mmkd::Matrix<S>::Zero(n, d), dw = mmkd::Matrix<S>::Zero(w.rows(), d);
      mmkd::Vector<S> db = mmkd::Vector<S>::Zero(b.size());
      const int form = int(r.pick(3));
      Buffers buffers;
      buffers.add(dh);
      buffers.add(dw);
      buffers.add(db.data(), db.size());
      buffers.check("FusedLinearKD", [&] {
        mmkd::FusedLinearKD<S> kd(o);
        if (form == 0) return kd.value_and_grad(h, w, ht, wt, yl, dh, dw);
        if (form == 1) return kd.value_and_grad(h, w, ht, wt, yl, b, b, dh, dw, db);
        return kd.value_and_grad(h, w, t, yl, b, dh, dw, db);
      });
      break;
    }
    default: {
      typename mmkd::CrossEntropy<S>::Options o;
      o.label_smoothing = S(r.option(0.1));
      o.reduction = reduction;
      o.weight = S(r.option(1));
      if (r.flag()) o.class_weights = r.matrix<S>(r.byte() < 220 ? c : r.dim(6), 1);
      const int target = int(r.pick(2));  // hard labels, or the teacher matrix as soft targets
      check("CrossEntropy", [&](const CRef& s, const CRef& t, Ref ds, Ref) {
        mmkd::CrossEntropy<S> ce(o);
        if (target == 1)
          return masked ? ce.value_and_grad(s, t, mask, ds) : ce.value_and_grad(s, t, ds);
        return masked ? ce.value_and_grad(s, y, mask, ds) : ce.value_and_grad(s, y, ds);
      });
    }
  }
}

}  // namespace

MMKD_FUZZ_ENTRY(run)
