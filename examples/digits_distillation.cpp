// mmkd end-to-end demo: every distillation loss of the library trains a real student on real
// data, with all gradients from mmkd and the example's own small MLP / CNN layers.
//
// Data: the UCI handwritten digits (examples/data/README.md): 1797 grey images of 8x8 pixels,
// 10 classes, scaled to [0, 1]. A fixed seeded split: 1297 training and 500 test images.
//
// Modalities cut from each image:
//   * top half (rows 0-3) and bottom half (rows 4-7): the two modalities of the MULTIMODAL
//     setting. Models see both halves as one 64-pixel input; "only modality m" is the image with
//     the other half blanked (zeros), which is how MSD takes a modality away.
//   * a "hard" modality: the image averaged over 2x2 blocks to 4x4, plus fixed Gaussian noise
//     (σ = 0.15 of the pixel range, drawn once per image): the low-quality input of the
//     CROSS-MODAL setting, whose teacher sees the clean 8x8 image.
//
// Protocol, the label-scarce paired-data setting of cross-modal distillation: each teacher
// learns from all 1297 training labels of its input; each student sees the labels of only 100
// training images (10 per class, drawn per seed) and all 1297 training images of its own input
// without labels, paired with the teacher's input. Every step draws 32 labelled and 96
// unlabelled images; cross-entropy acts on the labelled ones, the distillation terms on all 128.
// Without unlabelled pairs a teacher trained on the same 100 images would only echo the labels.
//
// Teachers: an MLP 64-128-10 on both halves, trained with random modality dropout so that its
// one-half predictions (MSD's saliency and modality-specific targets) are meaningful; an MLP
// 64-128-10 on the clean image; a CNN with two conv3x3-BN-ReLU stages (16, 32 channels) on the
// clean image. Students: MLP 64-32-10 on both halves; MLP 16-32-10 on the hard modality (plus a
// linear 32 -> 128 projection for the contrastive losses); a CNN (8, 16 channels) on the hard
// modality. Methods, each from the same seeds:
//   multimodal:  CE only; + LogitKD; + DecoupledKD (target class: the label, or the teacher's
//                prediction on unlabelled images); + ModalitySpecificKD with instance weights
//                (ModalitySaliency + ModalityWeighting) and with weights meta-learned by
//                ModalityWeightLearner; + LogitKD + ModalityGramKD (on the one-half embeddings).
//   cross-modal: CE only; + LogitKD; + LogitKD + ChannelDecorrelation + Uniformity (on the
//                student's hidden features); + InfoNCE (CLIP-style, projected student features
//                against the teacher's); + SimilarityDistillation (SEED, 512-entry queue).
//   CNN:         CE only; + ReviewKD (ReviewFusion + HierarchicalContextLoss over the stages).
//
// Output: progress while training, a results table (test accuracy, mean ± std over the seeds,
// seconds per run), and in the output directory results.csv, curves.csv (every epoch of every
// run) and, when gnuplot is installed, curves.png (mean test accuracy per epoch).
//
// Usage: digits_distillation [--seeds N] [--epochs E] [--out DIR] [--data FILE.csv]

#include <mmkd/mmkd.hpp>

#include "digits_data.hpp"

#include <unistd.h>

#include <sys/stat.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using mmkd::Index;
using Mat = mmkd::Matrix<float>;
using T4 = mmkd::Tensor4<float>;
using Param = mmkd::ParameterView<float>;
using ConstRef = Eigen::Ref<const Mat>;

constexpr Index kClasses = 10, kLabelled = 100, kLabelledBatch = 32, kUnlabelledBatch = 96;
constexpr Index kBatch = kLabelledBatch + kUnlabelledBatch;

// ---------------------------------------------------------------------------------------------
// Data

struct Split {
  Mat full;                 // N x 64, both halves, pixels in [0, 1]
  Mat hard;                 // N x 16, 4x4 block means + fixed noise
  std::vector<int> labels;  // N
  Index size() const { return full.rows(); }
};

Mat blank_half(const Mat& full, int keep) {  // keep 0: top half only, 1: bottom half only
  Mat out = Mat::Zero(full.rows(), 64);
  out.middleCols(32 * keep, 32) = full.middleCols(32 * keep, 32);
  return out;
}

// A seeded random permutation of 0..n-1 (Fisher-Yates).
std::vector<Index> shuffled(Index n, mmkd::SplitMix64& rng) {
  std::vector<Index> order(n);
  for (Index i = 0; i < n; ++i) order[i] = i;
  for (Index i = n - 1; i > 0; --i) std::swap(order[i], order[rng.next() % (i + 1)]);
  return order;
}

void load_digits(const std::string& path, Split& train, Split& test) {
  const digits::Images all = digits::read_csv(path);
  const Index n = all.pixels.rows(), n_test = 500;
  mmkd::SplitMix64 rng(2021);  // the fixed split, then the fixed noise
  const std::vector<Index> order = shuffled(n, rng);
  auto fill = [&](Split& s, Index begin, Index end) {
    s.full.resize(end - begin, 64);
    s.hard.resize(end - begin, 16);
    s.labels.clear();
    for (Index r = begin; r < end; ++r) {
      const auto px = all.pixels.row(order[r]);
      s.full.row(r - begin) = px;
      for (Index a = 0; a < 4; ++a)
        for (Index b = 0; b < 4; ++b) {
          float sum = 0;
          for (Index da = 0; da < 2; ++da)
            for (Index db = 0; db < 2; ++db) sum += px((2 * a + da) * 8 + 2 * b + db);
          s.hard(r - begin, 4 * a + b) = sum / 4 + 0.15f * float(rng.normal());
        }
      s.labels.push_back(all.labels[std::size_t(order[r])]);
    }
  };
  fill(train, 0, n - n_test);
  fill(test, n - n_test, n);
}

