// Causal attention of a prefill chunk over the paged KV cache, bfloat16 on AVX512-BF16.
//
// torch's CPU SDPA ran a 1,024-token SmolLM2 prefill's attention at ~0.1 TFLOP/s in bfloat16
// (10.8 ms a layer, 55 % of the step, on an AMD EPYC Zen 5), and a chunk over a cached prefix
// first gathered the context's rows out of the cache. Here the chunk's keys and values are
// read from their blocks once and laid out in pairs (pairs.h) per KV head: keys as tiles of
// 32 keys over the head's dimensions, values as tiles of 32 dimensions over pairs of keys.
// Then each work item — a KV head and 16 of the chunk's tokens, with every query head of the
// group (GQA) as rows — walks the key tiles its tokens can see (flash attention's online
// softmax): scores by `vdpbf16ps` (rows x key tile), scaled and masked in float32, the running
// max and sum updated, the probabilities rounded to bfloat16 and multiplied into the output
// sums by `vdpbf16ps` again (rows x value tile). On a CPU with AMX both products run on its
// tiles instead (pairs.h: the key and value tiles are the layout AMX's second operand wants).
//
// New token i of n sits at position context_len - n + i and sees keys 0 .. that position.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "pairs.h"
#include "vec.h"

// vdpbf16ps, and AVX512-BW's 16-bit permutes for the values' interleave.
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define ELECTRON_PREFILL 1
#endif

namespace {

using namespace electron;

constexpr int64_t KEYS = PAIR_COLS;  // keys of a tile
constexpr int64_t TOKENS = 16;       // new tokens of a work item
constexpr int MAX_ROWS = 8;          // rows of a pass over a tile

#if defined(ELECTRON_PREFILL)
const vec kIota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

struct Chunk {
  int64_t n, context, heads, kv_heads, dim, group, block_size, tiles;
  const c10::BFloat16* q;  // [n, heads, dim], rows q_stride apart
  int64_t q_stride;
  const c10::BFloat16* keys;    // the cache's keys, [blocks * block_size, kv_heads, dim]
  const c10::BFloat16* values;  // and values
  const int64_t* table;
  c10::BFloat16* kp;  // [kv_heads, tiles, dim / 2, 32, 2]: key tiles
  c10::BFloat16* vp;  // [kv_heads, tiles, dim / 32, 16, 32, 2]: value tiles
  c10::BFloat16* out;  // [n, heads, dim]
  float scale;
};

// Key tile `tile` of KV head h: keys and values read from their blocks (zeros past the end).
void pack_tile(const Chunk& c, int64_t h, int64_t tile) {
  const int64_t d = c.dim, row = c.kv_heads * d;
  c10::BFloat16* kt = c.kp + (h * c.tiles + tile) * KEYS * d;
  c10::BFloat16* vt = c.vp + (h * c.tiles + tile) * KEYS * d;
  const c10::BFloat16* k[KEYS];
  const c10::BFloat16* v[KEYS];
  static const c10::BFloat16 zeros[256] = {};
  for (int64_t j = 0; j < KEYS; ++j) {
    const int64_t pos = tile * KEYS + j;
    if (pos < c.context) {
      const int64_t slot = c.table[pos / c.block_size] * c.block_size + pos % c.block_size;
      k[j] = c.keys + slot * row + h * d;
      v[j] = c.values + slot * row + h * d;
    } else {
      k[j] = v[j] = zeros;
    }
  }
  // keys: [dim / 2][32 keys][2], a transpose of the tile's (key, pair) 32-bit words
  for (int64_t j = 0; j < KEYS; ++j) {
    for (int64_t p = 0; p < d / 2; ++p) {
      uint32_t pair;
      std::memcpy(&pair, k[j] + 2 * p, sizeof pair);
      std::memcpy(kt + (p * KEYS + j) * 2, &pair, sizeof pair);
    }
  }
  // values: [dim / 32][16 key pairs][32 dims][2], the rows of each pair of keys interleaved
  const __m512i first = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9,
                                         40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1,
                                         32, 0);
  const __m512i second = _mm512_add_epi16(first, _mm512_set1_epi16(16));
  for (int64_t t = 0; t < d / PAIR_COLS; ++t) {
    for (int64_t p = 0; p < KEYS / 2; ++p) {
      c10::BFloat16* dst = vt + (t * KEYS / 2 + p) * 2 * PAIR_COLS;
      const __m512i a = _mm512_loadu_si512(v[2 * p] + t * PAIR_COLS);
      const __m512i b = _mm512_loadu_si512(v[2 * p + 1] + t * PAIR_COLS);
      _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a, first, b));
      _mm512_storeu_si512(dst + PAIR_COLS, _mm512_permutex2var_epi16(a, second, b));
    }
  }
}

