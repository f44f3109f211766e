// y = x w^T (+ bias) in bfloat16 on a CPU with AVX512-BF16, from a copy of the weight laid out
// in pairs: every step, one token or a long prompt's chunk.
//
// `vdpbf16ps` adds to each of 16 float lanes the products of a pair of bfloat16 values with
// another pair. Laid out so that a 64-byte load holds, for 32 output columns, the weights of
// two consecutive inputs (k, k + 1) — [N / 32][K / 2][32 columns][2] — each pair of a token's
// inputs is broadcast once and feeds two instructions per weight load: no widening, no
// horizontal sums, the weights streamed once whatever the number of rows, and each 32-column
// tile's sums for up to 8 rows kept in 16 registers. oneDNN's packed copy does the same work
// with more fixed cost a call (its kernels are made for many rows): SmolLM2's projections
// took 0.49x its time for one token, 0.74x for 16, 0.93x for 256, 0.98x for 1,024 and 1.02x
// for 2,048 on an AMD EPYC Zen 4 (bench/README.md), so this copy serves every step there.
//
// On a CPU with AMX the same copy feeds AMX's tile multiply (below): on an Intel Xeon with
// AMX, 0.75x oneDNN's time for one token, 0.73x for 16, 0.93x for 256, 1.14x for 1,024.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "vec.h"

#include "pairs.h"

namespace {

using namespace electron;

constexpr int MAX_ROWS = 8;  // rows of x whose sums one pass over a tile keeps
constexpr int64_t ROW_BLOCK = 256;  // rows of x multiplied with every tile before the next

// y rows m0 .. m0 + rows - 1, columns n0 .. n0 + min(32, N - n0) - 1 = c (+ bias) in bfloat16;
// c [rows][32] floats.
inline void write_sums(const float* c, int64_t rows, const c10::BFloat16* bias, int64_t n0,
                       int64_t N, c10::BFloat16* y, int64_t m0) {
  const int64_t cols = std::min(PAIR_COLS, N - n0);
  vec b[2] = {};
  for (int64_t j = 0; bias && j < cols; ++j) b[j / W][j % W] = to_float(bias[n0 + j]);
  for (int64_t m = 0; m < rows; ++m) {
    c10::BFloat16* dst = y + (m0 + m) * N + n0;
    for (int h = 0; h < 2; ++h) {
      const int64_t lo = h * W, n = std::min<int64_t>(W, cols - lo);
      if (n <= 0) break;
      const vec sums = load(c + m * PAIR_COLS + lo) + b[h];
      if (n == W) {
        store_as(dst + lo, sums);
      } else {
        for (int64_t j = 0; j < n; ++j) dst[lo + j] = static_cast<c10::BFloat16>(sums[j]);
      }
    }
  }
}

#if defined(__AVX512BF16__)
// Rows m0 .. m0 + MR - 1 of y, columns n0 .. n0 + min(32, N - n0) - 1.
template <int MR>
inline void tile(const c10::BFloat16* x, int64_t K, const c10::BFloat16* w, const c10::BFloat16* bias,
                 int64_t n0, int64_t N, c10::BFloat16* y, int64_t m0) {
  __m512 acc[MR][2];
  pairs_tile<MR>(x + m0 * K, K, K / 2, w + (n0 / PAIR_COLS) * K * PAIR_COLS, acc);
  alignas(64) float c[MR * PAIR_COLS];
  for (int m = 0; m < MR; ++m) {
    _mm512_store_ps(c + m * PAIR_COLS, acc[m][0]);
    _mm512_store_ps(c + m * PAIR_COLS + W, acc[m][1]);
  }
  write_sums(c, MR, bias, n0, N, y, m0);
}
#endif

}  // namespace

bool pairs_linear_amx_available() {
#if defined(ELECTRON_AMX)
  return amx_usable();
#else
  return false;
#endif
}

bool pairs_linear_available() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// weight [N, K] bfloat16 (K even) -> its pairs layout, [ceil(N / 32), K / 2, 64]: tile t,
// pair p holds (w[32t + j][2p], w[32t + j][2p + 1]) for j = 0 .. 31; columns past N are 0.
torch::Tensor pairs_pack(const torch::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 &&
                  weight.scalar_type() == at::kBFloat16,
              "a bfloat16 CPU weight [N, K]");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(K % 2 == 0 && K > 0 && N > 0, "K must be even and N, K positive");
  const int64_t tiles = (N + PAIR_COLS - 1) / PAIR_COLS;
  auto padded = torch::zeros({tiles * PAIR_COLS, K}, weight.options());
  padded.narrow(0, 0, N).copy_(weight);
  // [tiles, 32, K/2, 2] -> [tiles, K/2, 32, 2]
  return padded.view({tiles, PAIR_COLS, K / 2, 2}).permute({0, 2, 1, 3}).contiguous()
      .view({tiles, K / 2, 2 * PAIR_COLS});
}

