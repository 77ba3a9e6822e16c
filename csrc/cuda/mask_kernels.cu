// CUDA kernels of fastmask._C. Noise is regenerated from (seed, offset + logit index) (philox.h), never stored.
// Per-weight masks: flat elementwise kernels, 16-byte weight accesses. Blocks: _masked_weight computes each gate once
// per tile into shared memory; _mask_grad sums each block (or row chunk) in one thread or warp in a fixed order, then
// the chunks in a fixed order: no atomics, bit-reproducible. Limits: 2-D weights (non-contiguous inputs are copied);
// gate math in float (double for fp64 logits); never build with --use_fast_math (noise must match ref.py bitwise).
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "philox.h"

namespace fastmask {
namespace {

constexpr int kThreads = 256;  // threads per CTA of every kernel

// The product W * gate (and grad_wm) is taken in float, or in double for float64 weights.
template <typename scalar_t>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// N values of U loaded / stored as one aligned vector access (16 bytes for N * sizeof(U) == 16).
template <typename U, int N>
struct alignas(sizeof(U) * N) Pack {
  U v[N];
};

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ceil(a / b) for a >= 0, b >= 1, without overflow for huge b.
__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return a == 0 ? 0 : 1 + (a - 1) / b; }

// Elements of the weight dtype per 16-byte access.
template <typename scalar_t>
constexpr int vec_of() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

// ---------------------------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------------------------

// out[i] = philox_uniform(seed, offset + i). Thread t of the grid-stride loop owns the aligned quad of stream
// positions 4 * (offset / 4 + q) .. + 3 and runs one Philox call for all four of them.
__global__ void __launch_bounds__(kThreads) _uniform_fill_kernel(
    float* __restrict__ out,  // (n,) contiguous float32
    int64_t n,                // number of elements
    uint64_t seed,            // Philox key (64 bits)
    uint64_t offset) {        // stream position of element 0
  const int64_t lead = static_cast<int64_t>(offset & 3);  // positions of the first quad before element 0
  const int64_t quads = (lead + n + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < quads; q += stride) {
    const PhiloxWords words = philox_words(seed, (offset >> 2) + static_cast<uint64_t>(q));
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int64_t i = 4 * q + w - lead;
      if (i >= 0 && i < n) out[i] = uint32_to_uniform(words.w[w]);
    }
  }
}

// gates[j] = z(logits[j]) of the estimator; j is the row-major flat index of the logit grid.
template <typename T>
__global__ void __launch_bounds__(kThreads) _gate_fwd_kernel(
    const T* __restrict__ logits,  // (n,) contiguous, compute dtype
    T* __restrict__ gates,         // (n,) output, compute dtype
    int64_t n,                     // number of logits
    GateParams p) {                // estimator, noise stream, hyper-parameters
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    gates[j] = gate_value<T>(p, logits[j], static_cast<uint64_t>(j), nullptr);
  }
}

// grad_logits[j] = grad_gates[j] * dz/dl(logits[j]) (dz/dl already negated for inverse masks).
template <typename T>
__global__ void __launch_bounds__(kThreads) _gate_bwd_kernel(
    const T* __restrict__ grad_gates,  // (n,) contiguous, compute dtype
    const T* __restrict__ logits,      // (n,) contiguous, compute dtype
    T* __restrict__ grad_logits,       // (n,) output, compute dtype
    int64_t n,                         // number of logits
    GateParams p) {                    // estimator, noise stream, hyper-parameters
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    T slope;
    gate_value<T>(p, logits[j], static_cast<uint64_t>(j), &slope);
    grad_logits[j] = grad_gates[j] * slope;
  }
}

