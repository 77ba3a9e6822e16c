// Philox4x32-10 noise and the gate math of every estimator, shared by the C++ CPU and CUDA kernels.
// Bit-exact with fastmask/ref.py (NOISE) and Triton: stream position p is word p % 4 of Philox4x32-10 with
// key = (lo32(seed), hi32(seed)) and counter = (lo32(p / 4), hi32(p / 4), 0, 0) (tl.randint4x(seed, p / 4)),
// then Triton's uint -> float conversion. One Philox call gives four consecutive positions.
// Everything here is FASTMASK_HD (host and device) and header-only so both compilers inline it.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define FASTMASK_HD __host__ __device__ __forceinline__
#else
#define FASTMASK_HD inline
#endif

namespace fastmask {

// Integer codes of the estimators: the order of fastmask.ref.ESTIMATORS.
enum Estimator : int64_t {
  kHardConcrete = 0,
  kGumbelSigmoidST = 1,
  kThresholdST = 2,
  kBernoulliST = 3,
};

// Noise is clamped to [kUniformEps, 1 - kUniformEps] before logit(u) (fastmask.ref.UNIFORM_EPS).
constexpr float kUniformEps = 1e-6f;

FASTMASK_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// The four output words of Philox4x32-10 for counter n (64 bits) and the 64-bit seed.
struct PhiloxWords {
  uint32_t w[4];
};

FASTMASK_HD PhiloxWords philox_words(uint64_t seed, uint64_t n) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(n), c1 = static_cast<uint32_t>(n >> 32), c2 = 0, c3 = 0;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_b = mulhi32(0xCD9E8D57u, c2), lo_b = 0xCD9E8D57u * c2;
    const uint32_t hi_a = mulhi32(0xD2511F53u, c0), lo_a = 0xD2511F53u * c0;
    c0 = hi_b ^ c1 ^ k0;
    c2 = hi_a ^ c3 ^ k1;
    c1 = lo_b;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return PhiloxWords{{c0, c1, c2, c3}};
}

// Triton's uint_to_uniform_float: read as int32, fold negatives with ~x, scale; the product is one rounding
// (no FMA can fuse into it), so host and device agree bit for bit.
FASTMASK_HD float uint32_to_uniform(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  x = x < 0 ? ~x : x;
#if defined(__CUDA_ARCH__)
  return __fmul_rn(__int2float_rn(x), 4.6566127342e-10f);
#else
  return static_cast<float>(x) * 4.6566127342e-10f;
#endif
}

// Word k (0..3) of a call, by selects: no dynamically indexed local array (local memory on a GPU).
FASTMASK_HD uint32_t philox_word(const PhiloxWords& words, uint32_t k) {
  return k == 0 ? words.w[0] : (k == 1 ? words.w[1] : (k == 2 ? words.w[2] : words.w[3]));
}

// Uniform noise at stream position p. Kernels that walk positions in order should call philox_words once per
// quad instead (this runs a whole Philox call for one position).
FASTMASK_HD float philox_uniform(uint64_t seed, uint64_t p) {
  return uint32_to_uniform(philox_word(philox_words(seed, p >> 2), static_cast<uint32_t>(p & 3)));
}

// Estimator parameters, passed by value to kernels.
struct GateParams {
  int64_t estimator;
  uint64_t seed;
  uint64_t offset;  // noise of logit j is philox_uniform(seed, offset + j): stream position offset + j
  double beta;      // temperature of hard_concrete and gumbel_sigmoid_st
  double gamma;     // hard_concrete stretch interval (gamma, zeta)
  double zeta;
  double tau;       // threshold_st threshold
  bool training;
  bool inverse;     // 1 - z, negated slope
};

// Math in the compute type T: float, or double when the logits are float64 (for gradcheck).
FASTMASK_HD float fm_exp(float v) { return expf(v); }
FASTMASK_HD double fm_exp(double v) { return exp(v); }
FASTMASK_HD float fm_log(float v) { return logf(v); }
FASTMASK_HD double fm_log(double v) { return log(v); }
FASTMASK_HD float fm_log1p(float v) { return log1pf(v); }
FASTMASK_HD double fm_log1p(double v) { return log1p(v); }

template <typename T>
FASTMASK_HD T fm_sigmoid(T v) { return T(1) / (T(1) + fm_exp(-v)); }

template <typename T>
FASTMASK_HD T clamp01(T v) { return v < T(0) ? T(0) : (v > T(1) ? T(1) : v); }

// logit(u) of the clamped noise of logit j: the logistic noise of hard_concrete and gumbel_sigmoid_st.
template <typename T>
FASTMASK_HD T logistic_noise(const GateParams& p, uint64_t j) {
  float u = philox_uniform(p.seed, p.offset + j);
  u = fminf(fmaxf(u, kUniformEps), 1.0f - kUniformEps);
  const T uu = static_cast<T>(u);
  return fm_log(uu) - fm_log1p(-uu);
}

// Gate z of logit l whose flat grid index is j; if slope != nullptr also dz/dl (the surrogate gradient).
// Mirrors fastmask.ref._gate_and_slope exactly (same formulas, same order of operations).
template <typename T>
FASTMASK_HD T gate_value(const GateParams& p, T l, uint64_t j, T* slope) {
  const T beta = static_cast<T>(p.beta), gamma = static_cast<T>(p.gamma), zeta = static_cast<T>(p.zeta);
  T z, dz;
  switch (p.estimator) {
    case kHardConcrete: {
      T s, ds;
      if (p.training) {
        s = fm_sigmoid<T>((logistic_noise<T>(p, j) + l) / beta);
        ds = s * (T(1) - s) / beta;
      } else {
        s = fm_sigmoid<T>(l);
        ds = s * (T(1) - s);
      }
      const T s_bar = s * (zeta - gamma) + gamma;
      z = clamp01(s_bar);
      dz = (s_bar > T(0) && s_bar < T(1)) ? (zeta - gamma) * ds : T(0);
      break;
    }
    case kGumbelSigmoidST: {
      if (p.training) {
        const T v = l + logistic_noise<T>(p, j);
        const T s = fm_sigmoid<T>(v / beta);
        z = v > T(0) ? T(1) : T(0);
        dz = s * (T(1) - s) / beta;
      } else {
        const T s = fm_sigmoid<T>(l);
        z = l > T(0) ? T(1) : T(0);
        dz = s * (T(1) - s);
      }
      break;
    }
    case kBernoulliST: {
      const T prob = fm_sigmoid<T>(l);
      z = p.training ? (static_cast<T>(philox_uniform(p.seed, p.offset + j)) < prob ? T(1) : T(0))
                     : (l > T(0) ? T(1) : T(0));
      dz = prob * (T(1) - prob);
      break;
    }
    default: {  // kThresholdST
      z = l > static_cast<T>(p.tau) ? T(1) : T(0);
      dz = T(1);
      break;
    }
  }
  if (slope != nullptr) *slope = p.inverse ? -dz : dz;
  return p.inverse ? T(1) - z : z;
}

}  // namespace fastmask
