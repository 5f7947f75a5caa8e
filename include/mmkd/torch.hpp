#pragma once

// mmkd losses as libtorch autograd functions (needs libtorch; not part of mmkd/mmkd.hpp). With
// CMake: find_package(mmkd REQUIRED COMPONENTS torch) and link mmkd::torch.
//
// Each wrapper views the tensors' memory in place (CPU, contiguous, float or double to match the
// loss, or bfloat16 for the logit losses that read it; nothing is copied except integer labels
// that are not int32), runs the loss's fused
// `value_and_grad` in the forward pass, saves the gradients, and in the backward pass returns them
// scaled by the incoming gradient: d(loss)/d(input) · grad_output. Gradients flow to the inputs
// mmkd differentiates (the student's, always; the teacher's where the loss offers it and the
// tensor requires grad); an input that requires grad but gets none from mmkd is an error rather
// than a silent zero gradient.
//
//   mmkd::LogitKD<float> kd;
//   torch::Tensor loss = mmkd_torch::logit_kd(kd, student_logits, teacher_logits.detach());
//   loss.backward();   // student_logits.grad() = dKD/dstudent, as autograd would give
//
// The functions live in namespace mmkd_torch, outside mmkd, so that `torch::` means libtorch
// wherever both are used. Bad tensors throw mmkd::InvalidArgument ("mmkd_torch: <loss>: ...").
// ReviewFusionModule is mmkd's ReviewFusion as a torch::nn::Module, for a libtorch student.
// Row masks are 1-D bool or uint8 tensors of N entries (1 = the row takes part), viewed in
// place; class labels follow PyTorch's convention that -100 marks a row to ignore.

#include <torch/torch.h>

#include "mmkd/mmkd.hpp"

#include <functional>
#include <string>
#include <vector>

