#pragma once

// Every mmkd loss written independently with libtorch ops (differentiated by libtorch's
// autograd): the references of the cross-checks and of the bridge test.

#include <torch/torch.h>

#include <mmkd/core/reduction.hpp>
#include <mmkd/detail/divergence.hpp>
#include <mmkd/structure/channel_decorrelation.hpp>

namespace torch_ref {

namespace F = torch::nn::functional;

// The token-level divergences per row, written with libtorch ops from their references: TRL's
// generalized_jsd_loss (log-mixture by logsumexp of the log-probabilities plus log β, log(1−β);
// kl_div with log_target), DistiLLM's skewed KLs (mixture of probabilities), total variation.
inline torch::Tensor torch_divergence_rows(mmkd::Divergence kind, double mix,
                                           const torch::Tensor& s, const torch::Tensor& t,
                                           double temp) {
  const auto lq = torch::log_softmax(s / temp, 1), lp = torch::log_softmax(t / temp, 1);
  auto kl = [](const torch::Tensor& lx, const torch::Tensor& ly) {  // KL(x ‖ y) per row
    return F::kl_div(ly, lx, F::KLDivFuncOptions().reduction(torch::kNone).log_target(true)).sum(1);
  };
  switch (kind) {
    case mmkd::Divergence::ForwardKL:
      return kl(lp, lq);
    case mmkd::Divergence::ReverseKL:
      return kl(lq, lp);
    case mmkd::Divergence::GeneralizedJSD: {
      const auto lm =
          torch::logsumexp(torch::stack({lq + std::log(1 - mix), lp + std::log(mix)}), 0);
      return mix * kl(lp, lm) + (1 - mix) * kl(lq, lm);
    }
    case mmkd::Divergence::SkewForwardKL:
      return kl(lp, torch::log(mix * lp.exp() + (1 - mix) * lq.exp()));
    case mmkd::Divergence::SkewReverseKL:
      return kl(lq, torch::log(mix * lq.exp() + (1 - mix) * lp.exp()));
    case mmkd::Divergence::TotalVariation:
      return 0.5 * (lp.exp() - lq.exp()).abs().sum(1);
  }
  return {};
}

/// TRL's top-k forward KL per row (its DistillationTrainer's sparse-teacher path, β = 0): the
/// student's full log-softmax gathered at the teacher's indices, then either a tail bucket
/// log(1 − Σ exp) appended to both sides (log-mass clamped at −1e-7, as TRL) or both sides
/// renormalised by their log-sum-exp; per bucket p·(log p − log q), NaN (0·(−inf − x)) → 0.
inline torch::Tensor torch_sparse_kd_rows(const torch::Tensor& s, const torch::Tensor& idx,
                                          const torch::Tensor& teacher_logprobs, double temp,
                                          bool tail_bucket) {
  auto lq = torch::log_softmax(s / temp, 1).gather(1, idx);
  auto lp = teacher_logprobs;
  if (tail_bucket) {
    auto add_tail = [](const torch::Tensor& l) {
      const auto log_mass = torch::logsumexp(l, 1, true).clamp_max(-1e-7);
      return torch::cat({l, torch::log(-torch::expm1(log_mass))}, 1);
    };
    lq = add_tail(lq);
    lp = add_tail(lp);
  } else {
    lq = lq - torch::logsumexp(lq, 1, true);
    lp = lp - torch::logsumexp(lp, 1, true);
  }
  return torch::nan_to_num(lp.exp() * (lp - lq), 0.0).sum(1);
}

/// mdistiller kd_loss with a row mask: T² · Σ_i m_i Σ_k kl_div, divided per the reduction.
inline torch::Tensor torch_kd(const torch::Tensor& s, const torch::Tensor& t, double temp,
                              mmkd::Reduction red, const torch::Tensor& row_mask) {
  const auto pointwise = F::kl_div(torch::log_softmax(s / temp, 1), torch::softmax(t / temp, 1),
                                   F::KLDivFuncOptions().reduction(torch::kNone));
  const auto per_row = pointwise.sum(1) * row_mask;
  auto total = per_row.sum() * temp * temp;
  if (red == mmkd::Reduction::BatchMean) total = total / row_mask.sum();
  if (red == mmkd::Reduction::Mean) total = total / (row_mask.sum() * s.size(1));
  return total;
}

/// mdistiller dkd_loss, written out: binary target/other probabilities with plain logs, and the
/// −1000·mask trick for the non-target softmax.
inline torch::Tensor torch_dkd(const torch::Tensor& s, const torch::Tensor& t,
                               const torch::Tensor& y, double alpha, double beta, double temp) {
  const auto n = double(s.size(0));
  const auto gt = F::one_hot(y, s.size(1)).to(s.scalar_type());
  const auto other = 1 - gt;
  const auto ps = torch::softmax(s / temp, 1), pt = torch::softmax(t / temp, 1);
  const auto bs = torch::stack({(ps * gt).sum(1), (ps * other).sum(1)}, 1);
  const auto bt = torch::stack({(pt * gt).sum(1), (pt * other).sum(1)}, 1);
  const auto tckd =
      F::kl_div(torch::log(bs), bt, F::KLDivFuncOptions().reduction(torch::kSum)) * temp * temp / n;
  const auto qt2 = torch::softmax(t / temp - 1000.0 * gt, 1);
  const auto ls2 = torch::log_softmax(s / temp - 1000.0 * gt, 1);
  const auto nckd =
      F::kl_div(ls2, qt2, F::KLDivFuncOptions().reduction(torch::kSum)) * temp * temp / n;
  return alpha * tckd + beta * nckd;
}

/// Per-row T²·KL(softmax(t/T) ‖ softmax(s/T)) along the last dimension.
inline torch::Tensor kd_rows(const torch::Tensor& s, const torch::Tensor& t, double temp) {
  return F::kl_div(torch::log_softmax(s / temp, -1), torch::softmax(t / temp, -1),
                   F::KLDivFuncOptions().reduction(torch::kNone))
             .sum(-1) *
         (temp * temp);
}

/// MSD: (β Σ_i KD_i(s, t) + Σ_{i,m} w_im KD_i(s^m, t^m)) / N; stacks M x N x C, weights N x M.
inline torch::Tensor torch_msd(const torch::Tensor& s, const torch::Tensor& t,
                               const torch::Tensor& sm, const torch::Tensor& tm,
                               const torch::Tensor& w, double temp, double beta) {
  const auto aux = kd_rows(sm, tm, temp).transpose(0, 1);  // N x M
  return (beta * kd_rows(s, t, temp).sum() + (w * aux).sum()) / double(s.size(0));
}

/// Modality Gram KD, cosine rows, per sample, every modality present: stacks M x N x D.
inline torch::Tensor torch_gram(const torch::Tensor& s, const torch::Tensor& t) {
  auto gram = [](const torch::Tensor& f) {
    const auto x = F::normalize(f.permute({1, 0, 2}), F::NormalizeFuncOptions().dim(2).eps(1e-12));
    return torch::bmm(x, x.transpose(1, 2));  // N x M x M
  };
  return (gram(s) - gram(t)).pow(2).mean();
}

/// Channel decorrelation: mean squared off-diagonal of the batch statistic (minus the teacher's
/// when given).
inline torch::Tensor torch_decorrelation(const torch::Tensor& z, mmkd::ChannelStatistic stat,
                                         const torch::Tensor& teacher = torch::Tensor()) {
  auto statistic = [&](const torch::Tensor& x) {
    auto h = x - x.mean(0, true);
    if (stat == mmkd::ChannelStatistic::Correlation) h = h / (h.pow(2).mean(0, true) + 1e-5).sqrt();
    return torch::mm(h.t(), h) / double(x.size(0));
  };
  auto diff = statistic(z);
  if (teacher.defined()) diff = diff - statistic(teacher);
  const int64_t c = z.size(1);
  const auto off = 1 - torch::eye(c, z.options().requires_grad(false));
  return (diff * off).pow(2).sum() / double(std::max<int64_t>(c * (c - 1), 1));
}

/// Wang & Isola's uniformity: log mean exp(−2‖u_i − u_j‖²) over pairs of normalised rows.
inline torch::Tensor torch_uniformity(const torch::Tensor& x) {
  const auto u = F::normalize(x, F::NormalizeFuncOptions().dim(1));
  return torch::pdist(u).pow(2).mul(-2.0).exp().mean().log();
}

/// open_clip's ClipLoss (symmetric) or one-directional InfoNCE; the positive of query i is key
/// i + offset.
inline torch::Tensor torch_clip(const torch::Tensor& q, const torch::Tensor& k, double temp,
                                bool symmetric, int64_t offset) {
  const int64_t n = q.size(0);
  const auto u = F::normalize(q, F::NormalizeFuncOptions().dim(1));
  const auto v = F::normalize(k, F::NormalizeFuncOptions().dim(1));
  const auto logits = torch::mm(u, v.t()) / temp;
  auto loss = F::cross_entropy(logits, torch::arange(n, torch::kLong) + offset);
  if (symmetric) {
    const auto cols = logits.narrow(1, offset, n).t();  // key → query for the positive keys
    loss = 0.5 * (loss + F::cross_entropy(cols, torch::arange(n, torch::kLong)));
  }
  return loss;
}

/// SEED as its code runs (jacobswan1/SEED, `SEED.forward`, `_dequeue_and_enqueue`,
/// `soft_cross_entropy`): normalised embeddings, the queue stored as D x K columns, sample i
/// scored against [its own teacher embedding; the queue], the teacher softmax at tau_t, the
/// student log-softmax at tau_s, the sum divided by N, then the teacher batch enqueued at a
/// moving pointer.
struct TorchSeed {
  torch::Tensor queue;  // D x K, unit columns
  std::int64_t ptr = 0;
  double tau_s, tau_t;

