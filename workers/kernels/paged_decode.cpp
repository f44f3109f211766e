// Decode attention over the paged KV cache on a CPU, reading each sequence's blocks in place.
//
// The torch path gathers every sequence's keys and values into a contiguous buffer per layer
// and then runs matmuls over it: at batch 64 the copy alone was half of attention's time, and
// attention a quarter of the step (bench/README.md). Here each (sequence, KV head) walks its
// block table twice: every key is dotted with the query heads that share it (GQA), then the
// values are summed with the softmax of those scores as weights. Work is split over torch's
// intra-op threads by (sequence, KV head).
//
// The arithmetic is written on GCC/Clang vector types as wide as the CPU's registers (16
// floats with AVX-512, else 8), not on scalars left to the auto-vectorizer: that one reduced
// every 64-wide dot product lane by lane (a serial chain of adds per key and query head) and
// summed the values into one accumulator (a chain of FMAs). Here the dot products of W keys
// are reduced together by a transposing sum (W - 1 shuffle-adds for W keys), each value row
// feeds one running sum per vector of the head, the exponentials are vectorized, and
// bfloat16/float16 rows are widened once per block for every query head of the group. In the
// engine this made decode 1.03-1.17x faster than the torch path on an AVX512-BF16 EPYC in
// bfloat16 (batch 8-64), where the scalar version had been 0.77-0.92x (bench/README.md).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace {

using namespace electron;

constexpr int64_t kMaxDim = 256;
constexpr int64_t kMaxChunks = kMaxDim / W;  // vectors per head

// exp(x) for x <= 0: 2^n * e^r with |r| <= ln2 / 2, a degree-6 polynomial (Cephes' expf).
inline vec exp_nonpositive(vec x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  const vec n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const vec r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  vec p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const ivec e = (__builtin_convertvector(n, ivec) + 127) << 23;
  vec scale;
  std::memcpy(&scale, &e, sizeof scale);
  return p * scale;
}

// C: vectors per head (head_dim / W), fixed at compile time for the common head sizes (0: read
// at run time).
template <typename T, int64_t C>
void decode(const torch::Tensor& q, const torch::Tensor& kv_cache, const torch::Tensor& tables,
            const torch::Tensor& lens, double scale, torch::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t chunks = C > 0 ? C : dim / W;
  const int64_t num_blocks = kv_cache.size(1), block_size = kv_cache.size(2),
                kv_heads = kv_cache.size(3), width = tables.size(1);
  const int64_t group = heads / kv_heads;
  const T* queries = q.data_ptr<T>();
  const T* keys = kv_cache.data_ptr<T>();
  const T* values = keys + num_blocks * block_size * kv_heads * dim;
  const int64_t* table = tables.data_ptr<int64_t>();
  const int64_t* len = lens.data_ptr<int64_t>();
  T* output = out.data_ptr<T>();
  const int64_t token_stride = kv_heads * dim;
  const float s = static_cast<float>(scale);
  constexpr bool is_float = std::is_same_v<T, float>;

  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(group * dim), acc(group * dim), tile(block_size * dim), scores,
        inv(group);
    vec part[W];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / kv_heads, h = item % kv_heads, n = len[b];
      const int64_t n_pad = (n + W - 1) / W * W;
      for (int64_t i = 0; i < group * dim; ++i) {
        query[i] = to_float(queries[(b * heads + h * group) * dim + i]) * s;
      }
      // Rows of one block for this head as floats: in the cache itself for float32, else
      // converted into `tile` once for every query head of the group.
      auto rows = [&](const T* base, int64_t slot, int64_t count, int64_t& stride) -> const float* {
        const T* src = base + (table[b * width + slot] * block_size * kv_heads + h) * dim;
        if constexpr (is_float) {
          stride = token_stride;
          return reinterpret_cast<const float*>(src);
        } else {
          for (int64_t t = 0; t < count; ++t) {
            const T* row = src + t * token_stride;
            float* dst = tile.data() + t * dim;
            for (int64_t e = 0; e < dim; e += W) store(dst + e, load_as_float(row + e));
          }
          stride = dim;
          return tile.data();
        }
      };
      scores.assign(group * n_pad, 0.f);
      for (int64_t first = 0, slot = 0; first < n; first += block_size, ++slot) {
        const int64_t count = std::min(block_size, n - first);
        int64_t stride;
        const float* k = rows(keys, slot, count, stride);
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = query.data() + g * dim;
          for (int64_t t0 = 0; t0 < count; t0 += W) {
            const int64_t m = std::min(W, count - t0);
            for (int64_t t = 0; t < W; ++t) {
              vec sum{};
              if (t < m) {
                const float* kt = k + (t0 + t) * stride;
                for (int64_t c = 0; c < chunks; ++c) sum += load(qg + c * W) * load(kt + c * W);
              }
              part[t] = sum;
            }
            const vec dots = transpose_sum(part);
            float* dst = scores.data() + g * n_pad + first + t0;
            if (m == W) store(dst, dots);
            else std::memcpy(dst, &dots, m * sizeof(float));
          }
        }
      }
      // Softmax numerators and their sums; the division comes at the end, once per output.
      for (int64_t g = 0; g < group; ++g) {
        float* row = scores.data() + g * n_pad;
        const float top = *std::max_element(row, row + n);
        vec total{};
        for (int64_t t = 0; t < n_pad; t += W) {
          vec e = exp_nonpositive(load(row + t) - top);
          for (int64_t l = 0; l < W; ++l) e[l] = t + l < n ? e[l] : 0.f;
          store(row + t, e);
          total += e;
        }
        float sum = 0.f;
        for (int64_t l = 0; l < W; ++l) sum += total[l];
        inv[g] = 1.f / sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t first = 0, slot = 0; first < n; first += block_size, ++slot) {
        const int64_t count = std::min(block_size, n - first);
        int64_t stride;
        const float* v = rows(values, slot, count, stride);
        for (int64_t g = 0; g < group; ++g) {
          const float* p = scores.data() + g * n_pad + first;
          float* a = acc.data() + g * dim;
          // One running sum per vector of the head: independent chains, in registers.
          vec sums[kMaxChunks];
          for (int64_t c = 0; c < chunks; ++c) sums[c] = load(a + c * W);
          for (int64_t t = 0; t < count; ++t) {
            const vec pt = splat(p[t]);
            for (int64_t c = 0; c < chunks; ++c) sums[c] += pt * load(v + t * stride + c * W);
          }
          for (int64_t c = 0; c < chunks; ++c) store(a + c * W, sums[c]);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        T* o = output + (b * heads + h * group + g) * dim;
        for (int64_t e = 0; e < dim; ++e) o[e] = static_cast<T>(acc[g * dim + e] * inv[g]);
      }
    }
  });
}

}  // namespace

