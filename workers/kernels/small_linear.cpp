// y = x w^T (+ bias) for a step of one or two tokens, on a CPU, from the plain weight.
//
// At batch 1 a decode step is the weights read once, so its speed is how fast they stream.
// oneDNN's packed bfloat16 copy read SmolLM2's projections at 14-18 GB/s on an AVX512-BF16
// EPYC whose cores read 55 GB/s (bench/README.md): its kernels are made for many rows. Here
// each thread streams its own rows of w once, widens them in registers, and the dot products
// of W weight rows with each token are reduced together by a transposing sum.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "vec.h"

namespace {

using namespace electron;

// Rows n0 .. n0 + rows - 1 (rows <= W) of y for the MR tokens m0 .. of x (as floats).
template <typename T, int MR>
inline void tile(const float* xf, int64_t K, const T* w, const T* bias, int64_t n0, int64_t rows,
                 T* y, int64_t N, int64_t m0) {
  vec part[MR][W];
  for (int64_t r = 0; r < W; ++r) {
    vec acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = vec{};
    if (r < rows) {
      const T* wr = w + (n0 + r) * K;
      int64_t k = 0;
      for (; k + W <= K; k += W) {
        const vec wk = load_as_float(wr + k);
        for (int m = 0; m < MR; ++m) acc[m] += load(xf + (m0 + m) * K + k) * wk;
      }
      for (; k < K; ++k) {
        for (int m = 0; m < MR; ++m) acc[m][0] += xf[(m0 + m) * K + k] * to_float(wr[k]);
      }
    }
    for (int m = 0; m < MR; ++m) part[m][r] = acc[m];
  }
  for (int m = 0; m < MR; ++m) {
    const vec out = transpose_sum(part[m]);
    T* dst = y + (m0 + m) * N + n0;
    for (int64_t r = 0; r < rows; ++r) {
      dst[r] = static_cast<T>(bias ? out[r] + to_float(bias[n0 + r]) : out[r]);
    }
  }
}

template <typename T>
void linear(const torch::Tensor& x, const torch::Tensor& w, const T* bias, torch::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const T* xs = x.data_ptr<T>();
  const T* ws = w.data_ptr<T>();
  T* ys = y.data_ptr<T>();
  std::vector<float> xf(M * K);
  for (int64_t i = 0; i < M * K; ++i) xf[i] = to_float(xs[i]);
  at::parallel_for(0, (N + W - 1) / W, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * W, rows = std::min(W, N - n0);
      int64_t m = 0;
      for (; m + 2 <= M; m += 2) tile<T, 2>(xf.data(), K, ws, bias, n0, rows, ys, N, m);
      if (m < M) tile<T, 1>(xf.data(), K, ws, bias, n0, rows, ys, N, m);
    }
  });
}

}  // namespace

// x [M, K] (a few rows), weight [N, K], bias [N] or None, all one dtype -> [M, N].
torch::Tensor small_linear(const torch::Tensor& x, const torch::Tensor& weight,
                           const std::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "x [M, K] and weight [N, K]");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and the weight differ in dtype");
  TORCH_CHECK(weight.is_contiguous(), "the weight must be contiguous");
  const auto xc = x.contiguous();
  std::optional<torch::Tensor> b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) &&
                    bias->scalar_type() == x.scalar_type(),
                "bias [N] in the weight's dtype");
    b = bias->contiguous();
  }
  auto y = torch::empty({xc.size(0), weight.size(0)}, xc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "small_linear", [&] {
    linear<scalar_t>(xc, weight, b ? b->data_ptr<scalar_t>() : nullptr, y);
  });
  return y;
}
