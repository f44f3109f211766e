// The pairs-layout product shared by the kernels that run on AVX512-BF16's `vdpbf16ps`
// (pairs_linear.cpp, prefill_attention.cpp), and the same product on AMX's tiles.
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

#if defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define ELECTRON_AMX 1
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

#endif

#if defined(ELECTRON_AMX)
// AMX multiplies a 16 x 32 bfloat16 tile of x with 16 pairs of inputs x 16 columns of weights
// in one instruction (`tdpbf16ps`), and its weight operand is this very layout: 16 pairs of a
// tile's first (or last) 16 columns lie 128 bytes apart, 64 bytes each. So one copy serves
// both products. Tile registers: 0-3 the sums (row tile r, column half h at 2r + h), 4-5 rows of
// x, 6-7 weights.
inline constexpr int64_t AMX_ROWS = 16;      // rows of a tile
inline constexpr int64_t AMX_PAIRS = 16;     // pairs of inputs a tile multiplies at once
inline constexpr int64_t HALF = PAIR_COLS / 2;  // columns of a tile of sums

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux lets a process use AMX's 8 KiB of tile state only once it has asked (arch_prctl).
inline bool amx_usable() {
  static const bool ok = [] {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

// Every tile 16 rows of 64 bytes. The configuration is the calling thread's.
inline void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = AMX_ROWS;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
}

// c [RT * 16][32] floats = the rows a[r] (16 each, `lda` elements apart, K = 2 P inputs) times
// the tile w ([P][32][2]); the pairs past the last whole 16 are added with vdpbf16ps.
template <int RT>
inline void amx_tile(const c10::BFloat16* const (&a)[2], int64_t lda, const c10::BFloat16* w,
                     int64_t P, float* c) {
  const int64_t whole = P / AMX_PAIRS * AMX_PAIRS, a_bytes = lda * 2, w_bytes = 4 * PAIR_COLS;
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (RT == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t p = 0; p < whole; p += AMX_PAIRS) {
    _tile_loadd(4, a[0] + 2 * p, a_bytes);
    _tile_loadd(6, w + p * 2 * PAIR_COLS, w_bytes);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (RT == 2) {
      _tile_loadd(5, a[1] + 2 * p, a_bytes);
      _tile_dpbf16ps(2, 5, 6);
    }
    _tile_loadd(7, w + p * 2 * PAIR_COLS + PAIR_COLS, w_bytes);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (RT == 2) _tile_dpbf16ps(3, 5, 7);
  }
  constexpr int64_t c_bytes = PAIR_COLS * 4;
  _tile_stored(0, c, c_bytes);
  _tile_stored(1, c + HALF, c_bytes);
  if constexpr (RT == 2) {
    _tile_stored(2, c + AMX_ROWS * PAIR_COLS, c_bytes);
    _tile_stored(3, c + AMX_ROWS * PAIR_COLS + HALF, c_bytes);
  }
  if (whole == P) return;
  for (int r = 0; r < RT; ++r) {
    for (int64_t m = 0; m < AMX_ROWS; ++m) {
      float* row = c + (r * AMX_ROWS + m) * PAIR_COLS;
      __m512 acc[1][2] = {{_mm512_loadu_ps(row), _mm512_loadu_ps(row + HALF)}};
      pairs_add<1>(a[r] + m * lda + 2 * whole, lda, P - whole, w + whole * 2 * PAIR_COLS, acc);
      _mm512_storeu_ps(row, acc[0][0]);
      _mm512_storeu_ps(row + HALF, acc[0][1]);
    }
  }
}
#endif

}  // namespace electron
