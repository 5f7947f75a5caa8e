#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/module.hpp"
#include "mmkd/core/random.hpp"
#include "mmkd/core/tensor.hpp"
#include "mmkd/core/types.hpp"
#include "mmkd/review/attention_fusion.hpp"

namespace mmkd {

/**
 * ReviewKD's deep-to-shallow review chain: one `AttentionFusion` per student stage, the deepest
 * without fusion, each shallower one fusing the residual of the stage below (Chen et al., CVPR
 * 2021; the `ReviewKD` wrapper of the official code and mdistiller).
 *
 * Every per-stage list runs **shallow → deep**, one entry per stage (S stages): `in_channels`
 * (the student's feature channels), `out_channels` (the teacher's), `shapes` (the student
 * feature's square size; empty = taken from the features) and `out_shapes` (the size of the
 * stage's output, the teacher feature's size; empty = `shapes`). The reference lists `shapes`
 * deep → shallow and tolerates surplus entries and features; here each list must have exactly S
 * entries and a stray feature is an error naming its stage. The reference resnet56 → resnet20
 * configuration (shapes [1,8,16,32,32]) becomes in = out = {16, 32, 64, 64},
 * shapes = {32, 16, 8, 1}, mid_channels 64, with the student features f1, f2, f3 and the pooled
 * feature (N x 64 x 1 x 1) — the stem feature is not passed.
 *
 * `forward` returns the S outputs shallow → deep (compare them with the teacher's features, e.g.
 * with `HierarchicalContextLoss`); `backward` takes their cotangents and adds the student-feature
 * gradients, the residual gradients of every stage summed through the chain. `mid_channels` 0
 * means the reference's min(512, in_channels of the deepest stage). Parameter names are the
 * reference's `state_dict` keys: `abfs.0.` is the deepest stage. A failed call changes no
 * parameter, gradient, running statistic or caller buffer.
 *
 * **Example**:
 * @code
 * mmkd::ReviewFusion<float>::Options o;
 * o.in_channels = o.out_channels = {16, 32, 64, 64};
 * o.shapes = {32, 16, 8, 1};
 * mmkd::ReviewFusion<float> review(o);
 * const auto& outs = review.forward({f1, f2, f3, pooled});   // shallow → deep
 * float loss = hcl.value_and_grad(outs, teacher_features, d_outs);
 * review.backward(d_outs_views, d_features);                  // adds
 * @endcode
 */
template <class Scalar = float>
class ReviewFusion : detail::FloatingScalar<Scalar> {
 public:
  //! The options; the defaults are those of the reference implementation.
  struct Options {
    std::vector<Index> in_channels;   //!< per stage, shallow → deep
    std::vector<Index> out_channels;  //!< per stage, shallow → deep
    std::vector<Index> shapes;        //!< per stage, shallow → deep; empty = from the features
    std::vector<Index> out_shapes;    //!< per stage, shallow → deep; empty = shapes
    Index mid_channels = 0;           //!< 0 = min(512, in_channels.back())
    std::uint64_t seed = 0;           //!< initialisation seed
  };

  //! Throws InvalidArgument for an invalid option.
  explicit ReviewFusion(const Options& options) : options_(options) {
    const Index s = Index(options_.in_channels.size());
    if (s == 0) detail::throw_invalid(kName, "in_channels is empty: need at least one stage");
    auto check_list = [&](const char* name, const std::vector<Index>& v, bool optional) {
      if (optional && v.empty()) return;
      if (Index(v.size()) != s) {
        detail::throw_invalid(kName, std::string(name) + " has " + std::to_string(v.size()) +
                                         " entries, expected " + std::to_string(s) +
                                         " (one per stage, shallow → deep, like in_channels)");
      }
      for (Index k = 0; k < s; ++k) {
        if (v[std::size_t(k)] < 1) {
          detail::throw_invalid(kName, stage_str(k) + ": " + name + "[" + std::to_string(k) +
                                           "] must be >= 1, got " +
                                           std::to_string(v[std::size_t(k)]));
        }
      }
    };
    check_list("in_channels", options_.in_channels, false);
    check_list("out_channels", options_.out_channels, false);
    check_list("shapes", options_.shapes, true);
    check_list("out_shapes", options_.out_shapes, true);
    if (options_.mid_channels < 0) detail::throw_invalid(kName, "mid_channels must be >= 0");
    if (options_.mid_channels == 0)
      options_.mid_channels = std::min<Index>(512, options_.in_channels.back());
    if (options_.out_shapes.empty()) options_.out_shapes = options_.shapes;
    SplitMix64 rng(options_.seed);
    stages_.reserve(std::size_t(s));
    for (Index k = 0; k < s; ++k) {
      typename AttentionFusion<Scalar>::Options o;
      o.in_channels = options_.in_channels[std::size_t(k)];
      o.mid_channels = options_.mid_channels;
      o.out_channels = options_.out_channels[std::size_t(k)];
      o.fuse = k < s - 1;
      o.seed = rng.next();
      stages_.push_back(AttentionFusion<Scalar>(o, std::string(kName) + " " + stage_str(k),
                                                "abfs." + std::to_string(s - 1 - k) + "."));
    }
  }

