// CPU impls of the fastmask._C ops (_uniform_fill, _gate_fwd, _gate_bwd, _masked_weight, _masked_weight_slope,
// _mask_grad, _mask_grad_masked_weight).
// Design: gates are regenerated from (seed, offset) and never stored; every op works on tiles of
// (block row g, run of grid columns), computes each gate once into a small stack/thread-local buffer and then
// streams the weight rows of that tile (one pass over W / grad_wm). float32 gate math runs in vectorisable loops
// (Philox in AVX-512 / AVX2 intrinsics chosen at run time, log/exp as branch-free polynomials), float64 uses the
// scalar fastmask::gate_value<double> of philox.h (gradcheck path).
// Limits: reductions of _mask_grad are split over tiles only (deterministic, independent of the thread count), so a
// grid of a single cell (a whole-layer mask) is reduced by one thread. Needs -fopenmp (at::parallel_for is header
// code) to use more than one thread. FASTMASK_CPU_ISA=scalar|avx2|avx512 caps the instruction set: AVX2 and AVX-512
// give the same bits; the portable path (no FMA) differs from them by float32 rounding only.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../philox.h"
#include "vec_math.h"

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define FASTMASK_X86_DISPATCH 1
#include <immintrin.h>
#define FASTMASK_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FASTMASK_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")))
#else
#define FASTMASK_X86_DISPATCH 0
#endif

#if defined(AT_PARALLEL_OPENMP) && AT_PARALLEL_OPENMP && !defined(_OPENMP)
// at::parallel_for is header code: without OpenMP in this translation unit every kernel runs on one thread.
#pragma message("fastmask: csrc/cpu/mask_kernels.cpp is compiled without -fopenmp, the CPU kernels will use one thread; add -fopenmp to the C++ compile and link flags")
#endif

#if defined(__GNUC__) || defined(__clang__)
#define FASTMASK_INLINE inline __attribute__((always_inline))
#else
#define FASTMASK_INLINE inline
#endif

#if defined(__clang__)
// No implicit a*b+c contraction (GCC: see the gate math below); fused multiply-adds are written out where wanted.
#pragma clang fp contract(off)
#endif

namespace fastmask {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// Instruction-set dispatch
// ---------------------------------------------------------------------------------------------------------------

enum Isa : int { kIsaScalar = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };

Isa detected_isa() {
#if FASTMASK_X86_DISPATCH
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
      return kIsaAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return kIsaAvx2;
    return kIsaScalar;
  }();
  return isa;
#else
  return kIsaScalar;
#endif
}

// The instruction set of this call: the detected one, capped by FASTMASK_CPU_ISA (read per call, so tests can switch).
Isa current_isa() {
  Isa isa = detected_isa();
  if (const char* env = std::getenv("FASTMASK_CPU_ISA")) {
    Isa cap = isa;
    if (std::strcmp(env, "scalar") == 0) cap = kIsaScalar;
    else if (std::strcmp(env, "avx2") == 0) cap = kIsaAvx2;
    isa = std::min(isa, cap);
  }
  return isa;
}

// ---------------------------------------------------------------------------------------------------------------
// Philox: u[i] = philox_uniform(seed, pos + i), bit-exact with philox.h on every path. The kernels below fill whole
// quads: counter c gives the four stream positions 4c .. 4c + 3 (its four output words, in order).
// ---------------------------------------------------------------------------------------------------------------

constexpr uint32_t kPhiloxA = 0xD2511F53u, kPhiloxB = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;        // key increments
constexpr float kUintToFloat = 4.6566127342e-10f;  // Triton's uint -> [0, 1) scale (philox.h uint32_to_uniform)

// Portable loop over counters (c0 + q, c1) for q < quads, with c0 + quads <= 2^32 (no carry); writes 4 * quads.
void philox_quads_scalar(uint32_t k0, uint32_t k1, uint32_t c0_start, uint32_t c1_const, int64_t quads,
                         float* __restrict u) {
  for (int64_t q = 0; q < quads; ++q) {
    uint32_t c0 = c0_start + static_cast<uint32_t>(q), c1 = c1_const, c2 = 0, c3 = 0, a0 = k0, a1 = k1;
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 10
#endif
    for (int round = 0; round < 10; ++round) {
      const uint64_t pb = static_cast<uint64_t>(kPhiloxB) * c2, pa = static_cast<uint64_t>(kPhiloxA) * c0;
      c0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ a0;
      c2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ a1;
      c1 = static_cast<uint32_t>(pb);
      c3 = static_cast<uint32_t>(pa);
      a0 += kKeyA;
      a1 += kKeyB;
    }
    u[4 * q] = uint32_to_uniform(c0);
    u[4 * q + 1] = uint32_to_uniform(c1);
    u[4 * q + 2] = uint32_to_uniform(c2);
    u[4 * q + 3] = uint32_to_uniform(c3);
  }
}

#if FASTMASK_X86_DISPATCH
// Words (8 x 32 bits, counters c .. c + 7 in order) -> uniform floats.
FASTMASK_TARGET_AVX2 FASTMASK_INLINE __m256 words_to_uniform_avx2(__m256i w) {
  w = _mm256_xor_si256(w, _mm256_srai_epi32(w, 31));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(w), _mm256_set1_ps(kUintToFloat));
}

// Stores word j of counters c .. c + 7 (f[j], lane k = counter c + k) at u[4k + j]: a 4 x 4 transpose within each
// 128-bit half, then the halves put in counter order.
FASTMASK_TARGET_AVX2 FASTMASK_INLINE void store_quads_avx2(__m256 f0, __m256 f1, __m256 f2, __m256 f3,
                                                           float* __restrict u) {
  const __m256 t0 = _mm256_unpacklo_ps(f0, f1), t1 = _mm256_unpackhi_ps(f0, f1);  // (c0: w0 w1, c1: w0 w1 | c4, c5)
  const __m256 t2 = _mm256_unpacklo_ps(f2, f3), t3 = _mm256_unpackhi_ps(f2, f3);  // the same for w2 w3
  // 64-bit unpacks: counters (0|4), (1|5), (2|6), (3|7), each with its four words in order
  const __m256d d0 = _mm256_castps_pd(t0), d1 = _mm256_castps_pd(t1);
  const __m256d d2 = _mm256_castps_pd(t2), d3 = _mm256_castps_pd(t3);
  const __m256 r0 = _mm256_castpd_ps(_mm256_unpacklo_pd(d0, d2)), r1 = _mm256_castpd_ps(_mm256_unpackhi_pd(d0, d2));
  const __m256 r2 = _mm256_castpd_ps(_mm256_unpacklo_pd(d1, d3)), r3 = _mm256_castpd_ps(_mm256_unpackhi_pd(d1, d3));
  _mm256_storeu_ps(u, _mm256_permute2f128_ps(r0, r1, 0x20));
  _mm256_storeu_ps(u + 8, _mm256_permute2f128_ps(r2, r3, 0x20));
  _mm256_storeu_ps(u + 16, _mm256_permute2f128_ps(r0, r1, 0x31));
  _mm256_storeu_ps(u + 24, _mm256_permute2f128_ps(r2, r3, 0x31));
}

