#pragma once

// Row kernels of the token-level divergences (LogitDivergence) other than the forward KL, which
// is kl_row / kd_rows. Internal.

#include <cmath>
#include <limits>

#include "mmkd/detail/kl.hpp"

namespace mmkd {

/// The divergence between the teacher's distribution p = softmax(t/T) and the student's
/// q = softmax(s/T) that LogitDivergence computes per row.
enum class Divergence {
  ForwardKL,       //!< KL(p ‖ q), Hinton's KD
  ReverseKL,       //!< KL(q ‖ p)
  GeneralizedJSD,  //!< β·KL(p ‖ m) + (1−β)·KL(q ‖ m), m = β·p + (1−β)·q (TRL, GKD)
  SkewForwardKL,   //!< KL(p ‖ λ·p + (1−λ)·q) (DistiLLM)
  SkewReverseKL,   //!< KL(q ‖ λ·q + (1−λ)·p) (DistiLLM)
  TotalVariation   //!< ½ Σ |p − q|
};

namespace detail {

/// Scratch rows of one divergence row: the two distributions and their logs, and one more.
template <class T>
struct DivergenceBuffers {
  RowMap<T> q, p, lq, lp, lm;
};

/// w·d with w = 0 giving 0 whatever d is: a term w·log(...) of a divergence, where a probability
/// of exactly 0 (a −inf logit, or an exponential below the smallest normal number) adds nothing
/// even against a log of −inf. A binary functor, so that it vectorises (Eigen 3.4's `select`
/// does not).
template <class T>
struct ZeroTimes {
  T operator()(T w, T d) const { return w == T(0) ? T(0) : w * d; }
  template <class Packet>
  Packet packetOp(const Packet& w, const Packet& d) const {
    using namespace Eigen::internal;
    return pselect(pcmp_eq(w, pzero(w)), pzero(w), pmul(w, d));
  }
};

/// log(exp(x) + exp(y)) elementwise, −inf where both are −inf: hi + log1p(exp(lo − hi)).
template <class T>
struct LogAddExp {
  T operator()(T x, T y) const { return log_add_exp(x, y); }
  template <class Packet>
  Packet packetOp(const Packet& x, const Packet& y) const {
    using namespace Eigen::internal;
    const Packet hi = pmax(x, y), lo = pmin(x, y);
    const Packet r = padd(hi, plog1p(ExpShifted<T>().packetOp(psub(lo, hi))));  // NaN at −inf, −inf
    return pselect(pcmp_eq(hi, pset1<Packet>(-std::numeric_limits<T>::infinity())), hi, r);
  }
};

/// ½·sign(p − q) elementwise (0 where equal or NaN): vectorised, where Eigen 3.4's sign() is not.
template <class T>
struct HalfSignOfDifference {
  T operator()(T p, T q) const { return p > q ? T(0.5) : (p < q ? T(-0.5) : T(0)); }
  template <class Packet>
  Packet packetOp(const Packet& p, const Packet& q) const {
    using namespace Eigen::internal;
    const Packet h = pset1<Packet>(T(0.5));
    return psub(pand(pcmp_lt(q, p), h), pand(pcmp_lt(p, q), h));
  }
};

/// One row of a divergence other than ForwardKL, with a = s/T, b = t/T. Returns D; writes
/// c·∂D/∂a to ga and c·∂D/∂b to gb (each optional: nullptr), c = `scale`. `mix` is β
/// (GeneralizedJSD) or λ (the skew divergences).
///
/// Everything is formed in the log domain from the max-shifted logits: log q = (s − max s)/T −
/// log Σ, log m = logaddexp(log β + log p, log(1−β) + log q), and the products q·p/m, p²/m as
/// exp of sums of logs, so nothing is 0·∞ where a probability underflows. A class with logit −inf
/// has probability 0 and adds 0 (0·log 0 = 0); a class the other side rules out while this side
/// does not makes ReverseKL (and the skew forms at λ = 0) infinite, which the caller reports.
///
/// For f(q), ∂f/∂a = q ⊙ (g − Σ q g) with g = ∂f/∂q; likewise for b with p:
///
///     ReverseKL  ga = q ⊙ (log q − log p − D)
///                gb = p − q
///     JSD        ga = (1−β) q ⊙ (log q − log m − KL(q‖m))
///                gb = β p ⊙ (log p − log m − KL(p‖m))
///     SkewFwd    ga = −(1−λ) (qp/m − q Σ qp/m)
///                gb = p ⊙ (log p − log m − D) − λ (p²/m − p Σ p²/m)
///     SkewRev    the same with (q, a) and (p, b) exchanged
///     TV         ga = q ⊙ (g − Σ q g), g = −½ sign(p − q)
///                gb = p ⊙ (h − Σ p h), h = −g
template <class T, class S, class U>
T divergence_row(Divergence kind, T mix, const Eigen::ArrayBase<S>& s, const Eigen::ArrayBase<U>& t,
                 T inv_t, DivergenceBuffers<T>& b, RowMap<T>* ga, RowMap<T>* gb, T scale = T(1)) {
  const ShiftedExp<T> es = shifted_exp(s, inv_t, b.q);
  const ShiftedExp<T> et = shifted_exp(t, inv_t, b.p);
  if (!(es.sum > T(0)) || !(et.sum > T(0))) return std::numeric_limits<T>::quiet_NaN();
  b.q /= es.sum;
  b.p /= et.sum;
  if (kind != Divergence::TotalVariation) {  // TV needs no logs
    b.lq = (s - es.x_max) * inv_t - std::log(es.sum);
    b.lp = (t - et.x_max) * inv_t - std::log(et.sum);
  }
  const ExpShifted<T> ex;
  const ZeroTimes<T> times;  // 0 where the weight (a probability) is 0
  // log(α·x + (1−α)·y) from log x, log y; −inf where both are −inf.
  auto log_mix = [&](T alpha, const RowMap<T>& lx, const RowMap<T>& ly) {
    const T la = std::log(alpha), lb = std::log1p(-alpha);
    b.lm = (lx + la).binaryExpr(ly + lb, LogAddExp<T>());
  };
  // KL(x ‖ λ·x + (1−λ)·y) and its gradients gx, gy: SkewForwardKL with (x, y) = (p, q),
  // SkewReverseKL with (q, p).
  auto skew_kl = [&](const RowMap<T>& x, const RowMap<T>& lx, const RowMap<T>& y,
                     const RowMap<T>& ly, RowMap<T>* gx, RowMap<T>* gy) {
    log_mix(mix, lx, ly);  // m = λ x + (1−λ) y
    const T dv = x.binaryExpr(lx - b.lm, times).sum();
    // The weights λ and 1−λ go inside the exponentials: (1−λ)·x·y/m ≤ y and λ·x²/m ≤ x never
    // overflow, and λ = 0 gives 0 where x²/m alone would be +inf (p underflowed to 0). The
    // difference with log m first: it is exact where m is one side (λ = 0 or 1) and the logs
    // are large.
    if (gy) {
      *gy = ((ly - b.lm) + lx + std::log1p(-mix)).unaryExpr(ex);  // (1−λ) x y / m
      const T sum = gy->sum();
      *gy = (y * sum - *gy) * scale;
    }
    if (gx) {
      *gx = ((lx - b.lm) + lx + std::log(mix)).unaryExpr(ex);  // λ x² / m
      const T sum = gx->sum();
      *gx = (x.binaryExpr((lx - b.lm) - dv, times) - (*gx - x * sum)) * scale;
    }
    return dv;
  };
  T d = 0;
  switch (kind) {
    case Divergence::ReverseKL: {
      d = b.q.binaryExpr(b.lq - b.lp, times).sum();
      if (ga) *ga = b.q.binaryExpr((b.lq - b.lp) - d, times) * scale;
      if (gb) *gb = (b.p - b.q) * scale;
      break;
    }
    case Divergence::GeneralizedJSD: {
      log_mix(mix, b.lp, b.lq);  // m = β p + (1−β) q
      const T kp = b.p.binaryExpr(b.lp - b.lm, times).sum();
      const T kq = b.q.binaryExpr(b.lq - b.lm, times).sum();
      d = mix * kp + (T(1) - mix) * kq;
      if (ga) *ga = b.q.binaryExpr(((b.lq - b.lm) - kq) * ((T(1) - mix) * scale), times);
      if (gb) *gb = b.p.binaryExpr(((b.lp - b.lm) - kp) * (mix * scale), times);
      break;
    }
    case Divergence::SkewForwardKL:
      d = skew_kl(b.p, b.lp, b.q, b.lq, gb, ga);
      break;
    case Divergence::SkewReverseKL:
      d = skew_kl(b.q, b.lq, b.p, b.lp, ga, gb);
      break;
    case Divergence::TotalVariation: {
      b.lm = b.p.binaryExpr(b.q, HalfSignOfDifference<T>());  // h = ∂D/∂p; ∂D/∂q = −h
      d = (b.p - b.q).abs().sum() * T(0.5);
      if (ga) *ga = b.q * ((b.q * b.lm).sum() - b.lm) * scale;
      if (gb) *gb = b.p * (b.lm - (b.p * b.lm).sum()) * scale;
      break;
    }
    case Divergence::ForwardKL:  // kd_rows
      break;
  }
  return d;
}

/// Any divergence's row with the student's gradient only: returns D and writes
/// ga = c·∂D/∂a (a = s/T, c = `scale`). ForwardKL goes through kl_row (ga = q − p), the others
/// through divergence_row. `ga` must not alias s or t.
template <class T, class S, class U>
T divergence_row_student(Divergence kind, T mix, const Eigen::ArrayBase<S>& s,
                         const Eigen::ArrayBase<U>& t, T inv_t, DivergenceBuffers<T>& b,
                         RowMap<T>& ga, T scale = T(1)) {
  if (kind == Divergence::ForwardKL) {
    const KlRow<T> r = kl_row(s, t, inv_t, b.q, b.p);
    ga = b.q * (scale / r.s.sum) - b.p * (scale / r.t.sum);
    return r.value;
  }
  return divergence_row(kind, mix, s, t, inv_t, b, &ga, static_cast<RowMap<T>*>(nullptr), scale);
}

}  // namespace detail
}  // namespace mmkd

namespace Eigen {
namespace internal {
template <class T>
struct functor_traits<mmkd::detail::ZeroTimes<T>> {
  enum { Cost = 2 * NumTraits<T>::MulCost, PacketAccess = packet_traits<T>::HasCmp };
};
template <class T>
struct functor_traits<mmkd::detail::HalfSignOfDifference<T>> {
  enum { Cost = 3 * NumTraits<T>::AddCost, PacketAccess = packet_traits<T>::HasCmp };
};
template <class T>
struct functor_traits<mmkd::detail::LogAddExp<T>> {
  enum {
    Cost = 40 * NumTraits<T>::MulCost,
    PacketAccess = packet_traits<T>::HasExp && packet_traits<T>::HasLog1p
  };
};
}  // namespace internal
}  // namespace Eigen
