// libFuzzer target: LogitKD, DecoupledKD and CrossEntropy (hard labels or soft targets, class
// weights) with shapes, options, labels, masks and values decoded from the input (see
// fuzz_support.hpp for the contract checked).

#include <mmkd/logit/cross_entropy.hpp>
#include <mmkd/logit/decoupled_kd.hpp>
#include <mmkd/logit/logit_kd.hpp>

#include "fuzz_support.hpp"

using namespace mmkd_fuzz;

namespace {

// The contract for call(sv, tv, ds, dt); when the views are strided and the call succeeds, the
// same call on the dense copies must give the same bits.
template <class S, class F>
void twin(const char* what, Buffers& b, F& call, const mmkd::ConstMatrixRef<S>& sv,
          const mmkd::ConstMatrixRef<S>& tv, const mmkd::Matrix<S>& s, const mmkd::Matrix<S>& t,
          mmkd::Matrix<S>& ds, mmkd::Matrix<S>& dt) {
  double v = 0;
  if (!b.check(what, [&] { return v = double(call(sv, tv, ds, dt)); })) return;
  if (sv.data() == s.data()) return;  // dense already
  mmkd::Matrix<S> ds2 = mmkd::Matrix<S>::Zero(ds.rows(), ds.cols()),
                  dt2 = mmkd::Matrix<S>::Zero(dt.rows(), dt.cols());
  const double v2 = double(call(s, t, ds2, dt2));
  same_bits<mmkd::Matrix<S>>(what, v, v2, {&ds, &dt}, {&ds2, &dt2});
}

template <class S>
void run(Reader& r) {
  const Index n = r.dim(6), c = r.dim(6);
  const bool same = r.byte() < 200;
  const Index nt = same ? n : r.dim(6), ct = same ? c : r.dim(6);
  const mmkd::Matrix<S> s = r.matrix<S>(n, c), t = r.matrix<S>(nt, ct);
  const mmkd::Labels y = r.labels(r.byte() < 240 ? n : r.dim(6), c);
  const mmkd::RowMask mask = r.mask<mmkd::RowMask>(r.byte() < 240 ? n : r.dim(6), 1);
  const bool masked = r.flag();
  // Student and teacher passed as strided views (left columns of wider matrices), or dense.
  const bool strided = r.flag();
  const Index pad = kAlignedPad * (1 + r.pick(2));
  const mmkd::Matrix<S> s_wide = widened(s, pad, std::numeric_limits<S>::quiet_NaN()),
                        t_wide = widened(t, pad, std::numeric_limits<S>::quiet_NaN());
  const mmkd::ConstMatrixRef<S> sv =
      strided ? mmkd::ConstMatrixRef<S>(s_wide.leftCols(c)) : mmkd::ConstMatrixRef<S>(s);
  const mmkd::ConstMatrixRef<S> tv =
      strided ? mmkd::ConstMatrixRef<S>(t_wide.leftCols(ct)) : mmkd::ConstMatrixRef<S>(t);
  if (strided && (sv.data() != s_wide.data() || tv.data() != t_wide.data()))
    die("a strided view was copied on binding");
  const auto reduction = mmkd::Reduction(r.pick(4));  // 3 is not a valid reduction
  mmkd::Matrix<S> ds = mmkd::Matrix<S>::Zero(n, c), dt = mmkd::Matrix<S>::Zero(nt, ct);
  Buffers b;
  b.add(ds);
  b.add(dt);
  switch (r.pick(3)) {
    case 0: {
      typename mmkd::LogitKD<S>::Options o;
      o.temperature = S(r.option(4));
      o.scale_by_t2 = r.flag();
      o.reduction = reduction;
      o.weight = S(r.option(1));
      const bool teacher_grad = r.flag();
      auto call = [&](const auto& s, const auto& t, mmkd::Matrix<S>& ds, mmkd::Matrix<S>& dt) {
        mmkd::LogitKD<S> kd(o);
        if (teacher_grad)
          return masked ? kd.value_and_grad(s, t, mask, ds, dt) : kd.value_and_grad(s, t, ds, dt);
        return masked ? kd.value_and_grad(s, t, mask, ds) : kd.value_and_grad(s, t, ds);
      };
      twin("LogitKD", b, call, sv, tv, s, t, ds, dt);
      break;
    }
    case 1: {
      typename mmkd::DecoupledKD<S>::Options o;
      o.alpha = S(r.option(1));
      o.beta = S(r.option(8));
      o.temperature = S(r.option(4));
      o.reduction = reduction;
      o.weight = S(r.option(1));
      auto call = [&](const auto& s, const auto& t, mmkd::Matrix<S>& ds, mmkd::Matrix<S>&) {
        mmkd::DecoupledKD<S> dkd(o);
        return masked ? dkd.value_and_grad(s, t, y, mask, ds) : dkd.value_and_grad(s, t, y, ds);
      };
      twin("DecoupledKD", b, call, sv, tv, s, t, ds, dt);
      break;
    }
    default: {
      typename mmkd::CrossEntropy<S>::Options o;
      o.label_smoothing = S(r.option(0.1));
      o.reduction = reduction;
      o.weight = S(r.option(1));
      if (r.flag()) o.class_weights = r.matrix<S>(r.byte() < 220 ? c : r.dim(6), 1);
      const int target = int(r.pick(2));  // hard labels, or the teacher matrix as soft targets
      auto call = [&](const auto& s, const auto& t, mmkd::Matrix<S>& ds, mmkd::Matrix<S>&) {
        mmkd::CrossEntropy<S> ce(o);
        if (target == 1)
          return masked ? ce.value_and_grad(s, t, mask, ds) : ce.value_and_grad(s, t, ds);
        return masked ? ce.value_and_grad(s, y, mask, ds) : ce.value_and_grad(s, y, ds);
      };
      twin("CrossEntropy", b, call, sv, tv, s, t, ds, dt);
    }
  }
}

}  // namespace

MMKD_FUZZ_ENTRY(run)