// q [B, H, d]; kv_cache [2, num_blocks, block_size, kv_heads, d] (keys, then values);
// block_tables [B, width] int64; context_lens [B] int64, each >= 1 and within its table.
// Returns [B, H, d]: softmax(q k^T * scale) v over each sequence's first context_lens keys.
torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& kv_cache,
                           const torch::Tensor& block_tables, const torch::Tensor& context_lens,
                           double scale) {
  TORCH_CHECK(q.device().is_cpu() && kv_cache.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 5 && kv_cache.size(0) == 2, "bad shapes");
  TORCH_CHECK(q.scalar_type() == kv_cache.scalar_type(), "q and the cache differ in dtype");
  TORCH_CHECK(q.size(2) == kv_cache.size(4) && q.size(1) % kv_cache.size(3) == 0,
              "heads or head_dim do not match the cache");
  TORCH_CHECK(q.size(2) % 16 == 0 && q.size(2) <= kMaxDim,
              "head_dim must be a multiple of 16, at most 256");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 &&
                  context_lens.scalar_type() == torch::kInt64,
              "block tables and lengths are int64");
  TORCH_CHECK(block_tables.size(0) == q.size(0) && context_lens.size(0) == q.size(0),
              "one block table and length per query");
  const auto qc = q.contiguous();
  const auto tables = block_tables.contiguous();
  const auto lens = context_lens.contiguous();
  TORCH_CHECK(kv_cache.is_contiguous(), "the cache must be contiguous");
  // The kernel reads raw pointers: every length and every block id it will follow is checked.
  const int64_t width = tables.size(1), block_size = kv_cache.size(2);
  const int64_t* len = lens.data_ptr<int64_t>();
  const int64_t* table = tables.data_ptr<int64_t>();
  for (int64_t b = 0; b < q.size(0); ++b) {
    TORCH_CHECK(len[b] >= 1 && len[b] <= width * block_size, "context length out of range");
    for (int64_t slot = 0; slot * block_size < len[b]; ++slot) {
      const int64_t block = table[b * width + slot];
      TORCH_CHECK(block >= 0 && block < kv_cache.size(1), "block id out of range");
    }
  }
  auto out = torch::empty_like(qc);
  const int64_t dim = qc.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qc.scalar_type(), "paged_decode", [&] {
    if (dim == 64) {
      decode<scalar_t, 64 / W>(qc, kv_cache, tables, lens, scale, out);
    } else if (dim == 128) {
      decode<scalar_t, 128 / W>(qc, kv_cache, tables, lens, scale, out);
    } else {
      decode<scalar_t, 0>(qc, kv_cache, tables, lens, scale, out);
    }
  });
  return out;
}