  //! Copies are deep: the copy's outputs() view its own stages' outputs, never the original's.
  //! Moves keep the stages' buffers, so the views stay valid.
  ReviewFusion(const ReviewFusion& other)
      : options_(other.options_), stages_(other.stages_), has_forward_(other.has_forward_) {
    rebuild_outputs(other.outputs_.size());
  }
  //! A deep copy (see the copy constructor).
  ReviewFusion& operator=(const ReviewFusion& other) {
    if (this != &other) {
      options_ = other.options_;
      stages_ = other.stages_;
      has_forward_ = other.has_forward_;
      rebuild_outputs(other.outputs_.size());
    }
    return *this;
  }
  //! Keeps the stages' buffers: the output views stay valid.
  ReviewFusion(ReviewFusion&&) noexcept = default;
  //! Keeps the stages' buffers: the output views stay valid.
  ReviewFusion& operator=(ReviewFusion&&) noexcept = default;

  const Options& options() const { return options_; }  //!< with the defaults filled in
  //! The number of stages S.
  Index stages() const { return Index(stages_.size()); }
  //! Stage k, shallow → deep (stage S − 1 is the deepest, non-fusing one).
  const AttentionFusion<Scalar>& stage(Index k) const { return stages_.at(std::size_t(k)); }

  //! Training mode (batch statistics; the running statistics are updated), or eval mode with false.
  void train(bool on = true) {
    for (auto& a : stages_) a.train(on);
  }
  //! Eval mode: normalises with the running statistics.
  void eval() { train(false); }
  //! Whether in training mode.
  bool is_training() const { return stages_.front().is_training(); }

  //! The S outputs for the student's S features, both shallow → deep. The views stay valid until
  //! the next forward.
  const std::vector<ConstTensor4Ref<Scalar>>& forward(
      const std::vector<ConstTensor4Ref<Scalar>>& features);

  //! The S outputs of the last forward, shallow → deep.
  const std::vector<ConstTensor4Ref<Scalar>>& outputs() const { return outputs_; }

  //! Adds the feature gradients to `d_features` (shapes of the features) for the cotangents of the
  //! S outputs, and the parameter gradients to gradients().
  void backward(const std::vector<ConstTensor4Ref<Scalar>>& d_outputs,
                const std::vector<Tensor4Ref<Scalar>>& d_features);

  //! Sets the parameter gradients to zero.
  void zero_grad() {
    for (auto& a : stages_) a.zero_grad();
  }

  //! Every stage's parameters, deepest first ("abfs.0.conv1.0.weight", ...).
  std::vector<ParameterView<Scalar>> parameters() { return collect(&Stage::parameters); }
  //! The parameter gradients, paired by position with parameters().
  std::vector<ParameterView<Scalar>> gradients() { return collect(&Stage::gradients); }
  //! The running statistics (updated in training mode, not trained).
  std::vector<ParameterView<Scalar>> buffers() { return collect(&Stage::buffers); }

 private:
  using Stage = AttentionFusion<Scalar>;
  static constexpr const char* kName = "ReviewFusion";

  std::string stage_str(Index k) const {
    return "stage " + std::to_string(k) + " of " + std::to_string(options_.in_channels.size());
  }

  void check_count(const char* name, std::size_t got) const {
    if (Index(got) != stages()) {
      detail::throw_invalid(kName, std::string(name) + " has " + std::to_string(got) +
                                       " entries, expected " + std::to_string(stages()) +
                                       " (one per stage, shallow → deep)");
    }
  }

