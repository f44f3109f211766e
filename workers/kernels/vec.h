// Vector helpers shared by the engine's CPU kernels: GCC/Clang vector types as wide as the
// CPU's registers, compiled with -march=native for the CPU the kernels run on.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace electron {

// Floats per vector: one register of the widest kind the CPU has (a vector type wider than
// its registers is split by the compiler, and its shuffles then cost many instructions).
#if defined(__AVX512F__)
constexpr int64_t W = 16;
#else
constexpr int64_t W = 8;
#endif
typedef float vec __attribute__((vector_size(W * sizeof(float))));
typedef int32_t ivec __attribute__((vector_size(W * sizeof(int32_t))));

inline vec load(const float* p) { vec v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }
inline vec splat(float x) { return vec{} + x; }
// *p in every lane, as one broadcast from memory (splat's `vec{} + x` costs an add and a
// shuffle, which matters in a loop of fused multiply-adds).
inline vec broadcast(const float* p) {
#if defined(__AVX512F__)
  return (vec)_mm512_set1_ps(*p);
#elif defined(__AVX__)
  return (vec)_mm256_broadcast_ss(p);
#else
  return splat(*p);
#endif
}

inline float to_float(float x) { return x; }
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline float to_float(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// out[j] = a[2j] + a[2j+1] for j < W/2, then the same of b: a step of the transposing sum.
inline vec pair_sum(vec a, vec b) {
#if defined(__AVX512F__)
  return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#else
  return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14) +
         __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15);
#endif
}

// W vectors of partial sums in, one vector out whose lane t is the sum of the lanes of p[t].
inline vec transpose_sum(vec* p) {
  for (int64_t n = W / 2; n >= 1; n /= 2) {
    for (int64_t i = 0; i < n; ++i) p[i] = pair_sum(p[2 * i], p[2 * i + 1]);
  }
  return p[0];
}

// fn.template operator()<MR>() for MR = min(rows, MAX): the row count as a template
// argument, so that a tile's sums stay in registers.
template <int MAX, typename Fn>
inline void with_rows(int64_t rows, Fn&& fn) {
  if constexpr (MAX > 1) {
    if (rows < MAX) return with_rows<MAX - 1>(rows, fn);
  }
  fn.template operator()<MAX>();
}

typedef uint16_t hvec __attribute__((vector_size(W * sizeof(uint16_t))));
typedef uint32_t uvec __attribute__((vector_size(W * sizeof(uint32_t))));

// W values of the cache or the weights as floats: bfloat16 widened in registers.
template <typename T>
inline vec load_as_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return load(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    hvec h;
    std::memcpy(&h, p, sizeof h);
    const uvec bits = __builtin_convertvector(h, uvec) << 16;
    vec v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
  } else {
    vec v;
    for (int64_t i = 0; i < W; ++i) v[i] = static_cast<float>(p[i]);
    return v;
  }
}

// A vector of floats rounded to T's precision as torch rounds a float to T (to nearest, ties
// to even; NaN stays NaN), as T's bits (bfloat16) or as floats (float32: as they are).
inline uvec bfloat16_bits(vec f) {
  uvec bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uvec rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return f != f ? uvec{} + 0x7FC0u : rounded;
}

template <typename T>
inline vec round_as(vec f) {
  if constexpr (std::is_same_v<T, float>) {
    return f;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uvec bits = bfloat16_bits(f) << 16;
    vec v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
  } else {
    for (int64_t i = 0; i < W; ++i) f[i] = static_cast<float>(static_cast<T>(f[i]));
    return f;
  }
}

// W floats stored as T, rounded as round_as rounds them.
template <typename T>
inline void store_as(T* p, vec f) {
  if constexpr (std::is_same_v<T, float>) {
    store(p, f);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const hvec h = __builtin_convertvector(bfloat16_bits(f), hvec);
    std::memcpy(p, &h, sizeof h);
  } else {
    for (int64_t i = 0; i < W; ++i) p[i] = static_cast<T>(f[i]);
  }
}

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

}  // namespace electron
