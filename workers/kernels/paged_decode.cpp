// Decode attention over the paged KV cache on a CPU, reading each sequence's blocks in place.
//
// The torch path gathers every sequence's keys and values into a contiguous buffer per layer
// and then runs matmuls over it: at batch 64 the copy alone was half of attention's time, and
// attention a quarter of the step (bench/README.md). Here each work item (a sequence, or one
// KV head of it when the batch is small: `Paged`) walks its block table twice: every key is
// dotted with the query heads that share it (GQA), then the values are summed with the
// softmax of those scores as weights. Items are split over torch's intra-op threads.
//
// Two paths compute this:
// - `decode`, for every dtype and CPU: arithmetic on GCC/Clang vector types as wide as the
//   CPU's registers (16 floats with AVX-512, else 8), not on scalars left to the
//   auto-vectorizer (which reduced every dot product lane by lane and summed the values in
//   one FMA chain). The dot products of W keys are reduced together by a transposing sum (W -
//   1 shuffle-adds for W keys), each value row feeds one running sum per vector of the head,
//   the exponentials are vectorized, and bfloat16/float16 rows are widened once per block for
//   every query head of the group. 1.03-1.17x the torch path in the engine on an AVX512-BF16
//   EPYC in bfloat16 (batch 8-64), where the scalar version had been 0.77-0.92x.
// - `decode_dpbf16`, for bfloat16 heads of 64 or 128 where the CPU has AVX512-BF16: the
//   products are summed by `vdpbf16ps` straight from the cache's bytes, with no widening:
//   a third of `decode`'s instructions per block, 0.58-0.88x its time a call over 30 layers'
//   cold caches. With whole-sequence items (`Paged`) it made a call 0.60x the previous
//   kernel's (batch 64, 150-token contexts) and decode 1.09-1.13x faster in the engine
//   (bench/README.md, "Decode attention on AVX512-BF16").
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "vec.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

using namespace electron;

constexpr int64_t kMaxDim = 256;
constexpr int64_t kMaxChunks = kMaxDim / W;  // vectors per head

// What both paths read: the shapes, the tensors' memory, and how the work is cut into items.
// An item is a sequence with all its KV heads when there are sequences enough to keep every
// thread busy: its blocks are then read whole, front to back (a block holds each token's heads
// side by side), where one head at a time read every third 128-byte row and ran at a third of
// the speed on a cold cache. Few sequences split by KV head instead.
template <typename T>
struct Paged {
  int64_t batch, heads, dim, num_blocks, block_size, kv_heads, width, group, token_stride,
      parts, nh;
  const T* queries;
  const T* keys;
  const T* values;
  const int64_t* table;
  const int64_t* len;
  T* output;
  float scale;

  Paged(const torch::Tensor& q, const torch::Tensor& kv_cache, const torch::Tensor& tables,
        const torch::Tensor& lens, double s, torch::Tensor& out)
      : batch(q.size(0)), heads(q.size(1)), dim(q.size(2)), num_blocks(kv_cache.size(1)),
        block_size(kv_cache.size(2)), kv_heads(kv_cache.size(3)), width(tables.size(1)),
        group(heads / kv_heads), token_stride(kv_heads * dim),
        parts(batch >= 4 * at::get_num_threads() ? 1 : kv_heads), nh(kv_heads / parts),
        queries(q.data_ptr<T>()), keys(kv_cache.data_ptr<T>()),
        values(keys + num_blocks * block_size * kv_heads * dim),
        table(tables.data_ptr<int64_t>()), len(lens.data_ptr<int64_t>()),
        output(out.data_ptr<T>()), scale(static_cast<float>(s)) {}

  // fn(b, h0): sequence b's KV heads h0 .. h0 + nh, over torch's intra-op threads. Each
  // thread first makes its scratch with make().
  template <typename Make, typename Fn>
  void for_items(Make make, Fn fn) const {
    at::parallel_for(0, batch * parts, 1, [&](int64_t begin, int64_t end) {
      auto scratch = make();
      for (int64_t item = begin; item < end; ++item) {
        fn(scratch, item / parts, item % parts * nh);
      }
    });
  }

  // Sequence b's block `slot`: its first token's row of KV head h0, in keys or values.
  const T* block(const T* base, int64_t b, int64_t h0, int64_t slot) const {
    return base + (table[b * width + slot] * block_size * kv_heads + h0) * dim;
  }
};