namespace mmkd_torch {

/// Whether the wrapper computes a gradient for an input.
enum class Grad { Always, IfRequired, Never };

/// One call of an mmkd loss: the inputs' names and gradient policy, and a function that runs
/// `value_and_grad` with gradient buffers (undefined where no gradient is wanted).
struct LossCall {
  std::string loss;                //!< the loss's name, for messages
  std::vector<std::string> names;  //!< each input's name, for messages
  std::vector<Grad> grads;         //!< each input's gradient policy
  //! runs value_and_grad into the buffers; returns the value
  std::function<double(const std::vector<at::Tensor>& buffers)> run;
  //! the loss value's dtype: the loss's scalar type; Undefined means the first input's
  at::ScalarType value_dtype = at::ScalarType::Undefined;
};

namespace detail {

template <class S>
c10::ScalarType dtype_of() {
  static_assert(std::is_same<S, float>::value || std::is_same<S, double>::value ||
                    std::is_same<S, mmkd::bfloat16>::value,
                "mmkd_torch: float, double or bfloat16");
  if (std::is_same<S, mmkd::bfloat16>::value) return at::kBFloat16;
  return std::is_same<S, float>::value ? at::kFloat : at::kDouble;
}

[[noreturn]] inline void fail(const std::string& loss, const std::string& msg) {
  mmkd::detail::throw_invalid("mmkd_torch", loss + ": " + msg);
}

template <class S>
void check(const std::string& loss, const char* name, const at::Tensor& t, int64_t dim,
           const char* why = "the loss's scalar type") {
  if (!t.defined()) fail(loss, std::string(name) + " is undefined");
  if (t.scalar_type() != dtype_of<S>())
    fail(loss, std::string(name) + " has dtype " + std::string(c10::toString(t.scalar_type())) +
                   ", expected " + c10::toString(dtype_of<S>()) + " (" + why + ")");
  if (!t.device().is_cpu()) fail(loss, std::string(name) + " is not on the CPU");
  if (!t.is_contiguous())
    fail(loss, std::string(name) + " is not contiguous (call .contiguous(): mmkd works in place)");
  if (t.dim() != dim)
    fail(loss, std::string(name) + " has " + std::to_string(t.dim()) + " dimensions, expected " +
                   std::to_string(dim));
}

// Views of checked tensors (bfloat16: at::BFloat16's 16 bits, read as Eigen's bfloat16).
template <class S>
Eigen::Map<const mmkd::Matrix<S>> cmat(const at::Tensor& t) {
  return {static_cast<const S*>(t.data_ptr()), t.size(0), t.size(1)};
}
template <class S>
Eigen::Map<mmkd::Matrix<S>> mat(const at::Tensor& t) {
  return {static_cast<S*>(t.data_ptr()), t.size(0), t.size(1)};
}

// Calls f(S()) for tensors of the loss's scalar type S, f(mmkd::bfloat16()) for bfloat16 ones:
// the logit losses read either.
template <class S, class F>
decltype(auto) with_logit_storage(const at::Tensor& t, F&& f) {
  if (t.defined() && t.scalar_type() == at::kBFloat16) return f(mmkd::bfloat16());
  return f(S());
}
template <class S>
mmkd::ConstTensor3Ref<S> ct3(const at::Tensor& t) {
  return {t.data_ptr<S>(), t.size(0), t.size(1), t.size(2)};
}
template <class S>
mmkd::Tensor3Ref<S> t3(const at::Tensor& t) {
  return {t.data_ptr<S>(), t.size(0), t.size(1), t.size(2)};
}
template <class S>
mmkd::ConstTensor4Ref<S> ct4(const at::Tensor& t) {
  return {t.data_ptr<S>(), t.size(0), t.size(1), t.size(2), t.size(3)};
}
template <class S>
mmkd::Tensor4Ref<S> t4(const at::Tensor& t) {
  return {t.data_ptr<S>(), t.size(0), t.size(1), t.size(2), t.size(3)};
}

// Integer class labels as int32 (a view when they are int32 already).
inline at::Tensor labels_int32(const std::string& loss, const at::Tensor& y) {
  if (!y.defined() || y.dim() != 1 || !at::isIntegralType(y.scalar_type(), false))
    fail(loss, "labels must be a 1-D integer tensor");
  return y.to(at::kInt).contiguous();
}
inline Eigen::Map<const mmkd::Labels> labels_view(const at::Tensor& y32) {
  return {y32.data_ptr<int>(), y32.size(0)};
}

// A 1-D bool or uint8 tensor of n entries as a row mask, viewed in place (both store one byte
// per row, 0 or 1).
inline Eigen::Map<const mmkd::RowMask> mask_view(const std::string& loss, const at::Tensor& mask,
                                                 int64_t n) {
  if (!mask.defined() || mask.dim() != 1 || mask.size(0) != n)
    fail(loss, "mask must be a 1-D tensor of " + std::to_string(n) + " entries (one per row)");
  if (mask.scalar_type() != at::kBool && mask.scalar_type() != at::kByte)
    fail(loss, "mask has dtype " + std::string(c10::toString(mask.scalar_type())) +
                   ", expected Bool or Byte");
  if (!mask.device().is_cpu() || !mask.is_contiguous()) fail(loss, "mask must be contiguous, CPU");
  return {static_cast<const std::uint8_t*>(mask.data_ptr()), n};
}

// Labels with PyTorch's ignore index -100: int32 labels with those rows set to class 0, and the
// mask that drops them, combined with `mask` when one is given; the mask stays undefined when
// neither asks for one.
struct MaskedLabels {
  at::Tensor labels, mask;  // int32; bool or uint8, or undefined
};
inline MaskedLabels ignore_index(const std::string& loss, const at::Tensor& labels,
                                 const at::Tensor& mask) {
  at::Tensor y = labels_int32(loss, labels);
  const at::Tensor ignored = y.eq(-100);
  if (mask.defined()) mask_view(loss, mask, y.size(0));  // its checks
  if (!ignored.any().item<bool>()) return {y, mask};
  const at::Tensor keep = mask.defined() ? mask.to(at::kByte) : at::ones_like(y, at::kByte);
  return {y.masked_fill(ignored, 0).contiguous(), keep.masked_fill(ignored, 0).contiguous()};
}

}  // namespace detail

/// The autograd node: forward runs the loss and saves its gradients; backward scales them.
struct LossFunction : torch::autograd::Function<LossFunction> {
  //! Runs the loss, saving its gradients.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const LossCall* call,
                            at::TensorList inputs) {
    std::vector<at::Tensor> buffers(inputs.size());
    for (std::size_t k = 0; k < inputs.size(); ++k) {
      const bool wanted = inputs[k].requires_grad();
      if (wanted && call->grads[k] == Grad::Never)
        detail::fail(call->loss, call->names[k] +
                                     " requires grad, but the loss gives no gradient for it "
                                     "(pass it detached)");
      if (call->grads[k] == Grad::Always || (wanted && call->grads[k] == Grad::IfRequired))
        buffers[k] = at::zeros_like(inputs[k]);
    }
    const double value = call->run(buffers);
    ctx->save_for_backward(buffers);
    const auto dtype = call->value_dtype == at::ScalarType::Undefined ? inputs[0].scalar_type()
                                                                      : call->value_dtype;
    return at::scalar_tensor(value, inputs[0].options().dtype(dtype));
  }

  //! The saved gradients times the incoming gradient.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_output) {
    torch::autograd::variable_list out{at::Tensor()};  // none for the LossCall pointer
    for (const auto& g : ctx->get_saved_variables())
      out.push_back(g.defined() ? g * grad_output[0] : at::Tensor());
    return out;
  }
};

inline at::Tensor run_loss(const LossCall& call, at::TensorList inputs) {
  return LossFunction::apply(&call, inputs);
}