inline __m512 m512(vec v) {
  __m512 m;
  std::memcpy(&m, &v, sizeof m);
  return m;
}

// Scratch of one thread: the item's query rows, scores, probabilities and output sums.
struct Scratch {
  std::vector<c10::BFloat16> q, probs;
  std::vector<float> scores, values, sums, max, total;
  explicit Scratch(int64_t rows, int64_t dim)
      : q(rows * dim), probs(rows * KEYS), scores(rows * KEYS), values(rows * PAIR_COLS),
        sums(rows * dim), max(rows), total(rows) {}
};

#if defined(ELECTRON_AMX)
// On AMX: out [rows][32] floats (rows rounded up to 16, the buffers of x and out holding them) =
// rows of x (`lda` apart, 2 P inputs) times the tile w ([P][32][2]), 32 rows a pass.
void amx_rows(const c10::BFloat16* x, int64_t lda, int64_t rows, const c10::BFloat16* w,
              int64_t P, float* out) {
  for (int64_t r0 = 0; r0 < rows; r0 += 2 * AMX_ROWS) {
    const bool two = rows - r0 > AMX_ROWS;
    const c10::BFloat16* const a[2] = {x + r0 * lda, two ? x + (r0 + AMX_ROWS) * lda : nullptr};
    if (two) {
      amx_tile<2>(a, lda, w, P, out + r0 * PAIR_COLS);
    } else {
      amx_tile<1>(a, lda, w, P, out + r0 * PAIR_COLS);
    }
  }
}
#endif

