#include <mmkd/logit/cross_entropy.hpp>
#include <mmkd/logit/logit_kd.hpp>
#include <mmkd/multimodal/modality_weight_learner.hpp>

#include "support.hpp"

using namespace mmkd_test;

TEST_CASE("ModalityWeightLearner: seeded init, shapes, parameter gradients",
          "[multimodal][learner]") {
  mmkd::ModalityWeightLearner<double>::Options o;
  o.hidden = 7;
  o.use_saliency = true;
  o.onehot_modalities = 2;
  o.seed = 3;
  mmkd::ModalityWeightLearner<double> net(o), same(o);
  o.seed = 4;
  mmkd::ModalityWeightLearner<double> other(o);
  CHECK(net.feature_dim() == 4);
  CHECK(net.parameters()[0].value == same.parameters()[0].value);
  CHECK_FALSE(net.parameters()[0].value == other.parameters()[0].value);
  CHECK(std::string(net.parameters()[3].name) == "fc2.bias");
  // PyTorch Linear default: |fc1.weight| ≤ 1/sqrt(fan_in = 4).
  CHECK(net.parameters()[0].value.cwiseAbs().maxCoeff() <= 0.5);

  const Matrix<double> aux = random_matrix<double>(5, 2, 1).cwiseAbs(),
                       sal = random_matrix<double>(5, 2, 2).cwiseAbs();
  Matrix<double> feats;
  net.make_features(aux, sal, feats);
  CHECK(feats.rows() == 10);
  CHECK(feats(3, 0) == aux(1, 1));
  CHECK(feats(3, 1) == sal(1, 1));
  CHECK(feats(3, 3) == 1);
  CHECK_THROWS_WITH(net.forward(Matrix<double>::Ones(10, 3)),
                    "ModalityWeightLearner: features has 3 columns, expected 4 (feature_dim())");

  // L = Σ_k c_k w_k: check every parameter's gradient against finite differences, on these 10
  // rows and on 600 (the backward pass sums rows in chunks of 256).
  const Matrix<double> aux_big = random_matrix<double>(300, 2, 5).cwiseAbs(),
                       sal_big = random_matrix<double>(300, 2, 6).cwiseAbs();
  Matrix<double> feats_big;
  net.make_features(aux_big, sal_big, feats_big);
  for (const Matrix<double>* f : {&feats_big, &feats}) {
    const Matrix<double> coef = random_matrix<double>(f->rows(), 1, 9);
    for (std::size_t p = 0; p < 4; ++p) {
      auto loss = [&](const Matrix<double>& x) {
        auto view = net.parameters()[p].value;
        const Matrix<double> saved = view;
        view = x;
        const double v = (net.forward(*f).array() * coef.array()).sum();
        view = saved;
        return v;
      };
      net.zero_grad();
      net.forward(*f);
      net.backward(coef);
      const Matrix<double> x0 = net.parameters()[p].value;
      const Matrix<double> analytic = net.gradients()[p].value;
      const auto r = mmkd::check_gradient(loss, x0, analytic, tight());
      INFO(f->rows() << " rows, " << net.parameters()[p].name << ": " << r.message());
      CHECK(r.passed);
    }
  }
  // A NaN parameter is named, not blamed on the features.
  net.parameters()[0].value(2, 1) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(net.forward(feats), "ModalityWeightLearner: parameter fc1.weight[2,1] is NaN");
  net.parameters()[0].value(2, 1) = 0.1;
  const Matrix<double> before = net.gradients()[0].value;
  CHECK_THROWS_AS(net.backward(Matrix<double>::Ones(3, 1)), mmkd::InvalidArgument);
  CHECK(bit_identical(Matrix<double>(net.gradients()[0].value), before));
}

