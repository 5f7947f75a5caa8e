#include "alloc/alloc_support.hpp"

#include <mmkd/core/loss_sum.hpp>
#include <mmkd/logit/cross_entropy.hpp>
#include <mmkd/logit/decoupled_kd.hpp>
#include <mmkd/logit/fused_linear_kd.hpp>
#include <mmkd/logit/logit_divergence.hpp>
#include <mmkd/logit/logit_kd.hpp>
#include <mmkd/logit/sparse_logit_kd.hpp>

using namespace mmkd_test;

TEMPLATE_TEST_CASE("logit losses allocate nothing in steady state", "[logit][alloc]", float,
                   double) {
  using T = TestType;
  const Matrix<T> s = random_matrix<T>(64, 100, 1), t = random_matrix<T>(64, 100, 2);
  const mmkd::Labels y = random_labels(64, 100, 3);
  mmkd::RowMask mask = mmkd::RowMask::Ones(64);
  mask(5) = 0;
  Matrix<T> ds = Matrix<T>::Zero(64, 100), dt = Matrix<T>::Zero(64, 100);
  mmkd::LogitKD<T> kd;
  mmkd::DecoupledKD<T> dkd;
  mmkd::CrossEntropy<T> ce, ce_weighted;
  ce_weighted.options().class_weights = random_matrix<T>(100, 1, 4).cwiseAbs();
  ce_weighted.options().label_smoothing = T(0.1);
  const Matrix<T> soft = t.cwiseAbs();
  std::vector<mmkd::LogitDivergence<T>> divergences;
  for (int k = 0; k < 6; ++k) {
    typename mmkd::LogitDivergence<T>::Options o;
    o.divergence = static_cast<mmkd::Divergence>(k);
    divergences.emplace_back(o);
  }
  // a top-8 teacher: the first 8 classes of each row, with mass 0.8
  mmkd::IndexMatrix idx(64, 8);
  for (Index i = 0; i < 64; ++i)
    for (Index j = 0; j < 8; ++j) idx(i, j) = int((i + 3 * j) % 100);
  const Matrix<T> lp = Matrix<T>::Constant(64, 8, std::log(T(0.1)));
  mmkd::SparseLogitKD<T> sparse_tail, sparse_ren({mmkd::SparseSupport::Renormalized});
  // a fused head: 64 tokens, d = 16, the 100 classes, in chunks of 24 rows
  const Matrix<T> h = random_matrix<T>(64, 16, 5), w = random_matrix<T>(100, 16, 6),
                  ht = random_matrix<T>(64, 8, 7), wt = random_matrix<T>(100, 8, 8);
  const mmkd::Vector<T> b = random_matrix<T>(100, 1, 9);
  Matrix<T> dh = Matrix<T>::Zero(64, 16), dw = Matrix<T>::Zero(100, 16);
  mmkd::Vector<T> db = mmkd::Vector<T>::Zero(100);
  typename mmkd::FusedLinearKD<T>::Options fo;
  fo.chunk_rows = 24;
  fo.hard_weight = T(0.5);
  fo.divergence.divergence = mmkd::Divergence::GeneralizedJSD;
  mmkd::FusedLinearKD<T> fused(fo);
  // bfloat16 storage of the logits and of the gradients
  const Matrix<mmkd::bfloat16> s16 = s.template cast<mmkd::bfloat16>(),
                               t16 = t.template cast<mmkd::bfloat16>();
  Matrix<mmkd::bfloat16> ds16 = Matrix<mmkd::bfloat16>::Zero(64, 100), dt16 = ds16;
  const Matrix<mmkd::bfloat16> h16 = h.template cast<mmkd::bfloat16>(),
                               w16 = w.template cast<mmkd::bfloat16>(),
                               ht16 = ht.template cast<mmkd::bfloat16>(),
                               wt16 = wt.template cast<mmkd::bfloat16>();
  Matrix<mmkd::bfloat16> dh16 = dh.template cast<mmkd::bfloat16>(),
                         dw16 = dw.template cast<mmkd::bfloat16>();
  mmkd::LossSum<T> total;  // its terms' calls, by name, add no allocation of their own
  total.add("kd", T(0.9), kd, [&](auto& l) { return l.value_and_grad(s, t, ds); });
  total.add("ce", T(0.1), ce, [&](auto& l) { return l.value_and_grad(s, y, ds); });
  for (int warm = 0; warm < 2; ++warm) {
    std::unique_ptr<NoMalloc> guard;
    if (warm == 1) guard = std::make_unique<NoMalloc>();
    CHECK_NOTHROW(kd.value_and_grad(s, t, mask, ds, dt));
    CHECK_NOTHROW(kd.value(s, t));
    CHECK_NOTHROW(dkd.value_and_grad(s, t, y, mask, ds));
    CHECK_NOTHROW(dkd.value(s, t, y));
    CHECK_NOTHROW(ce.value_and_grad(s, y, ds));
    CHECK_NOTHROW(ce.value(s, y, mask));
    CHECK_NOTHROW(ce.value_and_grad(s, soft, mask, ds));
    CHECK_NOTHROW(ce_weighted.value_and_grad(s, y, ds));
    CHECK_NOTHROW(ce_weighted.value_and_grad(s, soft, ds));
    for (auto& d : divergences) {
      CHECK_NOTHROW(d.value_and_grad(s, t, mask, ds, dt));
      CHECK_NOTHROW(d.value_and_grad(s, t, ds));
      CHECK_NOTHROW(d.value(s, t));
    }
    for (auto* sp : {&sparse_tail, &sparse_ren}) {
      CHECK_NOTHROW(sp->value_and_grad(s, idx, lp, mask, ds));
      CHECK_NOTHROW(sp->value(s, idx, lp));
    }
    CHECK_NOTHROW(fused.value_and_grad(h, w, ht, wt, y, dh, dw));
    CHECK_NOTHROW(fused.value_and_grad(h, w, ht, wt, y, b, b, dh, dw, db));
    CHECK_NOTHROW(fused.value_and_grad(h, w, t, y, dh, dw));
    CHECK_NOTHROW(fused.value(h, w, t, y, b));
    CHECK_NOTHROW(kd.value_and_grad(s16, t16, mask, ds16, dt16));
    CHECK_NOTHROW(kd.value_and_grad(s16, t16, ds));
    CHECK_NOTHROW(ce.value_and_grad(s16, y, mask, ds16));
    CHECK_NOTHROW(divergences[2].value_and_grad(s16, t16, ds16));
    CHECK_NOTHROW(divergences[0].value(s16, t16));
    CHECK_NOTHROW(fused.value_and_grad(h16, w16, ht16, wt16, y, dh16, dw16));
    CHECK_NOTHROW(fused.value_and_grad(h16, w16, t16, y, dh, dw));
    CHECK_NOTHROW(total.value_and_grad());
    CHECK_NOTHROW(total.value("kd"));
  }
}