// KV head h, new tokens t0 .. t0 + count - 1: rows r = (token t0 + r / group, query head
// h * group + r % group). Products on AMX's tiles if `amx` (the thread's tiles configured).
void attend(const Chunk& c, Scratch& s, int64_t h, int64_t t0, int64_t count, bool amx) {
  const int64_t d = c.dim, g = c.group, rows = count * g;
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(&s.q[r * d], c.q + (t0 + r / g) * c.q_stride + (h * g + r % g) * d,
                d * sizeof(c10::BFloat16));
  }
  std::fill(s.sums.begin(), s.sums.begin() + rows * d, 0.f);
  std::fill(s.max.begin(), s.max.begin() + rows, -std::numeric_limits<float>::infinity());
  std::fill(s.total.begin(), s.total.begin() + rows, 0.f);
  const int64_t first_pos = c.context - c.n + t0;  // position of the item's first token
  const int64_t last_pos = first_pos + count - 1;
  for (int64_t tile = 0; tile * KEYS <= last_pos; ++tile) {
    const c10::BFloat16* kt = c.kp + (h * c.tiles + tile) * KEYS * d;
    const c10::BFloat16* vt = c.vp + (h * c.tiles + tile) * KEYS * d;
    // Scores, scaled; keys past a row's position masked.
#if defined(ELECTRON_AMX)
    if (amx) amx_rows(s.q.data(), d, rows, kt, d / 2, s.scores.data());
#endif
    for (int64_t r0 = 0; r0 < rows && !amx; r0 += MAX_ROWS) {
      with_rows<MAX_ROWS>(rows - r0, [&]<int MR>() {
        __m512 acc[MR][2];
        pairs_tile<MR>(&s.q[r0 * d], d, d / 2, kt, acc);
        for (int m = 0; m < MR; ++m) {
          _mm512_storeu_ps(&s.scores[(r0 + m) * KEYS], acc[m][0]);
          _mm512_storeu_ps(&s.scores[(r0 + m) * KEYS + W], acc[m][1]);
        }
      });
    }
    const bool diagonal = (tile + 1) * KEYS - 1 > first_pos;
    const float inf = std::numeric_limits<float>::infinity();
    for (int64_t r = 0; r < rows; ++r) {
      float* sc = &s.scores[r * KEYS];
      vec lo = load(sc) * c.scale, hi = load(sc + W) * c.scale;
      if (diagonal) {  // keys past the row's position
        const float visible = static_cast<float>(first_pos + r / g - tile * KEYS + 1);
        lo = kIota < visible ? lo : splat(-inf);
        hi = kIota + static_cast<float>(W) < visible ? hi : splat(-inf);
      }
      const float top = std::max(s.max[r], _mm512_reduce_max_ps(m512(lo > hi ? lo : hi)));
      // exp(-inf) = 0 on the first tile; none where the running max stands (most tiles)
      const float rescale = top == s.max[r] ? 1.f : std::exp(s.max[r] - top);
      s.max[r] = top;
      // exp_nonpositive clamps at -87: masked keys must weigh exactly 0.
      const vec p_lo = lo == -inf ? vec{} : exp_nonpositive(lo - top);
      const vec p_hi = hi == -inf ? vec{} : exp_nonpositive(hi - top);
      // Rounded to bfloat16 (to nearest even) in one instruction, and summed as rounded: each
      // pair times 1 by vdpbf16ps.
      const __m512bh probs = _mm512_cvtne2ps_pbh(m512(p_hi), m512(p_lo));
      _mm512_storeu_si512(&s.probs[r * KEYS], (__m512i)probs);
      const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3f80);
      s.total[r] = s.total[r] * rescale +
                   _mm512_reduce_add_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), probs, ones));
      if (rescale != 1.f) {
        float* o = &s.sums[r * d];
        for (int64_t e = 0; e < d; e += W) store(o + e, load(o + e) * rescale);
      }
    }
    // Output sums += probabilities x values.
#if defined(ELECTRON_AMX)
    for (int64_t t = 0; t < d / PAIR_COLS && amx; ++t) {
      amx_rows(s.probs.data(), KEYS, rows, vt + t * KEYS * PAIR_COLS, KEYS / 2, s.values.data());
      for (int64_t r = 0; r < rows; ++r) {
        float* o = &s.sums[r * d + t * PAIR_COLS];
        const float* v = &s.values[r * PAIR_COLS];
        for (int64_t e = 0; e < PAIR_COLS; e += W) store(o + e, load(o + e) + load(v + e));
      }
    }
#endif
    for (int64_t r0 = 0; r0 < rows && !amx; r0 += MAX_ROWS) {
      for (int64_t t = 0; t < d / PAIR_COLS; ++t) {
        with_rows<MAX_ROWS>(rows - r0, [&]<int MR>() {
          __m512 acc[MR][2];
          pairs_tile<MR>(&s.probs[r0 * KEYS], KEYS, KEYS / 2, vt + t * KEYS * PAIR_COLS, acc);
          for (int m = 0; m < MR; ++m) {
            float* o = &s.sums[(r0 + m) * d + t * PAIR_COLS];
            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), acc[m][0]));
            _mm512_storeu_ps(o + W, _mm512_add_ps(_mm512_loadu_ps(o + W), acc[m][1]));
          }
        });
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    c10::BFloat16* dst = c.out + ((t0 + r / g) * c.heads + h * g + r % g) * d;
    const float inv = 1.f / s.total[r];
    for (int64_t e = 0; e < d; e += W) store_as(dst + e, load(&s.sums[r * d + e]) * inv);
  }
}
#endif

}  // namespace

bool prefill_attention_available() {
#if defined(ELECTRON_PREFILL)
  return true;
#else
  return false;
#endif
}

