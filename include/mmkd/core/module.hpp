#pragma once

#include "mmkd/core/types.hpp"

namespace mmkd {

/// A named, writable view of one parameter tensor of a module (or of its gradient), flattened to
/// a row-major matrix, so any optimiser can update it in place.
template <class Scalar>
struct ParameterView {
  const char* name;
  Eigen::Map<Matrix<Scalar>> value;
};

}  // namespace mmkd