TEST_CASE("hypergradient_linear equals finite differences of the real look-ahead step",
          "[multimodal][learner][gradient]") {
  // A linear student z = W h. Train loss (1/B) Σ_{i,m} w_im T²·KL(teacher_im ‖ z_im); one SGD step
  // W' = W − η ∇_W L_train; meta loss = mean CE of W' on a held-out batch.
  const Index b = 3, m = 2, d = 4, c = 5, bv = 6;
  const double lr = 0.3, temp = 2;
  const Matrix<double> w0 = random_matrix<double>(c, d, 1);
  const Matrix<double> h = random_matrix<double>(b * m, d, 2);  // row k = i·M + m
  const Matrix<double> teacher = random_matrix<double>(b * m, c, 3, 2);
  const Matrix<double> hv = random_matrix<double>(bv, d, 4);
  const mmkd::Labels yv = random_labels(bv, c, 5);
  const Matrix<double> weights0 = random_matrix<double>(b * m, 1, 6).cwiseAbs();

  mmkd::LogitKD<double> kd({temp, true, mmkd::Reduction::Sum});  // T²·KL of one row, grad T(p−q)
  mmkd::CrossEntropy<double> ce;
  auto lookahead = [&](const Matrix<double>& weights) {
    Matrix<double> grad_w = Matrix<double>::Zero(c, d);
    for (Index k = 0; k < b * m; ++k) {
      const Matrix<double> z = h.row(k) * w0.transpose();
      Matrix<double> g = Matrix<double>::Zero(1, c);
      kd.value_and_grad(z, teacher.row(k), g);
      grad_w += weights(k, 0) / double(b) * g.transpose() * h.row(k);
    }
    return Matrix<double>(w0 - lr * grad_w);
  };
  auto meta_loss = [&](const Matrix<double>& weights) {
    const Matrix<double> w1 = lookahead(weights);
    return ce.value(hv * w1.transpose(), yv);
  };

  // Analytic: per-row logit gradients at W, meta-sample gradients at W'.
  Matrix<double> g(b * m, c);
  for (Index k = 0; k < b * m; ++k) {
    Matrix<double> gk = Matrix<double>::Zero(1, c);
    kd.value_and_grad(h.row(k) * w0.transpose(), teacher.row(k), gk);
    g.row(k) = gk;
  }
  const Matrix<double> zv = hv * lookahead(weights0).transpose();
  mmkd::CrossEntropy<double> ce_sum({0.0, mmkd::Reduction::Sum});
  Matrix<double> gv = Matrix<double>::Zero(bv, c);
  ce_sum.value_and_grad(zv, yv, gv);  // per-sample dCE_j/dz (L_meta = their mean)
  Matrix<double> hyper = Matrix<double>::Zero(b * m, 1);
  mmkd::ModalityWeightLearner<double>::hypergradient_linear(g, h, gv, hv, lr, b, hyper);

  const auto r = mmkd::check_gradient(meta_loss, weights0, hyper, tight());
  INFO(r.message());
  CHECK(r.passed);

  // The general form with the dot products written out gives the same.
  Matrix<double> dots(b * m, 1);
  const Matrix<double> meta_grad_w = gv.transpose() * hv / double(bv);
  for (Index k = 0; k < b * m; ++k) {
    dots(k, 0) = (meta_grad_w.array() * (g.row(k).transpose() * h.row(k)).array()).sum();
  }
  Matrix<double> hyper2 = Matrix<double>::Zero(b * m, 1);
  mmkd::ModalityWeightLearner<double>::hypergradient(dots, lr, b, hyper2);
  CHECK(hyper2.isApprox(hyper, 1e-12));
}

TEST_CASE("A copied ModalityWeightLearner has its own parameters and forward cache",
          "[multimodal][learner]") {
  mmkd::ModalityWeightLearner<double>::Options o;
  o.hidden = 5;
  mmkd::ModalityWeightLearner<double> net(o), reference(o);
  const Matrix<double> feats = random_matrix<double>(6, net.feature_dim(), 1).cwiseAbs(),
                       other = random_matrix<double>(6, net.feature_dim(), 2).cwiseAbs(),
                       dw = random_matrix<double>(6, 1, 3);
  net.forward(feats);
  reference.forward(feats);
  mmkd::ModalityWeightLearner<double> copy(net);
  net.parameters()[0].value.setConstant(7);
  net.forward(other);  // the original's next forward must not reach the copy's cache
  copy.backward(dw);
  reference.backward(dw);
  for (std::size_t p = 0; p < 4; ++p) {
    CHECK(bit_identical(Matrix<double>(copy.parameters()[p].value),
                        Matrix<double>(reference.parameters()[p].value)));
    CHECK(bit_identical(Matrix<double>(copy.gradients()[p].value),
                        Matrix<double>(reference.gradients()[p].value)));
  }
}