// Rows `idx` of `src` into `dst`.
void gather(const Mat& src, const std::vector<Index>& idx, Mat& dst) {
  dst.resize(Index(idx.size()), src.cols());
  for (std::size_t r = 0; r < idx.size(); ++r) dst.row(Index(r)) = src.row(idx[r]);
}
void gather(const T4& src, const std::vector<Index>& idx, T4& dst) {
  const Index per = src.size() / src.dimension(0);
  dst.resize(Index(idx.size()), src.dimension(1), src.dimension(2), src.dimension(3));
  for (std::size_t r = 0; r < idx.size(); ++r)
    std::copy_n(src.data() + idx[r] * per, per, dst.data() + Index(r) * per);
}

// An N x C x H x W view of a row-major N x (C·H·W) matrix, and the flat array of a tensor.
mmkd::ConstTensor4Ref<float> as_maps(const Mat& x, Index c, Index h, Index w) {
  return mmkd::ConstTensor4Ref<float>(x.data(), x.rows(), c, h, w);
}
Eigen::Map<Eigen::ArrayXf> flat(T4& t) {
  return {t.data(), t.size()};
}

std::vector<int> argmax_rows(const Mat& z) {
  std::vector<int> out(std::size_t(z.rows()));
  for (Index i = 0; i < z.rows(); ++i) {
    Index k;
    z.row(i).maxCoeff(&k);
    out[std::size_t(i)] = int(k);
  }
  return out;
}

double accuracy(const Mat& logits, const std::vector<int>& labels) {
  const std::vector<int> predicted = argmax_rows(logits);
  Index hits = 0;
  for (std::size_t i = 0; i < predicted.size(); ++i) hits += (predicted[i] == labels[i]);
  return 100.0 * double(hits) / double(logits.rows());
}

// ---------------------------------------------------------------------------------------------
// The example's layers: each forward caches what its backward needs; backward adds to .grad.

struct Linear {  // y = x Wᵀ + b, PyTorch's default initialisation U(±1/√in)
  Mat w, b, gw, gb;
  Linear(Index in, Index out, mmkd::SplitMix64& rng) : w(out, in), b(1, out) {
    const double bound = 1.0 / std::sqrt(double(in));
    for (Index k = 0; k < w.size(); ++k) w.data()[k] = float(rng.uniform(-bound, bound));
    for (Index k = 0; k < b.size(); ++k) b.data()[k] = float(rng.uniform(-bound, bound));
    gw.setZero(out, in);
    gb.setZero(1, out);
  }
  void forward(const ConstRef& x, Mat& y) const {
    y.noalias() = x * w.transpose();
    y.rowwise() += b.row(0);
  }
  void backward(const ConstRef& x, const ConstRef& dy, Mat* dx) {
    gw.noalias() += dy.transpose() * x;
    gb += dy.colwise().sum();
    if (dx) dx->noalias() = dy * w;
  }
  void collect(std::vector<Param>& p, std::vector<Param>& g) {
    p.push_back({"weight", {w.data(), w.rows(), w.cols()}});
    p.push_back({"bias", {b.data(), b.rows(), b.cols()}});
    g.push_back({"weight", {gw.data(), gw.rows(), gw.cols()}});
    g.push_back({"bias", {gb.data(), gb.rows(), gb.cols()}});
  }
};

struct Mlp {  // logits = fc2(relu(fc1(x))); h = the hidden features
  Linear fc1, fc2;
  Mat h, z, dh;
  Mlp(Index in, Index hidden, mmkd::SplitMix64& rng)
      : fc1(in, hidden, rng), fc2(hidden, kClasses, rng) {}
  const Mat& forward(const ConstRef& x) {
    fc1.forward(x, h);
    h = h.cwiseMax(0.0f);
    fc2.forward(h, z);
    return z;
  }
  // dz: dL/dlogits; dh_extra: dL/dh from losses on the hidden features (empty: none).
  void backward(const ConstRef& x, const Mat& dz, const Mat& dh_extra) {
    fc2.backward(h, dz, &dh);
    if (dh_extra.size()) dh += dh_extra;
    dh.array() *= (h.array() > 0.0f).cast<float>();
    fc1.backward(x, dh, nullptr);
  }
  void collect(std::vector<Param>& p, std::vector<Param>& g) {
    fc1.collect(p, g);
    fc2.collect(p, g);
  }
};