namespace detail {

// A loss of two N x D matrices whose first gradient is always computed and second on request;
// `extra` (a row mask) goes between the inputs and the gradients.
// In: the tensors' storage type (S, or bfloat16 for a loss that reads it; the gradients then
// come back in bfloat16 too, as autograd expects of a bfloat16 input).
template <class S, class In = S, class Loss, class... Extra>
at::Tensor matrix_pair(Loss& loss, const std::string& name, const char* first, const char* second,
                       const at::Tensor& a, const at::Tensor& b, const Extra&... extra) {
  check<In>(name, first, a, 2);
  check<In>(name, second, b, 2,
            std::is_same<In, S>::value ? "the loss's scalar type" : "the student's");
  const LossCall call{name,
                      {first, second},
                      {Grad::Always, Grad::IfRequired},
                      [&](const std::vector<at::Tensor>& g) -> double {
                        if (g[1].defined())
                          return loss.value_and_grad(cmat<In>(a), cmat<In>(b), extra...,
                                                     mat<In>(g[0]), mat<In>(g[1]));
                        return loss.value_and_grad(cmat<In>(a), cmat<In>(b), extra...,
                                                   mat<In>(g[0]));
                      },
                      dtype_of<S>()};
  return run_loss(call, {a, b});
}

// A student/teacher logit loss with an optional row mask (undefined: every row), on tensors of
// the loss's scalar type or of bfloat16.
template <class S, class Loss>
at::Tensor masked_logit_pair(Loss& loss, const char* name, const at::Tensor& student,
                             const at::Tensor& teacher, const at::Tensor& mask) {
  return with_logit_storage<S>(student, [&](auto storage) {
    using In = decltype(storage);
    if (!mask.defined())
      return matrix_pair<S, In>(loss, name, "student", "teacher", student, teacher);
    check<In>(name, "student", student, 2);  // the mask's length is its row count
    const auto m = mask_view(name, mask, student.size(0));
    return matrix_pair<S, In>(loss, name, "student", "teacher", student, teacher, m);
  });
}

}  // namespace detail

/// LogitKD on N x C logits; the teacher's gradient too when it requires grad. `mask` (N, bool or
/// uint8) drops rows, e.g. the padding positions of token-level distillation. Student and
/// teacher may both be BFloat16: the loss is computed and returned in S, the gradients BFloat16.
template <class S>
at::Tensor logit_kd(mmkd::LogitKD<S>& loss, const at::Tensor& student, const at::Tensor& teacher,
                    const at::Tensor& mask = at::Tensor()) {
  return detail::masked_logit_pair<S>(loss, "LogitKD", student, teacher, mask);
}

/// LogitDivergence (any divergence) on N x V logits; the teacher's gradient too when it
/// requires grad; `mask` (N, bool or uint8) drops rows, e.g. padding tokens. BFloat16 logits
/// as for logit_kd.
template <class S>
at::Tensor logit_divergence(mmkd::LogitDivergence<S>& loss, const at::Tensor& student,
                            const at::Tensor& teacher, const at::Tensor& mask = at::Tensor()) {
  return detail::masked_logit_pair<S>(loss, "LogitDivergence", student, teacher, mask);
}

/// SparseLogitKD on N x V student logits against a top-k teacher: `teacher_indices` N x k
/// (int32 viewed in place, int64 as `torch::topk` returns them converted), `teacher_logprobs`
/// N x k of the student's dtype (no gradient); `mask` (N, bool or uint8) drops rows. Student and
/// log-probabilities may both be BFloat16 (loss in S, gradient BFloat16).
template <class S>
at::Tensor sparse_logit_kd(mmkd::SparseLogitKD<S>& loss, const at::Tensor& student,
                           const at::Tensor& teacher_indices, const at::Tensor& teacher_logprobs,
                           const at::Tensor& mask = at::Tensor()) {
  const std::string name = "SparseLogitKD";
  return detail::with_logit_storage<S>(student, [&](auto storage) {
    using In = decltype(storage);
    detail::check<In>(name, "student", student, 2);
    detail::check<In>(name, "teacher_logprobs", teacher_logprobs, 2,
                      std::is_same<In, S>::value ? "the loss's scalar type" : "the student's");
    if (!teacher_indices.defined() || teacher_indices.dim() != 2 ||
        !at::isIntegralType(teacher_indices.scalar_type(), false) ||
        !teacher_indices.device().is_cpu())
      detail::fail(name, "teacher_indices must be a 2-D integer CPU tensor");
    const at::Tensor idx = teacher_indices.to(at::kInt).contiguous();
    if (mask.defined()) detail::mask_view(name, mask, student.size(0));  // its checks
    const LossCall call{name,
                        {"student", "teacher_logprobs"},
                        {Grad::Always, Grad::Never},
                        [&](const std::vector<at::Tensor>& g) -> double {
                          const Eigen::Map<const mmkd::IndexMatrix> i(idx.data_ptr<int>(),
                                                                      idx.size(0), idx.size(1));
                          const auto s = detail::cmat<In>(student);
                          const auto lp = detail::cmat<In>(teacher_logprobs);
                          if (mask.defined())
                            return loss.value_and_grad(
                                s, i, lp, detail::mask_view(name, mask, student.size(0)),
                                detail::mat<In>(g[0]));
                          return loss.value_and_grad(s, i, lp, detail::mat<In>(g[0]));
                        },
                        detail::dtype_of<S>()};
    return run_loss(call, {student, teacher_logprobs});
  });
}