// Per-weight mask (block 1x1, so logit i gates weight element i): out = W * z, VEC elements per thread and step.
// Needs weight, logits and out aligned to their VEC-element vectors (checked on the host); the n % VEC tail is
// done one element at a time.
template <typename scalar_t, typename T, int VEC>
__global__ void __launch_bounds__(kThreads) _masked_weight_elem_kernel(
    const scalar_t* __restrict__ weight,  // (n,) contiguous weight
    const T* __restrict__ logits,         // (n,) contiguous logits, compute dtype
    scalar_t* __restrict__ out,           // (n,) output W * m, weight dtype
    int64_t n,                            // number of weight elements (= number of logits)
    GateParams p) {                       // estimator, noise stream, hyper-parameters
  using P = typename AccOf<scalar_t>::type;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t n_vec = n / VEC;
  for (int64_t k = tid; k < n_vec; k += stride) {
    const Pack<scalar_t, VEC> w = reinterpret_cast<const Pack<scalar_t, VEC>*>(weight)[k];
    const Pack<T, VEC> l = reinterpret_cast<const Pack<T, VEC>*>(logits)[k];
    Pack<scalar_t, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const T z = gate_value<T>(p, l.v[e], static_cast<uint64_t>(k * VEC + e), nullptr);
      o.v[e] = static_cast<scalar_t>(static_cast<P>(w.v[e]) * static_cast<P>(z));
    }
    reinterpret_cast<Pack<scalar_t, VEC>*>(out)[k] = o;
  }
  for (int64_t i = n_vec * VEC + tid; i < n; i += stride) {
    const T z = gate_value<T>(p, logits[i], static_cast<uint64_t>(i), nullptr);
    out[i] = static_cast<scalar_t>(static_cast<P>(weight[i]) * static_cast<P>(z));
  }
}

// Block masks (any bh x bw; also the fallback of per-weight masks whose pointers are not aligned).
// A CTA owns a tile of kMwRows rows x (kMwVecsPerRow * VEC) columns: it first computes the gates of the blocks the
// tile touches into shared memory (one gate_value per block and tile), then streams W -> W * m with VEC-element
// accesses. Thread (ty, tx) = (threadIdx.x / 64, threadIdx.x % 64) does columns [c0 + tx * VEC, + VEC) of rows
// ty, ty + 4, ty + 8, ty + 12 of the tile. VEC > 1 needs C % VEC == 0 and 16-byte aligned weight (host-checked).
constexpr int kMwRows = 16;        // rows per tile
constexpr int kMwVecsPerRow = 64;  // VEC-element vectors per tile row (threads per tile row)
constexpr int kMwRowThreads = kThreads / kMwVecsPerRow;  // threads down a tile column (4)

template <typename scalar_t, typename T, int VEC>
__global__ void __launch_bounds__(kThreads) _masked_weight_block_kernel(
    const scalar_t* __restrict__ weight,  // (R, C) contiguous weight
    const T* __restrict__ logits,         // (GR, GC) contiguous logits, compute dtype
    scalar_t* __restrict__ out,           // (R, C) output W * m, weight dtype
    int64_t R, int64_t C,                 // weight shape
    int64_t bh, int64_t bw,               // block shape: weight (r, c) is gated by logit (r / bh, c / bw)
    int64_t GC,                           // logit grid columns, ceil(C / bw)
    GateParams p) {                       // estimator, noise stream, hyper-parameters
  using P = typename AccOf<scalar_t>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  P* gates_s = reinterpret_cast<P*>(smem_raw);  // (ngr, ngc) gates of the blocks this tile touches

  constexpr int64_t kTileCols = static_cast<int64_t>(kMwVecsPerRow) * VEC;
  const int tx = threadIdx.x % kMwVecsPerRow, ty = threadIdx.x / kMwVecsPerRow;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTileCols;
  const int64_t gc0 = c0 / bw;
  const int64_t ngc = (min64(c0 + kTileCols, C) - 1) / bw - gc0 + 1;
  const int64_t c = c0 + static_cast<int64_t>(tx) * VEC;  // first column of this thread

  // Local block column (index into the tile's gate columns) of each of this thread's VEC columns.
  int lcol[VEC];
  {
    const int64_t first = c0 % bw + static_cast<int64_t>(tx) * VEC;  // column offset from block column gc0
    int64_t b = first / bw, rem = first % bw;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      lcol[e] = static_cast<int>(b);
      if (++rem == bw) {
        rem = 0;
        ++b;
      }
    }
  }

  const int64_t n_row_tiles = ceil_div(R, kMwRows);
  constexpr int kRowsPerThread = kMwRows / kMwRowThreads;
  for (int64_t rt = blockIdx.y; rt < n_row_tiles; rt += gridDim.y) {
    const int64_t r0 = rt * kMwRows;
    // Issue this thread's weight loads first so that they are in flight while the gates are computed.
    Pack<scalar_t, VEC> w[kRowsPerThread];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int64_t r = r0 + ty + static_cast<int64_t>(i) * kMwRowThreads;
      if (c < C && r < R) w[i] = *reinterpret_cast<const Pack<scalar_t, VEC>*>(weight + r * C + c);
    }
    const int64_t gr0 = r0 / bh;
    const int64_t ngr = (min64(r0 + kMwRows, R) - 1) / bh - gr0 + 1;
    __syncthreads();  // the previous row tile's readers are done with gates_s
    for (int64_t k = threadIdx.x; k < ngr * ngc; k += blockDim.x) {
      const int64_t j = (gr0 + k / ngc) * GC + gc0 + k % ngc;
      gates_s[k] = static_cast<P>(gate_value<T>(p, logits[j], static_cast<uint64_t>(j), nullptr));
    }
    __syncthreads();
    const int64_t r0_in_block = r0 % bh;
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int64_t rl = ty + static_cast<int64_t>(i) * kMwRowThreads;
      const int64_t r = r0 + rl;
      if (c < C && r < R) {
        const P* g = gates_s + ((r0_in_block + rl) / bh) * ngc;  // this row's gates
        Pack<scalar_t, VEC> o;
#pragma unroll
        for (int e = 0; e < VEC; ++e) o.v[e] = static_cast<scalar_t>(static_cast<P>(w[i].v[e]) * g[lcol[e]]);
        *reinterpret_cast<Pack<scalar_t, VEC>*>(out + r * C + c) = o;
      }
    }
  }
}