// The softmax numerators of a row of n scores (padded with zeros to n_pad, a multiple of W), in
// place; returns 1 / their sum: the division comes at the end, once per output.
inline float softmax_numerators(float* row, int64_t n, int64_t n_pad) {
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
  return 1.f / sum;
}

// C: vectors per head (head_dim / W), fixed at compile time for the common head sizes (0: read
// at run time).
template <typename T, int64_t C>
void decode(const Paged<T>& p) {
  const int64_t dim = p.dim, group = p.group, nh = p.nh, stride_in = p.token_stride;
  const int64_t chunks = C > 0 ? C : dim / W;
  const int64_t row = nh * dim;  // an item's values of one token, side by side
  constexpr bool is_float = std::is_same_v<T, float>;
  struct Scratch {
    std::vector<float> query, acc, tile, scores, inv;
  };
  p.for_items(
      [&] {
        return Scratch{std::vector<float>(nh * group * dim), std::vector<float>(nh * group * dim),
                       std::vector<float>(p.block_size * row), {}, std::vector<float>(nh * group)};
      },
      [&](Scratch& m, int64_t b, int64_t h0) {
        const int64_t n = p.len[b], n_pad = (n + W - 1) / W * W, rows_q = nh * group;
        for (int64_t i = 0; i < rows_q * dim; ++i) {
          m.query[i] = to_float(p.queries[(b * p.heads + h0 * group) * dim + i]) * p.scale;
        }
        // Rows of one block for this item's heads as floats: in the cache itself for float32,
        // else converted into `tile` once for every query head of each group.
        auto rows = [&](const T* base, int64_t slot, int64_t count,
                        int64_t& stride) -> const float* {
          const T* src = p.block(base, b, h0, slot);
          if constexpr (is_float) {
            stride = stride_in;
            return reinterpret_cast<const float*>(src);
          } else {
            for (int64_t t = 0; t < count; ++t) {
              const T* r = src + t * stride_in;
              float* dst = m.tile.data() + t * row;
              for (int64_t e = 0; e < row; e += W) store(dst + e, load_as_float(r + e));
            }
            stride = row;
            return m.tile.data();
          }
        };
        m.scores.assign(rows_q * n_pad, 0.f);
        vec part[W];
        for (int64_t first = 0, slot = 0; first < n; first += p.block_size, ++slot) {
          const int64_t count = std::min(p.block_size, n - first);
          int64_t stride;
          const float* k = rows(p.keys, slot, count, stride);
          for (int64_t r = 0; r < rows_q; ++r) {
            const float* qr = m.query.data() + r * dim;
            const float* kh = k + r / group * dim;
            for (int64_t t0 = 0; t0 < count; t0 += W) {
              const int64_t mw = std::min(W, count - t0);
              for (int64_t t = 0; t < W; ++t) {
                vec sum{};
                if (t < mw) {
                  const float* kt = kh + (t0 + t) * stride;
                  for (int64_t c = 0; c < chunks; ++c) sum += load(qr + c * W) * load(kt + c * W);
                }
                part[t] = sum;
              }
              const vec dots = transpose_sum(part);
              float* dst = m.scores.data() + r * n_pad + first + t0;
              if (mw == W) store(dst, dots);
              else std::memcpy(dst, &dots, mw * sizeof(float));
            }
          }
        }
        for (int64_t r = 0; r < rows_q; ++r) {
          m.inv[r] = softmax_numerators(m.scores.data() + r * n_pad, n, n_pad);
        }
        std::fill(m.acc.begin(), m.acc.end(), 0.f);
        for (int64_t first = 0, slot = 0; first < n; first += p.block_size, ++slot) {
          const int64_t count = std::min(p.block_size, n - first);
          int64_t stride;
          const float* v = rows(p.values, slot, count, stride);
          for (int64_t r = 0; r < rows_q; ++r) {
            const float* pr = m.scores.data() + r * n_pad + first;
            const float* vh = v + r / group * dim;
            float* a = m.acc.data() + r * dim;
            // One running sum per vector of the head: independent chains, in registers.
            vec sums[kMaxChunks];
            for (int64_t c = 0; c < chunks; ++c) sums[c] = load(a + c * W);
            for (int64_t t = 0; t < count; ++t) {
              const vec pt = splat(pr[t]);
              for (int64_t c = 0; c < chunks; ++c) sums[c] += pt * load(vh + t * stride + c * W);
            }
            for (int64_t c = 0; c < chunks; ++c) store(a + c * W, sums[c]);
          }
        }
        for (int64_t r = 0; r < rows_q; ++r) {
          T* o = p.output + (b * p.heads + h0 * group + r) * dim;
          for (int64_t e = 0; e < dim; ++e) o[e] = static_cast<T>(m.acc[r * dim + e] * m.inv[r]);
        }
      });
}