struct ConvStage {  // conv3x3 -> BatchNorm2d -> ReLU -> optional 2x2 average pooling
  Mat w, gw, ws;
  mmkd::BatchNorm2d<float> bn;
  bool pool;
  const T4* x = nullptr;
  T4 conv, act, out, d_act, d_conv;
  ConvStage(Index c_in, Index c_out, bool pool_, mmkd::SplitMix64& rng)
      : w(c_out, 9 * c_in), bn({c_out}), pool(pool_) {
    const double bound = std::sqrt(6.0 / double(9 * c_in));  // He-uniform for ReLU
    for (Index k = 0; k < w.size(); ++k) w.data()[k] = float(rng.uniform(-bound, bound));
    gw.setZero(w.rows(), w.cols());
  }
  const T4& forward(const T4& input) {
    x = &input;
    const Index n = input.dimension(0), h = input.dimension(2), wd = input.dimension(3);
    conv.resize(n, w.rows(), h, wd);
    mmkd::conv2d_3x3<float>(input, w, conv, ws);
    act = bn.forward(conv).cwiseMax(0.0f);
    if (!pool) return act;
    out.resize(n, w.rows(), h / 2, wd / 2);
    mmkd::adaptive_avg_pool2d<float>(act, out);
    return out;
  }
  const T4& output() const { return pool ? out : act; }
  // d_out: dL/d(output); adds dL/dx to *dx when given.
  void backward(const T4& d_out, T4* dx) {
    if (pool) {
      d_act.resize(act.dimensions());
      d_act.setZero();
      mmkd::adaptive_avg_pool2d_backward<float>(d_out, d_act);
    } else {
      d_act = d_out;
    }
    flat(d_act) *= (flat(act) > 0.0f).cast<float>();
    d_conv.resize(conv.dimensions());
    d_conv.setZero();
    bn.backward(d_act, d_conv);
    mmkd::Tensor4Ref<float> none(nullptr, 0, 0, 0, 0);
    mmkd::conv2d_3x3_backward<float>(*x, w, d_conv, dx ? mmkd::Tensor4Ref<float>(*dx) : none, gw,
                                     ws);
  }
  void collect(std::vector<Param>& p, std::vector<Param>& g) {
    p.push_back({"conv", {w.data(), w.rows(), w.cols()}});
    g.push_back({"conv", {gw.data(), gw.rows(), gw.cols()}});
    for (auto& v : bn.parameters()) p.push_back(v);
    for (auto& v : bn.gradients()) g.push_back(v);
  }
};

// Two stages, global average pooling, a linear classifier. Its stage features (shallow -> deep,
// the pooled feature last) are what ReviewKD compares.
struct Cnn {
  ConvStage s1, s2;
  Linear fc;
  T4 pooled, d_pooled, d2, d1;
  Mat z, dfeat;
  Cnn(Index c1, Index c2, bool pool1, mmkd::SplitMix64& rng)
      : s1(1, c1, pool1, rng), s2(c1, c2, true, rng), fc(c2, kClasses, rng) {}
  void train(bool on) {
    s1.bn.train(on);
    s2.bn.train(on);
  }
  const Mat& forward(const T4& x) {
    const T4& f2 = s2.forward(s1.forward(x));
    pooled.resize(f2.dimension(0), f2.dimension(1), 1, 1);
    mmkd::adaptive_avg_pool2d<float>(f2, pooled);
    fc.forward(Eigen::Map<const Mat>(pooled.data(), pooled.dimension(0), pooled.dimension(1)), z);
    return z;
  }
  std::vector<mmkd::ConstTensor4Ref<float>> features() const {
    return {s1.output(), s2.output(), pooled};
  }
  // dz: dL/dlogits; d_features: extra dL/d(features) (empty: none).
  void backward(const Mat& dz, const std::vector<T4>& d_features) {
    const Index n = pooled.dimension(0), c2 = pooled.dimension(1);
    fc.backward(Eigen::Map<const Mat>(pooled.data(), n, c2), dz, &dfeat);
    d_pooled = Eigen::TensorMap<const T4>(dfeat.data(), n, c2, 1, 1);
    const bool extra = !d_features.empty();
    if (extra) d_pooled += d_features[2];
    d2.resize(s2.output().dimensions());
    d2.setZero();
    mmkd::adaptive_avg_pool2d_backward<float>(d_pooled, d2);
    if (extra) d2 += d_features[1];
    d1.resize(s1.output().dimensions());
    d1.setZero();
    s2.backward(d2, &d1);
    if (extra) d1 += d_features[0];
    s1.backward(d1, nullptr);
  }
  void collect(std::vector<Param>& p, std::vector<Param>& g) {
    s1.collect(p, g);
    s2.collect(p, g);
    fc.collect(p, g);
  }
};

// The optimiser: mmkd's AdamW (PyTorch's rule) over the models' parameter views; decay 0 unless
// given, so make_adam(..., lr) is plain Adam.
using Adam = mmkd::AdamW<float>;

Adam make_adam(std::vector<Param> params, std::vector<Param> grads, double lr,
               double weight_decay = 0) {
  Adam::Options o = Adam::defaults();
  o.lr = lr;
  o.weight_decay = weight_decay;
  return Adam(std::move(params), std::move(grads), o);
}

template <class Model>
Adam make_adam(std::vector<Model*> models, double lr, double weight_decay = 0) {
  std::vector<Param> p, g;
  for (auto* m : models) m->collect(p, g);
  return make_adam(std::move(p), std::move(g), lr, weight_decay);
}

// ---------------------------------------------------------------------------------------------
// Runs and their record

enum class Method {
  Ce,
  LogitKd,
  DecoupledKd,
  MsdInstance,
  MsdLearned,
  GramKd,  // multimodal
  XCe,
  XLogitKd,
  XStructure,
  XInfoNce,
  XSeed,  // cross-modal
  CnnCe,
  CnnReview  // cross-modal CNN
};

struct MethodInfo {
  Method method;
  const char* setting;
  const char* name;
  bool all_labels = false;  // a reference: the student trained on every training label
};

