// RoPE of a step's queries and keys, and its keys and values into their KV cache slots, in
// one pass on a CPU.
//
// torch runs this as a multiply, a roll (a cat of two slices), an addcmul and two index
// copies per layer, each a few microseconds of dispatch for a step of a few tokens. Here each
// token's row of the fused q/k/v projection is rotated in place (queries and keys, Hugging
// Face's rotate_half form) and its keys and values copied to the cache. Rounding follows the
// torch path (llama.apply_rope): x * cos rounded to the dtype, then the rotated half times the
// signed sin added and rounded once (in bfloat16 and float16 the product is exact in a float,
// so the results are equal; in float32 the compiler may fuse that multiply-add, an ulp apart).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "vec.h"

namespace {

using namespace electron;

// One head of d values in place: out[i] = x[i] cos[i] + x[i +- d/2] signed_sin[i].
template <typename T>
inline void rotate(T* x, const T* cos, const T* ssin, int64_t d) {
  const int64_t half = d / 2, whole = half / W * W;
  for (int64_t i = 0; i < whole; i += W) {
    const vec a = load_as_float(x + i), b = load_as_float(x + half + i);
    const vec lo = round_as<T>(a * load_as_float(cos + i)) + b * load_as_float(ssin + i);
    const vec hi = round_as<T>(b * load_as_float(cos + half + i)) +
                   a * load_as_float(ssin + half + i);
    store_as(x + i, lo);
    store_as(x + half + i, hi);
  }
  for (int64_t i = whole; i < half; ++i) {
    const float a = to_float(x[i]), b = to_float(x[half + i]);
    x[i] = static_cast<T>(to_float(static_cast<T>(a * to_float(cos[i]))) +
                          b * to_float(ssin[i]));
    x[half + i] = static_cast<T>(to_float(static_cast<T>(b * to_float(cos[half + i]))) +
                                 a * to_float(ssin[half + i]));
  }
}

template <typename T>
void rope_rows(T* qkv, int64_t row_stride, int64_t tokens, int64_t heads, int64_t kv_heads,
               int64_t d, const T* cos, const T* ssin, const int64_t* positions,
               const int64_t* slots, T* keys, T* values) {
  const int64_t kv_row = kv_heads * d, rotated = heads + kv_heads;
  // Steps of a few tokens run on the calling thread: a fork would cost more than the work.
  const int64_t grain = std::max<int64_t>(1, 32768 / ((rotated + kv_heads) * d));
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      T* row = qkv + t * row_stride;
      const T* c = cos + positions[t] * d;
      const T* s = ssin + positions[t] * d;
      for (int64_t h = 0; h < rotated; ++h) rotate(row + h * d, c, s, d);
      std::memcpy(keys + slots[t] * kv_row, row + heads * d, kv_row * sizeof(T));
      std::memcpy(values + slots[t] * kv_row, row + rotated * d, kv_row * sizeof(T));
    }
  });
}

}  // namespace

// qkv [T, (heads + 2 kv_heads) * d] (rows: queries, keys, values; rows may be strided):
// queries and keys rotated in place for their positions [T] (cos and signed_sin [P, d], as
// llama.rope_tables makes them), then keys and values written to kv_cache [2, blocks,
// block_size, kv_heads, d] at slots [T] (block * block_size + offset).
void rope_write_kv(torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& signed_sin,
                   const torch::Tensor& positions, torch::Tensor& kv_cache,
                   const torch::Tensor& slots, int64_t heads, int64_t kv_heads) {
  TORCH_CHECK(qkv.device().is_cpu() && cos.device().is_cpu() && signed_sin.device().is_cpu() &&
                  positions.device().is_cpu() && kv_cache.device().is_cpu() &&
                  slots.device().is_cpu(),
              "CPU tensors only");
  TORCH_CHECK(heads > 0 && kv_heads > 0, "heads and kv_heads must be positive");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.size(3) == kv_heads &&
                  kv_cache.is_contiguous(),
              "kv_cache [2, blocks, block_size, kv_heads, d], contiguous");
  const int64_t d = kv_cache.size(4), tokens = qkv.size(0);
  TORCH_CHECK(d > 0 && d % 2 == 0, "the head size must be even");
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (heads + 2 * kv_heads) * d &&
                  (qkv.size(1) <= 1 || qkv.stride(1) == 1),
              "qkv [T, (heads + 2 kv_heads) * d], columns contiguous");
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == d && cos.sizes() == signed_sin.sizes() &&
                  cos.is_contiguous() && signed_sin.is_contiguous(),
              "cos and signed_sin [P, d], contiguous");
  const auto dtype = qkv.scalar_type();
  TORCH_CHECK(cos.scalar_type() == dtype && signed_sin.scalar_type() == dtype &&
                  kv_cache.scalar_type() == dtype,
              "qkv, the tables and the cache differ in dtype");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slots.scalar_type() == at::kLong &&
                  positions.dim() == 1 && slots.dim() == 1 && positions.size(0) == tokens &&
                  slots.size(0) == tokens,
              "positions and slots: int64 [T]");
  const auto pos = positions.contiguous(), slot = slots.contiguous();
  const int64_t* p = pos.data_ptr<int64_t>();
  const int64_t* s = slot.data_ptr<int64_t>();
  const int64_t num_positions = cos.size(0);
  const int64_t num_slots = kv_cache.size(1) * kv_cache.size(2);
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(p[t] >= 0 && p[t] < num_positions, "position ", p[t], " outside the tables");
    TORCH_CHECK(s[t] >= 0 && s[t] < num_slots, "slot ", s[t], " outside the cache");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "rope_write_kv", [&] {
    scalar_t* cache = kv_cache.data_ptr<scalar_t>();
    rope_rows<scalar_t>(qkv.data_ptr<scalar_t>(), qkv.stride(0), tokens, heads, kv_heads, d,
                        cos.data_ptr<scalar_t>(), signed_sin.data_ptr<scalar_t>(), p, s, cache,
                        cache + num_slots * kv_heads * d);
  });
}