// The Philox state lives in 64-bit lanes (low 32 bits meaningful): _mul_epu32 then gives the full 32x32->64
// product in one instruction and ignores the garbage that the xors leave in the high halves.
FASTMASK_TARGET_AVX2 void philox_quads_avx2(uint32_t k0, uint32_t k1, uint32_t c0_start, uint32_t c1_const,
                                            int64_t quads, float* __restrict u) {
  const __m256i mul_a = _mm256_set1_epi64x(kPhiloxA), mul_b = _mm256_set1_epi64x(kPhiloxB);
  const __m256i even = _mm256_set_epi64x(6, 4, 2, 0), odd = _mm256_set_epi64x(7, 5, 3, 1);
  const __m256i low_mask = _mm256_set1_epi64x(0xffffffffll);
  int64_t q = 0;
  for (; q + 8 <= quads; q += 8) {
    // Two streams: x holds counters q, q+2, q+4, q+6 and y holds q+1, q+3, ..., merged back in order at the end.
    const __m256i base = _mm256_set1_epi64x(static_cast<int64_t>(c0_start) + q);
    __m256i x0 = _mm256_add_epi64(base, even), y0 = _mm256_add_epi64(base, odd);
    __m256i x1 = _mm256_set1_epi64x(c1_const), y1 = x1;
    __m256i x2 = _mm256_setzero_si256(), y2 = x2, x3 = x2, y3 = x2;
    uint32_t a0 = k0, a1 = k1;
    for (int round = 0; round < 10; ++round) {
      const __m256i key0 = _mm256_set1_epi64x(a0), key1 = _mm256_set1_epi64x(a1);
      const __m256i pbx = _mm256_mul_epu32(x2, mul_b), pax = _mm256_mul_epu32(x0, mul_a);
      const __m256i pby = _mm256_mul_epu32(y2, mul_b), pay = _mm256_mul_epu32(y0, mul_a);
      x0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pbx, 32), x1), key0);
      x2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pax, 32), x3), key1);
      y0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pby, 32), y1), key0);
      y2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pay, 32), y3), key1);
      x1 = pbx;
      x3 = pax;
      y1 = pby;
      y3 = pay;
      a0 += kKeyA;
      a1 += kKeyB;
    }
    // Word j of counters q .. q + 7 in order: x's counters in the even 32-bit lanes, y's in the odd ones.
#define FASTMASK_MERGE(x, y) \
  words_to_uniform_avx2(_mm256_or_si256(_mm256_and_si256(x, low_mask), _mm256_slli_epi64(y, 32)))
    store_quads_avx2(FASTMASK_MERGE(x0, y0), FASTMASK_MERGE(x1, y1), FASTMASK_MERGE(x2, y2), FASTMASK_MERGE(x3, y3),
                     u + 4 * q);
#undef FASTMASK_MERGE
  }
  if (q < quads) philox_quads_scalar(k0, k1, c0_start + static_cast<uint32_t>(q), c1_const, quads - q, u + 4 * q);
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive inside avx512fintrin.h
#endif
FASTMASK_TARGET_AVX512 void philox_quads_avx512(uint32_t k0, uint32_t k1, uint32_t c0_start, uint32_t c1_const,
                                                int64_t quads, float* __restrict u) {
  const __m512i mul_a = _mm512_set1_epi64(kPhiloxA), mul_b = _mm512_set1_epi64(kPhiloxB);
  const __m512i iota = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), eight = _mm512_set1_epi64(8);
  int64_t q = 0;
  for (; q + 16 <= quads; q += 16) {
    // Two independent 8-lane streams (counters q..q+7 and q+8..q+15) for instruction-level parallelism.
    __m512i x0 = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(c0_start) + q), iota);
    __m512i y0 = _mm512_add_epi64(x0, eight);
    __m512i x1 = _mm512_set1_epi64(c1_const), y1 = x1;
    __m512i x2 = _mm512_setzero_si512(), y2 = x2, x3 = x2, y3 = x2;
    uint32_t a0 = k0, a1 = k1;
    for (int round = 0; round < 10; ++round) {
      const __m512i key0 = _mm512_set1_epi64(a0), key1 = _mm512_set1_epi64(a1);
      const __m512i pbx = _mm512_mul_epu32(x2, mul_b), pax = _mm512_mul_epu32(x0, mul_a);
      const __m512i pby = _mm512_mul_epu32(y2, mul_b), pay = _mm512_mul_epu32(y0, mul_a);
      x0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pbx, 32), x1, key0, 0x96);  // 3-way xor
      x2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pax, 32), x3, key1, 0x96);
      y0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pby, 32), y1, key0, 0x96);
      y2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pay, 32), y3, key1, 0x96);
      x1 = pbx;
      x3 = pax;
      y1 = pby;
      y3 = pay;
      a0 += kKeyA;
      a1 += kKeyB;
    }
#define FASTMASK_WORDS(v) words_to_uniform_avx2(_mm512_cvtepi64_epi32(v))  // low 32 bits of each 64-bit lane
    store_quads_avx2(FASTMASK_WORDS(x0), FASTMASK_WORDS(x1), FASTMASK_WORDS(x2), FASTMASK_WORDS(x3), u + 4 * q);
    store_quads_avx2(FASTMASK_WORDS(y0), FASTMASK_WORDS(y1), FASTMASK_WORDS(y2), FASTMASK_WORDS(y3), u + 4 * q + 32);
#undef FASTMASK_WORDS
  }
  if (q < quads) philox_quads_scalar(k0, k1, c0_start + static_cast<uint32_t>(q), c1_const, quads - q, u + 4 * q);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

// u[i] = philox_uniform(seed, pos + i) for i < n: the partial quads at either end through philox.h, the whole
// quads through the ISA's kernel (64-bit counters; split where the counter's low word wraps).
template <int kIsa>
FASTMASK_INLINE void philox_fill(uint64_t seed, uint64_t pos, int64_t n, float* u) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  if (n > 0 && (pos & 3) != 0) {  // head: the positions of pos's quad from pos on
    const PhiloxWords words = philox_words(seed, pos >> 2);
    for (uint64_t w = pos & 3; w < 4 && n > 0; ++w, ++pos, --n) *u++ = uint32_to_uniform(words.w[w]);
  }
  uint64_t ctr = pos >> 2;
  int64_t quads = n / 4;
  while (quads > 0) {
    const uint64_t to_wrap = (uint64_t{1} << 32) - (ctr & 0xffffffffull);
    const int64_t m = static_cast<int64_t>(std::min<uint64_t>(static_cast<uint64_t>(quads), to_wrap));
    const uint32_t c0 = static_cast<uint32_t>(ctr), c1 = static_cast<uint32_t>(ctr >> 32);
#if FASTMASK_X86_DISPATCH
    if constexpr (kIsa == kIsaAvx512) philox_quads_avx512(k0, k1, c0, c1, m, u);
    else if constexpr (kIsa == kIsaAvx2) philox_quads_avx2(k0, k1, c0, c1, m, u);
    else philox_quads_scalar(k0, k1, c0, c1, m, u);
#else
    philox_quads_scalar(k0, k1, c0, c1, m, u);
#endif
    ctr += static_cast<uint64_t>(m);
    u += 4 * m;
    quads -= m;
    n -= 4 * m;
  }
  if (n > 0) {  // tail: the first n positions of the last quad
    const PhiloxWords words = philox_words(seed, ctr);
    for (int64_t w = 0; w < n; ++w) u[w] = uint32_to_uniform(words.w[w]);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// float32 gate math: branch-free, so that the loops below vectorise in each instruction set
// ---------------------------------------------------------------------------------------------------------------

#if defined(__GNUC__) && !defined(__clang__)
// No implicit a*b+c contraction in the gate math (GCC contracts freely in C++ once a target has FMA, as the AVX2 /
// AVX-512 ones here do, and it may do so differently in a loop's vector body and its scalar tail): every element
// then takes the same roundings wherever it falls, so gates do not depend on how the work is split (thread count).
// The fused multiply-adds that we want are explicit (mad below).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

FASTMASK_INLINE float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}
FASTMASK_INLINE uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}
// c ? a : b as a bit mask: GCC (with the default -ftrapping-math) does not if-convert most float `?:` into vector
// selects, this form it vectorises on every instruction set.
FASTMASK_INLINE float select(bool c, float a, float b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return bits_to_float((float_to_bits(a) & m) | (float_to_bits(b) & ~m));
}