namespace detail {

// FusedLinearKD through the autograd node: gradients to h_s, w_s and (when given) b_s; the
// teacher (its head, or its logits) gets none.
// In: the tensors' storage type (S, or bfloat16 for all of them).
template <class S, class In>
at::Tensor fused_linear_as(mmkd::FusedLinearKD<S>& loss, const at::Tensor& h_s,
                           const at::Tensor& w_s, const at::Tensor& h_t, const at::Tensor& w_t,
                           const at::Tensor& logits, const at::Tensor& labels,
                           const at::Tensor& b_s, const at::Tensor& b_t) {
  const std::string name = "FusedLinearKD";
  check<In>(name, "h_s", h_s, 2);
  check<In>(name, "w_s", w_s, 2);
  const bool heads = !logits.defined();
  if (heads) {
    check<In>(name, "h_t", h_t, 2);
    check<In>(name, "w_t", w_t, 2);
  } else {
    check<In>(name, "teacher_logits", logits, 2);
  }
  if (b_s.defined()) check<In>(name, "b_s", b_s, 1);
  if (b_t.defined()) check<In>(name, "b_t", b_t, 1);
  const at::Tensor y = labels_int32(name, labels);  // -100 stays -100
  auto vec = [](const at::Tensor& b) {
    return b.defined()
               ? Eigen::Map<const mmkd::Vector<In>>(static_cast<const In*>(b.data_ptr()), b.size(0))
               : Eigen::Map<const mmkd::Vector<In>>(nullptr, 0);
  };
  std::vector<at::Tensor> inputs{h_s, w_s};
  std::vector<std::string> names{"h_s", "w_s"};
  std::vector<Grad> grads{Grad::Always, Grad::Always};
  if (b_s.defined()) {
    inputs.push_back(b_s);
    names.push_back("b_s");
    grads.push_back(Grad::Always);
  }
  const at::Tensor teacher[] = {h_t, w_t, logits, b_t};
  const char* teacher_names[] = {"h_t", "w_t", "teacher_logits", "b_t"};
  for (int k = 0; k < 4; ++k) {
    if (!teacher[k].defined()) continue;
    inputs.push_back(teacher[k]);
    names.push_back(teacher_names[k]);
    grads.push_back(Grad::Never);
  }
  const LossCall call{
      name, names, grads,
      [&](const std::vector<at::Tensor>& g) -> double {
        const auto hs = cmat<In>(h_s), ws = cmat<In>(w_s);
        const auto l = labels_view(y);
        const auto bs = vec(b_s), bt = vec(b_t);
        if (b_s.defined()) {
          Eigen::Map<mmkd::Vector<In>> db(static_cast<In*>(g[2].data_ptr()), g[2].size(0));
          if (heads)
            return loss.value_and_grad(hs, ws, cmat<In>(h_t), cmat<In>(w_t), l, bs, bt,
                                       mat<In>(g[0]), mat<In>(g[1]), db);
          return loss.value_and_grad(hs, ws, cmat<In>(logits), l, bs, mat<In>(g[0]), mat<In>(g[1]),
                                     db);
        }
        if (heads)
          return loss.value_and_grad(hs, ws, cmat<In>(h_t), cmat<In>(w_t), l, bs, bt, mat<In>(g[0]),
                                     mat<In>(g[1]), Eigen::Map<mmkd::Vector<In>>(nullptr, 0));
        return loss.value_and_grad(hs, ws, cmat<In>(logits), l, mat<In>(g[0]), mat<In>(g[1]));
      },
      dtype_of<S>()};
  return run_loss(call, inputs);
}

template <class S>
at::Tensor fused_linear(mmkd::FusedLinearKD<S>& loss, const at::Tensor& h_s, const at::Tensor& w_s,
                        const at::Tensor& h_t, const at::Tensor& w_t, const at::Tensor& logits,
                        const at::Tensor& labels, const at::Tensor& b_s, const at::Tensor& b_t) {
  return with_logit_storage<S>(h_s, [&](auto storage) {
    using In = decltype(storage);
    return fused_linear_as<S, In>(loss, h_s, w_s, h_t, w_t, logits, labels, b_s, b_t);
  });
}

}  // namespace detail

