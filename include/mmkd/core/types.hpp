#pragma once

#include <cstdint>

#include <Eigen/Core>

#include "mmkd/detail/scalar.hpp"

namespace mmkd {

using Index = Eigen::Index;

/// A batch: rows are samples, row-major, the memory layout of a contiguous PyTorch tensor.
template <class Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <class Scalar>
using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

/// Read-only input. Binds to a `Matrix`, a `Map` of a raw buffer or a block without copying
/// (a column-major argument is copied into a temporary by Eigen).
template <class Scalar>
using ConstMatrixRef = Eigen::Ref<const Matrix<Scalar>>;

/// Gradient output: must be row-major with unit inner stride; never copied.
template <class Scalar>
using MatrixRef = Eigen::Ref<Matrix<Scalar>>;

template <class Scalar>
using ConstVectorRef = Eigen::Ref<const Vector<Scalar>>;

template <class Scalar>
using VectorRef = Eigen::Ref<Vector<Scalar>>;

/// Class labels, one per row, in [0, C).
using Labels = Eigen::VectorXi;
using ConstLabelsRef = Eigen::Ref<const Labels>;

/// Per-row mask: 1 = the row takes part, 0 = the row is ignored (not read, zero gradient).
/// One byte per row, so a `torch::kBool` or `torch::kUInt8` tensor maps without a copy.
using RowMask = Eigen::Matrix<std::uint8_t, Eigen::Dynamic, 1>;
using ConstRowMaskRef = Eigen::Ref<const RowMask>;

}  // namespace mmkd