const std::vector<MethodInfo> kMethods = {
    {Method::Ce, "multimodal", "CE on all 1297 labels (reference)", true},
    {Method::Ce, "multimodal", "CE only"},
    {Method::LogitKd, "multimodal", "+ LogitKD"},
    {Method::DecoupledKd, "multimodal", "+ DecoupledKD"},
    {Method::MsdInstance, "multimodal", "+ ModalitySpecificKD, instance weights"},
    {Method::MsdLearned, "multimodal", "+ ModalitySpecificKD, learned weights"},
    {Method::GramKd, "multimodal", "+ LogitKD + ModalityGramKD"},
    {Method::XCe, "cross-modal", "CE on all 1297 labels (reference)", true},
    {Method::XCe, "cross-modal", "CE only"},
    {Method::XLogitKd, "cross-modal", "+ LogitKD"},
    {Method::XStructure, "cross-modal", "+ LogitKD + ChannelDecorrelation + Uniformity"},
    {Method::XInfoNce, "cross-modal", "+ InfoNCE"},
    {Method::XSeed, "cross-modal", "+ SimilarityDistillation"},
    {Method::CnnCe, "cross-modal CNN", "CE on all 1297 labels (reference)", true},
    {Method::CnnCe, "cross-modal CNN", "CE only"},
    {Method::CnnReview, "cross-modal CNN", "+ ReviewKD"},
};

struct Curve {
  std::vector<double> loss, acc;
};

struct Options {
  int seeds = 5, epochs = 60;
  std::string out = "digits_results", data = MMKD_DIGITS_CSV;
};

// Live progress: one line rewritten in place on a terminal, one line per run otherwise.
class Progress {
 public:
  explicit Progress(int epochs) : tty_(isatty(STDOUT_FILENO) != 0), epochs_(epochs) {}
  void epoch(const std::string& what, int seed, int epoch, double loss, double acc) {
    if (tty_) {
      std::printf("\r  %-58s seed %d  epoch %2d/%d  loss %7.4f  test %5.1f%%", what.c_str(), seed,
                  epoch + 1, epochs_, loss, acc);
      std::fflush(stdout);
    } else if (epoch + 1 == epochs_) {
      std::printf("  %-58s seed %d  epoch %2d/%d  loss %7.4f  test %5.1f%%\n", what.c_str(), seed,
                  epoch + 1, epochs_, loss, acc);
    }
  }
  void clear() {
    if (tty_) std::printf("\r%130s\r", "");
  }

 private:
  bool tty_;
  int epochs_;
};

// Everything the teachers give the students, computed once on the training set.
struct TeacherTargets {
  Mat mm_logits, mm_top, mm_bottom;  // multimodal teacher: full, top-only, bottom-only logits
  Mat mm_h_top, mm_h_bottom;         // its hidden features of the one-half inputs
  Mat x_logits, x_hidden;            // cross-modal MLP teacher on the clean image
  std::vector<T4> cnn_features;      // its stage features
  std::vector<int> mm_pred;          // the multimodal teacher's predicted classes
};

struct Data {
  Split train, test;
  Mat train_top, train_bottom;
};

std::vector<Index> labelled_subset(const Split& train, std::uint64_t seed, bool all) {
  mmkd::SplitMix64 rng(1000 + seed);
  std::vector<Index> out;
  const auto order = shuffled(train.size(), rng);
  if (all) return order;
  for (int c = 0; c < kClasses; ++c) {
    Index taken = 0;
    for (Index i : order)
      if (train.labels[i] == c && taken < kLabelled / kClasses) {
        out.push_back(i);
        ++taken;
      }
  }
  return out;
}

// A batch: 32 labelled indices (rows 0..31), then 96 indices of the whole training set.
std::vector<Index> batch_indices(const std::vector<Index>& labelled,
                                 const std::vector<Index>& order, Index step,
                                 mmkd::SplitMix64& rng) {
  std::vector<Index> idx;
  for (Index k = 0; k < kLabelledBatch; ++k) idx.push_back(labelled[rng.next() % labelled.size()]);
  for (Index k = 0; k < kUnlabelledBatch; ++k)
    idx.push_back(order[(step * kUnlabelledBatch + k) % order.size()]);
  return idx;
}

// ---------------------------------------------------------------------------------------------
// Teachers

template <class Forward, class Backward>
void train_supervised(const Split& train, int epochs, std::uint64_t seed, Adam& adam,
                      Forward&& forward, Backward&& backward) {
  mmkd::SplitMix64 rng(seed);
  mmkd::CrossEntropy<float> ce;
  const Index n = train.size(), batch = 64;
  Mat dz;
  mmkd::Labels y(batch);
  for (int e = 0; e < epochs; ++e) {
    const auto order = shuffled(n, rng);
    for (Index s = 0; s + batch <= n; s += batch) {
      std::vector<Index> idx(order.begin() + s, order.begin() + s + batch);
      for (Index k = 0; k < batch; ++k) y(k) = train.labels[idx[k]];
      const Mat& z = forward(idx, rng);
      dz.setZero(z.rows(), z.cols());
      ce.value_and_grad(z, y, dz);
      adam.zero_grad();
      backward(dz);
      adam.step();
    }
  }
}

