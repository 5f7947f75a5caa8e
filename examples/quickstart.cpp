// mmkd quickstart: each loss in a few lines, on a toy batch, with its gradient checked against
// finite differences by mmkd's public gradient checker.

#include <mmkd/mmkd.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  const mmkd::Index n = 4, c = 5;  // 4 samples, 5 classes
  mmkd::SplitMix64 rng(42);
  mmkd::Matrix<double> student(n, c), teacher(n, c);
  for (mmkd::Index k = 0; k < student.size(); ++k) {
    student.data()[k] = 2 * rng.normal();
    teacher.data()[k] = 2 * rng.normal();
  }
  mmkd::Labels labels(n);
  labels << 0, 3, 1, 4;

  std::printf("mmkd %s quickstart: N = %ld samples, C = %ld classes\n\n", mmkd::version_string,
              long(n), long(c));

  // The protocol: value() is forward only; value_and_grad() returns the same value and ADDS the
  // gradient to the buffer, so several terms on the same logits share one buffer.
  mmkd::Matrix<double> grad = mmkd::Matrix<double>::Zero(n, c);

  mmkd::LogitKD<double> kd({/*temperature=*/4.0});
  const double l_kd = kd.value_and_grad(student, teacher, grad);

  mmkd::DecoupledKD<double> dkd;  // alpha 1, beta 8, T 4
  dkd.options().beta = 2.0;
  const double l_dkd = dkd.value_and_grad(student, teacher, labels, grad);

  mmkd::CrossEntropy<double> ce({/*label_smoothing=*/0.1});
  const double l_ce = ce.value_and_grad(student, labels, grad);

  std::printf("  %-13s %10.6f   T^2 * KL(teacher || student), batch mean\n", "LogitKD", l_kd);
  std::printf("  %-13s %10.6f   alpha * TCKD + beta * NCKD\n", "DecoupledKD", l_dkd);
  std::printf("  %-13s %10.6f   hard labels, smoothing 0.1\n", "CrossEntropy", l_ce);
  std::printf("  %-13s %10.6f\n\n", "total", l_kd + l_dkd + l_ce);

  // Token-level use: rows = batch x positions, mask = 0 at padding; the mean is over real tokens.
  mmkd::RowMask mask(n);
  mask << 1, 1, 1, 0;
  std::printf("  LogitKD over 3 unmasked rows: %.6f\n", kd.value(student, teacher, mask));
  // The divergences of LLM distillation, e.g. TRL's generalized JSD (beta 0.5, T 1).
  mmkd::LogitDivergence<double>::Options jo;
  jo.divergence = mmkd::Divergence::GeneralizedJSD;
  mmkd::LogitDivergence<double> jsd(jo);
  std::printf("  generalized JSD over the same rows: %.6f\n", jsd.value(student, teacher, mask));
  // The same logits stored in bfloat16, as a language model emits them; computed in float.
  const mmkd::Matrix<mmkd::bfloat16> student16 = student.cast<mmkd::bfloat16>(),
                                     teacher16 = teacher.cast<mmkd::bfloat16>();
  mmkd::LogitDivergence<float>::Options jo16;
  jo16.divergence = mmkd::Divergence::GeneralizedJSD;
  mmkd::LogitDivergence<float> jsd16(jo16);
  std::printf("  the same on bfloat16 logits: %.6f\n",
              double(jsd16.value(student16, teacher16, mask)));
  // A teacher kept as its top-2 per row (a logit cache): classes and log-probabilities.
  mmkd::IndexMatrix top(n, 2);
  mmkd::Matrix<double> top_logprobs(n, 2);
  for (mmkd::Index i = 0; i < n; ++i) {
    const double lse = std::log((teacher.row(i).array() - teacher.row(i).maxCoeff()).exp().sum()) +
                       teacher.row(i).maxCoeff();
    mmkd::Index first = 0, second = 0;
    teacher.row(i).maxCoeff(&first);
    double best = -1e300;
    for (mmkd::Index j = 0; j < c; ++j)
      if (j != first && teacher(i, j) > best) best = teacher(i, second = j);
    top(i, 0) = int(first);
    top(i, 1) = int(second);
    top_logprobs(i, 0) = teacher(i, first) - lse;
    top_logprobs(i, 1) = teacher(i, second) - lse;
  }
  mmkd::SparseLogitKD<double> sparse;  // KL over the top-2 plus a bucket for the rest
  std::printf("  top-2 teacher KL over the same rows: %.6f\n",
              sparse.value(student, top, top_logprobs, mask));
  // The output head fused with the KL: the student's logits are hidden · head^T (d = 3), formed
  // two rows at a time and never stored whole; the teacher's logits are given.
  mmkd::Matrix<double> hidden(n, 3), head(c, 3);
  for (mmkd::Index k = 0; k < hidden.size(); ++k) hidden.data()[k] = rng.normal();
  for (mmkd::Index k = 0; k < head.size(); ++k) head.data()[k] = rng.normal();
  mmkd::Labels token_labels = labels;
  token_labels(3) = -100;  // the padding row
  mmkd::FusedLinearKD<double>::Options fo;
  fo.chunk_rows = 2;
  mmkd::FusedLinearKD<double> fused(fo);
  std::printf("  fused head + KL over the same rows: %.6f\n\n",
              fused.value(hidden, head, teacher, token_labels));

  // Check the summed gradient against central differences.
  auto total = [&](const mmkd::Matrix<double>& s) {
    return kd.value(s, teacher) + dkd.value(s, teacher, labels) + ce.value(s, labels);
  };
  const mmkd::GradcheckReport report = mmkd::check_gradient(total, student, grad);
  std::printf("  %s\n\n", report.message().c_str());

  // Multimodal: M = 2 modalities. Logits with only modality m kept form an M x N x C stack
  // (modality-major, like a contiguous [M, N, C] tensor); embeddings an M x N x D stack.
  const mmkd::Index m = 2, d = 8;
  mmkd::Tensor3<double> student_modal(m, n, c), teacher_modal(m, n, c);
  mmkd::Tensor3<double> student_emb(m, n, d), teacher_emb(m, n, 16);  // widths may differ
  for (auto* t : {&student_modal, &teacher_modal, &student_emb, &teacher_emb}) {
    for (mmkd::Index k = 0; k < t->size(); ++k) t->data()[k] = 2 * rng.normal();
  }
  mmkd::PresenceMask present = mmkd::PresenceMask::Ones(n, m);
  present(2, 1) = 0;  // sample 2 lacks modality 1: its term is dropped, its gradient is zero

  // MSD: saliency of each modality from the teacher, instance-wise weights, then the loss.
  mmkd::ModalitySaliency<double> saliency;    // removal KL
  mmkd::ModalityWeighting<double> weighting;  // instance-wise, mean one
  const mmkd::Matrix<double>& w =
      weighting.compute(saliency.compute(teacher, teacher_modal, present), present);
  mmkd::ModalitySpecificKD<double> msd;
  mmkd::Matrix<double> d_full = mmkd::Matrix<double>::Zero(n, c);
  mmkd::Tensor3<double> d_modal(m, n, c);
  d_modal.setZero();
  const double l_msd = msd.value_and_grad(student, teacher, student_modal, teacher_modal, w,
                                          present, d_full, d_modal);

  // Gram relation: the M x M cosine Gram of each sample's modality embeddings.
  mmkd::ModalityGramKD<double> gram;
  mmkd::Tensor3<double> d_emb(m, n, d);
  d_emb.setZero();
  const double l_gram = gram.value_and_grad(student_emb, teacher_emb, present, d_emb);

  std::printf("  %-18s %10.6f   beta * KD(full) + (1/N) sum_i,m w_im KD_i^m\n",
              "ModalitySpecificKD", l_msd);
  std::printf("  %-18s %10.6f   MSE of per-sample modality Gram matrices\n", "ModalityGramKD",
              l_gram);
  std::printf("  instance weights of sample 0: %.3f %.3f (sample 2: %.3f %.3f)\n\n", w(0, 0),
              w(0, 1), w(2, 0), w(2, 1));

  // Cross-modal contrastive and dimensional-structure losses on N x D embeddings.
  mmkd::Matrix<double> s_emb(n, d), t_emb(n, d);
  for (mmkd::Index k = 0; k < s_emb.size(); ++k) {
    s_emb.data()[k] = rng.normal();
    t_emb.data()[k] = rng.normal();
  }
  mmkd::Matrix<double> d_s_emb = mmkd::Matrix<double>::Zero(n, d);
  mmkd::InfoNCE<double> nce;  // CLIP loss, tau = 0.07
  const double l_nce = nce.value_and_grad(s_emb, t_emb, d_s_emb);
  mmkd::EmbeddingQueue<double> queue(16, d);  // past teacher embeddings
  queue.push(t_emb);
  mmkd::SimilarityDistillation<double> cmd;
  const double l_cmd = cmd.value_and_grad(s_emb, t_emb, queue, d_s_emb);
  mmkd::ChannelDecorrelation<double> decor;
  const double l_decor = decor.value_and_grad(s_emb, d_s_emb);
  mmkd::Uniformity<double> unif;
  const double l_unif = unif.value_and_grad(s_emb, d_s_emb);
  std::printf("  %-22s %10.6f   symmetric InfoNCE (CLIP), student queries vs teacher keys\n",
              "InfoNCE", l_nce);
  std::printf("  %-22s %10.6f   SEED soft cross-entropy over [teacher batch; queue]\n",
              "SimilarityDistillation", l_cmd);
  std::printf("  %-22s %10.6f   mean squared off-diagonal channel correlation\n",
              "ChannelDecorrelation", l_decor);
  std::printf("  %-22s %10.6f   log mean exp(-2 |u_i - u_j|^2), in [-8, 0]\n\n", "Uniformity",
              l_unif);

  // ReviewKD: the student's stage features (shallow -> deep) fused deep-to-shallow by attention
  // (ReviewFusion), compared with the teacher's features by the hierarchical context loss.
  {
    const std::vector<mmkd::Index> channels = {8, 16, 16}, sizes = {8, 4, 1};
    mmkd::ReviewFusion<double>::Options o;
    o.in_channels = o.out_channels = channels;
    o.shapes = sizes;
    o.mid_channels = 16;
    o.seed = 1;
    mmkd::ReviewFusion<double> review(o);
    std::vector<mmkd::Tensor4<double>> fs, ft, d_out, d_feat;
    for (std::size_t k = 0; k < channels.size(); ++k) {
      for (auto* v : {&fs, &ft, &d_out, &d_feat})
        v->emplace_back(4, channels[k], sizes[k], sizes[k]);
      for (mmkd::Index e = 0; e < fs[k].size(); ++e) {
        fs[k].data()[e] = rng.normal();
        ft[k].data()[e] = rng.normal();
      }
      d_out[k].setZero();
      d_feat[k].setZero();
    }
    mmkd::HierarchicalContextLoss<double> hcl;
    const auto& outs = review.forward({fs.begin(), fs.end()});
    const double l_hcl =
        hcl.value_and_grad(outs, {ft.begin(), ft.end()}, {d_out.begin(), d_out.end()});
    review.backward({d_out.begin(), d_out.end()}, {d_feat.begin(), d_feat.end()});
    std::printf("  %-22s %10.6f   sum over stages of (MSE + pooled 4/2/1 MSEs) / total weight\n",
                "ReviewFusion + HCL", l_hcl);
    std::printf("  %zu parameter tensors, e.g. %s; gradients added to every feature\n\n",
                review.parameters().size(), review.parameters().front().name);
  }

  // Bad input is an exception that names the argument; nothing is written.
  try {
    mmkd::Matrix<double> wrong(n, c + 1);
    kd.value(student, wrong);
  } catch (const mmkd::InvalidArgument& e) {
    std::printf("  caught: %s\n", e.what());
  }
  return report.passed ? 0 : 1;
}