/// FusedLinearKD: the student's hidden states h_s (N x d) and head weight w_s (V x d) with the
/// teacher's h_t, w_t, and N integer labels (-100: the row takes no part); optional head biases
/// (V). Gradients flow to h_s, w_s and b_s; the teacher's tensors must not require grad. All of
/// them may be BFloat16 (computed in S, the gradients BFloat16).
template <class S>
at::Tensor fused_linear_kd(mmkd::FusedLinearKD<S>& loss, const at::Tensor& h_s,
                           const at::Tensor& w_s, const at::Tensor& h_t, const at::Tensor& w_t,
                           const at::Tensor& labels, const at::Tensor& b_s = at::Tensor(),
                           const at::Tensor& b_t = at::Tensor()) {
  return detail::fused_linear(loss, h_s, w_s, h_t, w_t, at::Tensor(), labels, b_s, b_t);
}

/// FusedLinearKD with the teacher's precomputed logits (N x V) instead of its head.
template <class S>
at::Tensor fused_linear_kd_with_logits(mmkd::FusedLinearKD<S>& loss, const at::Tensor& h_s,
                                       const at::Tensor& w_s, const at::Tensor& teacher_logits,
                                       const at::Tensor& labels,
                                       const at::Tensor& b_s = at::Tensor()) {
  return detail::fused_linear(loss, h_s, w_s, at::Tensor(), at::Tensor(), teacher_logits, labels,
                              b_s, at::Tensor());
}

/// DecoupledKD on N x C logits with N integer labels; rows labelled -100 or masked out by
/// `mask` (N, bool or uint8) are dropped.
template <class S>
at::Tensor decoupled_kd(mmkd::DecoupledKD<S>& loss, const at::Tensor& student,
                        const at::Tensor& teacher, const at::Tensor& labels,
                        const at::Tensor& mask = at::Tensor()) {
  detail::check<S>("DecoupledKD", "student", student, 2);
  detail::check<S>("DecoupledKD", "teacher", teacher, 2);
  const auto y = detail::ignore_index("DecoupledKD", labels, mask);
  const LossCall call{"DecoupledKD",
                      {"student", "teacher"},
                      {Grad::Always, Grad::Never},
                      [&](const std::vector<at::Tensor>& g) -> double {
                        const auto s = detail::cmat<S>(student), t = detail::cmat<S>(teacher);
                        const auto l = detail::labels_view(y.labels);
                        if (y.mask.defined())
                          return loss.value_and_grad(
                              s, t, l, detail::mask_view("DecoupledKD", y.mask, student.size(0)),
                              detail::mat<S>(g[0]));
                        return loss.value_and_grad(s, t, l, detail::mat<S>(g[0]));
                      }};
  return run_loss(call, {student, teacher});
}

/// CrossEntropy on N x C logits with N integer labels, PyTorch's `ignore_index = -100`: those
/// rows, and rows masked out by `mask` (N, bool or uint8), are dropped and the mean is over the
/// others. BFloat16 logits are read as such (loss in S, gradient BFloat16).
template <class S>
at::Tensor cross_entropy(mmkd::CrossEntropy<S>& loss, const at::Tensor& logits,
                         const at::Tensor& labels, const at::Tensor& mask = at::Tensor()) {
  return detail::with_logit_storage<S>(logits, [&](auto storage) {
    using In = decltype(storage);
    detail::check<In>("CrossEntropy", "logits", logits, 2);
    const auto y = detail::ignore_index("CrossEntropy", labels, mask);
    const LossCall call{"CrossEntropy",
                        {"logits"},
                        {Grad::Always},
                        [&](const std::vector<at::Tensor>& g) -> double {
                          const auto z = detail::cmat<In>(logits);
                          const auto l = detail::labels_view(y.labels);
                          if (y.mask.defined())
                            return loss.value_and_grad(
                                z, l, detail::mask_view("CrossEntropy", y.mask, logits.size(0)),
                                detail::mat<In>(g[0]));
                          return loss.value_and_grad(z, l, detail::mat<In>(g[0]));
                        },
                        detail::dtype_of<S>()};
    return run_loss(call, {logits});
  });
}

/// ModalitySpecificKD: student, teacher N x C; student_modal, teacher_modal M x N x C; weights
/// N x M. Gradients to student and student_modal.
template <class S>
at::Tensor modality_specific_kd(mmkd::ModalitySpecificKD<S>& loss, const at::Tensor& student,
                                const at::Tensor& teacher, const at::Tensor& student_modal,
                                const at::Tensor& teacher_modal, const at::Tensor& weights) {
  const std::string name = "ModalitySpecificKD";
  detail::check<S>(name, "student", student, 2);
  detail::check<S>(name, "teacher", teacher, 2);
  detail::check<S>(name, "student_modal", student_modal, 3);
  detail::check<S>(name, "teacher_modal", teacher_modal, 3);
  detail::check<S>(name, "weights", weights, 2);
  const LossCall call{name,
                      {"student", "teacher", "student_modal", "teacher_modal", "weights"},
                      {Grad::Always, Grad::Never, Grad::Always, Grad::Never, Grad::Never},
                      [&](const std::vector<at::Tensor>& g) -> double {
                        return loss.value_and_grad(
                            detail::cmat<S>(student), detail::cmat<S>(teacher),
                            detail::ct3<S>(student_modal), detail::ct3<S>(teacher_modal),
                            detail::cmat<S>(weights), detail::mat<S>(g[0]), detail::t3<S>(g[2]));
                      }};
  return run_loss(call, {student, teacher, student_modal, teacher_modal, weights});
}