TeacherTargets train_teachers(const Data& d, int epochs) {
  TeacherTargets t;
  mmkd::SplitMix64 init(7);
  const Split& train = d.train;

  // Multimodal teacher, with modality dropout: a quarter of the images lose the top half, a
  // quarter the bottom half.
  Mlp mm(64, 128, init);
  Adam mm_adam = make_adam<Mlp>({&mm}, 3e-3);
  Mat xb;
  train_supervised(
      train, epochs, 11, mm_adam,
      [&](const std::vector<Index>& idx, mmkd::SplitMix64& rng) -> const Mat& {
        gather(train.full, idx, xb);
        for (Index i = 0; i < xb.rows(); ++i) {
          const auto r = rng.next() % 4;
          if (r < 2) xb.row(i).segment(32 * Index(r), 32).setZero();
        }
        return mm.forward(xb);
      },
      [&](const Mat& dz) { mm.backward(xb, dz, Mat()); });
  t.mm_logits = mm.forward(train.full);
  t.mm_top = mm.forward(d.train_top);
  t.mm_h_top = mm.h;
  t.mm_bottom = mm.forward(d.train_bottom);
  t.mm_h_bottom = mm.h;
  t.mm_pred = argmax_rows(t.mm_logits);
  std::printf("  %-34s test %5.1f%% (top half only %5.1f%%, bottom half only %5.1f%%)\n",
              "multimodal MLP 64-128-10", accuracy(mm.forward(d.test.full), d.test.labels),
              accuracy(mm.forward(blank_half(d.test.full, 0)), d.test.labels),
              accuracy(mm.forward(blank_half(d.test.full, 1)), d.test.labels));

  // Cross-modal teacher on the clean image.
  Mlp xm(64, 128, init);
  Adam x_adam = make_adam<Mlp>({&xm}, 3e-3);
  train_supervised(
      train, epochs, 12, x_adam,
      [&](const std::vector<Index>& idx, mmkd::SplitMix64&) -> const Mat& {
        gather(train.full, idx, xb);
        return xm.forward(xb);
      },
      [&](const Mat& dz) { xm.backward(xb, dz, Mat()); });
  t.x_logits = xm.forward(train.full);
  t.x_hidden = xm.h;
  std::printf("  %-34s test %5.1f%%\n", "clean-image MLP 64-128-10",
              accuracy(xm.forward(d.test.full), d.test.labels));

  // CNN teacher on the clean image: stages 8x8 -> 4x4 (16 ch) and 4x4 -> 2x2 (32 ch).
  Cnn cnn(16, 32, true, init);
  Adam c_adam = make_adam<Cnn>({&cnn}, 3e-3);
  T4 xt;
  train_supervised(
      train, epochs / 2, 13, c_adam,
      [&](const std::vector<Index>& idx, mmkd::SplitMix64&) -> const Mat& {
        gather(train.full, idx, xb);
        xt = as_maps(xb, 1, 8, 8);
        return cnn.forward(xt);
      },
      [&](const Mat& dz) { cnn.backward(dz, {}); });
  cnn.train(false);
  xt = as_maps(train.full, 1, 8, 8);
  cnn.forward(xt);  // caches the stage features
  for (const auto& f : cnn.features()) t.cnn_features.push_back(f);
  T4 xtest = as_maps(d.test.full, 1, 8, 8);
  std::printf("  %-34s test %5.1f%%\n", "clean-image CNN (16, 32 channels)",
              accuracy(cnn.forward(xtest), d.test.labels));
  return t;
}

// ---------------------------------------------------------------------------------------------
// Students