// a * b + c, fused (one rounding) on the AVX2+FMA / AVX-512 paths, two roundings on the portable path. Explicit,
// because the gate math is compiled without contraction (see above): then the vector body and the scalar tail of
// a loop round alike.
template <bool kFma>
FASTMASK_INLINE float mad(float a, float b, float c) {
  if constexpr (kFma) return std::fma(a, b, c);
  else return a * b + c;
}

// exp(x), Cephes expf polynomial (about 1 ulp); x is clamped to [-87, 88] (the result stays normal), NaN propagates.
template <bool kFma>
FASTMASK_INLINE float fast_exp(float x) {
  float xc = select(x > 88.0f, 88.0f, x);
  xc = select(xc < -87.0f, -87.0f, xc);
  const float shifted = mad<kFma>(xc, 1.44269504088896341f, 12582912.0f);  // round(x / ln 2): 1.5 * 2^23 trick
  const float n = shifted - 12582912.0f;
  const int32_t ni = static_cast<int32_t>(float_to_bits(shifted) - float_to_bits(12582912.0f));
  float r = mad<kFma>(n, -0.693359375f, xc);  // Cody-Waite: ln 2 = 0.693359375 - 2.12194440e-4
  r = mad<kFma>(n, 2.12194440e-4f, r);
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = mad<kFma>(p, r, 1.3981999507e-3f);
  p = mad<kFma>(p, r, 8.3334519073e-3f);
  p = mad<kFma>(p, r, 4.1665795894e-2f);
  p = mad<kFma>(p, r, 1.6666665459e-1f);
  p = mad<kFma>(p, r, 5.0000001201e-1f);
  const float y = mad<kFma>(p, r2, r) + 1.0f;  // in [0.7, 1.42]
  const float result = bits_to_float(float_to_bits(y) + (static_cast<uint32_t>(ni) << 23));
  return select(x != x, x, result);
}

// log(x) for normal x > 0 (Cephes logf, about 1 ulp).
template <bool kFma>
FASTMASK_INLINE float fast_log(float x) {
  const uint32_t bits = float_to_bits(x);
  float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 126);
  float m = bits_to_float((bits & 0x007fffffu) | 0x3f000000u);  // x = m * 2^e, m in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = select(small, e - 1.0f, e);
  m = select(small, m + m - 1.0f, m - 1.0f);  // log(x) = log1p(m) + e log 2, m in [sqrt(1/2) - 1, sqrt(2) - 1)
  const float m2 = m * m;
  float p = 7.0376836292e-2f;
  p = mad<kFma>(p, m, -1.1514610310e-1f);
  p = mad<kFma>(p, m, 1.1676998740e-1f);
  p = mad<kFma>(p, m, -1.2420140846e-1f);
  p = mad<kFma>(p, m, 1.4249322787e-1f);
  p = mad<kFma>(p, m, -1.6668057665e-1f);
  p = mad<kFma>(p, m, 2.0000714765e-1f);
  p = mad<kFma>(p, m, -2.4999993993e-1f);
  p = mad<kFma>(p, m, 3.3333331174e-1f);
  float y = p * m * m2;
  y = mad<kFma>(e, -2.12194440e-4f, y);
  y = mad<kFma>(-0.5f, m2, y);
  return mad<kFma>(e, 0.693359375f, m + y);
}

template <bool kFma>
FASTMASK_INLINE float fast_sigmoid(float v) {
  return 1.0f / (1.0f + fast_exp<kFma>(-v));
}

// logit(u) of the clamped noise, as fastmask.ref._logistic_noise but with one log: log(u / (1 - u)) instead of
// log(u) - log1p(-u) (1 - u is exact for u >= 1/2 and within 2^-25 relative below; the difference to the reference
// stays around 1e-7, far inside the float32 tolerance, and it saves a third of the transcendental work).
template <bool kFma>
FASTMASK_INLINE float logistic_noise_f(float u) {
  u = select(u < kUniformEps, kUniformEps, u);
  u = select(u > 1.0f - kUniformEps, 1.0f - kUniformEps, u);
  return fast_log<kFma>(u / (1.0f - u));
}

// Estimator parameters in float32, cast the way fastmask.ref casts python floats into float32 tensors.
struct GateParamsF {
  int64_t estimator;
  uint64_t seed, offset;
  float beta, gamma, zeta_minus_gamma, tau;  // zeta - gamma is taken in double, then rounded (as in ref.py)
  bool training, inverse;
};

// The estimator loops: training is a template flag and every condition a select, so that each loop vectorises.
template <bool kFma, bool kSlope, bool kTrain>
FASTMASK_INLINE void hard_concrete_f(const GateParamsF& p, const float* __restrict l, const float* __restrict u,
                                     int64_t n, float* __restrict z, float* __restrict slope) {
  const float beta = p.beta, gamma = p.gamma, zmg = p.zeta_minus_gamma;
  for (int64_t i = 0; i < n; ++i) {
    float s, ds;
    if constexpr (kTrain) {
      s = fast_sigmoid<kFma>((logistic_noise_f<kFma>(u[i]) + l[i]) / beta);
      ds = s * (1.0f - s) / beta;
    } else {
      s = fast_sigmoid<kFma>(l[i]);
      ds = s * (1.0f - s);
    }
    const float s_bar = s * zmg + gamma;
    z[i] = select(s_bar > 1.0f, 1.0f, select(s_bar < 0.0f, 0.0f, s_bar));
    if constexpr (kSlope) slope[i] = select((s_bar > 0.0f) & (s_bar < 1.0f), zmg * ds, 0.0f);
  }
}

template <bool kFma, bool kSlope, bool kTrain>
FASTMASK_INLINE void gumbel_f(const GateParamsF& p, const float* __restrict l, const float* __restrict u, int64_t n,
                              float* __restrict z, float* __restrict slope) {
  const float beta = p.beta;
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (kTrain) {
      const float v = l[i] + logistic_noise_f<kFma>(u[i]);
      z[i] = select(v > 0.0f, 1.0f, 0.0f);
      if constexpr (kSlope) {
        const float s = fast_sigmoid<kFma>(v / beta);
        slope[i] = s * (1.0f - s) / beta;
      }
    } else {
      z[i] = select(l[i] > 0.0f, 1.0f, 0.0f);
      if constexpr (kSlope) {
        const float s = fast_sigmoid<kFma>(l[i]);
        slope[i] = s * (1.0f - s);
      }
    }
  }
}

template <bool kFma, bool kSlope, bool kTrain>
FASTMASK_INLINE void bernoulli_f(const GateParamsF& /*p*/, const float* __restrict l, const float* __restrict u,
                                 int64_t n, float* __restrict z, float* __restrict slope) {
  for (int64_t i = 0; i < n; ++i) {
    const float prob = fast_sigmoid<kFma>(l[i]);
    if constexpr (kTrain) z[i] = select(u[i] < prob, 1.0f, 0.0f);
    else z[i] = select(l[i] > 0.0f, 1.0f, 0.0f);
    if constexpr (kSlope) slope[i] = prob * (1.0f - prob);
  }
}