// q [n, heads, dim] bfloat16 (rows may be strided, heads contiguous), kv_cache [2, blocks,
// block_size, kv_heads, dim] holding the context's keys and values (the chunk's included),
// block_table [>= ceil(context_len / block_size)] -> [n, heads, dim].
torch::Tensor prefill_attention(const torch::Tensor& q, const torch::Tensor& kv_cache,
                                const torch::Tensor& block_table, int64_t context_len,
                                double scale, bool amx) {
  TORCH_CHECK(prefill_attention_available(), "this build has no AVX512-BF16 and AVX512-BW");
  TORCH_CHECK(q.device().is_cpu() && kv_cache.device().is_cpu() && block_table.device().is_cpu(),
              "CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && kv_cache.scalar_type() == at::kBFloat16,
              "bfloat16 queries and cache");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.is_contiguous(),
              "kv_cache [2, blocks, block_size, kv_heads, dim], contiguous");
  const int64_t blocks = kv_cache.size(1), block_size = kv_cache.size(2);
  const int64_t kv_heads = kv_cache.size(3), dim = kv_cache.size(4);
  TORCH_CHECK(dim % PAIR_COLS == 0 && dim <= 256, "head size a multiple of 32, at most 256");
  TORCH_CHECK(q.dim() == 3 && q.size(2) == dim && q.size(1) % kv_heads == 0 &&
                  q.stride(2) == 1 && q.stride(1) == dim,
              "q [n, heads, dim] with heads a multiple of kv_heads, heads contiguous");
  const int64_t n = q.size(0);
  TORCH_CHECK(n >= 1 && context_len >= n, "1 <= new tokens <= context_len");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && block_table.dim() == 1,
              "block_table: int64 [blocks]");
  const auto table = block_table.contiguous();
  const int64_t used = (context_len + block_size - 1) / block_size;
  TORCH_CHECK(table.size(0) >= used, "the block table is shorter than the context");
  const int64_t* ids = table.data_ptr<int64_t>();
  for (int64_t i = 0; i < used; ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < blocks, "block id ", ids[i], " out of range");
  }
  auto out = torch::empty({n, q.size(1), dim}, q.options());
#if defined(ELECTRON_PREFILL)
  const int64_t tiles = (context_len + KEYS - 1) / KEYS;
  auto kp = torch::empty({kv_heads, tiles, KEYS * dim}, q.options());
  auto vp = torch::empty({kv_heads, tiles, KEYS * dim}, q.options());
  const auto* cache = kv_cache.data_ptr<c10::BFloat16>();
  Chunk c{n, context_len, q.size(1), kv_heads, dim, q.size(1) / kv_heads, block_size, tiles,
          q.data_ptr<c10::BFloat16>(), q.stride(0), cache,
          cache + blocks * block_size * kv_heads * dim, ids, kp.data_ptr<c10::BFloat16>(),
          vp.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(),
          static_cast<float>(scale)};
  at::parallel_for(0, kv_heads * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) pack_tile(c, i / tiles, i % tiles);
  });
  // Items (KV head, 16 tokens), the later (costlier) tokens interleaved with the earlier so
  // that the contiguous ranges parallel_for hands each thread weigh about the same.
  const int64_t spans = (n + TOKENS - 1) / TOKENS;
  std::vector<int64_t> order;
  order.reserve(spans);
  for (int64_t i = 0; i < spans; ++i) order.push_back(i % 2 ? spans - 1 - i / 2 : i / 2);
#if defined(ELECTRON_AMX)
  const bool on_amx = amx && amx_usable();
#else
  constexpr bool on_amx = false;
#endif
  at::parallel_for(0, kv_heads * spans, 1, [&](int64_t begin, int64_t end) {
    Scratch s(TOKENS * c.group, dim);
#if defined(ELECTRON_AMX)
    if (on_amx) configure_tiles();
#endif
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t0 = order[i % spans] * TOKENS;
      attend(c, s, i / spans, t0, std::min(TOKENS, n - t0), on_amx);
    }
#if defined(ELECTRON_AMX)
    if (on_amx) _tile_release();
#endif
  });
#endif
  return out;
}