#if defined(__AVX512BF16__)
// bfloat16 on a CPU with AVX512-BF16 (AMD Zen 4, Intel Cooper Lake and later): the products
// are summed by `vdpbf16ps` from the cache's own bytes, 32 pairs an instruction, with no
// widening of the rows into a float tile. C: 512-bit vectors per head (head_dim / 32).
//
// Scores: q . k in float from bfloat16 products (exact) summed in float, then scaled.
// Values: the softmax numerators rounded to bfloat16 (as Hugging Face's eager attention rounds
// its probabilities to the model's dtype before the product with V), summed over pairs of
// tokens: two value rows are interleaved (unpacklo/hi of 16-bit words, per 128-bit lane), so
// each accumulator holds a permuted set of the head's columns, put back in order at the end.
template <int64_t C>
void decode_dpbf16(const Paged<c10::BFloat16>& p) {
  using T = c10::BFloat16;
  const int64_t dim = p.dim, group = p.group, nh = p.nh, stride = p.token_stride;
  struct Scratch {
    std::vector<float> scores, acc, inv;
    std::vector<uint16_t> probs;  // the numerators in bfloat16, two tokens to a 32-bit word
    std::vector<__m512i> vpairs;  // one block's value rows of one head, interleaved
  };
  p.for_items(
      [&] {
        return Scratch{{}, std::vector<float>(nh * group * dim), std::vector<float>(nh * group),
                       {}, std::vector<__m512i>((p.block_size + 1) / 2 * 2 * C)};
      },
      [&](Scratch& m, int64_t b, int64_t h0) {
        const int64_t n = p.len[b], rows_q = nh * group;
        const int64_t n_pad = (n + W - 1) / W * W + W;  // + W: the pair past an odd end reads 0
        const T* qi = p.queries + (b * p.heads + h0 * group) * dim;
        m.scores.assign(rows_q * n_pad, 0.f);
        vec part[W];
        for (int64_t r = 0; r < rows_q; ++r) {
          __m512bh qv[C];
          for (int64_t c = 0; c < C; ++c) {
            qv[c] = (__m512bh)_mm512_loadu_si512(qi + r * dim + c * 32);
          }
          for (int64_t first = 0, slot = 0; first < n; first += p.block_size, ++slot) {
            const int64_t count = std::min(p.block_size, n - first);
            const T* k = p.block(p.keys, b, h0, slot) + r / group * dim;
            for (int64_t t0 = 0; t0 < count; t0 += W) {
              const int64_t mw = std::min(W, count - t0);
              for (int64_t t = 0; t < W; ++t) {
                __m512 sum = _mm512_setzero_ps();
                if (t < mw) {
                  const T* kt = k + (t0 + t) * stride;
                  for (int64_t c = 0; c < C; ++c) {
                    sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_loadu_si512(kt + c * 32), qv[c]);
                  }
                }
                part[t] = sum;
              }
              const vec dots = transpose_sum(part) * p.scale;
              float* dst = m.scores.data() + r * n_pad + first + t0;
              if (mw == W) store(dst, dots);
              else std::memcpy(dst, &dots, mw * sizeof(float));
            }
          }
        }
        m.probs.assign(rows_q * n_pad, 0);
        for (int64_t r = 0; r < rows_q; ++r) {
          float* sr = m.scores.data() + r * n_pad;
          m.inv[r] = softmax_numerators(sr, n, n_pad - W);
          for (int64_t t = 0; t < n_pad - W; t += W) {
            const __m256bh h = _mm512_cvtneps_pbh(load(sr + t));
            std::memcpy(m.probs.data() + r * n_pad + t, &h, sizeof h);
          }
        }
        std::fill(m.acc.begin(), m.acc.end(), 0.f);
        const __m512i zero = _mm512_setzero_si512();
        for (int64_t first = 0, slot = 0; first < n; first += p.block_size, ++slot) {
          const int64_t count = std::min(p.block_size, n - first);
          const T* v0 = p.block(p.values, b, h0, slot);
          for (int64_t kv = 0; kv < nh; ++kv) {
            const T* v = v0 + kv * dim;
            for (int64_t i = 0; 2 * i < count; ++i) {
              const T* x = v + 2 * i * stride;
              for (int64_t c = 0; c < C; ++c) {
                const __m512i lo = _mm512_loadu_si512(x + c * 32);
                // A missing second row is zeros, not the block's unwritten (maybe NaN) bytes.
                const __m512i hi = 2 * i + 1 < count ? _mm512_loadu_si512(x + stride + c * 32)
                                                     : zero;
                m.vpairs[(i * C + c) * 2] = _mm512_unpacklo_epi16(lo, hi);
                m.vpairs[(i * C + c) * 2 + 1] = _mm512_unpackhi_epi16(lo, hi);
              }
            }
            for (int64_t g = 0; g < group; ++g) {
              const int64_t r = kv * group + g;
              const uint16_t* pr = m.probs.data() + r * n_pad + first;
              float* a = m.acc.data() + r * dim;
              __m512 sums[2 * C];
              for (int64_t j = 0; j < 2 * C; ++j) sums[j] = _mm512_loadu_ps(a + j * 16);
              for (int64_t i = 0; 2 * i < count; ++i) {
                uint32_t word;
                std::memcpy(&word, pr + 2 * i, sizeof word);
                const __m512bh pp = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(word));
                for (int64_t j = 0; j < 2 * C; ++j) {
                  sums[j] = _mm512_dpbf16_ps(sums[j], (__m512bh)m.vpairs[i * 2 * C + j], pp);
                }
              }
              for (int64_t j = 0; j < 2 * C; ++j) _mm512_storeu_ps(a + j * 16, sums[j]);
            }
          }
        }
        // Accumulator j = 2c (+1 for the high words) lane l holds column
        // 32c + 8 (l / 4) + l % 4 (+ 4).
        for (int64_t r = 0; r < rows_q; ++r) {
          T* o = p.output + (b * p.heads + h0 * group + r) * dim;
          const float* a = m.acc.data() + r * dim;
          for (int64_t j = 0; j < 2 * C; ++j) {
            for (int64_t l = 0; l < 16; ++l) {
              o[32 * (j / 2) + 8 * (l / 4) + l % 4 + 4 * (j % 2)] =
                  static_cast<T>(a[j * 16 + l] * m.inv[r]);
            }
          }
        }
      });
}
#endif

}  // namespace

