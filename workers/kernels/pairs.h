// The pairs-layout product shared by the kernels that run on AVX512-BF16's `vdpbf16ps`
// (pairs_linear.cpp, prefill_attention.cpp).
//
// A "weight" of N = 32 columns over K = 2 P inputs is laid out as [P][32 columns][2]: one
// 64-byte load holds the weights of inputs 2p and 2p + 1 for 16 columns, and `vdpbf16ps`
// adds their products with one row's inputs 2p, 2p + 1 (a 32-bit broadcast) into 16 float
// sums. Nothing is widened and nothing summed across lanes; MR rows share each load.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace electron {

constexpr int64_t PAIR_COLS = 32;  // columns of a tile: two vectors of 16 floats

#if defined(__AVX512BF16__)

// acc[m][h] += lanes 16h .. 16h + 15 of x_m w for rows x_m = x + m * stride (2 P bfloat16
// each) and the tile w ([P][32][2] bfloat16).
template <int MR>
inline void pairs_add(const c10::BFloat16* x, int64_t stride, int64_t P, const c10::BFloat16* w,
                      __m512 (&acc)[MR][2]) {
  for (int64_t p = 0; p < P; ++p) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + p * 2 * PAIR_COLS);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + p * 2 * PAIR_COLS + PAIR_COLS);
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      std::memcpy(&pair, x + m * stride + 2 * p, sizeof pair);
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, w0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, w1);
    }
  }
}

// acc[m][h] = the same sums from zero.
template <int MR>
inline void pairs_tile(const c10::BFloat16* x, int64_t stride, int64_t P, const c10::BFloat16* w,
                       __m512 (&acc)[MR][2]) {
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  pairs_add<MR>(x, stride, P, w, acc);
}

// fn.template operator()<MR>() for MR = min(rows, MAX): the row count as a template
// argument, so that a tile's sums stay in registers.
template <int MAX, typename Fn>
inline void with_rows(int64_t rows, Fn&& fn) {
  if constexpr (MAX > 1) {
    if (rows < MAX) return with_rows<MAX - 1>(rows, fn);
  }
  fn.template operator()<MAX>();
}

#endif

}  // namespace electron