// One run of one method with one seed; returns the per-epoch curve.
Curve train_student(const MethodInfo& info, const Data& d, const TeacherTargets& t, int epochs,
                    std::uint64_t seed, Progress& progress, const std::string& what) {
  const Method method = info.method;
  const Split& train = d.train;
  const bool multimodal = method <= Method::GramKd, cnn = method >= Method::CnnCe;
  mmkd::SplitMix64 init(seed), rng(seed + 100);
  const std::vector<Index> labelled = labelled_subset(train, seed, info.all_labels);

  // Models and optimisers; the projection head and the weight learner are used by some methods.
  Mlp mlp(multimodal ? 64 : 16, 32, init);
  Linear proj(32, 128, init);
  Cnn student_cnn(8, 16, false, init);
  mmkd::ReviewFusion<float>::Options ro;
  ro.in_channels = {8, 16, 16};
  ro.out_channels = {16, 32, 32};
  ro.shapes = {4, 2, 1};
  ro.mid_channels = 16;
  ro.seed = seed;
  mmkd::ReviewFusion<float> review(ro);
  mmkd::ModalityWeightLearner<float>::Options lo;
  lo.seed = seed;
  mmkd::ModalityWeightLearner<float> learner(lo);

  std::vector<Param> p, g;
  if (cnn) {
    student_cnn.collect(p, g);
    if (method == Method::CnnReview)
      for (auto* v : {&p, &g}) {
        auto views = v == &p ? review.parameters() : review.gradients();
        v->insert(v->end(), views.begin(), views.end());
      }
  } else {
    mlp.collect(p, g);
    if (method == Method::XInfoNce || method == Method::XSeed) proj.collect(p, g);
  }
  Adam adam = make_adam(p, g, 3e-3, 1e-4);
  Adam meta_adam = make_adam(learner.parameters(), learner.gradients(), 1e-3);

  // The losses.
  mmkd::CrossEntropy<float> ce;
  mmkd::LogitKD<float> kd;  // T = 4
  mmkd::DecoupledKD<float> dkd;
  mmkd::ModalitySpecificKD<float> msd({/*temperature=*/4.0f});
  mmkd::ModalitySaliency<float> saliency({mmkd::SaliencyKind::RemovalKL, 4.0f});
  mmkd::ModalityWeighting<float> weighting;
  mmkd::ModalityGramKD<float> gram;
  mmkd::ChannelDecorrelation<float> decorrelation;
  decorrelation.options().weight = 0.1f;
  mmkd::Uniformity<float> uniformity;
  uniformity.options().weight = 0.1f;
  mmkd::InfoNCE<float> info_nce;
  info_nce.options().temperature = 0.1f;
  mmkd::SimilarityDistillation<float> seed_loss;
  mmkd::EmbeddingQueue<float> queue(512, 128);
  mmkd::HierarchicalContextLoss<float> hcl;
  // For the meta-learned weights: per-sample gradients of the auxiliary terms and of the meta loss.
  mmkd::LogitKD<float> kd_sum({4.0f, true, mmkd::Reduction::Sum});
  mmkd::CrossEntropy<float> ce_sum({0.0f, mmkd::Reduction::Sum});

  // Batch buffers.
  Mat x, x_top, x_bottom, x3, dz, dh, tz, t_top, t_bottom, th, th_top, th_bottom, pz, dp;
  Mat features, g_aux, h_aux, g_meta, h_meta, z_meta, dw, w_look, b_look;
  mmkd::Tensor3<float> t_modal, th_modal;
  T4 xt;
  std::vector<T4> t_feat(3), d_feat;
  mmkd::Labels y_lab(kLabelledBatch), targets(kBatch);

  const Index steps_per_epoch = (train.size() + kUnlabelledBatch - 1) / kUnlabelledBatch;
  Curve curve;
  for (int epoch = 0; epoch < epochs; ++epoch) {
    const auto order = shuffled(train.size(), rng);
    double epoch_loss = 0;
    if (cnn) student_cnn.train(true);
    for (Index step = 0; step < steps_per_epoch; ++step) {
      const auto idx = batch_indices(labelled, order, step, rng);
      for (Index k = 0; k < kLabelledBatch; ++k) y_lab(k) = train.labels[idx[k]];
      adam.zero_grad();
      float loss = 0;

      if (cnn) {
        gather(train.hard, idx, x);
        xt = as_maps(x, 1, 4, 4);
        const Mat& z = student_cnn.forward(xt);
        dz.setZero(z.rows(), z.cols());
        loss += ce.value_and_grad(z.topRows(kLabelledBatch), y_lab, dz.topRows(kLabelledBatch));
        d_feat.clear();
        if (method == Method::CnnReview) {
          for (int s = 0; s < 3; ++s) gather(t.cnn_features[s], idx, t_feat[s]);
          const auto& outs = review.forward(student_cnn.features());
          std::vector<T4> d_outs;
          for (const auto& o : outs) d_outs.emplace_back(T4(o.dimensions()).setZero());
          for (const auto& f : student_cnn.features())
            d_feat.emplace_back(T4(f.dimensions()).setZero());
          loss += hcl.value_and_grad(outs, {t_feat.begin(), t_feat.end()},
                                     {d_outs.begin(), d_outs.end()});
          review.backward({d_outs.begin(), d_outs.end()}, {d_feat.begin(), d_feat.end()});
        }
        student_cnn.backward(dz, d_feat);
        adam.step();
        epoch_loss += loss;
        continue;
      }

      if (multimodal) {
        // Rows [0, B): both halves; [B, 2B): top half only; [2B, 3B): bottom half only. Rows
        // B..3B of the logits and hidden features are then the M x N x C stacks MSD and the
        // Gram loss take, without a copy.
        gather(train.full, idx, x);
        x3.resize(3 * kBatch, 64);
        x3.topRows(kBatch) = x;
        x3.middleRows(kBatch, kBatch) = blank_half(x, 0);
        x3.bottomRows(kBatch) = blank_half(x, 1);
        gather(t.mm_logits, idx, tz);
        gather(t.mm_top, idx, t_top);
        gather(t.mm_bottom, idx, t_bottom);
        t_modal.resize(2, kBatch, kClasses);
        std::copy_n(t_top.data(), t_top.size(), t_modal.data());
        std::copy_n(t_bottom.data(), t_bottom.size(), t_modal.data() + t_top.size());
      } else {
        gather(train.hard, idx, x3);
        gather(t.x_logits, idx, tz);
        gather(t.x_hidden, idx, th);
      }
      const Mat& z3 = mlp.forward(x3);
      dz.setZero(z3.rows(), z3.cols());
      dh.resize(0, 0);
      auto z = z3.topRows(kBatch);
      auto dzb = dz.topRows(kBatch);
      loss += ce.value_and_grad(z.topRows(kLabelledBatch), y_lab, dzb.topRows(kLabelledBatch));

      const mmkd::ConstTensor3Ref<float> z_modal(z3.data() + kBatch * kClasses, 2, kBatch,
                                                 kClasses);
      mmkd::Tensor3Ref<float> dz_modal(dz.data() + kBatch * kClasses, 2, kBatch, kClasses);
      switch (method) {
        case Method::LogitKd:
        case Method::XLogitKd:
          loss += kd.value_and_grad(z, tz, dzb);
          break;
        case Method::DecoupledKd:
          for (Index k = 0; k < kBatch; ++k)
            targets(k) = k < kLabelledBatch ? y_lab(k) : t.mm_pred[idx[k]];
          dkd.options().weight = std::min(1.0f, float(epoch + 1) / 5);  // DKD's warm-up
          loss += dkd.value_and_grad(z, tz, targets, dzb);
          break;
        case Method::MsdInstance: {
          const Mat& w = weighting.compute(saliency.compute(tz, t_modal));
          loss += msd.value_and_grad(z, tz, z_modal, t_modal, w, dzb, dz_modal);
          break;
        }
        case Method::MsdLearned: {
          learner.make_features(msd.auxiliary_losses(z_modal, t_modal), features);
          const Mat& wk = learner.forward(features);  // (N·M) x 1, row k = i·M + m
          const Eigen::Map<const Mat> w(wk.data(), kBatch, 2);
          loss += msd.value_and_grad(z, tz, z_modal, t_modal, w, dzb, dz_modal);
          break;
        }
        case Method::GramKd: {
          loss += kd.value_and_grad(z, tz, dzb);
          const Index hs = mlp.h.cols(), ht = t.mm_h_top.cols();
          th_modal.resize(2, kBatch, ht);
          gather(t.mm_h_top, idx, th_top);
          gather(t.mm_h_bottom, idx, th_bottom);
          std::copy_n(th_top.data(), th_top.size(), th_modal.data());
          std::copy_n(th_bottom.data(), th_bottom.size(), th_modal.data() + th_top.size());
          dh.setZero(3 * kBatch, hs);
          loss += gram.value_and_grad(
              mmkd::ConstTensor3Ref<float>(mlp.h.data() + kBatch * hs, 2, kBatch, hs), th_modal,
              mmkd::Tensor3Ref<float>(dh.data() + kBatch * hs, 2, kBatch, hs));
          break;
        }
        case Method::XStructure:
          loss += kd.value_and_grad(z, tz, dzb);
          dh.setZero(kBatch, mlp.h.cols());
          loss += decorrelation.value_and_grad(mlp.h, dh);
          loss += uniformity.value_and_grad(mlp.h, dh);
          break;
        case Method::XInfoNce:
        case Method::XSeed:
          proj.forward(mlp.h, pz);
          dp.setZero(pz.rows(), pz.cols());
          loss += method == Method::XInfoNce ? info_nce.value_and_grad(pz, th, dp)
                                             : seed_loss.value_and_grad(pz, th, queue, dp);
          proj.backward(mlp.h, dp, &dh);
          if (method == Method::XSeed) queue.push(th);
          break;
        default:
          break;
      }
      mlp.backward(x3, dz, dh);

      if (method == Method::MsdLearned) {
        // Meta step (MW-Net): look ahead one SGD step of the final layer, score the weights by
        // the cross-entropy of the labelled rows after it, and train the learner on that.
        const float lr = 0.1f;
        w_look = mlp.fc2.w - lr * mlp.fc2.gw;
        b_look = mlp.fc2.b - lr * mlp.fc2.gb;
        const Index hs = mlp.h.cols();
        h_meta.resize(kLabelledBatch, hs + 1);  // the layer's input with a 1 for the bias
        h_meta << mlp.h.topRows(kLabelledBatch), Mat::Ones(kLabelledBatch, 1);
        z_meta = mlp.h.topRows(kLabelledBatch) * w_look.transpose();
        z_meta.rowwise() += b_look.row(0);
        g_meta.setZero(kLabelledBatch, kClasses);
        ce_sum.value_and_grad(z_meta, y_lab, g_meta);
        // Per-(sample, modality) gradients of the auxiliary terms, rows k = i·M + m.
        g_aux.setZero(2 * kBatch, kClasses);
        h_aux.resize(2 * kBatch, hs + 1);
        for (Index m = 0; m < 2; ++m) {
          Mat gm = Mat::Zero(kBatch, kClasses);
          kd_sum.value_and_grad(z3.middleRows((1 + m) * kBatch, kBatch), m == 0 ? t_top : t_bottom,
                                gm);
          for (Index i = 0; i < kBatch; ++i) {
            g_aux.row(2 * i + m) = gm.row(i);
            h_aux.row(2 * i + m) << mlp.h.row((1 + m) * kBatch + i), 1.0f;
          }
        }
        dw.setZero(2 * kBatch, 1);
        mmkd::ModalityWeightLearner<float>::hypergradient_linear(g_aux, h_aux, g_meta, h_meta, lr,
                                                                 kBatch, dw);
        meta_adam.zero_grad();
        learner.backward(dw);
        meta_adam.step();
      }
      adam.step();
      epoch_loss += loss;
    }

    // Test accuracy at the end of the epoch.
    double acc;
    if (cnn) {
      student_cnn.train(false);
      xt = as_maps(d.test.hard, 1, 4, 4);
      acc = accuracy(student_cnn.forward(xt), d.test.labels);
    } else {
      acc = accuracy(mlp.forward(multimodal ? d.test.full : d.test.hard), d.test.labels);
    }
    curve.loss.push_back(epoch_loss / double(steps_per_epoch));
    curve.acc.push_back(acc);
    progress.epoch(what, int(seed), epoch, curve.loss.back(), acc);
  }
  return curve;
}