// x [M, K] bfloat16, packed = pairs_pack(w) for w [N, K], bias [N] or None -> [M, N]. On AMX
// where the CPU has it (one token or many: level with vdpbf16ps for one, 2.2x faster for 16
// and 9x for 1,024 on an Intel Xeon), unless `amx` is false.
torch::Tensor pairs_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t N,
                           const std::optional<torch::Tensor>& bias, bool amx) {
  TORCH_CHECK(pairs_linear_available(), "this build has no AVX512-BF16");
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 &&
                  packed.scalar_type() == at::kBFloat16,
              "x [M, K] in bfloat16");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.size(1) * 2 == K &&
                  packed.size(2) == 2 * PAIR_COLS && N > 0 && packed.size(0) * PAIR_COLS >= N &&
                  packed.size(0) * PAIR_COLS < N + PAIR_COLS,
              "packed is not pairs_pack of an [N, K] weight");
  std::optional<torch::Tensor> b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == at::kBFloat16,
                "bias [N] in bfloat16");
    b = bias->contiguous();
  }
  const auto xc = x.contiguous();
  auto y = torch::empty({M, N}, x.options());
#if defined(__AVX512BF16__)
  const auto* xs = xc.data_ptr<c10::BFloat16>();
  const auto* ws = packed.data_ptr<c10::BFloat16>();
  const auto* bs = b ? b->data_ptr<c10::BFloat16>() : nullptr;
  auto* ys = y.data_ptr<c10::BFloat16>();
#if defined(ELECTRON_AMX)
  const bool on_amx = amx && amx_usable();
  // AMX reads x 16 rows at a time: a last, partial tile of rows is read from a copy of 16 rows
  // (the calling thread's, kept for its next call; the sums of its rows past M, whatever they
  // hold, are never written).
  thread_local std::vector<c10::BFloat16> padded;
  const int64_t partial = M % AMX_ROWS;
  if (on_amx && partial) {
    if (padded.size() < static_cast<size_t>(AMX_ROWS * K)) padded.resize(AMX_ROWS * K);
    std::memcpy(padded.data(), xs + (M - partial) * K, partial * K * sizeof(c10::BFloat16));
  }
  const c10::BFloat16* last = padded.data();
  const auto row_tile = [&](int64_t m) { return m + AMX_ROWS <= M ? xs + m * K : last; };
  // Rows m .. m + rows - 1 (at most two tiles) of the tile of columns n0 ..
  const auto amx_rows = [&](int64_t n0, int64_t m, int64_t rows) {
    alignas(64) float c[2 * AMX_ROWS * PAIR_COLS];
    const c10::BFloat16* const a[2] = {row_tile(m),
                                       rows > AMX_ROWS ? row_tile(m + AMX_ROWS) : nullptr};
    const auto* w = ws + (n0 / PAIR_COLS) * K * PAIR_COLS;
    if (rows > AMX_ROWS) {
      amx_tile<2>(a, K, w, K / 2, c);
    } else {
      amx_tile<1>(a, K, w, K / 2, c);
    }
    write_sums(c, rows, bs, n0, N, ys, m);
  };
  const int64_t unit = on_amx ? 2 * AMX_ROWS : MAX_ROWS;
#else
  constexpr bool on_amx = false;
  const int64_t unit = MAX_ROWS;
#endif
  // Long steps go ROW_BLOCK rows at a time, so that the rows a tile is multiplied with stay in
  // the core's cache while every tile streams past them. Within, items are (tiles, block of
  // rows), a thread's in tile order so that it reads each tile once. Rows are cut into blocks
  // only where tiles alone are too few to keep every thread busy (18 tiles on 16 threads).
  // On AMX, an item of many rows takes up to 4 tiles where there are plenty: its rows are
  // written 256 bytes at a time, not 64 (a Xeon's gate/up projection of 1,024 tokens, 3,072
  // columns, wrote 32 pages a group of rows and ran 1.4x oneDNN's time).
  const int64_t tiles = packed.size(0), threads = at::get_num_threads();
  const int64_t group =
      on_amx && M >= 4 * unit ? std::clamp<int64_t>(tiles / (4 * threads), 1, 4) : 1;
  const int64_t groups = (tiles + group - 1) / group;
  for (int64_t r0 = 0; r0 < M; r0 += ROW_BLOCK) {
    const int64_t rows = std::min<int64_t>(ROW_BLOCK, M - r0);
    const int64_t units = (rows + unit - 1) / unit;
    const int64_t blocks =
        std::max<int64_t>(1, std::min(units, (4 * threads + groups - 1) / groups));
    const int64_t block = (units + blocks - 1) / blocks * unit;
    at::parallel_for(0, groups * blocks, 1, [&](int64_t begin, int64_t end) {
#if defined(ELECTRON_AMX)
      if (on_amx) configure_tiles();
#endif
      for (int64_t i = begin; i < end; ++i) {
        const int64_t t0 = i / blocks * group, t1 = std::min(tiles, t0 + group);
        const int64_t m1 = r0 + std::min(rows, (i % blocks + 1) * block);
        for (int64_t m = r0 + (i % blocks) * block; m < m1; m += unit) {
          for (int64_t t = t0; t < t1; ++t) {
            if (on_amx) {
#if defined(ELECTRON_AMX)
              amx_rows(t * PAIR_COLS, m, std::min(unit, m1 - m));
#endif
            } else {
              with_rows<MAX_ROWS>(m1 - m, [&]<int MR>() { tile<MR>(xs, K, ws, bs, t * PAIR_COLS, N, ys, m); });
            }
          }
        }
      }
#if defined(ELECTRON_AMX)
      if (on_amx) _tile_release();
#endif
    });
  }
#endif
  return y;
}