template <bool kSlope>
FASTMASK_INLINE void threshold_f(const GateParamsF& p, const float* __restrict l, int64_t n, float* __restrict z,
                                 float* __restrict slope) {
  const float tau = p.tau;
  for (int64_t i = 0; i < n; ++i) {
    z[i] = select(l[i] > tau, 1.0f, 0.0f);
    if constexpr (kSlope) slope[i] = 1.0f;
  }
}

// Gates z (and dz/dl if kSlope) of the n logits l whose flat grid indices are j0, j0 + 1, ...
template <int kIsa, bool kSlope>
FASTMASK_INLINE void gates_f32_body(const GateParamsF& p, const float* l, uint64_t j0, int64_t n, float* z,
                                    float* slope) {
  constexpr bool kFma = kIsa != kIsaScalar;
  constexpr int64_t kChunk = 256;  // noise of one chunk stays in L1
  alignas(64) float u[kChunk];
  const bool noisy = p.training && p.estimator != kThresholdST;
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t m = std::min(kChunk, n - i0);
    float* zi = z + i0;
    float* si = kSlope ? slope + i0 : nullptr;
    if (noisy) philox_fill<kIsa>(p.seed, p.offset + j0 + static_cast<uint64_t>(i0), m, u);
    switch (p.estimator) {
      case kHardConcrete:
        if (p.training) hard_concrete_f<kFma, kSlope, true>(p, l + i0, u, m, zi, si);
        else hard_concrete_f<kFma, kSlope, false>(p, l + i0, u, m, zi, si);
        break;
      case kGumbelSigmoidST:
        if (p.training) gumbel_f<kFma, kSlope, true>(p, l + i0, u, m, zi, si);
        else gumbel_f<kFma, kSlope, false>(p, l + i0, u, m, zi, si);
        break;
      case kBernoulliST:
        if (p.training) bernoulli_f<kFma, kSlope, true>(p, l + i0, u, m, zi, si);
        else bernoulli_f<kFma, kSlope, false>(p, l + i0, u, m, zi, si);
        break;
      default: threshold_f<kSlope>(p, l + i0, m, zi, si); break;
    }
    if (p.inverse) {
      for (int64_t i = 0; i < m; ++i) zi[i] = 1.0f - zi[i];
      if constexpr (kSlope)
        for (int64_t i = 0; i < m; ++i) si[i] = -si[i];
    }
  }
}

using GatesF32Fn = void (*)(const GateParamsF&, const float*, uint64_t, int64_t, float*, float*);

void gates_f32_scalar(const GateParamsF& p, const float* l, uint64_t j0, int64_t n, float* z, float* slope) {
  if (slope) gates_f32_body<kIsaScalar, true>(p, l, j0, n, z, slope);
  else gates_f32_body<kIsaScalar, false>(p, l, j0, n, z, nullptr);
}
#if FASTMASK_X86_DISPATCH
FASTMASK_TARGET_AVX2 void gates_f32_avx2(const GateParamsF& p, const float* l, uint64_t j0, int64_t n, float* z,
                                         float* slope) {
  if (slope) gates_f32_body<kIsaAvx2, true>(p, l, j0, n, z, slope);
  else gates_f32_body<kIsaAvx2, false>(p, l, j0, n, z, nullptr);
}
FASTMASK_TARGET_AVX512 void gates_f32_avx512(const GateParamsF& p, const float* l, uint64_t j0, int64_t n, float* z,
                                             float* slope) {
  if (slope) gates_f32_body<kIsaAvx512, true>(p, l, j0, n, z, slope);
  else gates_f32_body<kIsaAvx512, false>(p, l, j0, n, z, nullptr);
}
#endif

// Gumbel noise g[i] = -log(-log(u)) of u = uniform(seed, ctr + i) clamped to [eps, 1 - eps] (fastmask.ref's
// _gumbel_noise; the learned N:M masks' noise), two branch-free logs per element instead of two torch passes.
template <int kIsa>
FASTMASK_INLINE void gumbel_fill_body(uint64_t seed, uint64_t ctr, int64_t n, float* g) {
  constexpr bool kFma = kIsa != kIsaScalar;
  constexpr int64_t kChunk = 256;  // the chunk's noise stays in L1 between the two loops
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t m = std::min(kChunk, n - i0);
    float* gi = g + i0;
    philox_fill<kIsa>(seed, ctr + static_cast<uint64_t>(i0), m, gi);
    for (int64_t i = 0; i < m; ++i) {
      float u = select(gi[i] < kUniformEps, kUniformEps, gi[i]);
      u = select(u > 1.0f - kUniformEps, 1.0f - kUniformEps, u);
      gi[i] = -fast_log<kFma>(-fast_log<kFma>(u));
    }
  }
}

void gumbel_fill_scalar(uint64_t seed, uint64_t ctr, int64_t n, float* g) {
  gumbel_fill_body<kIsaScalar>(seed, ctr, n, g);
}
#if FASTMASK_X86_DISPATCH
FASTMASK_TARGET_AVX2 void gumbel_fill_avx2(uint64_t seed, uint64_t ctr, int64_t n, float* g) {
  gumbel_fill_body<kIsaAvx2>(seed, ctr, n, g);
}
FASTMASK_TARGET_AVX512 void gumbel_fill_avx512(uint64_t seed, uint64_t ctr, int64_t n, float* g) {
  gumbel_fill_body<kIsaAvx512>(seed, ctr, n, g);
}
#endif

template <int kIsa>
FASTMASK_INLINE void exp_body(const float* x, float* y, int64_t n) {
  constexpr bool kFma = kIsa != kIsaScalar;
  for (int64_t i = 0; i < n; ++i) y[i] = fast_exp<kFma>(x[i]);
}

void exp_f32_scalar(const float* x, float* y, int64_t n) { exp_body<kIsaScalar>(x, y, n); }
#if FASTMASK_X86_DISPATCH
FASTMASK_TARGET_AVX2 void exp_f32_avx2(const float* x, float* y, int64_t n) { exp_body<kIsaAvx2>(x, y, n); }
FASTMASK_TARGET_AVX512 void exp_f32_avx512(const float* x, float* y, int64_t n) { exp_body<kIsaAvx512>(x, y, n); }
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// Everything a kernel needs to regenerate gates: the float64 params of philox.h, their float32 twin and the
// float32 gate routine of this call's instruction set.
struct GateCtx {
  GateParams p;
  GateParamsF pf;
  GatesF32Fn gates_f32;
  Isa isa;
};

GateCtx make_gate_ctx(int64_t estimator, int64_t seed, int64_t offset, double beta, double gamma, double zeta,
                      double tau, bool training, bool inverse) {
  TORCH_CHECK(estimator >= 0 && estimator <= 3,
              "fastmask: estimator must be an integer code in [0, 3] (0 hard_concrete, 1 gumbel_sigmoid_st, "
              "2 threshold_st, 3 bernoulli_st), got ", estimator);
  GateCtx c;
  c.p = GateParams{estimator, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), beta, gamma, zeta, tau,
                   training, inverse};
  c.pf = GateParamsF{estimator,
                     c.p.seed,
                     c.p.offset,
                     static_cast<float>(beta),
                     static_cast<float>(gamma),
                     static_cast<float>(zeta - gamma),
                     static_cast<float>(tau),
                     training,
                     inverse};
  c.isa = current_isa();
  switch (c.isa) {
#if FASTMASK_X86_DISPATCH
    case kIsaAvx512: c.gates_f32 = gates_f32_avx512; break;
    case kIsaAvx2: c.gates_f32 = gates_f32_avx2; break;
#endif
    default: c.gates_f32 = gates_f32_scalar; break;
  }
  return c;
}

