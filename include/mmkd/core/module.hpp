#pragma once

#include "mmkd/core/types.hpp"

namespace mmkd {

/// A named, writable view of one parameter tensor of a module (or of its gradient), flattened to
/// a row-major matrix, so any optimiser can update it in place.
template <class Scalar>
struct ParameterView {
  const char* name;  //!< the reference implementation's name, e.g. "abfs.0.conv1.0.weight"
  Eigen::Map<Matrix<Scalar>> value;  //!< the memory itself, viewed in place
};

}  // namespace mmkd
