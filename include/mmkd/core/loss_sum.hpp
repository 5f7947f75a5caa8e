#pragma once

// A weighted sum of loss terms: one call runs every term into the caller's gradient buffers,
// and each term's last value stays readable by name for logging.

#include <functional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "mmkd/core/errors.hpp"
#include "mmkd/detail/scalar.hpp"

namespace mmkd {

/**
 * L = Σ_k w_k · L_k, where each term L_k is an mmkd loss (or any callable) that adds its gradient
 * to the caller's buffers. A term's weight scales its value *and* its gradient: for an mmkd loss
 * it multiplies the loss's own `options().weight` for the duration of the call (restored
 * afterwards, also when the call throws).
 *
 * ```cpp
 * mmkd::LogitKD<float> kd;
 * mmkd::CrossEntropy<float> ce;
 * mmkd::LossSum<float> total;
 * total.add("kd", 0.9f, kd, [&](auto& loss) { return loss.value_and_grad(student, teacher, grad);
 * }); total.add("ce", 0.1f, ce, [&](auto& loss) { return loss.value_and_grad(student, labels,
 * grad); });
 * // each step: zero grad, then
 * float loss = total.value_and_grad();  // grad += 0.9 dKD/ds + 0.1 dCE/ds
 * for (const auto& t : total.terms()) log(t.name, t.value);  // 0.9·KD and 0.1·CE of this call
 * ```
 *
 * The callables capture their inputs by reference, so the same LossSum serves every step when
 * the step reuses its buffers. A term that is not an mmkd loss is added as a callable that
 * receives its weight: `total.add("l2", 1e-4f, [&](float w) { ...; return w * value; })`.
 *
 * Terms run in the order they were added. If term k throws, terms 0..k−1 have already added
 * their gradients (each mmkd loss keeps its own strong guarantee); zero the buffers before
 * retrying the step. After the first call nothing allocates; `add` allocates.
 */
template <class Scalar = float>
class LossSum : detail::FloatingScalar<Scalar> {
 public:
  /// A term's name, weight, and weighted value of the last call (0 before any call).
  struct Term {
    std::string name;  //!< the name given to add()
    Scalar weight;     //!< scales the term's value and gradient
    Scalar value;      //!< weight · the term's value, at the last call
  };

  /// Adds an mmkd loss: `call(loss)` computes it (value_and_grad, or value for a term whose
  /// gradient is not wanted) with `loss.options().weight` multiplied by `weight`.
  template <class Loss, class Call,
            std::enable_if_t<std::is_invocable_r_v<Scalar, Call&, Loss&>, int> = 0>
  LossSum& add(std::string name, Scalar weight, Loss& loss, Call call) {
    return add_term(std::move(name), weight, [&loss, call](Scalar w) mutable {
      Scalar& own = loss.options().weight;
      const Restore restore{own, own};
      own *= w;
      return Scalar(call(loss));
    });
  }

  /// Adds any term as `call(weight)`, which must return the weighted value and scale the
  /// gradient it adds by `weight` itself.
  template <class Call, std::enable_if_t<std::is_invocable_r_v<Scalar, Call&, Scalar>, int> = 0>
  LossSum& add(std::string name, Scalar weight, Call call) {
    return add_term(std::move(name), weight, std::move(call));
  }

  /// Runs every term and returns Σ_k w_k L_k; each term's weighted value is kept in terms().
  Scalar value_and_grad() {
    Scalar total = 0;
    for (std::size_t k = 0; k < terms_.size(); ++k) {
      terms_[k].value = calls_[k](terms_[k].weight);
      total += terms_[k].value;
    }
    return total;
  }

  //! Every term, in the order added, with its last value.
  const std::vector<Term>& terms() const { return terms_; }
  /// The weighted value of term `name` in the last call.
  Scalar value(std::string_view name) const { return terms_[find(name)].value; }
  /// Term `name`'s weight, to change between steps (a schedule).
  Scalar& weight(std::string_view name) { return terms_[find(name)].weight; }

 private:
  // Puts a loss's weight option back when the term's call returns or throws.
  struct Restore {
    Scalar& target;
    Scalar saved;
    ~Restore() { target = saved; }
  };

  template <class F>
  LossSum& add_term(std::string name, Scalar weight, F&& call) {
    if (!(weight >= Scalar(0)) || !detail::is_finite(weight))
      detail::throw_invalid(kName, "term \"" + name + "\" has weight " + std::to_string(weight) +
                                       ", expected finite and >= 0");
    for (const auto& t : terms_)
      if (t.name == name) detail::throw_invalid(kName, "a term named \"" + name + "\" exists");
    calls_.emplace_back(std::forward<F>(call));
    terms_.push_back({std::move(name), weight, Scalar(0)});
    return *this;
  }
  std::size_t find(std::string_view name) const {
    for (std::size_t k = 0; k < terms_.size(); ++k)
      if (terms_[k].name == name) return k;
    detail::throw_invalid(kName, "no term named \"" + std::string(name) + "\"");
  }

  static constexpr const char* kName = "LossSum";
  std::vector<Term> terms_;
  std::vector<std::function<Scalar(Scalar)>> calls_;
};

MMKD_EXTERN_TEMPLATE(LossSum)

}  // namespace mmkd
