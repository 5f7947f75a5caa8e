#pragma once

// What the optimisers share: their parameter and gradient lists, checked once, and the checks
// every step makes before it writes.

#include <string>
#include <vector>

#include "mmkd/core/errors.hpp"
#include "mmkd/core/module.hpp"

namespace mmkd {
namespace detail {

/// An optimiser's parameters and gradients: as many of each, pairwise of the same shape.
template <class Scalar>
void check_parameter_pairs(const char* cls, const std::vector<ParameterView<Scalar>>& params,
                           const std::vector<ParameterView<Scalar>>& grads) {
  if (params.size() != grads.size())
    throw_invalid(cls, std::to_string(params.size()) + " parameters but " +
                           std::to_string(grads.size()) + " gradients (one per parameter)");
  for (std::size_t k = 0; k < params.size(); ++k)
    check_shape(cls, grads[k].name, grads[k].value, params[k].value.rows(), params[k].value.cols(),
                "the gradient of the parameter at the same position");
}

/// Throws NumericalError naming the first non-finite gradient entry, before a step writes.
template <class Scalar>
void check_finite_gradients(const char* cls, const std::vector<ParameterView<Scalar>>& grads) {
  for (const auto& g : grads)
    if (!all_finite(g.value)) throw_numerical(cls, bad_entry("gradient", g.name, g.value));
}

template <class Scalar>
void zero_gradients(std::vector<ParameterView<Scalar>>& grads) {
  for (auto& g : grads) g.value.setZero();
}

}  // namespace detail
}  // namespace mmkd