// q [B, H, d]; kv_cache [2, num_blocks, block_size, kv_heads, d] (keys, then values);
// block_tables [B, width] int64; context_lens [B] int64, each >= 1 and within its table.
// Returns [B, H, d]: softmax(q k^T * scale) v over each sequence's first context_lens keys.
// bf16_dot: bfloat16 heads of 64 or 128 run `decode_dpbf16` where it is compiled in (False:
// `decode`, for tests and benchmarks).
torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& kv_cache,
                           const torch::Tensor& block_tables, const torch::Tensor& context_lens,
                           double scale, bool bf16_dot) {
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
#if defined(__AVX512BF16__)
  if (bf16_dot && qc.scalar_type() == at::kBFloat16 && (dim == 64 || dim == 128)) {
    const Paged<c10::BFloat16> p(qc, kv_cache, tables, lens, scale, out);
    if (dim == 64) decode_dpbf16<2>(p);
    else decode_dpbf16<4>(p);
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qc.scalar_type(), "paged_decode", [&] {
    const Paged<scalar_t> p(qc, kv_cache, tables, lens, scale, out);
    if (dim == 64) {
      decode<scalar_t, 64 / W>(p);
    } else if (dim == 128) {
      decode<scalar_t, 128 / W>(p);
    } else {
      decode<scalar_t, 0>(p);
    }
  });
  return out;
}

bool paged_decode_has_bf16_dot() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}