  void check_features(const std::vector<ConstTensor4Ref<Scalar>>& f) const {
    if (Index(f.size()) != stages()) {
      detail::throw_invalid(
          kName, "got " + std::to_string(f.size()) + " features, expected " +
                     std::to_string(stages()) +
                     " (one per stage, shallow → deep; the reference's stem feature is not "
                     "passed)");
    }
    const Index n = f.front().dimension(0);
    for (Index k = 0; k < stages(); ++k) {
      const auto& x = f[std::size_t(k)];
      const Index c = options_.in_channels[std::size_t(k)];
      const bool has_shape = !options_.shapes.empty();
      const Index sz = has_shape ? options_.shapes[std::size_t(k)] : 0;
      const bool bad = x.dimension(0) != n || x.dimension(0) < 1 || x.dimension(1) != c ||
                       x.dimension(2) < 1 || x.dimension(3) < 1 ||
                       (has_shape && (x.dimension(2) != sz || x.dimension(3) != sz));
      if (bad) {
        const std::string hw = has_shape ? std::to_string(sz) + "x" + std::to_string(sz) : "HxW";
        detail::throw_invalid(
            kName,
            stage_str(k) + ": feature has shape " +
                detail::shape_str4(x.dimension(0), x.dimension(1), x.dimension(2), x.dimension(3)) +
                ", expected " + std::to_string(n) + "x" + std::to_string(c) + "x" + hw +
                " (batch of stage 0, in_channels[" + std::to_string(k) + "]" +
                (has_shape ? ", shapes[" + std::to_string(k) + "]" : std::string()) + ")");
      }
    }
  }

  // outputs_ viewing this object's stages (empty before the first forward).
  void rebuild_outputs(std::size_t count) {
    outputs_.clear();
    for (std::size_t k = 0; k < count; ++k) outputs_.emplace_back(stages_[k].output());
  }

  std::vector<ParameterView<Scalar>> collect(std::vector<ParameterView<Scalar>> (Stage::*get)()) {
    std::vector<ParameterView<Scalar>> out;
    for (Index k = stages() - 1; k >= 0; --k) {
      auto v = (stages_[std::size_t(k)].*get)();
      out.insert(out.end(), v.begin(), v.end());
    }
    return out;
  }

  Options options_;
  std::vector<Stage> stages_;
  std::vector<ConstTensor4Ref<Scalar>> outputs_;
  bool has_forward_ = false;
};

template <class Scalar>
const std::vector<ConstTensor4Ref<Scalar>>& ReviewFusion<Scalar>::forward(
    const std::vector<ConstTensor4Ref<Scalar>>& features) {
  check_features(features);
  has_forward_ = false;
  const Index s = stages();
  for (Index k = s - 1; k >= 0; --k) {
    auto& a = stages_[std::size_t(k)];
    const Index out = options_.out_shapes.empty() ? 0 : options_.out_shapes[std::size_t(k)];
    const auto& x = features[std::size_t(k)];
    if (k == s - 1) {
      a.check_forward(x, nullptr, out);
      a.forward_pending(x, nullptr, out);
    } else {
      const ConstTensor4Ref<Scalar> r(stages_[std::size_t(k + 1)].residual());
      a.check_forward(x, &r, out);
      a.forward_pending(x, &r, out);
    }
    a.check_output();
  }
  for (auto& a : stages_) a.commit_forward();
  outputs_.clear();
  for (auto& a : stages_) outputs_.emplace_back(a.output());
  has_forward_ = true;
  return outputs_;
}

template <class Scalar>
void ReviewFusion<Scalar>::backward(const std::vector<ConstTensor4Ref<Scalar>>& d_outputs,
                                    const std::vector<Tensor4Ref<Scalar>>& d_features) {
  if (!has_forward_) detail::throw_invalid(kName, "backward called before forward");
  const Index s = stages();
  check_count("d_outputs", d_outputs.size());
  check_count("d_features", d_features.size());
  for (Index k = 0; k < s; ++k) {
    const auto& a = stages_[std::size_t(k)];
    const auto& o = a.output().dimensions();
    const auto& x = a.x_.dimensions();
    const std::string ks = std::to_string(k);  // short: no allocation
    detail::check_shape4(
        kName, [&] { return stage_str(k) + ": d_outputs[" + ks + "]"; }, d_outputs[std::size_t(k)],
        o[0], o[1], o[2], o[3], "shape of its output");
    detail::check_shape4(
        kName, [&] { return stage_str(k) + ": d_features[" + ks + "]"; },
        d_features[std::size_t(k)], x[0], x[1], x[2], x[3], "shape of its feature");
    if (!detail::all_finite4(d_outputs[std::size_t(k)])) {
      detail::throw_numerical(
          kName, detail::bad_element4("d_outputs[" + ks + "]", d_outputs[std::size_t(k)]));
    }
  }
  // The residual of stage k feeds stage k − 1, so its gradient is that stage's dres_in_.
  for (Index k = 0; k < s; ++k) {
    stages_[std::size_t(k)].backward_pending(
        d_outputs[std::size_t(k)], k == 0 ? nullptr : stages_[std::size_t(k - 1)].dres_in_.data());
  }
  for (const auto& a : stages_) a.check_pending();
  for (Index k = 0; k < s; ++k)
    stages_[std::size_t(k)].commit_backward(d_features[std::size_t(k)].data(), nullptr);
}

MMKD_EXTERN_TEMPLATE(ReviewFusion)

}  // namespace mmkd