// Gate (and slope) row in the compute dtype: float32 through the vectorised routine, float64 through philox.h.
inline void gate_row(const GateCtx& c, const float* l, uint64_t j0, int64_t n, float* z, float* slope) {
  c.gates_f32(c.pf, l, j0, n, z, slope);
}
inline void gate_row(const GateCtx& c, const double* l, uint64_t j0, int64_t n, double* z, double* slope) {
  for (int64_t i = 0; i < n; ++i)
    z[i] = gate_value<double>(c.p, l[i], j0 + static_cast<uint64_t>(i), slope ? slope + i : nullptr);
}

// ---------------------------------------------------------------------------------------------------------------
// Shared helpers of the ops
// ---------------------------------------------------------------------------------------------------------------

template <typename Wt>
using Upcast = std::conditional_t<std::is_same_v<Wt, double>, double, float>;  // float64 stays, the rest -> float32

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastmask: ", name, " must be a CPU tensor for the CPU kernels, got ",
              t.device());
}

// Logits as a contiguous tensor of the compute dtype (float64 stays float64, other float dtypes -> float32).
at::Tensor logits_in_compute_dtype(const at::Tensor& logits) {
  check_cpu(logits, "logits");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()),
              "fastmask: logits must be a floating-point tensor (float32, float64, float16 or bfloat16), got ",
              logits.scalar_type());
  const auto dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return logits.to(dtype).contiguous();
}

// Element-wise tiles over the (gr, gc) grid: (block row g, a run of KC grid columns, a run of RB weight rows).
struct TilePlan {
  int64_t rows, cols, bh, bw, gr, gc;
  int64_t kc, nkc;  // grid columns per tile, tiles per block row
  int64_t rb, nrb;  // weight rows per tile, row tiles per block row
  int64_t num_tiles() const { return gr * nrb * nkc; }
};

// split_rows: allow splitting a block row over several tiles (element-wise ops only; a reduction keeps whole block
// rows so that its summation order does not depend on the tiling).
TilePlan plan_tiles(int64_t rows, int64_t cols, int64_t bh, int64_t bw, int64_t gr, int64_t gc, bool split_rows) {
  TilePlan t{rows, cols, bh, bw, gr, gc, 1, 1, bh, 1};
  const int64_t want = 4 * static_cast<int64_t>(std::max(1, at::get_num_threads()));  // tiles for load balance
  t.kc = std::max<int64_t>(1, std::min<int64_t>(gc, ceil_div(1024, bw)));  // about 1024 weight columns per tile
  if (gr < want) t.kc = std::max<int64_t>(1, std::min(t.kc, ceil_div(gc, ceil_div(want, gr))));
  t.nkc = gc > 0 ? ceil_div(gc, t.kc) : 0;
  if (split_rows && gr * t.nkc < want && bh > 1) {
    t.nrb = std::min(bh, ceil_div(want, std::max<int64_t>(1, gr * t.nkc)));
    t.rb = ceil_div(bh, t.nrb);
    t.nrb = ceil_div(bh, t.rb);
  }
  return t;
}

// Grain of at::parallel_for over tiles: about 32K weight elements per task.
int64_t tile_grain(const TilePlan& t) {
  const int64_t per_tile = std::max<int64_t>(1, std::min(t.rb, t.rows) * std::min(t.kc * t.bw, t.cols));
  return std::max<int64_t>(1, 32768 / per_tile);
}

// ---------------------------------------------------------------------------------------------------------------
// _uniform_fill / _gumbel_fill
// ---------------------------------------------------------------------------------------------------------------

// The data of a noise op's out: a float32 contiguous CPU tensor.
float* noise_out(const at::Tensor& out, const char* op) {
  check_cpu(out, "out");
  TORCH_CHECK(out.scalar_type() == at::kFloat, "fastmask: ", op, ": out must be float32, got ", out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), "fastmask: ", op, ": out must be contiguous (got strides ", out.strides(),
              " for shape ", out.sizes(), ")");
  return out.data_ptr<float>();
}

void uniform_fill_cpu(at::Tensor out, int64_t seed, int64_t offset) {
  float* data = noise_out(out, "_uniform_fill");
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  const Isa isa = current_isa();
  at::parallel_for(0, out.numel(), 1 << 15, [&](int64_t b, int64_t e) {
    switch (isa) {
      case kIsaAvx512: philox_fill<kIsaAvx512>(s, o + static_cast<uint64_t>(b), e - b, data + b); break;
      case kIsaAvx2: philox_fill<kIsaAvx2>(s, o + static_cast<uint64_t>(b), e - b, data + b); break;
      default: philox_fill<kIsaScalar>(s, o + static_cast<uint64_t>(b), e - b, data + b); break;
    }
  });
}