  torch::Tensor loss(const torch::Tensor& s, const torch::Tensor& t) const {
    const auto s_emb = F::normalize(s, F::NormalizeFuncOptions().dim(1));
    const auto t_emb = F::normalize(t, F::NormalizeFuncOptions().dim(1)).detach();
    auto logit_stu = torch::cat({(s_emb * t_emb).sum(1, true), torch::mm(s_emb, queue)}, 1);
    auto logit_tea = torch::cat({(t_emb * t_emb).sum(1, true), torch::mm(t_emb, queue)}, 1);
    logit_stu = logit_stu / tau_s;
    const auto target = torch::softmax(logit_tea / tau_t, 1);
    return -(target * torch::log_softmax(logit_stu, 1)).sum() / double(s.size(0));
  }
  /// The loss of one training step, then the teacher batch enqueued.
  torch::Tensor step(const torch::Tensor& s, const torch::Tensor& t) {
    const auto l = loss(s, t);
    const auto t_emb = F::normalize(t, F::NormalizeFuncOptions().dim(1)).detach();
    const std::int64_t bs = t_emb.size(0);
    queue = queue.clone();  // SEED writes in place; the loss's graph keeps the old queue
    queue.narrow(1, ptr, bs).copy_(t_emb.t());
    ptr = (ptr + bs) % queue.size(1);
    return l;
  }
};

/// The batch-dictionary reading: every sample against [all teacher embeddings; queue].
inline torch::Tensor torch_seed_batch(const torch::Tensor& s, const torch::Tensor& t,
                                      const torch::Tensor& queue, double tau_s, double tau_t) {
  const auto dict = F::normalize(torch::cat({t, queue}), F::NormalizeFuncOptions().dim(1));
  const auto u = F::normalize(s, F::NormalizeFuncOptions().dim(1));
  const auto vt = F::normalize(t, F::NormalizeFuncOptions().dim(1));
  const auto target = torch::softmax(torch::mm(vt, dict.t()) / tau_t, 1);
  return -(target * torch::log_softmax(torch::mm(u, dict.t()) / tau_s, 1)).sum() /
         double(s.size(0));
}

/// SEED's loss for one batch against a fixed queue (K x D rows), without enqueueing.
inline torch::Tensor torch_seed(const torch::Tensor& s, const torch::Tensor& t,
                                const torch::Tensor& queue, double tau_s, double tau_t) {
  const TorchSeed ref{F::normalize(queue, F::NormalizeFuncOptions().dim(1)).t(), 0, tau_s, tau_t};
  return ref.loss(s, t);
}

}  // namespace torch_ref
