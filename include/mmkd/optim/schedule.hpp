#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "mmkd/core/errors.hpp"

namespace mmkd {

/**
 * The learning rate at `step` (from 0) of a linear warm-up followed by a cosine decay, the
 * schedule of Hugging Face's `get_cosine_schedule_with_warmup` (half a cosine) with a floor:
 *
 *     lr = base · step / warmup                                     for step < warmup
 *     lr = min + (base − min) · ½ (1 + cos(π · p)),  p = (step − warmup) / (total − warmup)
 *
 * p is clamped to [0, 1], so steps past `total` stay at `min`. Set an optimiser's rate before each
 * step: `adam.options().lr = mmkd::warmup_cosine(step, 100, 10000, 3e-4);`.
 */
inline double warmup_cosine(std::int64_t step, std::int64_t warmup, std::int64_t total, double base,
                            double min = 0) {
  static constexpr const char* kName = "warmup_cosine";
  if (step < 0 || warmup < 0 || total < warmup)
    detail::throw_invalid(kName, "needs 0 <= step and 0 <= warmup <= total, got step " +
                                     std::to_string(step) + ", warmup " + std::to_string(warmup) +
                                     ", total " + std::to_string(total));
  detail::check_positive(kName, "base", base);
  if (!(min >= 0 && min <= base))
    detail::throw_invalid(kName, "min must be in [0, base], got " + std::to_string(min));
  if (step < warmup) return base * double(step) / double(warmup);
  const double span = double(std::max<std::int64_t>(1, total - warmup));
  const double p = std::min(1.0, double(step - warmup) / span);
  return min + (base - min) * 0.5 * (1 + std::cos(3.14159265358979323846 * p));
}

}  // namespace mmkd
