#pragma once

#include <cmath>
#include <cstdint>

namespace mmkd {

/// A small, explicitly seeded generator (SplitMix64): the same seed gives the same stream on
/// every platform and compiler, unlike the `std::` distributions. mmkd has no global RNG.
class SplitMix64 {
 public:
  //! A generator seeded with `seed` (the same seed, the same sequence on every platform).
  explicit SplitMix64(std::uint64_t seed) : state_(seed) {}

  //! The next 64 random bits.
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  /// Uniform in [0, 1) with 53 random bits.
  double uniform() { return double(next() >> 11) * 0x1.0p-53; }
  /// Uniform in [lo, hi).
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  /// Standard normal (Box–Muller).
  double normal() {
    const double u1 = 1.0 - uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }

 private:
  std::uint64_t state_;
};

}  // namespace mmkd