/// ModalityGramKD on M x N x Ds student and M x N x Dt teacher embeddings; the teacher's gradient
/// too when it requires grad.
template <class S>
at::Tensor modality_gram_kd(mmkd::ModalityGramKD<S>& loss, const at::Tensor& student,
                            const at::Tensor& teacher) {
  detail::check<S>("ModalityGramKD", "student", student, 3);
  detail::check<S>("ModalityGramKD", "teacher", teacher, 3);
  const LossCall call{"ModalityGramKD",
                      {"student", "teacher"},
                      {Grad::Always, Grad::IfRequired},
                      [&](const std::vector<at::Tensor>& g) -> double {
                        const auto s = detail::ct3<S>(student), t = detail::ct3<S>(teacher);
                        if (g[1].defined())
                          return loss.value_and_grad(s, t, detail::t3<S>(g[0]),
                                                     detail::t3<S>(g[1]));
                        return loss.value_and_grad(s, t, detail::t3<S>(g[0]));
                      }};
  return run_loss(call, {student, teacher});
}

/// ChannelDecorrelation on N x C features (identity target).
template <class S>
at::Tensor channel_decorrelation(mmkd::ChannelDecorrelation<S>& loss, const at::Tensor& features) {
  detail::check<S>("ChannelDecorrelation", "features", features, 2);
  const LossCall call{"ChannelDecorrelation",
                      {"features"},
                      {Grad::Always},
                      [&](const std::vector<at::Tensor>& g) -> double {
                        return loss.value_and_grad(detail::cmat<S>(features), detail::mat<S>(g[0]));
                      }};
  return run_loss(call, {features});
}

/// Uniformity on N x D embeddings or N x C x H x W feature maps.
template <class S>
at::Tensor uniformity(mmkd::Uniformity<S>& loss, const at::Tensor& x) {
  detail::check<S>("Uniformity", "x", x, x.dim() == 4 ? 4 : 2);
  const LossCall call{
      "Uniformity", {"x"}, {Grad::Always}, [&](const std::vector<at::Tensor>& g) -> double {
        if (x.dim() == 4) return loss.value_and_grad(detail::ct4<S>(x), detail::t4<S>(g[0]));
        return loss.value_and_grad(detail::cmat<S>(x), detail::mat<S>(g[0]));
      }};
  return run_loss(call, {x});
}

/// InfoNCE of N x D queries against K x D keys; the keys' gradient too when they require grad.
/// A learned temperature is the loss's own parameter (`loss.parameters()` / `gradients()`).
template <class S>
at::Tensor info_nce(mmkd::InfoNCE<S>& loss, const at::Tensor& queries, const at::Tensor& keys) {
  return detail::matrix_pair<S>(loss, "InfoNCE", "queries", "keys", queries, keys);
}

/// SimilarityDistillation of N x D student against teacher embeddings, over [teacher; queue]
/// (queue: K x D past teacher embeddings, or undefined for none).
template <class S>
at::Tensor similarity_distillation(mmkd::SimilarityDistillation<S>& loss, const at::Tensor& student,
                                   const at::Tensor& teacher,
                                   const at::Tensor& queue = at::Tensor()) {
  const std::string name = "SimilarityDistillation";
  detail::check<S>(name, "student", student, 2);
  detail::check<S>(name, "teacher", teacher, 2);
  if (queue.defined()) detail::check<S>(name, "queue", queue, 2);
  const LossCall call{name,
                      {"student", "teacher", "queue"},
                      {Grad::Always, Grad::Never, Grad::Never},
                      [&](const std::vector<at::Tensor>& g) -> double {
                        const auto s = detail::cmat<S>(student), t = detail::cmat<S>(teacher);
                        if (queue.defined())
                          return loss.value_and_grad(s, t, detail::cmat<S>(queue),
                                                     detail::mat<S>(g[0]));
                        return loss.value_and_grad(s, t, detail::mat<S>(g[0]));
                      }};
  if (queue.defined()) return run_loss(call, {student, teacher, queue});
  return run_loss(call, {student, teacher});
}

