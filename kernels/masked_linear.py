"""Fused Triton kernels of fastmask.ops.masked_linear: y = x (W * m)^T + b and its backward.

Design: ``_masked_gemm_kernel`` computes C = A @ (W * m)^(T) with each W tile gated inside the K loop (gates
regenerated per weight from (seed, offset), or read from the per-gate grid of block / unit masks, hoisted out of
the loop when constant along K), multiplied in fp32, rounded to the weight dtype, then tl.dot with fp32
accumulation; it serves y (A = x) and grad_x (A = grad_out) through stride/layout flags, reading the weight in
place in either layout. ``_mask_grad_kernel`` keeps the dWm = dy^T x tile in registers and, in its epilogue,
multiplies it by W and the regenerated gate slope and writes d(logits) (summed over gate blocks in registers;
atomics only where a block spans tiles) and grad_weight: dWm never reaches memory.
Limits: strategy="auto" writes W * m once (weight dtype) and calls cuBLAS for y and grad_x instead, since that
was measured faster on an H100 (policy below); fp64 has no tensor-core path (broadcast-multiply reduction:
gradcheck sizes); atomics make the d(logits) summation order non-deterministic, so deterministic mode
(fastmask.set_deterministic: the caller passes ``fixed_order_mask_grad``) runs ``_mask_grad_fixed_order`` wherever
the kernel would use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from ._gate_math import NO_SPECIALIZE, _cast, _f64_param, _gates_at, _grid_gate_slope, _mma, compute_dtype, \
    device_guard, interpreted, param_bits, tl_dtype
from .gate import gate_forward, grid_shape, masked_weight

# (grad_wm, weight, logits, block, p, needs_weight_grad, needs_masked_weight) -> (grad_logits, grad_weight or None,
# W * m or None): the mask gradient from dWm (R, C) in the accumulator dtype, summed in a fixed order (the Triton
# backend's mask_grad in fastmask/ops/_backend.py: torch block sums around the gate kernels of this package).
MaskGradFromDwm = Callable[..., tuple]


# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _masked_gemm_kernel(
    a_ptr,  # A (M, Q): x (forward) or grad_out (grad_x); any strides
    w_ptr,  # the weight as stored, read as B (Q, P) through stride_wq / stride_wp (no copy, no transpose)
    gates_ptr,  # logits grid, or the gates z of the grid (GATE_GRID); contiguous; the gate of B[q, p] is at
    #             flat index (q // Q_DIV) * q_mul + (p // P_DIV) * p_mul
    bias_ptr,  # (P,) bias when HAS_BIAS, else unused
    c_ptr,  # C (M, P) output, its dtype is the output dtype
    M, P, Q,  # problem size
    stride_am, stride_aq,  # A strides
    stride_wq, stride_wp,  # weight strides along B's q and p
    stride_cm, stride_cp,  # C strides
    q_mul, p_mul,  # gate-grid flat index multipliers of the q and p block indices (grid columns or 1)
    seed, offset,  # noise stream: gate j uses tl.rand(seed, offset + j)
    beta_bits, gamma_bits, zg_bits, tau_bits,  # float64 bit patterns of beta, gamma, zeta - gamma, tau
    Q_DIV: tl.constexpr, P_DIV: tl.constexpr,  # gate block size along q and p
    DEP_Q: tl.constexpr, DEP_P: tl.constexpr,  # whether gates vary along q / p (grid dimension > 1)
    COMPUTE: tl.constexpr,  # gate math dtype (float32, float64 for float64 logits)
    W_UP: tl.constexpr,  # dtype of the product W * m before rounding to the weight dtype
    ACC: tl.constexpr,  # accumulator dtype (float32, float64 for float64 inputs)
    ESTIMATOR: tl.constexpr, TRAINING: tl.constexpr, INVERSE: tl.constexpr,  # estimator flags
    HAS_BIAS: tl.constexpr,  # add bias in the epilogue
    GATE_GRID: tl.constexpr,  # gates_ptr holds precomputed gates (block / unit grids), not logits
    USE_DOT: tl.constexpr,  # tl.dot (False: fp64 broadcast-multiply reduction)
    INPUT_PRECISION: tl.constexpr,  # tl.dot input precision of fp32 operands ("ieee", "tf32") or None
    INTERPRET: tl.constexpr,  # running under the Triton interpreter (bfloat16 workarounds)
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,  # tile
    GROUP_M: tl.constexpr,  # programs along M sharing a P tile consecutively (L2 reuse)
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_p = tl.cdiv(P, BLOCK_P)
    num_pid_in_group = GROUP_M * num_pid_p
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_p = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_m = offs_m < M
    mask_p = offs_p < P
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    w_cols = w_ptr + offs_p.to(tl.int64)[None, :] * stride_wp

    beta = _f64_param(beta_bits, COMPUTE)
    gamma = _f64_param(gamma_bits, COMPUTE)
    zg = _f64_param(zg_bits, COMPUTE)
    tau = _f64_param(tau_bits, COMPUTE)
    gate_p = (offs_p // P_DIV) * p_mul if DEP_P else offs_p * 0
    if not DEP_Q:
        # The gates do not change along the K loop (e.g. output units, a layer): one row of them per program.
        g_hoisted = _gates_at(gates_ptr, gate_p, mask_p, seed, offset, beta, gamma, zg, tau, COMPUTE, ESTIMATOR,
                              TRAINING, INVERSE, GATE_GRID).to(W_UP)[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=ACC)
    for q0 in range(0, Q, BLOCK_Q):
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        mask_q = offs_q < Q
        a = tl.load(a_rows + offs_q[None, :] * stride_aq, mask=mask_m[:, None] & mask_q[None, :], other=0.0)
        mask_w = mask_q[:, None] & mask_p[None, :]
        w = tl.load(w_cols + offs_q.to(tl.int64)[:, None] * stride_wq, mask=mask_w, other=0.0)
        if DEP_Q:
            gate_q = (offs_q // Q_DIV) * q_mul
            if DEP_P:  # per-weight / 2-D blocks: a gate per tile element
                g = _gates_at(gates_ptr, gate_q[:, None] + gate_p[None, :], mask_w, seed, offset, beta, gamma, zg,
                              tau, COMPUTE, ESTIMATOR, TRAINING, INVERSE, GATE_GRID).to(W_UP)
            else:  # gates vary along q only (e.g. input units): one column of them
                g = _gates_at(gates_ptr, gate_q, mask_q, seed, offset, beta, gamma, zg, tau, COMPUTE, ESTIMATOR,
                              TRAINING, INVERSE, GATE_GRID).to(W_UP)[:, None]
        else:
            g = g_hoisted
        w = _cast(w.to(W_UP) * g, w_ptr.dtype.element_ty, INTERPRET)
        acc = _mma(a, w.to(a.dtype), acc, USE_DOT, INPUT_PRECISION, INTERPRET)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_p, mask=mask_p, other=0.0).to(ACC)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_p[None, :] * stride_cp
    tl.store(c_ptrs, _cast(acc, c_ptr.dtype.element_ty, INTERPRET), mask=mask_m[:, None] & mask_p[None, :])


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _mask_grad_kernel(
    a_ptr,  # A (M, R): dWm[r, c] = sum_m A[m, r] B[m, c]; grad_out (out_in) or x (in_out)
    b_ptr,  # B (M, C): x (out_in) or grad_out (in_out)
    w_ptr,  # weight (R, C) as stored
    logits_ptr,  # gate grid (GR, GC), contiguous
    gl_ptr,  # d(logits) out: (GR, GC) contiguous; an accumulation buffer (zeroed) when USE_ATOMIC
    gw_ptr,  # grad_weight out, (R, C) contiguous, weight dtype (NEED_GW only)
    M, R, C,  # tokens, weight shape
    GC,  # gate-grid columns
    stride_am, stride_ar,  # A strides
    stride_bm, stride_bc,  # B strides
    stride_wr, stride_wc,  # weight strides
    seed, offset,  # noise stream
    beta_bits, gamma_bits, zg_bits, tau_bits,  # float64 bit patterns of beta, gamma, zeta - gamma, tau
    BH: tl.constexpr, BW: tl.constexpr,  # gate block
    DEP_R: tl.constexpr, DEP_C: tl.constexpr,  # whether the gate grid has more than one row / column
    G_R: tl.constexpr, G_C: tl.constexpr,  # rows / columns of the tile summed in registers into one gate
    USE_ATOMIC: tl.constexpr,  # d(logits) entries are shared between programs (or within a reduced tile)
    NEED_GW: tl.constexpr,  # also write grad_weight = dWm * m
    COMPUTE: tl.constexpr,  # gate math dtype
    ACC: tl.constexpr,  # accumulator dtype
    ESTIMATOR: tl.constexpr, TRAINING: tl.constexpr, INVERSE: tl.constexpr,  # estimator flags
    USE_DOT: tl.constexpr,  # tl.dot (False: fp64 broadcast-multiply reduction)
    INPUT_PRECISION: tl.constexpr,  # tl.dot input precision of fp32 operands, or None
    INTERPRET: tl.constexpr,  # running under the Triton interpreter (bfloat16 workarounds)
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,  # tile; BLOCK_M is the reduction
    GROUP_R: tl.constexpr,  # programs along R sharing a C tile consecutively (L2 reuse)
):
    pid = tl.program_id(0)
    num_pid_r = tl.cdiv(R, BLOCK_R)
    num_pid_c = tl.cdiv(C, BLOCK_C)
    num_pid_in_group = GROUP_R * num_pid_c
    group_id = pid // num_pid_in_group
    first_pid_r = group_id * GROUP_R
    group_size_r = tl.minimum(num_pid_r - first_pid_r, GROUP_R)
    pid_r = first_pid_r + (pid % num_pid_in_group) % group_size_r
    pid_c = (pid % num_pid_in_group) // group_size_r

    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_r = offs_r < R
    mask_c = offs_c < C
    a_cols = a_ptr + offs_r.to(tl.int64)[:, None] * stride_ar
    b_cols = b_ptr + offs_c.to(tl.int64)[None, :] * stride_bc

    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        a_t = tl.load(a_cols + offs_m.to(tl.int64)[None, :] * stride_am, mask=mask_r[:, None] & mask_m[None, :],
                      other=0.0)
        b = tl.load(b_cols + offs_m.to(tl.int64)[:, None] * stride_bm, mask=mask_m[:, None] & mask_c[None, :],
                    other=0.0)
        acc = _mma(a_t, b.to(a_t.dtype), acc, USE_DOT, INPUT_PRECISION, INTERPRET)

    # Epilogue: dWm (in registers) -> per-weight gate gradient dWm * W -> d(logits), grad_weight.
    beta = _f64_param(beta_bits, COMPUTE)
    gamma = _f64_param(gamma_bits, COMPUTE)
    zg = _f64_param(zg_bits, COMPUTE)
    tau = _f64_param(tau_bits, COMPUTE)
    ELEMENTWISE: tl.constexpr = G_R == 1 and G_C == 1  # a gate per tile element: d(logits) written elementwise
    if ELEMENTWISE or NEED_GW:
        _mask_grad_elementwise(acc, offs_r, offs_c, w_ptr, logits_ptr, gl_ptr, gw_ptr, R, C, GC, stride_wr,
                               stride_wc, seed, offset, beta, gamma, zg, tau, BH, BW, DEP_R, DEP_C, ELEMENTWISE,
                               USE_ATOMIC, NEED_GW, COMPUTE, ACC, ESTIMATOR, TRAINING, INVERSE, INTERPRET)
    if not ELEMENTWISE:
        # Sum the tile over each gate block in registers (blocks align with the tile: G_R, G_C divide it), then
        # one slope per block.
        mask_rc = mask_r[:, None] & mask_c[None, :]
        w = tl.load(w_ptr + offs_r.to(tl.int64)[:, None] * stride_wr + offs_c.to(tl.int64)[None, :] * stride_wc,
                    mask=mask_rc, other=0.0)
        per_weight = (acc * w.to(ACC)).to(COMPUTE)
        part = tl.reshape(per_weight, (BLOCK_R // G_R, G_R, BLOCK_C // G_C, G_C))
        part = tl.sum(tl.sum(part, axis=3), axis=1)
        red_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R // G_R) * G_R
        red_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C // G_C) * G_C
        mask_red = (red_r < R)[:, None] & (red_c < C)[None, :]
        gate_red_r = (red_r // BH) * GC if DEP_R else red_r * 0
        gate_red_c = red_c // BW if DEP_C else red_c * 0
        gate_red = gate_red_r[:, None] + gate_red_c[None, :]
        _, slope_red = _grid_gate_slope(logits_ptr, gate_red, mask_red, seed, offset, beta, gamma, zg, tau,
                                        COMPUTE, ESTIMATOR, TRAINING, INVERSE)
        contrib = part * slope_red
        if USE_ATOMIC:
            tl.atomic_add(gl_ptr + gate_red, contrib, mask=mask_red)
        else:
            tl.store(gl_ptr + gate_red, contrib.to(gl_ptr.dtype.element_ty), mask=mask_red)


@triton.jit
def _mask_grad_elementwise(acc, offs_r, offs_c, w_ptr, logits_ptr, gl_ptr, gw_ptr, R, C, GC, stride_wr, stride_wc,
                           seed, offset, beta, gamma, zg, tau, BH: tl.constexpr, BW: tl.constexpr,
                           DEP_R: tl.constexpr, DEP_C: tl.constexpr, WRITE_GL: tl.constexpr,
                           USE_ATOMIC: tl.constexpr, NEED_GW: tl.constexpr, COMPUTE: tl.constexpr,
                           ACC: tl.constexpr, ESTIMATOR: tl.constexpr, TRAINING: tl.constexpr,
                           INVERSE: tl.constexpr, INTERPRET: tl.constexpr):
    """Per-element epilogue of _mask_grad_kernel on a (part of a) tile: acc holds dWm at rows offs_r, columns
    offs_c. WRITE_GL: write d(logits) = dWm * W * slope (per-element gates); NEED_GW: grad_weight = dWm * z."""
    mask_rc = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    gate_r = (offs_r // BH) * GC if DEP_R else offs_r * 0
    gate_c = offs_c // BW if DEP_C else offs_c * 0
    gate_rc = gate_r[:, None] + gate_c[None, :]
    z, slope = _grid_gate_slope(logits_ptr, gate_rc, mask_rc, seed, offset, beta, gamma, zg, tau, COMPUTE,
                                ESTIMATOR, TRAINING, INVERSE)
    if NEED_GW:
        gw = _cast(acc * z.to(ACC), gw_ptr.dtype.element_ty, INTERPRET)
        tl.store(gw_ptr + offs_r.to(tl.int64)[:, None] * C + offs_c[None, :], gw, mask=mask_rc)
    if WRITE_GL:
        w = tl.load(w_ptr + offs_r.to(tl.int64)[:, None] * stride_wr + offs_c.to(tl.int64)[None, :] * stride_wc,
                    mask=mask_rc, other=0.0)
        contrib = (acc * w.to(ACC)).to(COMPUTE) * slope
        if USE_ATOMIC:
            tl.atomic_add(gl_ptr + gate_rc, contrib, mask=mask_rc)
        else:
            tl.store(gl_ptr + gate_rc, contrib.to(gl_ptr.dtype.element_ty), mask=mask_rc)


# ----------------------------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------------------------

_INTERPRET_GEMM = interpreted(_masked_gemm_kernel)
_INTERPRET_GRAD = interpreted(_mask_grad_kernel)


@dataclass(frozen=True)
class GemmConfig:
    """Tile sizes of one kernel launch: (block_a, block_b, block_k) = (BLOCK_M, BLOCK_P, BLOCK_Q) for the GEMMs,
    (BLOCK_R, BLOCK_C, BLOCK_M) for the mask gradient (block_k is always the reduction)."""

    block_a: int
    block_b: int
    block_k: int
    group: int = 8
    num_warps: int = 4
    num_stages: int = 3


# Tiles used under the Triton interpreter (CPU tensors): small, so tests stay fast; tests may pass their own.
INTERPRET_CONFIG = GemmConfig(16, 16, 16, group=2, num_warps=1, num_stages=1)

# Policy of strategy="auto": materialise W * m once in the weight dtype and call cuBLAS (float64: fused). Measured
# on an H100 (bf16, weight 4096 x 4096, triton 3.6, CUDA-graph timings, ms per call), the fused GEMM never won:
# * gates constant along the reduction (output units in y, input units in grad_x): fused 0.054 / 0.057 / 0.164
#   vs materialised 0.040 / 0.050 / 0.114 at 128 / 512 / 2048 tokens (W * m costs 0.028 there: the gates are
#   sampled once per gate, then one memory-bound pass; the Triton GEMM is slower than cuBLAS);
# * gates varying along the reduction (per weight, 2-D blocks): Philox per weight per M tile (0.52 ms at 64
#   tokens, 4 warps) or a per-element gather of block gates (5.9 ms at 8192 tokens) inside the K loop, vs 0.10 ms
#   (per weight) / 0.028 ms (blocks) for W * m.
# strategy="fused" still runs the fused GEMM (tests cover it; it is the starting point for a faster kernel).


def _gemm_config(dtype: torch.dtype, device: torch.device, tokens: int) -> GemmConfig:
    if device.type != "cuda":
        return INTERPRET_CONFIG
    if dtype == torch.float64:
        return GemmConfig(16, 16, 16, group=8, num_warps=4, num_stages=2)
    if dtype == torch.float32:
        return GemmConfig(64, 64, 32, group=8, num_warps=4, num_stages=3)
    if tokens <= 64:
        return GemmConfig(64, 64, 64, group=8, num_warps=4, num_stages=3)
    return GemmConfig(128, 128, 64, group=8, num_warps=8, num_stages=3)


def _grad_config(dtype: torch.dtype, device: torch.device, per_element: bool, tokens: int) -> GemmConfig:
    if device.type != "cuda":
        return INTERPRET_CONFIG
    if dtype == torch.float64:
        return GemmConfig(16, 16, 16, group=8, num_warps=4, num_stages=2)
    if dtype == torch.float32:
        return GemmConfig(64, 64, 32, group=8, num_warps=4, num_stages=3)
    if per_element:
        # Philox per element in the epilogue must stay in registers: 128 x 128 tiles over 8 warps spill (H100,
        # 4096^2 bf16, 512 tokens: 0.87 ms vs 0.20 ms for 64 x 64 over 8 warps); with many tokens the GEMM
        # dominates and 16 warps keep the big tile (8192 tokens: 0.91 ms vs 1.12 ms for 64 x 64).
        if tokens >= 4096:
            return GemmConfig(128, 128, 64, group=8, num_warps=16, num_stages=4)
        return GemmConfig(64, 64, 64, group=8, num_warps=8, num_stages=3)
    return GemmConfig(128, 128, 64, group=8, num_warps=8, num_stages=3)


def _input_precision(dtype: torch.dtype):
    """fp32 operands: exact fp32 products unless torch allows TF32 for matmuls (as F.linear would)."""
    if dtype != torch.float32:
        return None
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _use_fused(dtype: torch.dtype, strategy: str) -> bool:
    """Fused GEMM (gates applied per tile) or materialised W * m + library GEMM (policy above)."""
    if strategy == "fused":
        return True
    if strategy == "materialize":
        return False
    if strategy != "auto":
        raise ValueError(f"strategy must be 'auto', 'fused' or 'materialize', got {strategy!r}")
    return dtype == torch.float64  # gradcheck sizes: keeps the fused kernels under test there


def _masked_gemm(a: torch.Tensor, weight: torch.Tensor, logits: torch.Tensor, gates: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], block, r_is_q: bool, p, out_dtype: torch.dtype,
                 config: Optional[GemmConfig]) -> torch.Tensor:
    """C = A @ B with B[q, p] the masked weight; the weight's rows are B's q (r_is_q) or B's p. ``gates``: the
    precomputed gate grid (block / unit grids) or None (gates regenerated per element from the logits)."""
    rows, cols = weight.shape
    bh, bw, grid_r, grid_c = grid_shape(weight, logits, block)
    tokens = a.shape[0]
    q_size, p_size = (rows, cols) if r_is_q else (cols, rows)
    out = torch.empty((tokens, p_size), dtype=out_dtype, device=a.device)
    if out.numel() == 0:
        return out
    if q_size == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand_as(out))
    if r_is_q:
        stride_wq, stride_wp = weight.stride(0), weight.stride(1)
        q_div, q_mul, dep_q, p_div, p_mul, dep_p = bh, grid_c, grid_r > 1, bw, 1, grid_c > 1
    else:
        stride_wq, stride_wp = weight.stride(1), weight.stride(0)
        q_div, q_mul, dep_q, p_div, p_mul, dep_p = bw, 1, grid_c > 1, bh, grid_c, grid_r > 1
    cfg = config or _gemm_config(a.dtype, a.device, tokens)
    grid = (triton.cdiv(tokens, cfg.block_a) * triton.cdiv(p_size, cfg.block_b),)
    with device_guard(a):
        _masked_gemm_kernel[grid](
            a, weight, gates if gates is not None else logits, bias if bias is not None else out, out, tokens,
            p_size, q_size, a.stride(0), a.stride(1), stride_wq, stride_wp, out.stride(0), out.stride(1), q_mul,
            p_mul, p.seed, p.offset, *param_bits(p),
            Q_DIV=q_div, P_DIV=p_div, DEP_Q=dep_q, DEP_P=dep_p, COMPUTE=tl_dtype(compute_dtype(logits)),
            W_UP=tl_dtype(compute_dtype(weight)), ACC=tl_dtype(compute_dtype(a)), ESTIMATOR=int(p.estimator),
            TRAINING=bool(p.training), INVERSE=bool(p.inverse), HAS_BIAS=bias is not None,
            GATE_GRID=gates is not None, USE_DOT=a.dtype != torch.float64, INPUT_PRECISION=_input_precision(a.dtype),
            INTERPRET=_INTERPRET_GEMM, BLOCK_M=cfg.block_a, BLOCK_P=cfg.block_b,
            BLOCK_Q=cfg.block_k, GROUP_M=cfg.group, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _group(block_size: int, dep: bool, dim: int, tile: int) -> tuple[int, bool]:
    """(rows of a tile summed into one gate, whether the tile owns its gates exclusively) along one dimension."""
    if not dep:  # one gate along this whole dimension
        return tile, dim <= tile
    if _is_pow2(block_size):
        return min(block_size, tile), block_size <= tile
    return 1, False  # non-power-of-two blocks: per-element atomics


def _mask_grad(grad_out, x, weight, logits, block, in_out: bool, p, needs_weight_grad: bool,
               config: Optional[GemmConfig], fixed_order_mask_grad: Optional[MaskGradFromDwm]):
    """(grad_logits, grad_weight or None) from the fused dWm GEMM with its d(logits) epilogue; where that epilogue
    would sum with atomic adds and ``fixed_order_mask_grad`` is given (deterministic mode), the fixed-order
    fallback instead."""
    rows, cols = weight.shape
    bh, bw, grid_r, grid_c = grid_shape(weight, logits, block)
    a, b = (x, grad_out) if in_out else (grad_out, x)
    if b.dtype != a.dtype:
        b = b.to(a.dtype)
    compute = compute_dtype(logits)
    dep_r, dep_c = grid_r > 1, grid_c > 1
    # Philox per tile element in the epilogue: per-weight gates (or non-power-of-two blocks), or grad_weight.
    per_element = needs_weight_grad or (dep_r and not (bh > 1 and _is_pow2(bh))
                                        and dep_c and not (bw > 1 and _is_pow2(bw)))
    cfg = config or _grad_config(a.dtype, a.device, per_element, a.shape[0])
    g_r, own_r = _group(bh, dep_r, rows, cfg.block_a)
    g_c, own_c = _group(bw, dep_c, cols, cfg.block_b)
    use_atomic = not (own_r and own_c)
    grad_weight = torch.empty((rows, cols), dtype=weight.dtype, device=weight.device) if needs_weight_grad else None
    if use_atomic:
        gl = torch.zeros((grid_r, grid_c), dtype=compute, device=logits.device)
    else:
        gl = torch.empty((grid_r, grid_c), dtype=logits.dtype, device=logits.device)
    if rows * cols == 0:
        return gl.zero_().to(logits.dtype), grad_weight
    if use_atomic and fixed_order_mask_grad is not None:
        return _mask_grad_fixed_order(a, b, weight, logits, block, p, needs_weight_grad, fixed_order_mask_grad)
    grid = (triton.cdiv(rows, cfg.block_a) * triton.cdiv(cols, cfg.block_b),)
    with device_guard(a):
        _mask_grad_kernel[grid](
            a, b, weight, logits, gl, grad_weight if grad_weight is not None else gl, a.shape[0], rows, cols,
            grid_c, a.stride(0), a.stride(1), b.stride(0), b.stride(1), weight.stride(0), weight.stride(1),
            p.seed, p.offset, *param_bits(p),
            BH=bh, BW=bw, DEP_R=dep_r, DEP_C=dep_c, G_R=g_r, G_C=g_c, USE_ATOMIC=use_atomic,
            NEED_GW=needs_weight_grad, COMPUTE=tl_dtype(compute), ACC=tl_dtype(compute_dtype(a)),
            ESTIMATOR=int(p.estimator), TRAINING=bool(p.training), INVERSE=bool(p.inverse),
            USE_DOT=a.dtype != torch.float64, INPUT_PRECISION=_input_precision(a.dtype),
            INTERPRET=_INTERPRET_GRAD, BLOCK_R=cfg.block_a,
            BLOCK_C=cfg.block_b, BLOCK_M=cfg.block_k, GROUP_R=cfg.group, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
    return gl.to(logits.dtype), grad_weight


def _mask_grad_fixed_order(a, b, weight, logits, block, p, needs_weight_grad: bool,
                           mask_grad_from_dwm: MaskGradFromDwm):
    """Deterministic mode's stand-in for an atomic _mask_grad launch, same results up to rounding: dWm = A^T B by
    one library GEMM in the accumulator dtype, then ``mask_grad_from_dwm`` (block sums in a fixed order, the slopes
    by the gate kernel). Costs what the fused epilogue saves: dWm (R x C, float32) in memory once."""
    acc = compute_dtype(a)
    grad_wm = a.to(acc).t() @ b.to(acc)  # (R, C): the weight's layout
    grad_logits, grad_weight, _ = mask_grad_from_dwm(grad_wm, weight, logits, block, p, needs_weight_grad, False)
    return grad_logits.to(logits.dtype), grad_weight


def _masked_matmul(a, weight, logits, bias, block, r_is_q: bool, p, out_dtype, strategy: str,
                   config: Optional[GemmConfig]) -> torch.Tensor:
    """A @ B (+ bias) with B the masked weight read as (Q, P): fused Triton GEMM or materialised W * m + cuBLAS."""
    per_element = logits.numel() == weight.numel()
    gates = None if per_element else gate_forward(logits, p)  # one sample per gate, not per weight
    if _use_fused(a.dtype, strategy):
        return _masked_gemm(a, weight, logits, gates, bias, block, r_is_q, p, out_dtype, config)
    wm = masked_weight(weight, logits, block, p, gates=gates)
    b_mat = wm if r_is_q else wm.t()  # (Q, P)
    out = a @ b_mat if bias is None else torch.addmm(bias.to(a.dtype), a, b_mat)
    return out.to(out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# the backend interface
# ----------------------------------------------------------------------------------------------------------------

def masked_linear_forward(x: torch.Tensor, weight: torch.Tensor, logits: torch.Tensor, bias: Optional[torch.Tensor],
                          block: tuple[int, int], in_out: bool, p, *, strategy: str = "auto",
                          config: Optional[GemmConfig] = None) -> torch.Tensor:
    """y = x (W * m)^T + b for 2-D x (tokens, in); W is (out, in), or (in, out) when ``in_out``; y in x's dtype.

    strategy: "fused" (gates applied per tile inside the Triton GEMM; W * m never written), "materialize"
    (W * m written once in the weight dtype, then cuBLAS) or "auto" (materialize; fused for float64);
    config: tiles of the fused GEMM."""
    return _masked_matmul(x, weight, logits.contiguous(), bias, block, in_out, p, x.dtype, strategy, config)


def masked_linear_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, logits: torch.Tensor,
                           has_bias: bool, block: tuple[int, int], in_out: bool, p, needs_input_grad: bool,
                           needs_weight_grad: bool, *, fixed_order_mask_grad: Optional[MaskGradFromDwm] = None,
                           strategy: str = "auto", config: Optional[GemmConfig] = None,
                           grad_config: Optional[GemmConfig] = None):
    """(grad_x, grad_weight, grad_logits, grad_bias) of masked_linear_forward (fastmask.ref semantics).

    grad_x = grad_out (W * m) as in the forward (``strategy``); grad_logits and grad_weight come from the fused
    dWm kernel (dWm never reaches memory); grad_bias = grad_out.sum(0). ``fixed_order_mask_grad`` (deterministic
    mode; None: atomic adds allowed): the mask gradient from dWm (``MaskGradFromDwm``), run instead of the fused
    kernel where that kernel would sum d(logits) with atomic adds (gate blocks spanning tiles)."""
    logits = logits.contiguous()
    grad_x = None
    if needs_input_grad:
        grad_x = _masked_matmul(grad_out, weight, logits, None, block, not in_out, p, x.dtype, strategy, config)
    grad_logits, grad_weight = _mask_grad(grad_out, x, weight, logits, block, in_out, p, needs_weight_grad,
                                          grad_config, fixed_order_mask_grad)
    grad_bias = grad_out.sum(0, dtype=compute_dtype(grad_out)).to(grad_out.dtype) if has_bias else None
    return grad_x, grad_weight, grad_logits, grad_bias