// ---------------------------------------------------------------------------------------------
// Reporting

struct Summary {
  double mean, std, seconds;
};

Summary summarise(const std::vector<double>& final_acc, double seconds) {
  double mean = 0, var = 0;
  for (double a : final_acc) mean += a;
  mean /= double(final_acc.size());
  for (double a : final_acc) var += (a - mean) * (a - mean);
  const double std = final_acc.size() > 1 ? std::sqrt(var / double(final_acc.size() - 1)) : 0;
  return {mean, std, seconds / double(final_acc.size())};
}

void write_plot(const std::string& dir, const std::vector<std::vector<double>>& mean_curves) {
  if (std::system("command -v gnuplot >/dev/null 2>&1") != 0) {
    std::printf("gnuplot not found: no curves.png (the curves are in %s/curves.csv)\n",
                dir.c_str());
    return;
  }
  {
    std::ofstream dat(dir + "/curves_mean.dat");
    for (std::size_t m = 0; m < kMethods.size(); ++m) {
      dat << "# " << kMethods[m].setting << ": " << kMethods[m].name << "\n";
      for (std::size_t e = 0; e < mean_curves[m].size(); ++e)
        dat << e + 1 << " " << mean_curves[m][e] << "\n";
      dat << "\n\n";
    }
    std::ofstream gp(dir + "/curves.gp");
    gp << "set terminal pngcairo size 1500,480 font ',10'\n"
       << "set output '" << dir << "/curves.png'\n"
       << "set multiplot layout 1,3 title 'mmkd on UCI digits: mean test accuracy per epoch'\n"
       << "set xlabel 'epoch'\nset ylabel 'test accuracy (%)'\nset key bottom right\nset grid\n";
    const char* settings[] = {"multimodal", "cross-modal", "cross-modal CNN"};
    for (const char* s : settings) {
      gp << "set title '" << s << " student'\nplot ";
      bool first = true;
      for (std::size_t m = 0; m < kMethods.size(); ++m) {
        if (std::string(kMethods[m].setting) != s) continue;
        gp << (first ? "" : ", ") << "'" << dir << "/curves_mean.dat' index " << m
           << " with lines lw 2 title '" << kMethods[m].name << "'";
        first = false;
      }
      gp << "\n";
    }
    gp << "unset multiplot\n";
  }
  const std::string cmd = "gnuplot '" + dir + "/curves.gp'";
  if (std::system(cmd.c_str()) == 0)
    std::printf("wrote %s/curves.png\n", dir.c_str());
  else
    std::printf("gnuplot failed: no curves.png\n");
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
      return argv[++i];
    };
    if (a == "--seeds")
      o.seeds = std::stoi(next());
    else if (a == "--epochs")
      o.epochs = std::stoi(next());
    else if (a == "--out")
      o.out = next();
    else if (a == "--data")
      o.data = next();
    else
      throw std::invalid_argument("unknown argument " + a +
                                  " (usage: [--seeds N] [--epochs E] [--out DIR] [--data CSV])");
  }
  if (o.seeds < 1 || o.epochs < 1) throw std::invalid_argument("--seeds and --epochs must be >= 1");
  return o;
}

}  // namespace