/// HierarchicalContextLoss over stages: student and teacher maps N x C x H x W, one per stage.
template <class S>
at::Tensor hierarchical_context_loss(mmkd::HierarchicalContextLoss<S>& loss,
                                     const std::vector<at::Tensor>& student,
                                     const std::vector<at::Tensor>& teacher) {
  const std::string name = "HierarchicalContextLoss";
  if (student.empty() || student.size() != teacher.size())
    detail::fail(name, "student and teacher need the same number (≥ 1) of stages");
  LossCall call{name, {}, {}, nullptr};
  std::vector<at::Tensor> inputs;
  for (std::size_t k = 0; k < student.size(); ++k) {
    detail::check<S>(name, "student stage", student[k], 4);
    inputs.push_back(student[k]);
    call.names.push_back("student[" + std::to_string(k) + "]");
    call.grads.push_back(Grad::Always);
  }
  for (std::size_t k = 0; k < teacher.size(); ++k) {
    detail::check<S>(name, "teacher stage", teacher[k], 4);
    inputs.push_back(teacher[k]);
    call.names.push_back("teacher[" + std::to_string(k) + "]");
    call.grads.push_back(Grad::Never);
  }
  const std::size_t stages = student.size();
  call.run = [&](const std::vector<at::Tensor>& g) -> double {
    std::vector<mmkd::ConstTensor4Ref<S>> s, t;
    std::vector<mmkd::Tensor4Ref<S>> d;
    for (std::size_t k = 0; k < stages; ++k) {
      s.push_back(detail::ct4<S>(student[k]));
      t.push_back(detail::ct4<S>(teacher[k]));
      d.push_back(detail::t4<S>(g[k]));
    }
    return loss.value_and_grad(s, t, d);
  };
  return run_loss(call, inputs);
}

template <class S>
class ReviewFusionModule;

namespace detail {

// PyTorch's shape for a parameter or buffer of mmkd's ReviewFusion (the same memory): conv weights
// (O, C, kh, kw) as the reference's state_dict holds them, everything else 1-D.
inline std::vector<int64_t> torch_shape(const std::string& name, int64_t rows, int64_t cols) {
  auto ends_with = [&](const std::string& s) {
    return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0;
  };
  if (ends_with("conv2.0.weight")) return {rows, cols / 9, 3, 3};
  if (ends_with(".0.weight")) return {rows, cols, 1, 1};
  return {rows * cols};
}

// The autograd node of ReviewFusionModule: forward runs mmkd's forward and copies the outputs
// out (mmkd overwrites them at the next forward); backward runs mmkd's backward for the incoming
// cotangents and returns the feature and parameter gradients.
template <class S>
struct ReviewFusionFunction : torch::autograd::Function<ReviewFusionFunction<S>> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                ReviewFusionModule<S>* m, at::TensorList inputs) {
    auto& fusion = m->fusion_;
    const auto stages = static_cast<std::size_t>(fusion.stages());
    std::vector<mmkd::ConstTensor4Ref<S>> views;
    std::vector<int64_t> sizes;
    for (std::size_t k = 0; k < stages; ++k) {
      check<S>("ReviewFusion", ("features[" + std::to_string(k) + "]").c_str(), inputs[k], 4);
      views.push_back(ct4<S>(inputs[k]));
      for (int64_t d : inputs[k].sizes()) sizes.push_back(d);
    }
    const auto& outs = fusion.forward(views);
    torch::autograd::variable_list result;
    for (const auto& o : outs) {
      const auto& d = o.dimensions();
      at::Tensor t = at::empty({d[0], d[1], d[2], d[3]}, inputs[0].options());
      std::copy(o.data(), o.data() + o.size(), t.data_ptr<S>());
      result.push_back(t);
    }
    ctx->saved_data["module"] = reinterpret_cast<int64_t>(m);
    ctx->saved_data["generation"] = ++m->generation_;
    ctx->saved_data["sizes"] = sizes;
    return result;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    auto* m = reinterpret_cast<ReviewFusionModule<S>*>(ctx->saved_data["module"].toInt());
    if (ctx->saved_data["generation"].toInt() != m->generation_)
      fail("ReviewFusion",
           "backward of an earlier forward: the module keeps the state of its last forward "
           "only (call backward before the next forward)");
    auto& fusion = m->fusion_;
    const auto stages = static_cast<std::size_t>(fusion.stages());
    const auto sizes = ctx->saved_data["sizes"].toIntVector();
    std::vector<at::Tensor> d_out(stages), d_feat(stages);
    std::vector<mmkd::ConstTensor4Ref<S>> dov;
    std::vector<mmkd::Tensor4Ref<S>> dfv;
    const auto options = at::TensorOptions().dtype(dtype_of<S>());
    for (std::size_t k = 0; k < stages; ++k) {
      const auto& o = fusion.outputs()[k].dimensions();
      d_out[k] = grad_outputs[k].defined()
                     ? grad_outputs[k].contiguous()
                     : at::zeros({o[0], o[1], o[2], o[3]}, options);  // an unused output
      check<S>("ReviewFusion", ("grad of output " + std::to_string(k)).c_str(), d_out[k], 4);
      dov.push_back(ct4<S>(d_out[k]));
      d_feat[k] =
          at::zeros({sizes[4 * k], sizes[4 * k + 1], sizes[4 * k + 2], sizes[4 * k + 3]}, options);
      dfv.push_back(t4<S>(d_feat[k]));
    }
    fusion.zero_grad();
    fusion.backward(dov, dfv);
    torch::autograd::variable_list out{at::Tensor()};  // none for the module pointer
    out.insert(out.end(), d_feat.begin(), d_feat.end());
    auto grads = fusion.gradients();
    for (std::size_t j = 0; j < grads.size(); ++j)
      out.push_back(at::from_blob(grads[j].value.data(), m->params_[j].sizes(), options).clone());
    return out;
  }
};

}  // namespace detail