void gumbel_fill_cpu(at::Tensor out, int64_t seed, int64_t offset) {
  float* data = noise_out(out, "_gumbel_fill");
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  const Isa isa = current_isa();
  at::parallel_for(0, out.numel(), 1 << 14, [&](int64_t b, int64_t e) {
    const uint64_t ctr = o + static_cast<uint64_t>(b);
#if FASTMASK_X86_DISPATCH
    if (isa == kIsaAvx512) return gumbel_fill_avx512(s, ctr, e - b, data + b);
    if (isa == kIsaAvx2) return gumbel_fill_avx2(s, ctr, e - b, data + b);
#endif
    gumbel_fill_scalar(s, ctr, e - b, data + b);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// _gate_fwd / _gate_bwd
// ---------------------------------------------------------------------------------------------------------------

template <typename G>
void gate_fwd_kernel(const GateCtx& c, const G* l, G* z, int64_t n) {
  at::parallel_for(0, n, 1 << 13, [&](int64_t b, int64_t e) {
    gate_row(c, l + b, static_cast<uint64_t>(b), e - b, z + b, nullptr);
  });
}

at::Tensor gate_fwd_cpu(const at::Tensor& logits, int64_t estimator, int64_t seed, int64_t offset, double beta,
                        double gamma, double zeta, double tau, bool training, bool inverse) {
  const GateCtx c = make_gate_ctx(estimator, seed, offset, beta, gamma, zeta, tau, training, inverse);
  const at::Tensor l = logits_in_compute_dtype(logits);
  at::Tensor z = at::empty(l.sizes(), l.options());
  if (l.scalar_type() == at::kDouble) gate_fwd_kernel<double>(c, l.data_ptr<double>(), z.data_ptr<double>(), l.numel());
  else gate_fwd_kernel<float>(c, l.data_ptr<float>(), z.data_ptr<float>(), l.numel());
  return z;
}

template <typename G>
void gate_bwd_kernel(const GateCtx& c, const G* g, const G* l, G* out, int64_t n) {
  at::parallel_for(0, n, 1 << 13, [&](int64_t b, int64_t e) {
    constexpr int64_t kChunk = 1024;
    G z[kChunk], slope[kChunk];
    for (int64_t i0 = b; i0 < e; i0 += kChunk) {
      const int64_t m = std::min(kChunk, e - i0);
      gate_row(c, l + i0, static_cast<uint64_t>(i0), m, z, slope);
      for (int64_t i = 0; i < m; ++i) out[i0 + i] = g[i0 + i] * slope[i];
    }
  });
}

at::Tensor gate_bwd_cpu(const at::Tensor& grad_gates, const at::Tensor& logits, int64_t estimator, int64_t seed,
                        int64_t offset, double beta, double gamma, double zeta, double tau, bool training,
                        bool inverse) {
  const GateCtx c = make_gate_ctx(estimator, seed, offset, beta, gamma, zeta, tau, training, inverse);
  const at::Tensor l = logits_in_compute_dtype(logits);
  check_cpu(grad_gates, "grad_gates");
  TORCH_CHECK(at::isFloatingType(grad_gates.scalar_type()), "fastmask: grad_gates must be a floating-point tensor, got ",
              grad_gates.scalar_type());
  TORCH_CHECK(grad_gates.sizes() == logits.sizes(), "fastmask: grad_gates must have the shape of logits ",
              logits.sizes(), ", got ", grad_gates.sizes());
  const at::Tensor g = grad_gates.to(l.scalar_type()).contiguous();
  at::Tensor out = at::empty(l.sizes(), l.options());
  if (l.scalar_type() == at::kDouble)
    gate_bwd_kernel<double>(c, g.data_ptr<double>(), l.data_ptr<double>(), out.data_ptr<double>(), l.numel());
  else gate_bwd_kernel<float>(c, g.data_ptr<float>(), l.data_ptr<float>(), out.data_ptr<float>(), l.numel());
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// _masked_weight: out[r, c] = W[r, c] * z[r / bh, c / bw], product in float32 (float64) rounded once
// ---------------------------------------------------------------------------------------------------------------

// Weight (R, C) and logits checks shared by _masked_weight and _mask_grad; returns the grid shape.
std::pair<int64_t, int64_t> check_weight_and_grid(const at::Tensor& weight, const at::Tensor& logits, int64_t bh,
                                                  int64_t bw) {
  check_cpu(weight, "weight");
  TORCH_CHECK(weight.dim() == 2, "fastmask: weight must be 2-D (rows, cols), got shape ", weight.sizes());
  const auto wt = weight.scalar_type();
  TORCH_CHECK(wt == at::kFloat || wt == at::kDouble || wt == at::kHalf || wt == at::kBFloat16,
              "fastmask: weight must be float32, float64, float16 or bfloat16, got ", wt);
  TORCH_CHECK(bh >= 1 && bw >= 1, "fastmask: block (bh, bw) must be positive, got (", bh, ", ", bw, ")");
  const int64_t rows = weight.size(0), cols = weight.size(1);
  const int64_t gr = ceil_div(rows, bh), gc = ceil_div(cols, bw);
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) == gr && logits.size(1) == gc,
              "fastmask: logits must be a 2-D grid of shape [", gr, ", ", gc, "] for weight ", weight.sizes(),
              " with block (", bh, ", ", bw, "), got ", logits.sizes());
  return {gr, gc};
}

// Rows of float16 / bfloat16 weights go through float32 buffers: load (convert), multiply, store (round once).
// float16 uses the F16C conversion instructions on the AVX2 / AVX-512 paths (c10::Half's portable conversion is
// branchy scalar code, about 20x slower).
#if FASTMASK_X86_DISPATCH
FASTMASK_TARGET_AVX2 void half_to_float_f16c(const c10::Half* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
  for (; i < n; ++i) out[i] = static_cast<float>(in[i]);
}
FASTMASK_TARGET_AVX2 void float_to_half_f16c(const float* in, c10::Half* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) out[i] = c10::Half(in[i]);
}
#endif

template <typename Wt>
void load_row(Isa isa, const Wt* in, float* out, int64_t n) {
#if FASTMASK_X86_DISPATCH
  if constexpr (std::is_same_v<Wt, c10::Half>) {
    if (isa >= kIsaAvx2) return half_to_float_f16c(in, out, n);
  }
#endif
  (void)isa;
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(in[i]);
}

template <typename Wt>
void store_row(Isa isa, const float* in, Wt* out, int64_t n) {
#if FASTMASK_X86_DISPATCH
  if constexpr (std::is_same_v<Wt, c10::Half>) {
    if (isa >= kIsaAvx2) return float_to_half_f16c(in, out, n);
  }
#endif
  (void)isa;
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<Wt>(in[i]);
}

// ze[i] = gate of weight column c0 + i, for the kn gates of a tile (cn columns).
template <typename A, typename G>
FASTMASK_INLINE void expand_gate_row(const G* zrow, int64_t kn, int64_t bw, int64_t cn, A* ze) {
  if (bw == 1) {
    for (int64_t k = 0; k < kn; ++k) ze[k] = static_cast<A>(zrow[k]);
    return;
  }
  for (int64_t k = 0; k < kn; ++k) {
    const A v = static_cast<A>(zrow[k]);
    const int64_t b1 = std::min((k + 1) * bw, cn);
    for (int64_t i = k * bw; i < b1; ++i) ze[i] = v;
  }
}

// S (optional, nullptr: not wanted): the gates' slopes dz/dl, one per gate, written by the first row tile of each
// block row (the other row tiles of a split block row regenerate the same gates for their rows only).
template <typename Wt, typename G>
void masked_weight_kernel(const GateCtx& c, const Wt* W, const G* L, Wt* out, G* S, const TilePlan& t) {
  using A = Upcast<Wt>;
  constexpr bool kDirect = std::is_same_v<Wt, A>;  // float32 / float64 weights: no conversion buffer
  const int64_t C = t.cols, bw = t.bw;
  const int64_t max_cols = std::min(t.kc * bw, C);
  at::parallel_for(0, t.num_tiles(), tile_grain(t), [&](int64_t t0, int64_t t1) {
    std::vector<G> zrow(static_cast<size_t>(t.kc));
    std::vector<A> zexp(static_cast<size_t>(max_cols));  // gates expanded to the tile's weight columns
    std::vector<float> wrow(static_cast<size_t>(kDirect ? 0 : max_cols));
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t g = tile / (t.nrb * t.nkc), rbi = (tile / t.nkc) % t.nrb, kci = tile % t.nkc;
      const int64_t k0 = kci * t.kc, kn = std::min(t.kc, t.gc - k0);
      const int64_t r0 = g * t.bh + rbi * t.rb, r1 = std::min({r0 + t.rb, (g + 1) * t.bh, t.rows});
      if (r0 >= r1) continue;
      const int64_t c0 = k0 * bw, c1 = std::min((k0 + kn) * bw, C), cn = c1 - c0;
      const uint64_t j0 = static_cast<uint64_t>(g * t.gc + k0);
      gate_row(c, L + j0, j0, kn, zrow.data(), (S != nullptr && rbi == 0) ? S + j0 : nullptr);  // once per tile
      expand_gate_row<A, G>(zrow.data(), kn, bw, cn, zexp.data());
      const A* __restrict ze = zexp.data();
      for (int64_t r = r0; r < r1; ++r) {
        const Wt* __restrict w = W + r * C + c0;
        Wt* __restrict o = out + r * C + c0;
        if constexpr (kDirect) {
          for (int64_t i = 0; i < cn; ++i) o[i] = w[i] * ze[i];
        } else {
          float* __restrict buf = wrow.data();
          load_row<Wt>(c.isa, w, buf, cn);
          for (int64_t i = 0; i < cn; ++i) buf[i] = buf[i] * ze[i];
          store_row<Wt>(c.isa, buf, o, cn);
        }
      }
    }
  });
}

