#pragma once

namespace mmkd {

/// How per-element terms are combined into the loss.
///
/// - `BatchMean`: sum over classes (features), mean over the rows that take part. For KL-type
///   losses this is the true mean KL per sample (PyTorch `reduction="batchmean"`).
/// - `Mean`: mean over every element that takes part (rows x classes; PyTorch `"mean"`).
/// - `Sum`: plain sum.
enum class Reduction { Mean, BatchMean, Sum };

inline const char* to_string(Reduction r) {
  switch (r) {
    case Reduction::Mean:
      return "Mean";
    case Reduction::BatchMean:
      return "BatchMean";
    case Reduction::Sum:
      return "Sum";
  }
  return "?";
}

}  // namespace mmkd
