"""Triton kernel of fastmask.ops.grouped_masked_linear: the K masked weights (K, R, C) in one launch.

Design: one program per (row tile, column tile, mask k), so all K masks are built by a single launch; mask k
reads gate grid k of the stack (the precomputed gates of block / unit grids, one gate_forward launch over the
whole stack) or regenerates per-weight noise at counter ``offset + k * GR * GC + j`` (the stack is one Philox
stream). The grouped product itself is one torch.bmm over the tokens grouped by mask (fastmask/ops).
Limits: the weight is read with any strides; the logits stack must be contiguous; output (K, R, C) contiguous
in the weight dtype, the product W * z taken in float32 (float64 for float64 weights) and rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._gate_math import NO_SPECIALIZE, _cast, _f64_param, _gates_at, compute_dtype, device_guard, interpreted, \
    param_bits, tl_dtype
from .gate import MASKED_WEIGHT_TILE, gate_forward


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _grouped_masked_weight_kernel(
    w_ptr,  # weight (R, C), any strides, shared by the K masks
    gates_ptr,  # logits stack (K, GR, GC), or its gates z (GATE_GRID), contiguous
    out_ptr,  # W * m_k out, (K, R, C) contiguous, weight dtype
    R, C,  # weight shape
    GC,  # gate-grid columns: gate of (r, c) is (r // BH) * GC + c // BW within a mask's grid
    N_GATES,  # gates per mask (GR * GC): mask k's grid starts at k * N_GATES, its noise at offset + k * N_GATES
    stride_wr, stride_wc,  # weight strides
    seed, offset,  # noise stream of the whole stack
    beta_bits, gamma_bits, zg_bits, tau_bits,  # float64 bit patterns of the estimator parameters
    BH: tl.constexpr, BW: tl.constexpr,  # gate block
    DEP_R: tl.constexpr, DEP_C: tl.constexpr,  # whether a mask's gate grid has more than one row / column
    COMPUTE: tl.constexpr,  # gate math dtype
    W_UP: tl.constexpr,  # dtype of the product W * m (float32, or float64 for float64 weights)
    ESTIMATOR: tl.constexpr, TRAINING: tl.constexpr, INVERSE: tl.constexpr,  # estimator flags
    GATE_GRID: tl.constexpr,  # gates_ptr holds precomputed gates (block / unit grids), not logits
    INTERPRET: tl.constexpr,  # running under the Triton interpreter (bfloat16 rounding workaround)
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,  # tile
):
    k = tl.program_id(2).to(tl.int64)
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    w = tl.load(w_ptr + offs_r.to(tl.int64)[:, None] * stride_wr + offs_c.to(tl.int64)[None, :] * stride_wc,
                mask=mask, other=0.0)
    gr = (offs_r // BH) * GC if DEP_R else offs_r * 0
    gc = offs_c // BW if DEP_C else offs_c * 0
    first_gate = k * N_GATES  # this mask's grid within the stack, and its noise counter
    z = _gates_at(gates_ptr + first_gate, gr[:, None] + gc[None, :], mask, seed, offset + first_gate,
                  _f64_param(beta_bits, COMPUTE), _f64_param(gamma_bits, COMPUTE), _f64_param(zg_bits, COMPUTE),
                  _f64_param(tau_bits, COMPUTE), COMPUTE, ESTIMATOR, TRAINING, INVERSE, GATE_GRID)
    wm = _cast(w.to(W_UP) * z.to(W_UP), out_ptr.dtype.element_ty, INTERPRET)
    out_base = out_ptr + k * R * C
    tl.store(out_base + offs_r.to(tl.int64)[:, None] * C + offs_c[None, :], wm, mask=mask)


_INTERPRET = interpreted(_grouped_masked_weight_kernel)


def grouped_masked_weight(weight: torch.Tensor, logits: torch.Tensor, block: tuple[int, int], p, tile=None
                          ) -> torch.Tensor:
    """W * m_k for every mask k of the stack ``logits`` (K, GR, GC): (K, R, C) contiguous, weight dtype and layout
    (fastmask.ref.grouped_masked_weight_ref), in one launch (plus one gate launch for block / unit grids)."""
    logits = logits.contiguous()
    n_masks, grid_r, grid_c = logits.shape
    rows, cols = weight.shape
    out = torch.empty((n_masks, rows, cols), dtype=weight.dtype, device=weight.device)
    if out.numel() == 0:
        return out
    use_grid = grid_r * grid_c < rows * cols
    gates = gate_forward(logits, p) if use_grid else logits  # the whole stack: one stream, one launch
    block_r, block_c, num_warps = tile or (MASKED_WEIGHT_TILE if weight.device.type == "cuda" else (16, 16, 1))
    w_up = torch.float64 if weight.dtype == torch.float64 else torch.float32
    with device_guard(weight):
        _grouped_masked_weight_kernel[(triton.cdiv(rows, block_r), triton.cdiv(cols, block_c), n_masks)](
            weight, gates, out, rows, cols, grid_c, grid_r * grid_c, weight.stride(0), weight.stride(1), p.seed,
            p.offset, *param_bits(p), BH=int(block[0]), BW=int(block[1]), DEP_R=grid_r > 1, DEP_C=grid_c > 1,
            COMPUTE=tl_dtype(compute_dtype(logits)), W_UP=tl_dtype(w_up), ESTIMATOR=int(p.estimator),
            TRAINING=bool(p.training), INVERSE=bool(p.inverse), GATE_GRID=use_grid, INTERPRET=_INTERPRET,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
    return out
