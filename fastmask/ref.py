"""Pure-PyTorch reference of every fastmask op.

This module is the oracle the C++, CUDA and Triton backends are tested against, the CPU fallback when the
extension is not built, and the "naive" baseline of the benchmarks. It favours clarity over speed, but stays
vectorised (no Python loops over elements).

Conventions shared by every backend (see DESIGN.md):

* Noise (``NOISE``, "philox4x32-10/4-words"): element ``i`` (row-major flat index) of ``uniform(shape, seed,
  offset)`` is position ``p = offset + i`` of one stream: word ``p % 4`` of Philox4x32-10 with key
  ``(seed & 0xffffffff, seed >> 32)`` and counter ``(lo32(p // 4), hi32(p // 4), 0, 0)`` (Triton's
  ``tl.randint4x(seed, p // 4)``), read as int32, ``x = w if w >= 0 else ~w``, and
  ``u = float32(x) * float32(4.6566127342e-10)`` (``tl.rand``'s conversion), so ``u`` lies in [0, 1). One Philox
  call gives four consecutive positions. The noise depends on the absolute position, not on ``offset`` and ``i``
  apart, so a grid at ``offset`` is the slice [offset, offset + n) of the stream and stacks, splits and offsets
  compose. Files written before fastmask 0.2 used "philox4x32-10/first-word" (``tl.rand(seed, p)``: the first
  word of counter p, one Philox call per position): ``uniform_ref(..., noise="philox4x32-10/first-word")``.
* Gates: a logits tensor is a 2-D grid over the weight (in the weight's own layout). Weight element ``(r, c)``
  is gated by logit ``(r // bh, c // bw)`` where ``block = (bh, bw)``; per-weight masks are ``block = (1, 1)``,
  output units ``(1, C)``, input units ``(R, 1)``, heads ``(R, head_dim)``, a whole layer ``(R, C)``.
  The noise of logit ``j`` (row-major flat index in the grid) is ``uniform`` element ``j``.
* K masks over one weight (``grouped_masked_linear``): a stack (K, GR, GC) of grids is one noise stream in
  row-major order, so mask ``k`` is the single grid ``logits[k]`` at offset ``offset + k * GR * GC``.
* Estimators (``beta`` is the temperature of the stochastic relaxations, ``tau`` the threshold of
  ``threshold_st``); ``inverse=True`` returns ``1 - z`` and negates the gradient:

  ================== ====================================================== ============================
  estimator          training forward z                                     dz/dl (surrogate)
  ================== ====================================================== ============================
  hard_concrete      clamp(sigmoid((logit(u) + l) / beta) (zeta - gamma)    (zeta - gamma) s (1 - s) / beta
                     + gamma, 0, 1)                                          where 0 < s_bar < 1, else 0
  gumbel_sigmoid_st  [l + logit(u) > 0]                                     s (1 - s) / beta,
                                                                             s = sigmoid((l + logit(u)) / beta)
  bernoulli_st       [u < sigmoid(l)]                                       p (1 - p), p = sigmoid(l)
  threshold_st       [l > tau]                                              1
  ================== ====================================================== ============================

  Eval (``training=False``): hard_concrete ``clamp(sigmoid(l) (zeta - gamma) + gamma, 0, 1)``;
  gumbel_sigmoid_st and bernoulli_st ``[sigmoid(l) > 0.5]`` (i.e. ``[l > 0]``); threshold_st as in training.
  ``u`` is clamped to ``[UNIFORM_EPS, 1 - UNIFORM_EPS]`` before ``logit(u)`` so no log(0) ever happens.
* Arguments: the forward references take the gate keywords of the public ops (those of ``gate_ref``; keyword-only,
  so ``ref.masked_linear_ref(x, W, l, **kw)`` and ``fm.ops.masked_linear(x, W, l, **kw)`` read alike); the backward
  references and the masked weights of a stack take one ``fastmask._params.GateParams`` (what the op layer's
  backends hold) and keyword-only flags. Products are taken in ``compute_dtype`` and rounded once
  (``apply_gates`` for W * m and dWm * m).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ._params import ESTIMATORS, GateParams

__all__ = [
    "ESTIMATORS",
    "compute_dtype",
    "apply_gates",
    "UNIFORM_EPS",
    "NOISE",
    "NOISES",
    "philox_words",
    "uniform_ref",
    "gate_ref",
    "gate_backward_ref",
    "expand_gates",
    "flatten_tokens",
    "reduce_to_grid",
    "masked_weight_ref",
    "masked_linear_ref",
    "masked_linear_backward_ref",
    "unit_axis",
    "unit_dim",
    "gated_units_ref",
    "scale_units",
    "gated_units_backward_ref",
    "reduce_units",
    "mask_offset",
    "mask_params",
    "grouped_masked_weight_ref",
    "grouped_masked_linear_ref",
    "grouped_masked_linear_backward_ref",
    "masked_linear_naive",
    "hard_concrete_naive",
    "l0_norm_ref",
    "l0_norm_backward_ref",
]

# ESTIMATORS (from _params): the estimator names, in the order of the kernels' integer codes.

# Noise is clamped to [UNIFORM_EPS, 1 - UNIFORM_EPS] before logit(u): u can be exactly 0 (probability 2^-31).
UNIFORM_EPS = 1e-6

# The noise definitions (module docstring): NOISE is what every backend draws; mask files and checkpoints record it.
NOISE = "philox4x32-10/4-words"
NOISE_FIRST_WORD = "philox4x32-10/first-word"  # fastmask < 0.2 (mask format 1, checkpoint format <= 2)
NOISES = (NOISE, NOISE_FIRST_WORD)

# Philox4x32 constants (Salmon et al. 2011; identical to triton.language.random).
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
_COUNTER_MASK = 2**62 - 1  # quad counters of 64-bit positions: p >> 2 < 2**62
# Triton's uint_to_uniform_float scale: the largest float32 s with (2^31 - 1) * s < 1.
_UINT_TO_FLOAT_SCALE = 4.6566127342e-10


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product a * b, for a constant a and uint32 values b held in int64.

    Split into 16-bit halves so that no intermediate overflows int64 (torch has no unsigned 64-bit multiply).
    """
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    low_product = a_lo * b_lo
    cross = a_hi * b_lo + a_lo * b_hi  # < 2^33
    hi = a_hi * b_hi + ((cross + (low_product >> 16)) >> 16)
    lo = ((cross & 0xFFFF) << 16) + low_product
    return hi & _MASK32, lo & _MASK32