// Per-weight mask gradient: grad_logits[i] = T(grad_wm[i] * W[i]) * dz/dl, grad_weight[i] = grad_wm[i] * z (if
// grad_weight != nullptr). VEC elements per thread and step; pointers aligned to their vectors (host-checked).
template <typename scalar_t, typename T, int VEC>
__global__ void __launch_bounds__(kThreads) _mask_grad_elem_kernel(
    const typename AccOf<scalar_t>::type* __restrict__ grad_wm,  // (n,) d(loss)/d(W * m), float32 (float64)
    const scalar_t* __restrict__ weight,                         // (n,) contiguous weight
    const T* __restrict__ logits,                                // (n,) contiguous logits, compute dtype
    T* __restrict__ grad_logits,                                 // (n,) output, compute dtype
    scalar_t* __restrict__ grad_weight,                          // (n,) output, weight dtype, or nullptr
    int64_t n,                                                   // number of weight elements (= logits)
    GateParams p) {                                              // estimator, noise stream, hyper-parameters
  using P = typename AccOf<scalar_t>::type;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t n_vec = n / VEC;
  for (int64_t k = tid; k < n_vec; k += stride) {
    const Pack<P, VEC> gw = reinterpret_cast<const Pack<P, VEC>*>(grad_wm)[k];
    const Pack<scalar_t, VEC> w = reinterpret_cast<const Pack<scalar_t, VEC>*>(weight)[k];
    const Pack<T, VEC> l = reinterpret_cast<const Pack<T, VEC>*>(logits)[k];
    Pack<T, VEC> gl;
    Pack<scalar_t, VEC> gwt;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      T slope;
      const T z = gate_value<T>(p, l.v[e], static_cast<uint64_t>(k * VEC + e), &slope);
      gl.v[e] = static_cast<T>(gw.v[e] * static_cast<P>(w.v[e])) * slope;
      gwt.v[e] = static_cast<scalar_t>(gw.v[e] * static_cast<P>(z));
    }
    reinterpret_cast<Pack<T, VEC>*>(grad_logits)[k] = gl;
    if (grad_weight != nullptr) reinterpret_cast<Pack<scalar_t, VEC>*>(grad_weight)[k] = gwt;
  }
  for (int64_t i = n_vec * VEC + tid; i < n; i += stride) {
    T slope;
    const T z = gate_value<T>(p, logits[i], static_cast<uint64_t>(i), &slope);
    grad_logits[i] = static_cast<T>(grad_wm[i] * static_cast<P>(weight[i])) * slope;
    if (grad_weight != nullptr) grad_weight[i] = static_cast<scalar_t>(grad_wm[i] * static_cast<P>(z));
  }
}