/// mmkd's ReviewFusion (the student's ABF chain of ReviewKD) as a libtorch module, for a student
/// trained with libtorch: `forward` takes the S student features N x C_k x H_k x W_k (shallow →
/// deep, contiguous CPU tensors of the module's scalar type) and returns the S fused maps, which
/// autograd differentiates with mmkd's analytic backward (features and parameters).
///
/// The parameters and the batch-norm buffers are registered under the reference's state_dict
/// names ("abfs.0.conv1.0.weight", ..., conv weights shaped (O, C, kh, kw)) and are views of the
/// mmkd module's own memory: a torch optimizer stepping `parameters()`, or `load_state_dict`-style
/// copies into them, change the mmkd module in place. `train()` / `eval()` switch both.
///
/// mmkd keeps the state of one forward: the backward of a forward must run before the next
/// forward (an older graph's backward throws mmkd::InvalidArgument, it never uses a newer
/// forward's state).
///
/// ```cpp
/// mmkd::ReviewFusion<float>::Options o;  // in_channels, out_channels, shapes, mid_channels
/// auto review = std::make_shared<mmkd_torch::ReviewFusionModule<float>>(o);
/// torch::optim::Adam opt(review->parameters(), 1e-3);
/// auto fused = review->forward(student_features);
/// auto loss = mmkd_torch::hierarchical_context_loss(hcl, fused, teacher_features);
/// loss.backward();  opt.step();
/// ```
template <class S = float>
class ReviewFusionModule : public torch::nn::Module {
 public:
  using Options = typename mmkd::ReviewFusion<S>::Options;  //!< mmkd::ReviewFusion's options

  ReviewFusionModule(const ReviewFusionModule&) = delete;  // the registered tensors view fusion_
  ReviewFusionModule& operator=(const ReviewFusionModule&) = delete;

  //! Builds the mmkd module (seeded initialisation) and registers views of its tensors.
  explicit ReviewFusionModule(const Options& options) : fusion_(options) {
    for (auto& p : fusion_.parameters()) params_.push_back(register_view(p, true));
    for (auto& b : fusion_.buffers()) register_view(b, false);
    fusion_.train(is_training());
  }

  //! The S fused maps (shallow → deep) for the S student features, as new tensors.
  std::vector<at::Tensor> forward(const std::vector<at::Tensor>& features) {
    if (features.size() != static_cast<std::size_t>(fusion_.stages()))
      detail::fail("ReviewFusion", "got " + std::to_string(features.size()) +
                                       " features, expected " + std::to_string(fusion_.stages()) +
                                       " (one per stage)");
    std::vector<at::Tensor> inputs(features);
    inputs.insert(inputs.end(), params_.begin(), params_.end());
    return detail::ReviewFusionFunction<S>::apply(this, at::TensorList(inputs));
  }

  //! Training or (false) eval mode, for this module and the mmkd one.
  void train(bool on = true) override {
    torch::nn::Module::train(on);
    fusion_.train(on);
  }

  /// The mmkd module whose memory the registered tensors view.
  mmkd::ReviewFusion<S>& fusion() { return fusion_; }
  const mmkd::ReviewFusion<S>& fusion() const { return fusion_; }  //!< read-only

 private:
  friend struct detail::ReviewFusionFunction<S>;

  // Registers a view of `v` under its dotted name, creating the empty parent modules on the way.
  at::Tensor register_view(mmkd::ParameterView<S> v, bool parameter) {
    const std::string name = v.name;
    torch::nn::Module* parent = this;
    std::size_t start = 0;
    for (std::size_t dot; (dot = name.find('.', start)) != std::string::npos; start = dot + 1) {
      const std::string part = name.substr(start, dot - start);
      auto children = parent->named_children();
      if (auto* child = children.find(part)) {
        parent = child->get();
      } else {
        parent = parent->register_module(part, std::make_shared<torch::nn::Module>()).get();
      }
    }
    at::Tensor t =
        at::from_blob(v.value.data(), detail::torch_shape(name, v.value.rows(), v.value.cols()),
                      at::TensorOptions().dtype(detail::dtype_of<S>()));
    const std::string leaf = name.substr(start);
    return parameter ? parent->register_parameter(leaf, t) : parent->register_buffer(leaf, t);
  }

  mmkd::ReviewFusion<S> fusion_;
  std::vector<at::Tensor> params_;  // the registered parameters, in fusion_.parameters() order
  std::int64_t generation_ = 0;     // forwards so far
};

}  // namespace mmkd_torch
