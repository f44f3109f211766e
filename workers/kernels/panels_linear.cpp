// y = x w^T (+ bias) in float32 on a CPU, from a copy of the weight laid out in panels: every
// step, one token or a long prompt's chunk.
//
// A panel holds 2 W output columns (16 on AVX2, 32 on AVX-512) over all K inputs, input by
// input — [N / 2W][K][2W] — so that two vector loads hold one input's weights for the
// panel's columns, each row's input is broadcast once and feeds two fused multiply-adds, and
// the sums of a panel's columns for up to MAX_ROWS rows stay in registers: the weights are
// streamed once whatever the number of rows, with no horizontal sums. Where float32 serves
// (a CPU without bfloat16 arithmetic), MKL's GEMM runs its small-row cases far under the
// CPU's peak — on an AMD EPYC with AVX2 only, a one-token GEMV on one thread and 16 rows at
// about half the peak (bench/README.md) — and slices of the weight for a batched GEMM
// (``Projection.slice``) only helped the first.
//
// Every row's sums are taken in input order, one fused multiply-add per input, whatever the
// step's other rows: a request's logits do not depend on which requests share its step.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

#include "vec.h"

namespace {

using namespace electron;

constexpr int64_t PANEL = 2 * W;  // columns of a panel: two vectors of floats
// Rows whose sums one pass over a panel keeps: 2 MR sums, two weight vectors and a broadcast
// within the CPU's vector registers (16 on AVX2, 32 on AVX-512).
constexpr int MAX_ROWS = W == 16 ? 12 : 6;
// Steps of many rows go ROW_BLOCK rows and K_BLOCK inputs at a time: a panel's K_BLOCK
// inputs (16 KiB on AVX2) stay in the core's first-level cache while the block's rows pass
// (their inputs, 256 KiB, in its second), and each row's sums are carried in y from one
// block of inputs to the next (stored and loaded back exactly: the order of the sums holds).
constexpr int64_t ROW_BLOCK = 256;
constexpr int64_t K_BLOCK = 256;

// Columns n0 .. n0 + min(PANEL, N - n0) - 1 of rows m0 .. m0 + MR - 1 of y, over inputs
// k0 .. k1 - 1: from zero (plus the bias) where k0 is 0, else from the sums y holds.
template <int MR>
inline void panel_rows(const float* x, int64_t K, const float* panel, const float* bias,
                       int64_t k0, int64_t k1, int64_t n0, int64_t N, float* y, int64_t m0) {
  const int64_t cols = std::min(PANEL, N - n0);
  alignas(64) float c[MR][PANEL];
  vec acc[MR][2];
  if (k0 == 0) {
    alignas(64) float b[PANEL] = {};
    for (int64_t j = 0; bias && j < cols; ++j) b[j] = bias[n0 + j];
    for (int m = 0; m < MR; ++m) acc[m][0] = load(b), acc[m][1] = load(b + W);
  } else {
    for (int m = 0; m < MR; ++m) {
      float* src = y + (m0 + m) * N + n0;
      if (cols == PANEL) {
        acc[m][0] = load(src), acc[m][1] = load(src + W);
      } else {
        std::memset(c[m], 0, sizeof c[m]);
        std::memcpy(c[m], src, cols * sizeof(float));
        acc[m][0] = load(c[m]), acc[m][1] = load(c[m] + W);
      }
    }
  }
  const float* xs = x + m0 * K;
  for (int64_t k = k0; k < k1; ++k) {
    const vec w0 = load(panel + k * PANEL), w1 = load(panel + k * PANEL + W);
    for (int m = 0; m < MR; ++m) {
      const vec xb = broadcast(xs + m * K + k);
      acc[m][0] += xb * w0;
      acc[m][1] += xb * w1;
    }
  }
  for (int m = 0; m < MR; ++m) {
    float* dst = y + (m0 + m) * N + n0;
    if (cols == PANEL) {
      store(dst, acc[m][0]), store(dst + W, acc[m][1]);
    } else {
      store(c[m], acc[m][0]), store(c[m] + W, acc[m][1]);
      std::memcpy(dst, c[m], cols * sizeof(float));
    }
  }
}

}  // namespace

int64_t panels_width() { return PANEL; }

// weight [N, K] float32 -> its panels layout, [ceil(N / PANEL), K, PANEL]: panel t, input k
// holds w[PANEL t + j][k] for j = 0 .. PANEL - 1; columns past N are 0.
torch::Tensor panels_pack(const torch::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 &&
                  weight.scalar_type() == at::kFloat,
              "a float32 CPU weight [N, K]");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(K > 0 && N > 0, "N and K must be positive");
  const int64_t panels = (N + PANEL - 1) / PANEL;
  auto padded = torch::zeros({panels * PANEL, K}, weight.options());
  padded.narrow(0, 0, N).copy_(weight);
  return padded.view({panels, PANEL, K}).transpose(1, 2).contiguous();
}

// x [M, K] float32, packed = panels_pack(w) for w [N, K], bias [N] or None -> [M, N].
torch::Tensor panels_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t N,
                            const std::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && packed.scalar_type() == at::kFloat,
              "x [M, K] in float32");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.size(1) == K &&
                  packed.size(2) == PANEL && N > 0 && packed.size(0) * PANEL >= N &&
                  packed.size(0) * PANEL < N + PANEL,
              "packed is not panels_pack of an [N, K] weight");
  std::optional<torch::Tensor> b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == at::kFloat,
                "bias [N] in float32");
    b = bias->contiguous();
  }
  const auto xc = x.contiguous();
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  const float* xs = xc.data_ptr<float>();
  const float* ws = packed.data_ptr<float>();
  const float* bs = b ? b->data_ptr<float>() : nullptr;
  float* ys = y.data_ptr<float>();
  // Up to 64 rows pass over each panel whole (the panel streamed from memory once, in
  // order, and read again from the core's second-level cache); more go in blocks of rows
  // and inputs (above).
  const int64_t k_block = M <= 64 ? K : K_BLOCK;
  // Each thread takes a run of panels, and rows are cut between threads too only where the
  // panels alone are too few to keep them busy.
  const int64_t panels = packed.size(0), threads = at::get_num_threads();
  const int64_t row_parts =
      std::clamp<int64_t>((4 * threads + panels - 1) / panels, 1, (M + MAX_ROWS - 1) / MAX_ROWS);
  const int64_t part_rows = (M + row_parts - 1) / row_parts;
  at::parallel_for(0, panels * row_parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      // The items of one part of the rows, panels p0 .. p1 - 1.
      const int64_t part = i / panels, p0 = i % panels;
      const int64_t p1 = std::min(panels, p0 + (end - i));
      i += p1 - p0;
      const int64_t r_end = std::min(M, (part + 1) * part_rows);
      for (int64_t r0 = part * part_rows; r0 < r_end; r0 += ROW_BLOCK) {
        const int64_t r1 = std::min(r_end, r0 + ROW_BLOCK);
        for (int64_t k0 = 0; k0 < K; k0 += k_block) {
          const int64_t k1 = std::min(K, k0 + k_block);
          for (int64_t p = p0; p < p1; ++p) {
            const float* panel = ws + p * K * PANEL;
            for (int64_t m = r0; m < r1; m += MAX_ROWS) {
              with_rows<MAX_ROWS>(r1 - m, [&]<int MR>() {
                panel_rows<MR>(xs, K, panel, bs, k0, k1, p * PANEL, N, ys, m);
              });
            }
          }
        }
      }
    }
  });
  return y;
}