// Block mask gradient, stage 1. Work item (s, g) = row chunk s of block g (rows [g_r * bh + s * chunk_rows,
// + chunk_rows) of the block, clipped); item s * n_grid + g, so neighbouring items are neighbouring block columns.
// A group of G threads (G = 1: a thread, G = 32: a warp) owns an item: lane k sums T(grad_wm * W) over the chunk's
// elements k, k + G, ... (row-major within the chunk, so a warp reads consecutive columns), then a fixed xor-shuffle
// tree adds the lanes. With one chunk per block (nsplit == 1) it writes grad_logits = sum * dz/dl; otherwise the
// chunk sum goes to partials[g][s] and _mask_grad_finalize_kernel adds them in a fixed order. grad_weight = grad_wm * z
// is written in the same pass. Fixed order everywhere: bit-reproducible run to run.
template <typename scalar_t, typename T, int G>
__global__ void __launch_bounds__(kThreads) _mask_grad_block_kernel(
    const typename AccOf<scalar_t>::type* __restrict__ grad_wm,  // (R, C) d(loss)/d(W * m), float32 (float64)
    const scalar_t* __restrict__ weight,                         // (R, C) contiguous weight
    const T* __restrict__ logits,                                // (GR, GC) contiguous logits, compute dtype
    T* __restrict__ grad_logits,                                 // (GR, GC) output (written when nsplit == 1)
    T* __restrict__ partials,                                    // (GR * GC, nsplit) chunk sums (nsplit > 1)
    scalar_t* __restrict__ grad_weight,                          // (R, C) output, weight dtype, or nullptr
    int64_t R, int64_t C,                                        // weight shape
    int64_t bh, int64_t bw,                                      // block shape
    int64_t GR, int64_t GC,                                      // logit grid shape
    int64_t chunk_rows,                                          // rows of a block per work item
    int64_t nsplit,                                              // row chunks per block
    GateParams p) {                                              // estimator, noise stream, hyper-parameters
  using P = typename AccOf<scalar_t>::type;
  const int lane = G == 1 ? 0 : static_cast<int>(threadIdx.x % G);
  const int64_t n_grid = GR * GC;
  const int64_t n_items = n_grid * nsplit;
  const int64_t item_stride = static_cast<int64_t>(gridDim.x) * (blockDim.x / G);
  // All lanes of a group share `item`, so the loop (and the shuffles in it) is uniform across the group.
  for (int64_t item = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G; item < n_items;
       item += item_stride) {
    const int64_t s = item / n_grid, g = item % n_grid;
    const int64_t gr = g / GC, gc = g % GC;
    const int64_t row_begin = gr * bh + s * chunk_rows;
    const int64_t row_end = min64(min64(row_begin + chunk_rows, (gr + 1) * bh), R);
    const int64_t col_begin = gc * bw;
    const int64_t width = min64(bw, C - col_begin);

    // The gate is needed up front for grad_weight; otherwise only its slope, after the loads (nsplit == 1).
    T slope = T(0);
    P z = P(0);
    if (grad_weight != nullptr) z = static_cast<P>(gate_value<T>(p, logits[g], static_cast<uint64_t>(g), &slope));

    T acc = T(0);
    const int64_t n_el = row_begin < row_end ? (row_end - row_begin) * width : 0;
    // Element e of the chunk is (row_begin + e / width, col_begin + e % width); step G elements incrementally.
    // kBatch elements per lane are loaded before any is used (several loads in flight), then added in order.
    constexpr int kBatch = 8;
    int64_t dr = lane / width, dc = lane % width;
    const int64_t step_r = G / width, step_c = G % width;
    for (int64_t e0 = lane; e0 < n_el; e0 += kBatch * G) {
      int64_t idx[kBatch];
      P gw[kBatch];
      P wv[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        idx[u] = (row_begin + dr) * C + col_begin + dc;
        if (e0 + u * G < n_el) {
          gw[u] = grad_wm[idx[u]];
          wv[u] = static_cast<P>(weight[idx[u]]);
        }
        dc += step_c;
        dr += step_r;
        if (dc >= width) {
          dc -= width;
          ++dr;
        }
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (e0 + u * G < n_el) {
          acc += static_cast<T>(gw[u] * wv[u]);
          if (grad_weight != nullptr) grad_weight[idx[u]] = static_cast<scalar_t>(gw[u] * z);
        }
      }
    }
    if (G > 1) {
#pragma unroll
      for (int o = G / 2; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    }
    if (lane == 0) {
      if (nsplit == 1) {
        if (grad_weight == nullptr) gate_value<T>(p, logits[g], static_cast<uint64_t>(g), &slope);
        grad_logits[g] = acc * slope;
      } else {
        partials[g * nsplit + s] = acc;
      }
    }
  }
}

// Block mask gradient, stage 2 (nsplit > 1): grad_logits[g] = (sum of the chunk sums partials[g][:]) * dz/dl.
// One warp per logit: lane k adds chunks k, k + 32, ... in order, then a fixed xor-shuffle tree (deterministic).
constexpr int kWarp = 32;

template <typename T>
__global__ void __launch_bounds__(kThreads) _mask_grad_finalize_kernel(
    const T* __restrict__ partials,  // (n_grid, nsplit) chunk sums from _mask_grad_block_kernel
    const T* __restrict__ logits,    // (n_grid,) contiguous logits, compute dtype
    T* __restrict__ grad_logits,     // (n_grid,) output, compute dtype
    int64_t n_grid,                  // number of logits
    int64_t nsplit,                  // chunks per block
    GateParams p) {                  // estimator, noise stream, hyper-parameters
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t g = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; g < n_grid; g += stride) {
    T acc = T(0);
#pragma unroll 4
    for (int64_t s = lane; s < nsplit; s += kWarp) acc += partials[g * nsplit + s];
#pragma unroll
    for (int o = kWarp / 2; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) {
      T slope;
      gate_value<T>(p, logits[g], static_cast<uint64_t>(g), &slope);
      grad_logits[g] = acc * slope;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side: checks, dispatch, launches
// ---------------------------------------------------------------------------------------------------------------

template <typename U>
struct Tag {
  using type = U;
};

// Calls f(Tag<scalar_t>{}) for a floating weight dtype.
template <typename F>
void dispatch_float(at::ScalarType st, const char* op, const char* name, F&& f) {
  switch (st) {
    case at::kFloat: f(Tag<float>{}); break;
    case at::kDouble: f(Tag<double>{}); break;
    case at::kHalf: f(Tag<c10::Half>{}); break;
    case at::kBFloat16: f(Tag<c10::BFloat16>{}); break;
    default: TORCH_CHECK(false, op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", st);
  }
}

// Calls f(Tag<T>{}) for the compute type of the logits: double for float64, else float.
template <typename F>
void dispatch_compute(const at::Tensor& logits, F&& f) {
  if (logits.scalar_type() == at::kDouble) {
    f(Tag<double>{});
  } else {
    f(Tag<float>{});
  }
}

// Error messages format numbers and shapes with std::to_string, not by streaming integers into c10::str: an
// nvcc-compiled TU can instantiate std::ostream::_M_insert<long> itself, and that copy crashed (SIGSEGV inside the
// error path) on a machine whose libstdc++ differs from the host compiler's headers (seen with torch 2.11, nvcc 13.0).
std::string num(int64_t v) { return std::to_string(v); }

std::string shape(c10::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", st);
}

// t must be a CUDA tensor on `device` (the device of the op's first tensor argument).
void check_device(const at::Tensor& t, const char* op, const char* name, const at::Device& device) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a defined tensor");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor (all tensor arguments on one CUDA device), "
              "got a tensor on ", t.device());
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " like the other arguments, got ",
              t.device());
}

GateParams make_params(const char* op, int64_t estimator, int64_t seed, int64_t offset, double beta, double gamma,
                       double zeta, double tau, bool training, bool inverse) {
  TORCH_CHECK(estimator >= kHardConcrete && estimator <= kBernoulliST, op,
              ": estimator must be an index into fastmask.ref.ESTIMATORS (0: hard_concrete, 1: gumbel_sigmoid_st, "
              "2: threshold_st, 3: bernoulli_st), got ",
              num(estimator));
  GateParams p;
  p.estimator = estimator;
  p.seed = static_cast<uint64_t>(seed);  // two's complement, as fastmask.ref masks Python ints to 32-bit words
  p.offset = static_cast<uint64_t>(offset);
  p.beta = beta;
  p.gamma = gamma;
  p.zeta = zeta;
  p.tau = tau;
  p.training = training;
  p.inverse = inverse;
  return p;
}

// Grid of a grid-stride kernel over `work` items of `per_cta` each: enough CTAs to fill the GPU, no more.
unsigned int grid_for(int64_t work, int64_t per_cta) {
  // ATen caches the device properties per device: no driver query per launch.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t needed = (work + per_cta - 1) / per_cta;
  const int64_t cap = static_cast<int64_t>(std::max(sms, 1)) * 32;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(needed, cap)));
}