int main(int argc, char** argv) try {
  const Options opt = parse(argc, argv);
  const auto t0 = std::chrono::steady_clock::now();
  Data d;
  load_digits(opt.data, d.train, d.test);
  d.train_top = blank_half(d.train.full, 0);
  d.train_bottom = blank_half(d.train.full, 1);
  std::printf(
      "mmkd %s: distillation on the UCI digits, %ld training / %ld test images, "
      "%ld labels per student, %d seeds x %d epochs\n\nteachers (all training labels):\n",
      mmkd::version_string, long(d.train.size()), long(d.test.size()), long(kLabelled), opt.seeds,
      opt.epochs);
  const TeacherTargets teachers = train_teachers(d, opt.epochs);

  mkdir(opt.out.c_str(), 0755);
  std::ofstream curves_csv(opt.out + "/curves.csv");
  curves_csv << "setting,method,seed,epoch,train_loss,test_accuracy\n";
  std::printf("\nstudents (100 labels + the unlabelled paired training images):\n");
  Progress progress(opt.epochs);
  std::vector<Summary> summaries;
  std::vector<std::vector<double>> mean_curves;
  for (const auto& m : kMethods) {
    const std::string what = std::string(m.setting) + ": " + m.name;
    std::vector<double> finals, mean_curve(std::size_t(opt.epochs), 0.0);
    double seconds = 0;
    for (int s = 0; s < opt.seeds; ++s) {
      const auto start = std::chrono::steady_clock::now();
      const Curve c = train_student(m, d, teachers, opt.epochs, std::uint64_t(s), progress, what);
      seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      finals.push_back(c.acc.back());
      for (int e = 0; e < opt.epochs; ++e) {
        mean_curve[std::size_t(e)] += c.acc[std::size_t(e)] / opt.seeds;
        curves_csv << m.setting << ",\"" << m.name << "\"," << s << "," << e + 1 << ","
                   << c.loss[std::size_t(e)] << "," << c.acc[std::size_t(e)] << "\n";
      }
    }
    summaries.push_back(summarise(finals, seconds));
    mean_curves.push_back(mean_curve);
    progress.clear();
    std::printf("  %-58s %5.1f ± %.1f %%\n", what.c_str(), summaries.back().mean,
                summaries.back().std);
  }

  std::ofstream results(opt.out + "/results.csv");
  results << "setting,method,test_accuracy_mean,test_accuracy_std,seeds,seconds_per_run\n";
  std::printf(
      "\n| setting | method | test accuracy (%%), mean ± std over %d seeds | s / run |\n"
      "|---|---|---|---|\n",
      opt.seeds);
  for (std::size_t k = 0; k < kMethods.size(); ++k) {
    const Summary& s = summaries[k];
    std::printf("| %s | %s | %.1f ± %.1f | %.2f |\n", kMethods[k].setting, kMethods[k].name, s.mean,
                s.std, s.seconds);
    results << kMethods[k].setting << ",\"" << kMethods[k].name << "\"," << s.mean << "," << s.std
            << "," << opt.seeds << "," << s.seconds << "\n";
  }
  std::printf("\nwrote %s/results.csv and %s/curves.csv\n", opt.out.c_str(), opt.out.c_str());
  write_plot(opt.out, mean_curves);
  std::printf("total time %.1f s\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "digits_distillation: %s\n", e.what());
  return 1;
}