def philox_words(seed: int, counters: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four output words of Philox4x32-10 for key ``seed`` and counters ``(lo32(n), hi32(n), 0, 0)``.

    ``counters`` is an int64 tensor of 64-bit counter values n (non-negative); returns four tensors of uint32 values
    held in int64 (Triton's ``tl.randint4x`` order).
    """
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c0 = counters & _MASK32
    c1 = (counters >> 32) & _MASK32
    c2 = torch.zeros_like(counters)
    c3 = torch.zeros_like(counters)
    for _ in range(_PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uint32_to_uniform(words: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float for 32-bit words held in int64: read as int32, fold negatives with ~x."""
    signed = torch.where(words >= 2**31, words - 2**32, words)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * torch.tensor(_UINT_TO_FLOAT_SCALE, dtype=torch.float32, device=words.device)


def _stream_words(seed: int, offset: int, n: int, device, noise: str) -> torch.Tensor:
    """The 32-bit words of stream positions offset .. offset + n - 1 (uint64 arithmetic: a position past 2**64
    wraps, as in the C++ kernels) under the definition ``noise``, as an int64 tensor."""
    if noise == NOISE:
        # One Philox call per quad of positions, over the quads the positions touch.
        lead = offset & 3
        quads = (lead + n + 3) // 4
        counters = (offset >> 2) + torch.arange(quads, dtype=torch.int64, device=device)
        words = torch.stack(philox_words(seed, counters & _COUNTER_MASK), dim=1).flatten()
        return words[lead:lead + n]
    if noise == NOISE_FIRST_WORD:
        return philox_words(seed, torch.arange(n, dtype=torch.int64, device=device) + offset)[0]
    raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")


def uniform_ref(shape: Sequence[int], seed: int, offset: int = 0, device=None, *,
                noise: Optional[str] = None) -> torch.Tensor:
    """Counter-based uniform noise in [0, 1), float32: element i is stream position ``offset + i`` (see ``NOISE``
    in the module docstring); ``noise`` picks a definition of ``NOISES`` (default: the current one)."""
    words = _stream_words(seed, offset, math.prod(shape), device, noise or NOISE)
    return _uint32_to_uniform(words).reshape(tuple(shape))


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64, every other float dtype computes in float32: the dtype of the gate math (of logits;
    float64 for gradcheck) and of the products and sums taken before rounding once (of weights, activations)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its compute dtype."""
    return t.to(compute_dtype(t))


def _logistic_noise(l: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """logit(u) of the clamped noise; u is clamped in float32, then the math runs in l's dtype."""
    u = uniform_ref(l.shape, seed, offset, device=l.device).clamp(UNIFORM_EPS, 1.0 - UNIFORM_EPS).to(l.dtype)
    return torch.log(u) - torch.log1p(-u)


def _gate_and_slope(logits, estimator, seed, offset, beta, gamma, zeta, tau, training):
    """(z, dz/dl) in the compute dtype for the given estimator, before ``inverse``."""
    l = logits.to(compute_dtype(logits))
    if estimator == "hard_concrete":
        if training:
            noise = _logistic_noise(l, seed, offset)
            s = torch.sigmoid((noise + l) / beta)
            slope_s = s * (1 - s) / beta
        else:
            s = torch.sigmoid(l)
            slope_s = s * (1 - s)
        s_bar = s * (zeta - gamma) + gamma
        z = s_bar.clamp(0.0, 1.0)
        inside = (s_bar > 0) & (s_bar < 1)
        return z, torch.where(inside, (zeta - gamma) * slope_s, torch.zeros_like(l))
    if estimator == "gumbel_sigmoid_st":
        if training:
            noise = _logistic_noise(l, seed, offset)
            s = torch.sigmoid((l + noise) / beta)
            return (l + noise > 0).to(l.dtype), s * (1 - s) / beta
        p = torch.sigmoid(l)
        return (l > 0).to(l.dtype), p * (1 - p)
    if estimator == "bernoulli_st":
        p = torch.sigmoid(l)
        if training:
            u = uniform_ref(l.shape, seed, offset, device=l.device).to(l.dtype)
            return (u < p).to(l.dtype), p * (1 - p)
        return (l > 0).to(l.dtype), p * (1 - p)
    if estimator == "threshold_st":
        return (l > tau).to(l.dtype), torch.ones_like(l)
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


def gate_ref(logits, *, estimator="hard_concrete", seed=0, offset=0, beta=2 / 3, gamma=-0.1, zeta=1.1, tau=0.0,
             training=True, inverse=False) -> torch.Tensor:
    """Gates z in [0, 1] (compute dtype, shaped like ``logits``) of the given estimator. Its keywords (the gate
    keywords of the public ops) are those of every forward reference below (``**gate``)."""
    z, _ = _gate_and_slope(logits, estimator, seed, offset, beta, gamma, zeta, tau, training)
    return 1 - z if inverse else z


def gate_backward_ref(grad_gates, logits, *, estimator="hard_concrete", seed=0, offset=0, beta=2 / 3, gamma=-0.1,
                      zeta=1.1, tau=0.0, training=True, inverse=False) -> torch.Tensor:
    """d(loss)/d(logits) in the compute dtype given d(loss)/d(gates); regenerates the noise from (seed, offset)."""
    _, slope = _gate_and_slope(logits, estimator, seed, offset, beta, gamma, zeta, tau, training)
    grad = grad_gates.to(slope.dtype) * slope
    return -grad if inverse else grad


def expand_gates(gates: torch.Tensor, block: Sequence[int], weight_shape: Sequence[int]) -> torch.Tensor:
    """Broadcast a gate grid (..., GR, GC) to the weight shape (..., R, C): element (r, c) takes gate
    (r // bh, c // bw); leading dimensions (the K masks of a grouped layer) are kept."""
    bh, bw = block
    rows, cols = weight_shape[-2:]
    return gates.repeat_interleave(bh, -2)[..., :rows, :].repeat_interleave(bw, -1)[..., :cols]


def reduce_to_grid(values: torch.Tensor, block: Sequence[int], grid_shape: Sequence[int]) -> torch.Tensor:
    """Sum a (..., R, C) tensor over each (bh, bw) block (edge blocks may be partial) into (..., GR, GC)."""
    bh, bw = block
    gr, gc = grid_shape[-2:]
    *lead, rows, cols = values.shape
    padded = values.new_zeros(*lead, gr * bh, gc * bw)
    padded[..., :rows, :cols] = values
    return padded.reshape(*lead, gr, bh, gc, bw).sum(dim=(-3, -1))


def apply_gates(values: torch.Tensor, gates: torch.Tensor, block: Sequence[int]) -> torch.Tensor:
    """``values * m``, m the gate grid ``gates`` (..., GR, GC) expanded to values' (R, C) (``expand_gates``; leading
    dimensions of the gates, the K masks of a grouped layer, broadcast): the product taken in the compute dtype of
    ``values`` and rounded once to their dtype. The masked weight W * m and the weight's gradient dWm * m of every
    backend that builds them with torch ops."""
    up = _upcast(values)
    return (up * expand_gates(gates, block, values.shape).to(up.dtype)).to(values.dtype)


def masked_weight_ref(weight, logits, block, **gate) -> torch.Tensor:
    """W * m in the weight's dtype and layout (the product is taken in float32, or float64, and rounded once);
    ``gate``: the keywords of ``gate_ref``."""
    return apply_gates(weight, gate_ref(logits, **gate), block)


def masked_weight_and_slope_ref(weight, logits, block, p: GateParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(W * m in the weight's dtype and layout, the gates' slopes dz/dl in the compute dtype shaped like
    ``logits``): what the forward of the "keep" memory policy keeps for the backward (fastmask/ops/_modes.py)."""
    z, slope = _gate_and_slope(logits, p.estimator_name, p.seed, p.offset, p.beta, p.gamma, p.zeta, p.tau,
                               p.training)
    if p.inverse:
        z, slope = 1 - z, -slope
    return apply_gates(weight, z, block), slope


def mask_grad_from_slope(grad_wm, weight, slope, block) -> torch.Tensor:
    """d(logits) (the slopes' dtype) from dWm (compute dtype, the weight's layout) and kept slopes: the block sums of
    dWm * W times dz/dl. Overwrites ``grad_wm`` (the caller's temporary) for per-weight gates."""
    if tuple(block) == (1, 1):
        return grad_wm.mul_(weight).mul_(slope) if grad_wm.dtype == slope.dtype else \
            (grad_wm * weight).to(slope.dtype) * slope
    per_block = reduce_to_grid((grad_wm * _upcast(weight)).to(slope.dtype), block, slope.shape)
    return per_block.mul_(slope)


def flatten_tokens(t: torch.Tensor) -> torch.Tensor:
    """(..., features) -> (tokens, features). The row count is explicit: reshape(-1, 0) is ambiguous when there are
    no features."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _as_out_in(weight_like: torch.Tensor, weight_layout: str) -> torch.Tensor:
    return weight_like if weight_layout == "out_in" else weight_like.t()


def masked_linear_ref(x, weight, logits, bias=None, *, weight_layout="out_in", block=(1, 1), **gate) -> torch.Tensor:
    """y = x (W * m)^T + b, with W stored as (out, in) (``out_in``, nn.Linear) or (in, out) (``in_out``, Conv1D);
    ``gate``: the keywords of ``gate_ref``."""
    wm = masked_weight_ref(weight, logits, block, **gate)
    return F.linear(x, _as_out_in(wm, weight_layout), bias)


def masked_linear_backward_ref(grad_out, x, weight, logits, p: GateParams, *, has_bias=False, weight_layout="out_in",
                               block=(1, 1), needs_weight_grad=False):
    """Gradients (grad_x, grad_weight, grad_logits, grad_bias) of ``masked_linear_ref`` with the gates ``p``.

    grad_weight is None unless ``needs_weight_grad``; grad_bias (grad_out's dtype) is None unless ``has_bias``.
    The mask gradient dWm = dy^T x is accumulated in float32, as the fused kernels do.
    """
    gate = p.ref_kwargs()
    gates = gate_ref(logits, **gate)
    grad_x = (grad_out @ _as_out_in(apply_gates(weight, gates, block), weight_layout)).to(x.dtype)

    dy2 = _upcast(flatten_tokens(grad_out))
    x2 = _upcast(flatten_tokens(x))
    grad_wm = _as_out_in(dy2.t() @ x2, weight_layout)  # in the weight's layout, float32 (float64)
    per_weight = (grad_wm * _upcast(weight)).to(gates.dtype)
    grad_gates = reduce_to_grid(per_weight, block, logits.shape)
    grad_logits = gate_backward_ref(grad_gates, logits, **gate).to(logits.dtype)
    grad_weight = apply_gates(grad_wm, gates, block).to(weight.dtype) if needs_weight_grad else None
    grad_bias = dy2.sum(0).to(grad_out.dtype) if has_bias else None
    return grad_x, grad_weight, grad_logits, grad_bias


def unit_axis(grid_shape: Sequence[int], weight_layout: str) -> Optional[str]:
    """Which whole units a gate grid gates: "in" (input units, heads as groups of them, or the whole layer),
    "out" (output units) or None (per-weight or block gates).

    A unit gate needs no weight-gradient GEMM (``gated_units_ref``): for input units y = (x * z) W^T gives
    dz = sum_t x * (dy W); for output units y = (x W^T) * z gives dz = sum_t dy * (x W^T). A layer gate (1, 1) is
    taken as input units: its backward then needs nothing beyond x, which every masked layer keeps anyway.
    """
    grid_rows, grid_cols = grid_shape
    rows_axis, cols_axis = ("out", "in") if weight_layout == "out_in" else ("in", "out")
    if grid_rows == 1 and grid_cols == 1:
        return "in"
    if grid_rows == 1:
        return cols_axis
    if grid_cols == 1:
        return rows_axis
    return None


def unit_dim(axis: str, weight_layout: str) -> int:
    """The weight dimension (0 rows, 1 columns) along which the units of ``axis`` lie, in the weight's layout."""
    return 1 if (axis == "in") == (weight_layout == "out_in") else 0


def gated_units_ref(x, logits, group: int, bias=None, **gate) -> torch.Tensor:
    """y = x * z[feature // group] + bias along the last dimension of x: one gate per ``group`` consecutive
    features (the last group may be partial), gate j drawing ``uniform(seed, offset + j)`` as in ``gate_ref``
    (``gate``: its keywords).

    The product is taken in float32 (float64) and rounded once to x's dtype. This is how unit, head and layer
    masks run without a masked weight: input units gate x before the GEMM, output units gate its result.
    """
    return scale_units(x, gate_ref(logits.reshape(-1), **gate), group, bias)


def scale_units(x, gates, group: int, bias=None) -> torch.Tensor:
    """x * gates[..., feature // group] (+ bias) in float32 (float64), rounded once to x's dtype. ``gates``: (G,) for
    every row, or (rows, G), one gate vector per row of a 2-D x (the rows of K-mask batches)."""
    up = _upcast(x)
    features = x.shape[-1]
    if features % group == 0 and (gates.dim() == 1 or x.dim() == 2):  # broadcast over each group: no gate copy
        y = (up.unflatten(-1, (features // group, group)) * gates.to(up.dtype).unsqueeze(-1)).flatten(-2)
    else:  # a partial last group
        y = up * gates.repeat_interleave(group, dim=-1)[..., :features].to(up.dtype)
    if bias is not None:
        y = y + _upcast(bias)
    return y.to(x.dtype)


def gated_units_backward_ref(grad_out, x, logits, group: int, p: GateParams, *, has_bias=False):
    """(grad_x, grad_logits, grad_bias) of ``gated_units_ref`` with the gates ``p``: grad_x = dy * z, d(gate j) =
    the float32 (float64) sum over tokens and over the group's features of dy * x, then the estimator's slope;
    grad_bias = sum_t dy (None unless ``has_bias``)."""
    flat_logits = logits.reshape(-1)
    gate = p.ref_kwargs()
    gates = gate_ref(flat_logits, **gate)
    grad_x = scale_units(grad_out, gates, group)
    grad_gates = reduce_units(_upcast(grad_out) * _upcast(x), group, gates.shape[0])[0].to(gates.dtype)
    grad_logits = gate_backward_ref(grad_gates, flat_logits, **gate)
    grad_bias = _upcast(flatten_tokens(grad_out)).sum(0) if has_bias else None
    return grad_x, grad_logits.reshape(logits.shape).to(logits.dtype), grad_bias


def reduce_units(per_feature: torch.Tensor, group: int, n_gates: int, n_masks: int = 1,
                 token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum (..., features) over each group of ``group`` features and over the rows of each mask: (n_masks, n_gates).
    Rows (the leading dimensions, flattened) belong to mask ``token_mask[row]``, or, without ``token_mask``, to
    ``n_masks`` equal contiguous groups."""
    rows = flatten_tokens(per_feature)
    features = rows.shape[1]
    if token_mask is None:  # rows first (one pass over the tokens), then the small (K, features) group sums
        per_mask = rows.view(n_masks, rows.shape[0] // n_masks, features).sum(1)
    else:
        per_mask = rows.new_zeros(n_masks, features).index_add_(0, token_mask, rows)
    if group == 1 and features == n_gates:
        return per_mask
    padded = per_mask.new_zeros(n_masks, n_gates * group)
    padded[:, :features] = per_mask
    return padded.view(n_masks, n_gates, group).sum(2)


def mask_offset(offset: int, mask: int, n_gates: int) -> int:
    """Noise offset of mask ``mask`` of a stack of K gate grids of ``n_gates`` gates each: the stack is one Philox
    stream in row-major order, so gate j of mask k draws ``uniform(seed, offset + k * n_gates + j)``."""
    return offset + mask * n_gates


def _rows_of_mask(x, index, mask: int, n_masks: int):
    """The leading-dimension rows of ``x`` that use mask ``mask``: ``index == mask``, or the mask's contiguous
    group of x.shape[0] / n_masks rows when ``index`` is None."""
    if index is None:
        size = x.shape[0] // n_masks
        return torch.arange(mask * size, (mask + 1) * size, device=x.device)
    return (index == mask).nonzero().flatten()


def grouped_masked_linear_ref(x, weight, logits, bias=None, index=None, *, weight_layout="out_in", block=(1, 1),
                              offset=0, **gate) -> torch.Tensor:
    """K masked linear layers over one weight: row b of x (its leading dimension) uses mask ``index[b]``.

    ``logits`` is a stack (K, GR, GC) of gate grids. ``index`` (LongTensor (x.shape[0],), values in [0, K)) or
    None: x.shape[0] is K equal contiguous groups, group k using mask k. By definition this equals K separate
    ``masked_linear_ref`` calls, mask k with offset ``mask_offset(offset, k, GR * GC)`` (this loop over the K
    masks is the oracle of the grouped op, which runs them as one batched product). ``offset``, ``gate``: the
    keywords of ``gate_ref``.
    """
    n_masks, n_gates = logits.shape[0], logits[0].numel()
    y = None
    for k in range(n_masks):
        rows = _rows_of_mask(x, index, k, n_masks)
        y_k = masked_linear_ref(x[rows], weight, logits[k], bias, weight_layout=weight_layout, block=block,
                                offset=mask_offset(offset, k, n_gates), **gate)
        if y is None:
            y = y_k.new_zeros(*x.shape[:-1], y_k.shape[-1])
        y[rows] = y_k
    return y


def mask_params(p: GateParams, mask: int, n_gates: int) -> GateParams:
    """The gate parameters of mask ``mask`` of a stack of K grids of ``n_gates`` gates each: ``p`` at the mask's
    offset (``mask_offset``)."""
    return dataclasses.replace(p, offset=mask_offset(p.offset, mask, n_gates))


def grouped_masked_linear_backward_ref(grad_out, x, weight, logits, p: GateParams, *, index=None, has_bias=False,
                                       weight_layout="out_in", block=(1, 1), needs_weight_grad=False):
    """Gradients (grad_x, grad_weight, grad_logits (K, GR, GC), grad_bias) of ``grouped_masked_linear_ref`` with the
    gates ``p``: per mask, ``masked_linear_backward_ref`` over that mask's rows; the shared weight and bias sum
    their gradients (in float32, or float64). grad_weight is None unless ``needs_weight_grad``, grad_bias (grad_out's
    dtype) None unless ``has_bias``."""
    n_masks, n_gates = logits.shape[0], logits[0].numel()
    grad_x = torch.zeros_like(x)
    grad_logits = torch.zeros_like(logits)
    grad_weight = torch.zeros_like(weight, dtype=compute_dtype(weight)) if needs_weight_grad else None
    grad_bias = grad_out.new_zeros(grad_out.shape[-1], dtype=compute_dtype(grad_out)) if has_bias else None
    for k in range(n_masks):
        rows = _rows_of_mask(x, index, k, n_masks)
        gx, gw, gl, gb = masked_linear_backward_ref(
            grad_out[rows], x[rows], weight, logits[k], mask_params(p, k, n_gates), has_bias=has_bias,
            weight_layout=weight_layout, block=block, needs_weight_grad=needs_weight_grad)
        grad_x[rows] = gx
        grad_logits[k] = gl
        if needs_weight_grad:
            grad_weight += gw
        if has_bias:
            grad_bias += gb
    return (grad_x, None if grad_weight is None else grad_weight.to(weight.dtype), grad_logits,
            None if grad_bias is None else grad_bias.to(grad_out.dtype))


def grouped_masked_weight_ref(weight, logits, block, p: GateParams) -> torch.Tensor:
    """The K masked weights (K, R, C) of a stack of gate grids (K, GR, GC) with the gates ``p``, in the weight's
    dtype and layout: mask k is ``masked_weight_ref(weight, logits[k], ..., offset=mask_offset(offset, k, GR * GC))``
    (one gate draw over the stack: its flat index is the noise counter)."""
    return apply_gates(weight, gate_ref(logits, **p.ref_kwargs()), block)


def _l0_shift(beta: float, gamma: float, zeta: float) -> float:
    return beta * math.log(-gamma / zeta)


def l0_norm_ref(logits, estimator="hard_concrete", beta=2 / 3, gamma=-0.1, zeta=1.1, tau=0.0) -> torch.Tensor:
    """Expected number of non-zero gates (a scalar in the compute dtype).

    hard_concrete: sum of P(z != 0) = sigmoid(l - beta log(-gamma / zeta)) (Louizos et al. 2018, eq. 12);
    gumbel_sigmoid_st and bernoulli_st: sum of P(z = 1) = sigmoid(l); threshold_st: the count of l > tau.
    """
    l = logits.to(compute_dtype(logits))
    if estimator == "hard_concrete":
        return torch.sigmoid(l - _l0_shift(beta, gamma, zeta)).sum()
    if estimator in ("gumbel_sigmoid_st", "bernoulli_st"):
        return torch.sigmoid(l).sum()
    if estimator == "threshold_st":
        return (l > tau).to(l.dtype).sum()
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


def l0_norm_backward_ref(grad, logits, estimator="hard_concrete", beta=2 / 3, gamma=-0.1, zeta=1.1, tau=0.0):
    """d(l0_norm)/d(logits) times the incoming scalar gradient; threshold_st passes the gradient straight through."""
    l = logits.to(compute_dtype(logits))
    if estimator == "hard_concrete":
        p = torch.sigmoid(l - _l0_shift(beta, gamma, zeta))
        slope = p * (1 - p)
    elif estimator in ("gumbel_sigmoid_st", "bernoulli_st"):
        p = torch.sigmoid(l)
        slope = p * (1 - p)
    elif estimator == "threshold_st":
        slope = torch.ones_like(l)
    else:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    return (grad.to(l.dtype) * slope).to(logits.dtype)


def masked_linear_naive(x, weight, logits, bias=None, *, estimator="hard_concrete", seed=0, offset=0, training=True,
                        inverse=False, weight_layout="out_in", block=(1, 1), beta=2 / 3, gamma=-0.1, zeta=1.1,
                        tau=0.0) -> torch.Tensor:
    """The way masks are learned by hand today: sample gates with torch ops, ``F.linear(x, W * z)``, autograd.

    Same noise and gradients as ``masked_linear_ref`` (straight-through estimators use the ``z + s (l - l)``
    trick), but every intermediate is a separate tensor kept for autograd and the masked-weight gradient is
    computed in the activation dtype. This is the benchmark baseline and the "PyTorch in the same dtype" error
    yardstick of the tests.
    """
    z, slope = _gate_and_slope(logits, estimator, seed, offset, beta, gamma, zeta, tau, training)
    if inverse:
        z, slope = 1 - z, -slope
    l = logits.to(z.dtype)
    z = z.detach() + slope.detach() * (l - l.detach())
    mask = expand_gates(z, block, weight.shape)
    wm = (weight.to(mask.dtype) * mask).to(weight.dtype)
    return F.linear(x, _as_out_in(wm, weight_layout), bias)


def hard_concrete_naive(logits, beta=2 / 3, gamma=-0.1, zeta=1.1, generator=None, noise=None) -> torch.Tensor:
    """Hard-concrete sampling as users write it by hand (torch's own RNG, one kernel per op, autograd through
    every intermediate): the baseline the fused ops are benchmarked against. Not bit-compatible with ``uniform``,
    unless ``noise`` (uniform in [0, 1), shaped like ``logits``, e.g. ``fastmask.ops.uniform``) replaces torch.rand:
    then the gates are those of ``gate_ref`` up to float rounding (the benchmarks' loss-trajectory check)."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device) if noise is None else noise
    u = u.clamp(UNIFORM_EPS, 1 - UNIFORM_EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + logits) / beta)
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


# --- learned N:M masks (MaskLLM-style Gumbel-softmax over the admissible patterns) ----------------------------
# A group is M consecutive weights along the input (reduction) dimension of the (out, in) weight; for an (in, out)
# weight (GPT-2's Conv1D) that is M consecutive rows. The C = C(M, N) admissible patterns of a group (N ones among
# M) are ``nm_patterns(n, m)`` in itertools.combinations order, and a layer's logits are (out, in / M, C), one
# categorical choice per group, in that (out, group, pattern) order whatever the weight's layout. Noise: logit j
# (row-major flat index) draws ``uniform(seed, offset + j)``, clamped like the gates' noise, Gumbel g = -log(-log u).
#
#   z = (scale * l + g) / temperature (training; no g in eval), y = softmax(z) over the C patterns
#   soft: mask = y @ S (a convex mix of patterns; gradient exact)
#   hard: mask = S[argmax z] (exactly N of M), gradient straight through the soft mask (y @ S)
#   eval: mask = S[argmax l] (exactly N of M, ties to the first pattern), slope of softmax(scale * l / temperature)
#
# d(logits) from the per-weight gradient d(mask) = dWm * W (grouped (out, G, M)): dy = d(mask) @ S^T, then the
# softmax Jacobian dz = y * (dy - sum_c y_c dy_c), times scale / temperature.


def nm_patterns(n: int, m: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The C(m, n) admissible N:M patterns as a (C, m) 0/1 tensor, in itertools.combinations order (pattern c keeps
    the c-th n-subset of range(m) in lexicographic order; the C++ kernel enumerates them the same way)."""
    kept = torch.combinations(torch.arange(m), r=n).reshape(-1, n)
    patterns = torch.zeros(kept.shape[0], m, dtype=dtype)
    patterns.scatter_(1, kept, 1.0)
    return patterns.to(device)


def nm_logits_shape(weight_shape: Sequence[int], m: int, weight_layout: str = "out_in") -> tuple[int, int, int]:
    """(out, in // m): the first two dimensions of a layer's N:M logits (the third is C(m, n))."""
    out_features, in_features = weight_shape if weight_layout == "out_in" else tuple(weight_shape)[::-1]
    return out_features, in_features // m


def gumbel_from_uniform(u: torch.Tensor, dtype) -> torch.Tensor:
    """-log(-log u) of uniform noise u (float32), clamped to [UNIFORM_EPS, 1 - UNIFORM_EPS] in float32, then the
    math in ``dtype``: the learned N:M masks' noise, whichever backend drew u."""
    u = u.clamp(UNIFORM_EPS, 1.0 - UNIFORM_EPS).to(dtype)
    return -torch.log(-torch.log(u))


def _gumbel_noise(shape, seed: int, offset: int, dtype, device) -> torch.Tensor:
    """The Gumbel noise of ``uniform_ref(shape, seed, offset)``."""
    return gumbel_from_uniform(uniform_ref(shape, seed, offset, device=device), dtype)


def nm_soft_ref(logits, *, seed=0, offset=0, training=True, temperature=1.0, scale=1.0, noise=None):
    """(y, z): softmax probabilities over the patterns and the pre-softmax scores z, in the compute dtype.
    ``noise``: the Gumbel noise if already drawn (the op layer draws it with its backend's ``uniform``)."""
    l = logits.to(compute_dtype(logits))
    z = scale * l
    if training:
        g = _gumbel_noise(l.shape, seed, offset, l.dtype, l.device) if noise is None else noise.to(l.dtype)
        z = z + g
    z = z / temperature
    return torch.softmax(z, dim=-1), z


def nm_group_mask_ref(logits, *, n, m, seed=0, offset=0, training=True, hard=True, temperature=1.0, scale=1.0,
                      noise=None) -> torch.Tensor:
    """The mask of every group, (out, G, m) in the compute dtype (see the section comment)."""
    patterns = nm_patterns(n, m, compute_dtype(logits), logits.device)
    if not training:
        return patterns[logits.argmax(dim=-1)]
    y, z = nm_soft_ref(logits, seed=seed, offset=offset, training=True, temperature=temperature, scale=scale,
                       noise=noise)
    return patterns[z.argmax(dim=-1)] if hard else y @ patterns


def nm_mask_ref(logits, *, n, m, **nm) -> torch.Tensor:
    """The N:M mask as an (out, in) tensor (the nn.Linear orientation) in the compute dtype; ``nm``: the keywords of
    ``nm_group_mask_ref``."""
    groups = nm_group_mask_ref(logits, n=n, m=m, **nm)
    return groups.reshape(groups.shape[0], -1)


def nm_masked_weight_ref(weight, logits, *, n, m, weight_layout="out_in", **nm) -> torch.Tensor:
    """W * mask in the weight's dtype and layout (product in float32, or float64, rounded once)."""
    mask = _as_out_in(nm_mask_ref(logits, n=n, m=m, **nm), weight_layout)
    up = _upcast(weight)
    return (up * mask.to(up.dtype)).to(weight.dtype)


def nm_masked_linear_ref(x, weight, logits, bias=None, *, n, m, weight_layout="out_in", **nm) -> torch.Tensor:
    """y = x (W * mask)^T + b with the N:M mask of ``logits`` (``nm``: seed, offset, training, hard, temperature,
    scale)."""
    wm = nm_masked_weight_ref(weight, logits, n=n, m=m, weight_layout=weight_layout, **nm)
    return F.linear(x, _as_out_in(wm, weight_layout), bias)


def nm_logits_backward_ref(grad_group_mask, logits, *, n, m, seed=0, offset=0, training=True, hard=True,
                           temperature=1.0, scale=1.0, noise=None) -> torch.Tensor:
    """d(loss)/d(logits) (compute dtype) from d(loss)/d(mask) grouped as (out, G, m): through the soft mask y @ S
    (exact for ``hard=False``, the straight-through surrogate for ``hard=True`` and in eval)."""
    del hard  # the same surrogate either way: the soft mask's Jacobian
    patterns = nm_patterns(n, m, compute_dtype(logits), logits.device)
    y, _ = nm_soft_ref(logits, seed=seed, offset=offset, training=training, temperature=temperature, scale=scale,
                       noise=noise)
    dy = grad_group_mask.to(y.dtype) @ patterns.t()
    dz = y * (dy - (y * dy).sum(-1, keepdim=True))
    return dz * (scale / temperature)


def nm_masked_linear_backward_ref(grad_out, x, weight, logits, *, n, m, has_bias=False, weight_layout="out_in",
                                  needs_weight_grad=False, **nm):
    """(grad_x, grad_weight, grad_logits, grad_bias) of ``nm_masked_linear_ref``; dWm = dy^T x accumulated in
    float32 (float64). grad_weight = dWm * mask (None unless asked), grad_bias None unless ``has_bias``."""
    mask = nm_mask_ref(logits, n=n, m=m, **nm)  # (out, in)
    up_w = _upcast(weight)
    wm = (up_w * _as_out_in(mask, weight_layout).to(up_w.dtype)).to(weight.dtype)
    grad_x = (grad_out @ _as_out_in(wm, weight_layout)).to(x.dtype)
    dy2 = _upcast(flatten_tokens(grad_out))
    x2 = _upcast(flatten_tokens(x))
    grad_wm = dy2.t() @ x2  # (out, in), float32 (float64)
    per_weight = (grad_wm * _as_out_in(up_w, weight_layout).to(grad_wm.dtype)).to(mask.dtype)
    grad_logits = nm_logits_backward_ref(per_weight.reshape(*logits.shape[:2], m), logits, n=n, m=m, **nm)
    grad_weight = None
    if needs_weight_grad:
        grad_weight = _as_out_in(grad_wm * mask.to(grad_wm.dtype), weight_layout).to(weight.dtype)
    grad_bias = dy2.sum(0).to(grad_out.dtype) if has_bias else None
    return grad_x, grad_weight, grad_logits.to(logits.dtype), grad_bias


__all__ += ["nm_patterns", "nm_logits_shape", "nm_soft_ref", "nm_group_mask_ref", "nm_mask_ref",
            "nm_masked_weight_ref", "nm_masked_linear_ref", "nm_logits_backward_ref", "nm_masked_linear_backward_ref"]
