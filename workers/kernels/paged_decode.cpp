// Decode attention over the paged KV cache on a CPU, reading each sequence's blocks in place.
//
// The torch path gathers every sequence's keys and values into a contiguous buffer per layer
// and then runs matmuls over it: at batch 64 the copy alone was half of attention's time, and
// attention a quarter of the step (bench/README.md). Here each (sequence, KV head) walks its
// block table twice: every key is dotted with the query heads that share it (GQA), then the
// values are summed with the softmax of those scores as weights. Work is split over torch's
// intra-op threads by (sequence, KV head).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

template <typename T>
void decode(const torch::Tensor& q, const torch::Tensor& kv_cache, const torch::Tensor& tables,
            const torch::Tensor& lens, double scale, torch::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t num_blocks = kv_cache.size(1), block_size = kv_cache.size(2),
                kv_heads = kv_cache.size(3), width = tables.size(1);
  const int64_t group = heads / kv_heads;
  const T* queries = q.data_ptr<T>();
  const T* keys = kv_cache.data_ptr<T>();
  const T* values = keys + num_blocks * block_size * kv_heads * dim;
  const int64_t* table = tables.data_ptr<int64_t>();
  const int64_t* len = lens.data_ptr<int64_t>();
  T* output = out.data_ptr<T>();
  const int64_t token_stride = kv_heads * dim;  // between positions within a block
  const float s = static_cast<float>(scale);

  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(group * dim), acc(group * dim), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / kv_heads, h = item % kv_heads, n = len[b];
      for (int64_t i = 0; i < group * dim; ++i) {
        query[i] = static_cast<float>(queries[(b * heads + h * group) * dim + i]);
      }
      // Two passes over the blocks: every score first (the keys read once), then the values
      // weighted by the softmax of them (read once): no running rescale to round.
      scores.resize(group * n);
      for (int64_t first = 0, slot = 0; first < n; first += block_size, ++slot) {
        const T* k = keys + (table[b * width + slot] * block_size * kv_heads + h) * dim;
        const int64_t count = std::min(block_size, n - first);
        for (int64_t t = 0; t < count; ++t) {
          const T* kt = k + t * token_stride;
          for (int64_t g = 0; g < group; ++g) {
            const float* qg = query.data() + g * dim;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t e = 0; e < dim; ++e) dot += qg[e] * static_cast<float>(kt[e]);
            scores[g * n + first + t] = dot * s;
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* row = scores.data() + g * n;
        const float top = *std::max_element(row, row + n);
        float total = 0.f;
        for (int64_t t = 0; t < n; ++t) total += (row[t] = std::exp(row[t] - top));
        const float inv = 1.f / total;
        for (int64_t t = 0; t < n; ++t) row[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t first = 0, slot = 0; first < n; first += block_size, ++slot) {
        const T* v = values + (table[b * width + slot] * block_size * kv_heads + h) * dim;
        const int64_t count = std::min(block_size, n - first);
        for (int64_t t = 0; t < count; ++t) {
          const T* vt = v + t * token_stride;
          for (int64_t g = 0; g < group; ++g) {
            const float p = scores[g * n + first + t];
            float* a = acc.data() + g * dim;
#pragma omp simd
            for (int64_t e = 0; e < dim; ++e) a[e] += p * static_cast<float>(vt[e]);
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        T* o = output + (b * heads + h * group + g) * dim;
        for (int64_t e = 0; e < dim; ++e) o[e] = static_cast<T>(acc[g * dim + e]);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qc.scalar_type(), "paged_decode",
                                  [&] { decode<scalar_t>(qc, kv_cache, tables, lens, scale, out); });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "Decode attention over the paged KV cache (CPU)");
}