template <typename G>
void masked_weight_dispatch(const GateCtx& c, const at::Tensor& w, const at::Tensor& l, at::Tensor& out,
                            at::Tensor* slope, const TilePlan& t) {
  const G* L = l.data_ptr<G>();
  G* S = slope ? slope->data_ptr<G>() : nullptr;
  switch (w.scalar_type()) {
    case at::kFloat: masked_weight_kernel<float, G>(c, w.data_ptr<float>(), L, out.data_ptr<float>(), S, t); break;
    case at::kDouble:
      masked_weight_kernel<double, G>(c, w.data_ptr<double>(), L, out.data_ptr<double>(), S, t);
      break;
    case at::kHalf:
      masked_weight_kernel<c10::Half, G>(c, w.data_ptr<c10::Half>(), L, out.data_ptr<c10::Half>(), S, t);
      break;
    default:
      masked_weight_kernel<c10::BFloat16, G>(c, w.data_ptr<c10::BFloat16>(), L, out.data_ptr<c10::BFloat16>(), S,
                                             t);
      break;
  }
}

// W * m, and with `slope` also dz/dl of every gate (compute dtype, shaped like the logits) from the same pass.
std::tuple<at::Tensor, at::Tensor> masked_weight_impl(const at::Tensor& weight, const at::Tensor& logits, int64_t bh,
                                                      int64_t bw, int64_t estimator, int64_t seed, int64_t offset,
                                                      double beta, double gamma, double zeta, double tau,
                                                      bool training, bool inverse, bool with_slope) {
  const GateCtx c = make_gate_ctx(estimator, seed, offset, beta, gamma, zeta, tau, training, inverse);
  const auto [gr, gc] = check_weight_and_grid(weight, logits, bh, bw);
  const at::Tensor l = logits_in_compute_dtype(logits);
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor slope = with_slope ? at::empty(l.sizes(), l.options()) : at::empty({0}, l.options());
  if (w.numel() == 0) return {out, slope};
  const TilePlan t = plan_tiles(w.size(0), w.size(1), bh, bw, gr, gc, /*split_rows=*/true);
  at::Tensor* slope_ptr = with_slope ? &slope : nullptr;
  if (l.scalar_type() == at::kDouble) masked_weight_dispatch<double>(c, w, l, out, slope_ptr, t);
  else masked_weight_dispatch<float>(c, w, l, out, slope_ptr, t);
  return {out, slope};
}

at::Tensor masked_weight_cpu(const at::Tensor& weight, const at::Tensor& logits, int64_t bh, int64_t bw,
                             int64_t estimator, int64_t seed, int64_t offset, double beta, double gamma, double zeta,
                             double tau, bool training, bool inverse) {
  return std::get<0>(masked_weight_impl(weight, logits, bh, bw, estimator, seed, offset, beta, gamma, zeta, tau,
                                        training, inverse, /*with_slope=*/false));
}

std::tuple<at::Tensor, at::Tensor> masked_weight_slope_cpu(const at::Tensor& weight, const at::Tensor& logits,
                                                           int64_t bh, int64_t bw, int64_t estimator, int64_t seed,
                                                           int64_t offset, double beta, double gamma, double zeta,
                                                           double tau, bool training, bool inverse) {
  return masked_weight_impl(weight, logits, bh, bw, estimator, seed, offset, beta, gamma, zeta, tau, training,
                            inverse, /*with_slope=*/true);
}

// ---------------------------------------------------------------------------------------------------------------
// _mask_grad: grad_logits[g] = slope[g] * sum over block g of grad_wm * W; grad_weight = grad_wm * m
// ---------------------------------------------------------------------------------------------------------------

// Sum of G(gw[i] * w[i]) over one block row segment, in a fixed order that depends only on n.
template <typename G, typename A>
FASTMASK_INLINE G block_dot(const A* __restrict gw, const A* __restrict w, int64_t n) {
  if (n < 32) {
    G s = G(0);
    for (int64_t i = 0; i < n; ++i) s += static_cast<G>(gw[i] * w[i]);
    return s;
  }
  G lane[16] = {};  // 16 independent partial sums (vectorisable), folded pairwise at the end
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; ++k) lane[k] += static_cast<G>(gw[i + k] * w[i + k]);
  for (int k = 0; i < n; ++i, ++k) lane[k] += static_cast<G>(gw[i] * w[i]);
  for (int half = 8; half >= 1; half /= 2)
    for (int k = 0; k < half; ++k) lane[k] += lane[k + half];
  return lane[0];
}

// WM (optional, nullptr: not wanted): the masked weight W * m in the weight dtype, written from the same pass.
template <typename Wt, typename G>
void mask_grad_kernel(const GateCtx& c, const Upcast<Wt>* GW, const Wt* W, const G* L, G* GL, Wt* GWt, Wt* WM,
                      const TilePlan& t) {
  using A = Upcast<Wt>;
  constexpr bool kDirect = std::is_same_v<Wt, A>;
  const int64_t C = t.cols, bw = t.bw;
  const int64_t max_cols = std::min(t.kc * bw, C);
  const bool expand = GWt != nullptr || WM != nullptr;
  at::parallel_for(0, t.num_tiles(), tile_grain(t), [&](int64_t t0, int64_t t1) {
    std::vector<G> zrow(static_cast<size_t>(t.kc)), srow(static_cast<size_t>(t.kc)), acc(static_cast<size_t>(t.kc));
    std::vector<A> zexp(static_cast<size_t>(expand ? max_cols : 0));
    std::vector<float> wrow(static_cast<size_t>(kDirect ? 0 : max_cols)), prod(wrow.size());
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t g = tile / t.nkc, kci = tile % t.nkc;  // t.nrb == 1: whole block rows per tile
      const int64_t k0 = kci * t.kc, kn = std::min(t.kc, t.gc - k0);
      const int64_t r0 = g * t.bh, r1 = std::min(r0 + t.bh, t.rows);
      const int64_t c0 = k0 * bw, c1 = std::min((k0 + kn) * bw, C), cn = c1 - c0;
      const uint64_t j0 = static_cast<uint64_t>(g * t.gc + k0);
      gate_row(c, L + j0, j0, kn, zrow.data(), srow.data());  // gates and slopes regenerated, once per tile
      if (expand) expand_gate_row<A, G>(zrow.data(), kn, bw, cn, zexp.data());
      G* __restrict a = acc.data();
      for (int64_t k = 0; k < kn; ++k) a[k] = G(0);
      for (int64_t r = r0; r < r1; ++r) {
        const A* __restrict gw = GW + r * C + c0;
        const A* __restrict w;
        if constexpr (kDirect) {
          w = W + r * C + c0;
        } else {
          load_row<Wt>(c.isa, W + r * C + c0, wrow.data(), cn);
          w = wrow.data();
        }
        // Block sums: rows in order; within a row, block_dot's fixed order (independent of the tiling).
        if (bw == 1) {
          for (int64_t k = 0; k < kn; ++k) a[k] += static_cast<G>(gw[k] * w[k]);
        } else {
          for (int64_t k = 0; k < kn; ++k) {
            const int64_t b0 = k * bw, b1 = std::min(b0 + bw, cn);
            a[k] += block_dot<G, A>(gw + b0, w + b0, b1 - b0);
          }
        }
        if (GWt != nullptr) {
          Wt* __restrict o = GWt + r * C + c0;
          const A* __restrict ze = zexp.data();
          if constexpr (kDirect) {
            for (int64_t i = 0; i < cn; ++i) o[i] = gw[i] * ze[i];
          } else {
            float* __restrict p = prod.data();
            for (int64_t i = 0; i < cn; ++i) p[i] = gw[i] * ze[i];
            store_row<Wt>(c.isa, p, o, cn);
          }
        }
        if (WM != nullptr) {  // the product rounded once, as _masked_weight does
          Wt* __restrict o = WM + r * C + c0;
          const A* __restrict ze = zexp.data();
          if constexpr (kDirect) {
            for (int64_t i = 0; i < cn; ++i) o[i] = w[i] * ze[i];
          } else {
            float* __restrict p = prod.data();
            for (int64_t i = 0; i < cn; ++i) p[i] = w[i] * ze[i];
            store_row<Wt>(c.isa, p, o, cn);
          }
        }
      }
      G* __restrict gl = GL + j0;
      const G* __restrict s = srow.data();
      for (int64_t k = 0; k < kn; ++k) gl[k] = a[k] * s[k];
    }
  });
}