bool aligned(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// Logit grid shape for a (R, C) weight and (bh, bw) blocks; checks the block and the logits.
void check_block_and_logits(const char* op, const at::Tensor& weight, const at::Tensor& logits, int64_t bh,
                            int64_t bw) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (R, C), got ", num(weight.dim()), "-D with shape ",
              shape(weight.sizes()));
  TORCH_CHECK(bh >= 1 && bw >= 1, op, ": the block (bh, bw) must be positive, got (", num(bh), ", ", num(bw), ")");
  const int64_t R = weight.size(0), C = weight.size(1);
  const int64_t GR = ceil_div(R, bh), GC = ceil_div(C, bw);
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) == GR && logits.size(1) == GC, op,
              ": logits must have shape [ceil(R / bh), ceil(C / bw)] = [", num(GR), ", ", num(GC), "] for weight ",
              shape(weight.sizes()), " and block (", num(bh), ", ", num(bw), "), got ", shape(logits.sizes()));
}

// ---- _uniform_fill ----
void uniform_fill_cuda(at::Tensor out, int64_t seed, int64_t offset) {  // by value: the CPU kernel's signature
  constexpr const char* op = "fastmask::_uniform_fill";
  TORCH_CHECK(out.is_cuda(), op, ": out must be a CUDA tensor, got a tensor on ", out.device());
  TORCH_CHECK(out.scalar_type() == at::kFloat, op, ": out must be float32, got ", out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous (it is filled in place in row-major order)");
  const int64_t n = out.numel();
  if (n == 0) return;
  c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  _uniform_fill_kernel<<<grid_for((n + 6) / 4, kThreads), kThreads, 0, stream>>>(out.data_ptr<float>(), n,
                                                                       static_cast<uint64_t>(seed),
                                                                       static_cast<uint64_t>(offset));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- _gate_fwd ----
at::Tensor gate_fwd_cuda(const at::Tensor& logits, int64_t estimator, int64_t seed, int64_t offset, double beta,
                         double gamma, double zeta, double tau, bool training, bool inverse) {
  constexpr const char* op = "fastmask::_gate_fwd";
  check_device(logits, op, "logits", logits.device());
  check_float_dtype(logits, op, "logits");
  const GateParams p = make_params(op, estimator, seed, offset, beta, gamma, zeta, tau, training, inverse);
  c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor result;
  dispatch_compute(logits, [&](auto t_tag) {
    using T = typename decltype(t_tag)::type;
    const at::Tensor l = logits.to(c10::CppTypeToScalarType<T>::value).contiguous();
    result = at::empty(logits.sizes(), l.options());
    const int64_t n = l.numel();
    if (n == 0) return;
    _gate_fwd_kernel<T><<<grid_for(n, kThreads), kThreads, 0, stream>>>(l.data_ptr<T>(), result.data_ptr<T>(), n, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return result;
}

// ---- _gate_bwd ----
at::Tensor gate_bwd_cuda(const at::Tensor& grad_gates, const at::Tensor& logits, int64_t estimator, int64_t seed,
                         int64_t offset, double beta, double gamma, double zeta, double tau, bool training,
                         bool inverse) {
  constexpr const char* op = "fastmask::_gate_bwd";
  check_device(logits, op, "logits", logits.device());
  check_device(grad_gates, op, "grad_gates", logits.device());
  check_float_dtype(logits, op, "logits");
  check_float_dtype(grad_gates, op, "grad_gates");
  TORCH_CHECK(grad_gates.sizes() == logits.sizes(), op, ": grad_gates must have the shape of logits ",
              shape(logits.sizes()), ", got ", shape(grad_gates.sizes()));
  const GateParams p = make_params(op, estimator, seed, offset, beta, gamma, zeta, tau, training, inverse);
  c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor result;
  dispatch_compute(logits, [&](auto t_tag) {
    using T = typename decltype(t_tag)::type;
    constexpr auto kT = c10::CppTypeToScalarType<T>::value;
    const at::Tensor l = logits.to(kT).contiguous();
    const at::Tensor gg = grad_gates.to(kT).contiguous();
    result = at::empty(logits.sizes(), l.options());
    const int64_t n = l.numel();
    if (n == 0) return;
    _gate_bwd_kernel<T><<<grid_for(n, kThreads), kThreads, 0, stream>>>(gg.data_ptr<T>(), l.data_ptr<T>(),
                                                                        result.data_ptr<T>(), n, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return result;
}

// ---- _masked_weight ----
template <typename scalar_t, typename T, int VEC>
void launch_masked_weight_block(const at::Tensor& w, const at::Tensor& l, at::Tensor& out, int64_t bh, int64_t bw,
                                const GateParams& p, cudaStream_t stream) {
  using P = typename AccOf<scalar_t>::type;
  const int64_t R = w.size(0), C = w.size(1), GR = l.size(0), GC = l.size(1);
  constexpr int64_t kTileCols = static_cast<int64_t>(kMwVecsPerRow) * VEC;
  // Most blocks one tile can touch: ceil-ish((tile extent - 1) / block) + 1, and never more than the grid.
  const int64_t max_ngr = std::min(GR, (kMwRows - 1) / bh + 2);
  const int64_t max_ngc = std::min(GC, (kTileCols - 1) / bw + 2);
  const size_t smem = static_cast<size_t>(max_ngr * max_ngc) * sizeof(P);
  TORCH_CHECK(smem <= 48 * 1024, "fastmask::_masked_weight: internal error: ", num(static_cast<int64_t>(smem)),
              " bytes of shared memory");
  const int64_t n_row_tiles = ceil_div(R, kMwRows);
  const dim3 grid(static_cast<unsigned int>(ceil_div(C, kTileCols)),
                  static_cast<unsigned int>(std::min<int64_t>(n_row_tiles, 65535)));
  _masked_weight_block_kernel<scalar_t, T, VEC><<<grid, kThreads, smem, stream>>>(
      w.data_ptr<scalar_t>(), l.data_ptr<T>(), out.data_ptr<scalar_t>(), R, C, bh, bw, GC, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor masked_weight_cuda(const at::Tensor& weight, const at::Tensor& logits, int64_t bh, int64_t bw,
                              int64_t estimator, int64_t seed, int64_t offset, double beta, double gamma, double zeta,
                              double tau, bool training, bool inverse) {
  constexpr const char* op = "fastmask::_masked_weight";
  check_device(weight, op, "weight", weight.device());
  check_device(logits, op, "logits", weight.device());
  check_float_dtype(weight, op, "weight");
  check_float_dtype(logits, op, "logits");
  check_block_and_logits(op, weight, logits, bh, bw);
  const GateParams p = make_params(op, estimator, seed, offset, beta, gamma, zeta, tau, training, inverse);
  c10::cuda::CUDAGuard guard(weight.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty(w.sizes(), w.options());
  if (w.numel() == 0) return out;
  dispatch_float(w.scalar_type(), op, "weight", [&](auto w_tag) {
    using scalar_t = typename decltype(w_tag)::type;
    dispatch_compute(logits, [&](auto t_tag) {
      using T = typename decltype(t_tag)::type;
      constexpr int VEC = vec_of<scalar_t>();
      const at::Tensor l = logits.to(c10::CppTypeToScalarType<T>::value).contiguous();
      const int64_t C = w.size(1);
      if (bh == 1 && bw == 1 && aligned(w.data_ptr(), 16) && aligned(l.data_ptr(), sizeof(T) * VEC) &&
          aligned(out.data_ptr(), 16)) {
        const int64_t n = w.numel();
        _masked_weight_elem_kernel<scalar_t, T, VEC><<<grid_for(n / VEC + 1, kThreads), kThreads, 0, stream>>>(
            w.data_ptr<scalar_t>(), l.data_ptr<T>(), out.data_ptr<scalar_t>(), n, p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else if (C % VEC == 0 && aligned(w.data_ptr(), 16) && aligned(out.data_ptr(), 16)) {
        launch_masked_weight_block<scalar_t, T, VEC>(w, l, out, bh, bw, p, stream);
      } else {
        launch_masked_weight_block<scalar_t, T, 1>(w, l, out, bh, bw, p, stream);
      }
    });
  });
  return out;
}

// ---- _mask_grad ----
template <typename scalar_t, typename T, int G>
void launch_mask_grad_block(const at::Tensor& gwm, const at::Tensor& w, const at::Tensor& l, at::Tensor& grad_logits,
                            scalar_t* grad_weight, int64_t bh, int64_t bw, const GateParams& p, cudaStream_t stream) {
  using P = typename AccOf<scalar_t>::type;
  const int64_t R = w.size(0), C = w.size(1), GR = l.size(0), GC = l.size(1);
  const int64_t n_grid = GR * GC;
  // Split tall blocks into row chunks of about kTarget elements so that there is enough parallel work
  // (a whole-layer block would otherwise be one item); chunk sums are added in order by the finalize kernel.
  constexpr int64_t kTarget = G == 1 ? 32 : 1024;
  const int64_t width = std::min(bw, C), height = std::min(bh, R);
  const int64_t chunk_rows = std::min(height, std::max<int64_t>(1, kTarget / width));
  const int64_t nsplit = ceil_div(height, chunk_rows);
  at::Tensor partials;
  if (nsplit > 1) partials = at::empty({n_grid, nsplit}, l.options());
  T* partials_ptr = nsplit > 1 ? partials.data_ptr<T>() : nullptr;
  const int64_t n_items = n_grid * nsplit;
  _mask_grad_block_kernel<scalar_t, T, G><<<grid_for(n_items, kThreads / G), kThreads, 0, stream>>>(
      gwm.data_ptr<P>(), w.data_ptr<scalar_t>(), l.data_ptr<T>(), grad_logits.data_ptr<T>(), partials_ptr, grad_weight,
      R, C, bh, bw, GR, GC, chunk_rows, nsplit, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (nsplit > 1) {
    _mask_grad_finalize_kernel<T><<<grid_for(n_grid, kThreads / kWarp), kThreads, 0, stream>>>(
        partials_ptr, l.data_ptr<T>(), grad_logits.data_ptr<T>(), n_grid, nsplit, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor> mask_grad_cuda(const at::Tensor& grad_wm, const at::Tensor& weight,
                                                  const at::Tensor& logits, int64_t bh, int64_t bw, int64_t estimator,
                                                  int64_t seed, int64_t offset, double beta, double gamma, double zeta,
                                                  double tau, bool training, bool inverse, bool needs_weight_grad) {
  constexpr const char* op = "fastmask::_mask_grad";
  check_device(weight, op, "weight", weight.device());
  check_device(grad_wm, op, "grad_wm", weight.device());
  check_device(logits, op, "logits", weight.device());
  check_float_dtype(weight, op, "weight");
  check_float_dtype(logits, op, "logits");
  check_block_and_logits(op, weight, logits, bh, bw);
  check_float_dtype(grad_wm, op, "grad_wm");
  TORCH_CHECK(grad_wm.sizes() == weight.sizes(), op, ": grad_wm must have the shape of weight ",
              shape(weight.sizes()), ", got ", shape(grad_wm.sizes()));
  const GateParams p = make_params(op, estimator, seed, offset, beta, gamma, zeta, tau, training, inverse);
  c10::cuda::CUDAGuard guard(weight.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor w = weight.contiguous();
  // grad_wm is read in the product dtype: float32, or float64 for float64 weights (a conversion if it is not).
  const at::Tensor gwm = grad_wm.to(w.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  const auto compute_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_logits = at::empty(logits.sizes(), logits.options().dtype(compute_type));
  at::Tensor grad_weight = needs_weight_grad ? at::empty(w.sizes(), w.options()) : at::empty({0}, w.options());
  if (w.numel() == 0) return {grad_logits, grad_weight};
  dispatch_float(w.scalar_type(), op, "weight", [&](auto w_tag) {
    using scalar_t = typename decltype(w_tag)::type;
    using P = typename AccOf<scalar_t>::type;
    dispatch_compute(logits, [&](auto t_tag) {
      using T = typename decltype(t_tag)::type;
      constexpr int VEC = vec_of<scalar_t>();
      const at::Tensor l = logits.to(c10::CppTypeToScalarType<T>::value).contiguous();
      scalar_t* gw_ptr = needs_weight_grad ? grad_weight.data_ptr<scalar_t>() : nullptr;
      const int64_t C = w.size(1);
      if (bh == 1 && bw == 1 && aligned(gwm.data_ptr(), sizeof(P) * VEC) && aligned(w.data_ptr(), 16) &&
          aligned(l.data_ptr(), sizeof(T) * VEC) && aligned(grad_logits.data_ptr(), sizeof(T) * VEC) &&
          (gw_ptr == nullptr || aligned(gw_ptr, 16))) {
        const int64_t n = w.numel();
        _mask_grad_elem_kernel<scalar_t, T, VEC><<<grid_for(n / VEC + 1, kThreads), kThreads, 0, stream>>>(
            gwm.data_ptr<P>(), w.data_ptr<scalar_t>(), l.data_ptr<T>(), grad_logits.data_ptr<T>(), gw_ptr, n, p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else if (std::min(bw, C) >= 32) {
        launch_mask_grad_block<scalar_t, T, 32>(gwm, w, l, grad_logits, gw_ptr, bh, bw, p, stream);
      } else {
        launch_mask_grad_block<scalar_t, T, 1>(gwm, w, l, grad_logits, gw_ptr, bh, bw, p, stream);
      }
    });
  });
  return {grad_logits, grad_weight};
}

}  // namespace
}  // namespace fastmask

TORCH_LIBRARY_IMPL(fastmask, CUDA, m) {
  m.impl("_uniform_fill", &fastmask::uniform_fill_cuda);
  m.impl("_gate_fwd", &fastmask::gate_fwd_cuda);
  m.impl("_gate_bwd", &fastmask::gate_bwd_cuda);
  m.impl("_masked_weight", &fastmask::masked_weight_cuda);
  m.impl("_mask_grad", &fastmask::mask_grad_cuda);
}
