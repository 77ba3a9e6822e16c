// CPU kernels of learned N:M masks (fastmask/ops/nm.py; the rules are fastmask/ref.py's "learned N:M masks").
// One pass over the weight per direction, one group of M input weights at a time, with its C = C(M, N) pattern
// scores in registers: the forward writes W * mask, the backward writes d(logits) (the per-pattern sums of
// dWm * W, then the softmax Jacobian) and the mask itself (for dx and the weight gradient). Nothing of size
// (rows, cols, C) is ever materialised.
// Noise: the caller passes the Gumbel noise g = -log(-log u) of every logit j, u = uniform(seed, offset + j) (the
// library's Philox stream; fastmask/ops/nm.py draws it with the vectorised _gumbel_fill for float32 logits, within
// about 1 ulp of the reference, and with the reference's torch ops for float64), so the O(C) logs per group stay out
// of this scalar loop (std::log per logit in here made the step about 9x the dense step at 128 tokens). Limits:
// M <= 8 (C <= 70), contiguous tensors, CPU only.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec_math.h"

#include <cmath>
#include <cstdint>
#include <vector>

namespace fastmask {
namespace cpu {
namespace {

constexpr int kMaxM = 8;
constexpr int kMaxPatterns = 70;  // C(8, 4)

// The patterns as bit masks (bit j: weight j of the group kept), in itertools.combinations order.
void make_patterns(int n, int m, int start, int chosen, uint32_t bits, std::vector<uint32_t>& out) {
  if (chosen == n) {
    out.push_back(bits);
    return;
  }
  for (int j = start; j < m; ++j) make_patterns(n, m, j + 1, chosen + 1, bits | (1u << j), out);
}

std::vector<uint32_t> patterns_of(int64_t n, int64_t m) {
  TORCH_CHECK(m >= 2 && m <= kMaxM && n >= 1 && n < m, "fastmask N:M kernels: need 1 <= n < m <= 8, got n=", n,
              ", m=", m);
  std::vector<uint32_t> out;
  make_patterns(static_cast<int>(n), static_cast<int>(m), 0, 0, 0u, out);
  return out;
}

struct NMArgs {
  int64_t out, groups, c, m;
  bool training, hard, in_out;
  double temperature, scale;
};

// Scores z_c = (scale * l_c + g_c) / temperature of one group (g only in training), in the compute type T.
template <typename T>
inline void group_scores(const T* l, const T* g, const NMArgs& a, T* z) {
  const T scale = static_cast<T>(a.scale), temperature = static_cast<T>(a.temperature);
  for (int64_t c = 0; c < a.c; ++c) {
    T v = l[c] * scale;
    if (a.training) v = v + g[c];
    z[c] = v / temperature;
  }
}

template <typename T>
inline int64_t argmax(const T* v, int64_t c) {  // the first maximum, as torch.argmax
  int64_t best = 0;
  for (int64_t i = 1; i < c; ++i)
    if (v[i] > v[best]) best = i;
  return best;
}

template <typename T>
inline void softmax(const T* z, int64_t c, T* y) {
  T mx = z[argmax(z, c)], sum = 0;
  for (int64_t i = 0; i < c; ++i) {
    y[i] = std::exp(z[i] - mx);
    sum += y[i];
  }
  for (int64_t i = 0; i < c; ++i) y[i] = y[i] / sum;
}

// The M values of one pattern (bit j: weight j kept).
template <typename T>
inline void pattern_mask(uint32_t bits, int64_t m, T* mask) {
  for (int64_t j = 0; j < m; ++j) mask[j] = (bits >> j) & 1u ? T(1) : T(0);
}

// The group's mask (M values) from its scores: a hard / eval pick, or the soft mix y @ S.
template <typename T>
inline void group_mask(const T* l, const T* z, const T* y, const std::vector<uint32_t>& pats, const NMArgs& a,
                       T* mask) {
  if (a.hard || !a.training) {
    pattern_mask(pats[a.training ? argmax(z, a.c) : argmax(l, a.c)], a.m, mask);
    return;
  }
  for (int64_t j = 0; j < a.m; ++j) {
    T s = 0;
    for (int64_t c = 0; c < a.c; ++c)
      if ((pats[c] >> j) & 1u) s += y[c];
    mask[j] = s;
  }
}

// Index of weight j of group g of output row o in the weight's own layout.
inline int64_t weight_index(const NMArgs& a, int64_t o, int64_t g, int64_t j) {
  const int64_t i = g * a.m + j;
  return a.in_out ? i * a.out + o : o * (a.groups * a.m) + i;
}

NMArgs make_args(const at::Tensor& weight, const at::Tensor& logits, const c10::optional<at::Tensor>& gumbel, int64_t n,
                 int64_t m, bool training, bool hard, double temperature, double scale, bool in_out,
                 const std::vector<uint32_t>& pats) {
  TORCH_CHECK(weight.device().is_cpu() && logits.device().is_cpu(), "fastmask N:M kernels: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "fastmask N:M kernels: weight must be 2-D contiguous");
  TORCH_CHECK(logits.dim() == 3 && logits.is_contiguous(), "fastmask N:M kernels: logits must be (out, in / m, C)");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
              "fastmask N:M kernels: logits must be float32 or float64, got ", logits.scalar_type());
  const int64_t out = in_out ? weight.size(1) : weight.size(0), in = in_out ? weight.size(0) : weight.size(1);
  TORCH_CHECK(in % m == 0 && logits.size(0) == out && logits.size(1) == in / m &&
                  logits.size(2) == static_cast<int64_t>(pats.size()),
              "fastmask N:M kernels: logits must have shape (", out, ", ", in / m, ", ", pats.size(), "), got ",
              logits.sizes());
  if (training) {
    TORCH_CHECK(gumbel.has_value() && gumbel->scalar_type() == logits.scalar_type() && gumbel->is_contiguous() &&
                    gumbel->numel() == logits.numel(),
                "fastmask N:M kernels: training needs the Gumbel noise (the logits' dtype and shape, contiguous)");
  }
  return NMArgs{out, in / m, static_cast<int64_t>(pats.size()), m, training, hard, in_out, temperature, scale};
}

at::Tensor nm_masked_weight_cpu(const at::Tensor& weight, const at::Tensor& logits,
                                const c10::optional<at::Tensor>& gumbel,
                                int64_t n, int64_t m, bool training, bool hard, double temperature, double scale,
                                bool in_out) {
  const auto pats = patterns_of(n, m);
  const NMArgs a = make_args(weight, logits, gumbel, n, m, training, hard, temperature, scale, in_out, pats);
  at::Tensor wm = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "nm_masked_weight", [&] {
    using T = scalar_t;
    const T* lp = logits.data_ptr<T>();
    const T* up = training ? gumbel->data_ptr<T>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "nm_masked_weight_w", [&] {
      using W = scalar_t;
      using Acc = std::conditional_t<std::is_same_v<W, double>, double, float>;  // ref.compute_dtype(weight)
      const W* wp = weight.data_ptr<W>();
      W* op = wm.data_ptr<W>();
      at::parallel_for(0, a.out, 16, [&](int64_t b, int64_t e) {
        T z[kMaxPatterns], y[kMaxPatterns], mask[kMaxM];
        for (int64_t o = b; o < e; ++o) {
          for (int64_t g = 0; g < a.groups; ++g) {
            const int64_t base = (o * a.groups + g) * a.c;
            group_scores<T>(lp + base, up ? up + base : nullptr, a, z);
            if (a.training && !a.hard) softmax<T>(z, a.c, y);
            group_mask<T>(lp + base, z, y, pats, a, mask);
            for (int64_t j = 0; j < a.m; ++j) {
              const int64_t k = weight_index(a, o, g, j);
              op[k] = static_cast<W>(static_cast<Acc>(wp[k]) * static_cast<Acc>(mask[j]));
            }
          }
        }
      });
    });
  });
  return wm;
}

// One group's share of the backward from its softmax y and mask: writes the mask into mp's row and d(logits)
// = y (dy - y . dy) * factor into grad, dy_c = the sum of dWm * W over the weights pattern c keeps (dWm * W taken in
// dWm's dtype, then the logits' compute type, as the reference rounds).
template <typename T, typename G, typename W>
inline void group_logits_grad(const NMArgs& a, const std::vector<uint32_t>& pats, const T* y, const T* mask,
                              const G* dp, const W* wp, int64_t o, int64_t g, T factor, T* grad, T* mp) {
  T dm[kMaxM], dy[kMaxPatterns];
  for (int64_t j = 0; j < a.m; ++j) {
    const int64_t col = g * a.m + j;
    dm[j] = static_cast<T>(dp[o * a.groups * a.m + col] * static_cast<G>(wp[weight_index(a, o, g, j)]));
    mp[o * a.groups * a.m + col] = mask[j];
  }
  T s = 0;
  for (int64_t c = 0; c < a.c; ++c) {
    T acc = 0;
    for (int64_t j = 0; j < a.m; ++j)
      if ((pats[c] >> j) & 1u) acc += dm[j];
    dy[c] = acc;
    s += y[c] * acc;
  }
  for (int64_t c = 0; c < a.c; ++c) grad[c] = y[c] * (dy[c] - s) * factor;
}

// The training backward with float32 logits, row by row: the scores of the row's groups in one pass, each group
// shifted by its maximum, the exps of the whole row in one vectorised call (exp_f32_kernel: the 6 exps per 2:4 group
// were most of this kernel's time as scalar std::exp), then the per-group sums, mask, pattern sums and softmax
// Jacobian as in the generic loop below. Same scores and picks as the generic loop; the softmax within about 1 ulp.
template <typename G, typename W>
void logits_grad_rows_f32(const NMArgs& a, const std::vector<uint32_t>& pats, const float* lp, const float* up,
                          const G* dp, const W* wp, float* gp, float* mp) {
  const ExpF32Fn exp_f32 = exp_f32_kernel();
  const float scale = static_cast<float>(a.scale), temperature = static_cast<float>(a.temperature);
  const float factor = static_cast<float>(a.scale / a.temperature);
  const int64_t row_len = a.groups * a.c;
  at::parallel_for(0, a.out, 16, [&](int64_t b, int64_t e) {
    std::vector<float> z(static_cast<size_t>(row_len));
    std::vector<int64_t> pick(static_cast<size_t>(a.groups));
    float mask[kMaxM];
    for (int64_t o = b; o < e; ++o) {
      const float* l = lp + o * row_len;
      const float* noise = up + o * row_len;
      for (int64_t i = 0; i < row_len; ++i) z[i] = (l[i] * scale + noise[i]) / temperature;  // as group_scores
      for (int64_t g = 0; g < a.groups; ++g) {
        float* zg = z.data() + g * a.c;
        const int64_t best = argmax(zg, a.c);
        const float mx = zg[best];
        pick[g] = best;
        for (int64_t c = 0; c < a.c; ++c) zg[c] = zg[c] - mx;
      }
      exp_f32(z.data(), z.data(), row_len);  // z now holds exp(z - max) per group
      for (int64_t g = 0; g < a.groups; ++g) {
        float* y = z.data() + g * a.c;
        float sum = 0;
        for (int64_t c = 0; c < a.c; ++c) sum += y[c];
        for (int64_t c = 0; c < a.c; ++c) y[c] = y[c] / sum;
        if (a.hard) pattern_mask(pats[pick[g]], a.m, mask);
        else group_mask<float>(l + g * a.c, nullptr, y, pats, a, mask);  // the soft mix reads y only
        group_logits_grad<float, G, W>(a, pats, y, mask, dp, wp, o, g, factor, gp + (o * a.groups + g) * a.c, mp);
      }
    }
  });
}

// Whether the float32 training path above ran (float logits in training); float64 logits (gradcheck) and eval take
// the generic loop.
template <typename G, typename W>
bool logits_grad_fast(const NMArgs& a, const std::vector<uint32_t>& pats, const float* lp, const float* up,
                      const G* dp, const W* wp, float* gp, float* mp) {
  if (!a.training) return false;
  logits_grad_rows_f32<G, W>(a, pats, lp, up, dp, wp, gp, mp);
  return true;
}
template <typename G, typename W>
bool logits_grad_fast(const NMArgs&, const std::vector<uint32_t>&, const double*, const double*, const G*, const W*,
                      double*, double*) {
  return false;
}

std::tuple<at::Tensor, at::Tensor> nm_logits_grad_cpu(const at::Tensor& grad_wm, const at::Tensor& weight,
                                                      const at::Tensor& logits,
                                                      const c10::optional<at::Tensor>& gumbel,
                                                      int64_t n, int64_t m, bool training, bool hard,
                                                      double temperature, double scale, bool in_out) {
  const auto pats = patterns_of(n, m);
  const NMArgs a = make_args(weight, logits, gumbel, n, m, training, hard, temperature, scale, in_out, pats);
  TORCH_CHECK(grad_wm.dim() == 2 && grad_wm.size(0) == a.out && grad_wm.size(1) == a.groups * a.m &&
                  grad_wm.is_contiguous() &&
                  (grad_wm.scalar_type() == at::kFloat || grad_wm.scalar_type() == at::kDouble),
              "fastmask N:M kernels: grad_wm must be a contiguous float32 / float64 (out, in) tensor");
  at::Tensor grad = at::empty_like(logits);
  at::Tensor mask_out = at::empty({a.out, a.groups * a.m}, logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "nm_logits_grad", [&] {
    using T = scalar_t;
    const T* lp = logits.data_ptr<T>();
    const T* up = training ? gumbel->data_ptr<T>() : nullptr;
    T* gp = grad.data_ptr<T>();
    T* mp = mask_out.data_ptr<T>();
    const T factor = static_cast<T>(scale / temperature);
    AT_DISPATCH_FLOATING_TYPES(grad_wm.scalar_type(), "nm_logits_grad_g", [&] {
      using G = scalar_t;
      const G* dp = grad_wm.data_ptr<G>();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "nm_logits_grad_w", [&] {
        using W = scalar_t;
        const W* wp = weight.data_ptr<W>();
        if (logits_grad_fast<G, W>(a, pats, lp, up, dp, wp, gp, mp)) return;
        at::parallel_for(0, a.out, 16, [&](int64_t b, int64_t e) {
          T z[kMaxPatterns], y[kMaxPatterns], mask[kMaxM];
          for (int64_t o = b; o < e; ++o) {
            for (int64_t g = 0; g < a.groups; ++g) {
              const int64_t base = (o * a.groups + g) * a.c;
              group_scores<T>(lp + base, up ? up + base : nullptr, a, z);
              softmax<T>(z, a.c, y);
              group_mask<T>(lp + base, z, y, pats, a, mask);
              group_logits_grad<T, G, W>(a, pats, y, mask, dp, wp, o, g, factor, gp + base, mp);
            }
          }
        });
      });
    });
  });
  return {grad, mask_out};
}

}  // namespace
}  // namespace cpu
}  // namespace fastmask

// The schemas live here (not in csrc/ops.cpp) so that the N:M kernels are one file; fastmask/ops/nm.py uses them
// when the "cpu" backend is chosen and they exist.
TORCH_LIBRARY_FRAGMENT(fastmask, m) {
  // W * mask (weight dtype and layout); gumbel: the Gumbel noise of every logit (the logits' dtype) in training,
  // else None.
  m.def(
      "_nm_masked_weight(Tensor weight, Tensor logits, Tensor? gumbel, int n, int m, bool training, bool hard, "
      "float temperature, float scale, bool in_out) -> Tensor");
  // (d(logits), mask (out, in)) from grad_wm = d(loss)/d(W * mask) as an (out, in) float32 / float64 tensor.
  m.def(
      "_nm_logits_grad(Tensor grad_wm, Tensor weight, Tensor logits, Tensor? gumbel, int n, int m, bool training, "
      "bool hard, float temperature, float scale, bool in_out) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastmask, CPU, m) {
  m.impl("_nm_masked_weight", &fastmask::cpu::nm_masked_weight_cpu);
  m.impl("_nm_logits_grad", &fastmask::cpu::nm_logits_grad_cpu);
}
