#pragma once

// bfloat16 storage: rows read into the compute type and gradients rounded back. Internal.
//
// A bfloat16 is the upper half of an IEEE float, so reading one is exact: its 16 bits shifted
// into the high half of a 32-bit word. Writing rounds a float to the nearest bfloat16, ties to
// even, by adding 0x7FFF plus the lowest kept bit to the word and keeping its high half; NaN is
// kept a (quiet) NaN of the same sign. Both loops are SSE2 on x86-64 (the baseline, so any build
// gets them) and plain C++ elsewhere.

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "mmkd/core/types.hpp"

#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#define MMKD_BF16_SSE2 1
#endif

namespace mmkd {
namespace detail {

inline float bf16_bits_to_float(std::uint16_t b) {
  const std::uint32_t u = std::uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline std::uint16_t float_to_bf16_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return std::uint16_t((u >> 16) | 0x0040u);  // NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return std::uint16_t(u >> 16);
}

/// out_k = in_k for n contiguous values (exact).
template <class T>
void load_bf16(const bfloat16* in, T* out, Index n) {
  const auto* src = reinterpret_cast<const std::uint16_t*>(in);
  Index k = 0;
#ifdef MMKD_BF16_SSE2
  if constexpr (std::is_same<T, float>::value) {
    const __m128i zero = _mm_setzero_si128();
    for (; k + 8 <= n; k += 8) {
      const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k));
      // Interleaving zeros below each 16-bit value puts it in the high half of a 32-bit lane.
      _mm_storeu_ps(out + k, _mm_castsi128_ps(_mm_unpacklo_epi16(zero, x)));
      _mm_storeu_ps(out + k + 4, _mm_castsi128_ps(_mm_unpackhi_epi16(zero, x)));
    }
  }
#endif
  for (; k < n; ++k) out[k] = T(bf16_bits_to_float(src[k]));
}

/// dst_k = bf16(float(dst_k) + g_k) for n contiguous values, rounded to nearest even.
template <class T>
void add_to_bf16(bfloat16* dst, const T* g, Index n) {
  auto* d = reinterpret_cast<std::uint16_t*>(dst);
  Index k = 0;
#ifdef MMKD_BF16_SSE2
  if constexpr (std::is_same<T, float>::value) {
    const __m128i zero = _mm_setzero_si128(), one = _mm_set1_epi32(1);
    const __m128i half = _mm_set1_epi32(0x7FFF), quiet = _mm_set1_epi32(0x00400000);
    const __m128i bias = _mm_set1_epi32(0x8000), bias16 = _mm_set1_epi16(-0x8000);
    auto round = [&](__m128 f) {
      const __m128i u = _mm_castps_si128(f);
      const __m128i r =
          _mm_add_epi32(u, _mm_add_epi32(half, _mm_and_si128(_mm_srli_epi32(u, 16), one)));
      const __m128i nan = _mm_castps_si128(_mm_cmpunord_ps(f, f));
      const __m128i v =
          _mm_or_si128(_mm_and_si128(nan, _mm_or_si128(u, quiet)), _mm_andnot_si128(nan, r));
      // The high halves, biased into int16's range for the signed-saturating pack.
      return _mm_sub_epi32(_mm_srli_epi32(v, 16), bias);
    };
    for (; k + 8 <= n; k += 8) {
      const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(d + k));
      const __m128 lo =
          _mm_add_ps(_mm_castsi128_ps(_mm_unpacklo_epi16(zero, x)), _mm_loadu_ps(g + k));
      const __m128 hi =
          _mm_add_ps(_mm_castsi128_ps(_mm_unpackhi_epi16(zero, x)), _mm_loadu_ps(g + k + 4));
      const __m128i packed = _mm_sub_epi16(_mm_packs_epi32(round(lo), round(hi)), bias16);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + k), packed);
    }
  }
#endif
  for (; k < n; ++k) d[k] = float_to_bf16_bits(float(T(bf16_bits_to_float(d[k])) + g[k]));
}

}  // namespace detail
}  // namespace mmkd