template <typename G>
void mask_grad_dispatch(const GateCtx& c, const at::Tensor& gw, const at::Tensor& w, const at::Tensor& l,
                        at::Tensor& gl, at::Tensor* gwt, at::Tensor* wm, const TilePlan& t) {
  const G* L = l.data_ptr<G>();
  G* GL = gl.data_ptr<G>();
  switch (w.scalar_type()) {
    case at::kFloat:
      mask_grad_kernel<float, G>(c, gw.data_ptr<float>(), w.data_ptr<float>(), L, GL,
                                 gwt ? gwt->data_ptr<float>() : nullptr, wm ? wm->data_ptr<float>() : nullptr, t);
      break;
    case at::kDouble:
      mask_grad_kernel<double, G>(c, gw.data_ptr<double>(), w.data_ptr<double>(), L, GL,
                                  gwt ? gwt->data_ptr<double>() : nullptr, wm ? wm->data_ptr<double>() : nullptr, t);
      break;
    case at::kHalf:
      mask_grad_kernel<c10::Half, G>(c, gw.data_ptr<float>(), w.data_ptr<c10::Half>(), L, GL,
                                     gwt ? gwt->data_ptr<c10::Half>() : nullptr,
                                     wm ? wm->data_ptr<c10::Half>() : nullptr, t);
      break;
    default:
      mask_grad_kernel<c10::BFloat16, G>(c, gw.data_ptr<float>(), w.data_ptr<c10::BFloat16>(), L, GL,
                                         gwt ? gwt->data_ptr<c10::BFloat16>() : nullptr,
                                         wm ? wm->data_ptr<c10::BFloat16>() : nullptr, t);
      break;
  }
}

// _mask_grad, and with needs_masked_weight also W * m from the same pass (_mask_grad_masked_weight).
std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_grad_impl(
    const at::Tensor& grad_wm, const at::Tensor& weight, const at::Tensor& logits, int64_t bh, int64_t bw,
    int64_t estimator, int64_t seed, int64_t offset, double beta, double gamma, double zeta, double tau,
    bool training, bool inverse, bool needs_weight_grad, bool needs_masked_weight) {
  const GateCtx c = make_gate_ctx(estimator, seed, offset, beta, gamma, zeta, tau, training, inverse);
  const auto [gr, gc] = check_weight_and_grid(weight, logits, bh, bw);
  check_cpu(grad_wm, "grad_wm");
  TORCH_CHECK(grad_wm.sizes() == weight.sizes(), "fastmask: grad_wm must have the shape of weight ", weight.sizes(),
              ", got ", grad_wm.sizes());
  TORCH_CHECK(at::isFloatingType(grad_wm.scalar_type()), "fastmask: grad_wm must be a floating-point tensor, got ",
              grad_wm.scalar_type());
  const at::Tensor l = logits_in_compute_dtype(logits);
  const at::Tensor w = weight.contiguous();
  // grad_wm is read in float32, or float64 for float64 weights (a no-op for what the op layer passes).
  const at::Tensor gw = grad_wm.to(w.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  at::Tensor gl = at::empty(l.sizes(), l.options());
  const auto contiguous = w.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor gwt = needs_weight_grad ? at::empty(w.sizes(), contiguous) : at::empty({0}, weight.options());
  at::Tensor wm = needs_masked_weight ? at::empty(w.sizes(), contiguous) : at::empty({0}, weight.options());
  if (w.numel() == 0) {
    gl.zero_();
    return {gl, gwt, wm};
  }
  const TilePlan t = plan_tiles(w.size(0), w.size(1), bh, bw, gr, gc, /*split_rows=*/false);
  at::Tensor* gwt_ptr = needs_weight_grad ? &gwt : nullptr;
  at::Tensor* wm_ptr = needs_masked_weight ? &wm : nullptr;
  if (l.scalar_type() == at::kDouble) mask_grad_dispatch<double>(c, gw, w, l, gl, gwt_ptr, wm_ptr, t);
  else mask_grad_dispatch<float>(c, gw, w, l, gl, gwt_ptr, wm_ptr, t);
  return {gl, gwt, wm};
}

std::tuple<at::Tensor, at::Tensor> mask_grad_cpu(const at::Tensor& grad_wm, const at::Tensor& weight,
                                                 const at::Tensor& logits, int64_t bh, int64_t bw, int64_t estimator,
                                                 int64_t seed, int64_t offset, double beta, double gamma, double zeta,
                                                 double tau, bool training, bool inverse, bool needs_weight_grad) {
  auto [gl, gwt, wm] = mask_grad_impl(grad_wm, weight, logits, bh, bw, estimator, seed, offset, beta, gamma, zeta,
                                      tau, training, inverse, needs_weight_grad, /*needs_masked_weight=*/false);
  return {gl, gwt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_grad_masked_weight_cpu(
    const at::Tensor& grad_wm, const at::Tensor& weight, const at::Tensor& logits, int64_t bh, int64_t bw,
    int64_t estimator, int64_t seed, int64_t offset, double beta, double gamma, double zeta, double tau,
    bool training, bool inverse, bool needs_weight_grad) {
  return mask_grad_impl(grad_wm, weight, logits, bh, bw, estimator, seed, offset, beta, gamma, zeta, tau, training,
                        inverse, needs_weight_grad, /*needs_masked_weight=*/true);
}

}  // namespace

ExpF32Fn exp_f32_kernel() {
#if FASTMASK_X86_DISPATCH
  switch (current_isa()) {
    case kIsaAvx512: return exp_f32_avx512;
    case kIsaAvx2: return exp_f32_avx2;
    default: break;
  }
#endif
  return exp_f32_scalar;
}

}  // namespace cpu
}  // namespace fastmask

TORCH_LIBRARY_IMPL(fastmask, CPU, m) {
  m.impl("_uniform_fill", &fastmask::cpu::uniform_fill_cpu);
  m.impl("_gumbel_fill", &fastmask::cpu::gumbel_fill_cpu);
  m.impl("_gate_fwd", &fastmask::cpu::gate_fwd_cpu);
  m.impl("_gate_bwd", &fastmask::cpu::gate_bwd_cpu);
  m.impl("_masked_weight", &fastmask::cpu::masked_weight_cpu);
  m.impl("_masked_weight_slope", &fastmask::cpu::masked_weight_slope_cpu);
  m.impl("_mask_grad", &fastmask::cpu::mask_grad_cpu);
  m.impl("_mask_grad_masked_weight", &fastmask::cpu::mask_grad_masked_weight_cpu);
}
