// The MLP's activation, silu(gate) * up, in one pass on a CPU.
//
// torch runs F.silu(gate) * up as two operators, each writing a [T, intermediate] tensor,
// after the gate/up projection's output was split (and, for column-sliced weights, reordered
// by a copy first). Here each row of gate and up is read once, in place (any row stride: the
// halves of one [T, 2 * intermediate] output, or the two slices of a sliced projection), and
// the product written once. Rounding follows torch's: silu(gate) rounded to the dtype, then
// the product rounded.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

#include "vec.h"

namespace {

using namespace electron;

template <typename T>
void silu_mul_rows(const T* gate, int64_t gate_stride, const T* up, int64_t up_stride,
                   int64_t rows, int64_t dim, T* out) {
  const int64_t whole = dim / W * W;
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gate + r * gate_stride;
      const T* u = up + r * up_stride;
      T* o = out + r * dim;
      // silu(x) = x * sigmoid(x), sigmoid from e = exp(-|x|) <= 1: 1 / (1 + e) for x >= 0,
      // e / (1 + e) below.
      for (int64_t i = 0; i < whole; i += W) {
        const vec x = load_as_float(g + i);
        const vec e = exp_nonpositive(x < 0.f ? x : -x);
        const vec num = x < 0.f ? e : splat(1.f);
        store_as(o + i, round_as<T>(x * (num / (e + 1.f))) * load_as_float(u + i));
      }
      for (int64_t i = whole; i < dim; ++i) {
        const float x = to_float(g[i]);
        o[i] = static_cast<T>(to_float(static_cast<T>(x / (1.f + std::exp(-x)))) *
                              to_float(u[i]));
      }
    }
  });
}

}  // namespace

// gate, up [T, I] (rows may be strided, columns contiguous) -> silu(gate) * up, [T, I].
torch::Tensor silu_mul(const torch::Tensor& gate, const torch::Tensor& up) {
  TORCH_CHECK(gate.device().is_cpu() && up.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(gate.dim() == 2 && gate.sizes() == up.sizes(), "gate and up [T, I], one shape");
  TORCH_CHECK(gate.scalar_type() == up.scalar_type(), "gate and up differ in dtype");
  const auto g = gate.size(1) <= 1 || gate.stride(1) == 1 ? gate : gate.contiguous();
  const auto u = up.size(1) <= 1 || up.stride(1) == 1 ? up : up.contiguous();
  auto out = torch::empty(gate.sizes(), gate.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "silu_mul", [&] {
    silu_mul_rows<scalar_t>(g.data_ptr<scalar_t>(), g.stride(0), u.data_ptr<scalar_t>(),
                            u.stride(0), g.size(0), g.size(1), out.data_ptr<scalar_t>());
  });
  return out;
}
