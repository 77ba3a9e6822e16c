"""Triton kernels of fastmask.ops.gate (forward and backward) and of the masked weight W * m.

Design: elementwise kernels over the gate grid (flat index j = the noise counter offset + j); backward
regenerates the noise instead of reading saved noise. ``_masked_weight_kernel`` writes W * m in the weight's dtype
for the "materialise once" path of masked_linear (the fused GEMMs in masked_linear.py never write it), and the K
masked weights of grouped_masked_linear in one launch (program axis 2 is the mask k: grid k of the stack, its
noise at counter offset + k * GR * GC, as the stack is one Philox stream).
Limits: logits/grad are read as contiguous (the wrappers call .contiguous()); math in float32, or float64 for
float64 logits; outputs are in that compute dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._gate_math import NO_SPECIALIZE, _cast, _f64_param, _gate_slope, _gates_at, compute_dtype, device_guard, \
    interpreted, param_bits, tl_dtype

_BLOCK = 1024


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _gate_fwd_kernel(
    logits_ptr,  # logits, contiguous, n elements, any float dtype
    z_ptr,  # gates out, contiguous, compute dtype
    n,  # number of gates
    seed,  # Philox key
    offset,  # noise counter of gate 0
    beta_bits, gamma_bits, zg_bits, tau_bits,  # float64 bit patterns of beta, gamma, zeta - gamma, tau
    COMPUTE: tl.constexpr,  # tl.float32 or tl.float64
    ESTIMATOR: tl.constexpr,  # 0 hard_concrete, 1 gumbel_sigmoid_st, 2 threshold_st, 3 bernoulli_st
    TRAINING: tl.constexpr,  # stochastic (training) or deterministic (eval) gates
    INVERSE: tl.constexpr,  # 1 - z
    BLOCK: tl.constexpr,  # gates per program
):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = j < n
    l = tl.load(logits_ptr + j, mask=mask, other=0.0).to(COMPUTE)
    z, _ = _gate_slope(l, seed, j + offset, _f64_param(beta_bits, COMPUTE), _f64_param(gamma_bits, COMPUTE),
                       _f64_param(zg_bits, COMPUTE), _f64_param(tau_bits, COMPUTE), ESTIMATOR, TRAINING, INVERSE)
    tl.store(z_ptr + j, z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _gate_bwd_kernel(
    grad_ptr,  # d(loss)/d(gates), contiguous, n elements, any float dtype
    logits_ptr,  # logits, contiguous, n elements
    out_ptr,  # d(loss)/d(logits) out, contiguous, compute dtype
    n,  # number of gates
    seed,  # Philox key
    offset,  # noise counter of gate 0
    beta_bits, gamma_bits, zg_bits, tau_bits,  # float64 bit patterns of beta, gamma, zeta - gamma, tau
    COMPUTE: tl.constexpr,  # tl.float32 or tl.float64
    ESTIMATOR: tl.constexpr,  # estimator code
    TRAINING: tl.constexpr,  # training (regenerates the noise) or eval
    INVERSE: tl.constexpr,  # negate the slope
    BLOCK: tl.constexpr,  # gates per program
):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = j < n
    l = tl.load(logits_ptr + j, mask=mask, other=0.0).to(COMPUTE)
    g = tl.load(grad_ptr + j, mask=mask, other=0.0).to(COMPUTE)
    _, slope = _gate_slope(l, seed, j + offset, _f64_param(beta_bits, COMPUTE), _f64_param(gamma_bits, COMPUTE),
                           _f64_param(zg_bits, COMPUTE), _f64_param(tau_bits, COMPUTE), ESTIMATOR, TRAINING,
                           INVERSE)
    tl.store(out_ptr + j, (g * slope).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _masked_weight_kernel(
    w_ptr,  # weight (R, C), any strides
    gates_ptr,  # logits grids (K, GR, GC), or their gates z (GATE_GRID), contiguous; K = 1 for one mask
    out_ptr,  # W * m_k out, (K, R, C) contiguous, weight dtype
    R, C,  # weight shape
    GC,  # gate-grid columns: gate of (r, c) is (r // BH) * GC + c // BW within a mask's grid
    N_GATES,  # gates per mask (GR * GC): mask k's grid starts at k * N_GATES, its noise at offset + k * N_GATES
    stride_wr, stride_wc,  # weight strides
    seed, offset,  # noise stream
    beta_bits, gamma_bits, zg_bits, tau_bits,  # float64 bit patterns of the estimator parameters
    BH: tl.constexpr, BW: tl.constexpr,  # gate block
    DEP_R: tl.constexpr, DEP_C: tl.constexpr,  # whether the gate grid has more than one row / column
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
    first_gate = k * N_GATES  # mask k's grid within the stack, and its noise counter
    z = _gates_at(gates_ptr + first_gate, gr[:, None] + gc[None, :], mask, seed, offset + first_gate,
                  _f64_param(beta_bits, COMPUTE), _f64_param(gamma_bits, COMPUTE), _f64_param(zg_bits, COMPUTE),
                  _f64_param(tau_bits, COMPUTE), COMPUTE, ESTIMATOR, TRAINING, INVERSE, GATE_GRID)
    wm = _cast(w.to(W_UP) * z.to(W_UP), out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out_ptr + k * R * C + offs_r.to(tl.int64)[:, None] * C + offs_c[None, :], wm, mask=mask)


def _launch_elementwise(kernel, tensors, n, p, compute):
    block = _BLOCK if tensors[0].device.type == "cuda" else 256
    with device_guard(tensors[0]):
        kernel[(triton.cdiv(n, block),)](*tensors, n, p.seed, p.offset, *param_bits(p), COMPUTE=tl_dtype(compute),
                                         ESTIMATOR=int(p.estimator), TRAINING=bool(p.training),
                                         INVERSE=bool(p.inverse), BLOCK=block)


def gate_forward(logits: torch.Tensor, p) -> torch.Tensor:
    """Gates z of ``logits`` (any shape) under GateParams ``p``, in the compute dtype (fastmask.ref.gate_ref)."""
    logits = logits.contiguous()
    compute = compute_dtype(logits)
    z = torch.empty(logits.shape, dtype=compute, device=logits.device)
    if logits.numel():
        _launch_elementwise(_gate_fwd_kernel, (logits, z), logits.numel(), p, compute)
    return z


def gate_backward(grad_gates: torch.Tensor, logits: torch.Tensor, p) -> torch.Tensor:
    """d(loss)/d(logits) in the compute dtype given d(loss)/d(gates) (fastmask.ref.gate_backward_ref)."""
    logits = logits.contiguous()
    grad_gates = grad_gates.expand(logits.shape).contiguous()
    compute = compute_dtype(logits)
    out = torch.empty(logits.shape, dtype=compute, device=logits.device)
    if logits.numel():
        _launch_elementwise(_gate_bwd_kernel, (grad_gates, logits, out), logits.numel(), p, compute)
    return out


_INTERPRET_MW = interpreted(_masked_weight_kernel)

# (BLOCK_R, BLOCK_C, num_warps) of _masked_weight_kernel on GPUs (16 elements a thread keeps Philox in registers;
# H100, 4096 x 4096 bf16 per-weight gates: 0.104 ms vs 0.145 ms for (32, 128, 4) and 0.175 ms for (64, 128, 8)).
MASKED_WEIGHT_TILE = (16, 128, 4)


def grid_shape(weight: torch.Tensor, logits: torch.Tensor, block) -> tuple[int, int, int, int]:
    """(bh, bw, grid rows, grid cols), checked: the kernels index the gate grid without bounds checks, so a grid
    that does not fit the weight would read out of bounds (an illegal memory access on a GPU)."""
    rows, cols = weight.shape
    bh, bw = int(block[0]), int(block[1])
    if logits.dim() != 2 or bh < 1 or bw < 1 or tuple(logits.shape) != (triton.cdiv(rows, bh), triton.cdiv(cols, bw)):
        raise ValueError(f"fastmask.kernels: logits grid {tuple(logits.shape)} does not match weight "
                         f"{tuple(weight.shape)} with block {(bh, bw)}")
    return bh, bw, logits.shape[0], logits.shape[1]


def masked_weight(weight: torch.Tensor, logits: torch.Tensor, block: tuple[int, int], p, tile=None,
                  gates: torch.Tensor | None = None) -> torch.Tensor:
    """W * m (contiguous, weight dtype and layout; fastmask.ref.masked_weight_ref) from the gate grid ``logits``.

    Block / unit grids first sample their gates once per gate (``gates``, computed here unless given), so the
    per-weight pass only reads them; per-weight grids regenerate the noise per element."""
    return _masked_weights(weight, logits.contiguous()[None], block, p, tile,
                           None if gates is None else gates[None])[0]


def grouped_masked_weight(weight: torch.Tensor, logits: torch.Tensor, block: tuple[int, int], p, tile=None
                          ) -> torch.Tensor:
    """W * m_k for every mask k of the stack ``logits`` (K, GR, GC): (K, R, C) contiguous, weight dtype and layout
    (fastmask.ref.grouped_masked_weight_ref), in one launch (plus one gate launch over the whole stack for block /
    unit grids)."""
    return _masked_weights(weight, logits.contiguous(), block, p, tile, None)


def _masked_weights(weight, stack, block, p, tile, gates):
    """(K, R, C) masked weights of a contiguous (K, GR, GC) stack of gate grids: one launch, program axis 2 = k."""
    n_masks = stack.shape[0]
    rows, cols = weight.shape
    _, _, grid_r, grid_c = grid_shape(weight, stack[0], block)
    out = torch.empty((n_masks, rows, cols), dtype=weight.dtype, device=weight.device)
    if out.numel() == 0:
        return out
    use_grid = grid_r * grid_c < rows * cols
    if use_grid and gates is None:
        gates = gate_forward(stack, p)  # the whole stack: one noise stream, one launch
    cuda = weight.device.type == "cuda"
    block_r, block_c, num_warps = tile or (MASKED_WEIGHT_TILE if cuda else (16, 16, 1))
    with device_guard(weight):
        _masked_weight_kernel[(triton.cdiv(rows, block_r), triton.cdiv(cols, block_c), n_masks)](
            weight, gates if use_grid else stack, out, rows, cols, grid_c, grid_r * grid_c, weight.stride(0),
            weight.stride(1), p.seed, p.offset, *param_bits(p), BH=int(block[0]), BW=int(block[1]),
            DEP_R=grid_r > 1, DEP_C=grid_c > 1, COMPUTE=tl_dtype(compute_dtype(stack)),
            W_UP=tl_dtype(compute_dtype(weight)), ESTIMATOR=int(p.estimator), TRAINING=bool(p.training),
            INVERSE=bool(p.inverse), GATE_GRID=use_grid, INTERPRET=_INTERPRET_MW, BLOCK_R=block_r, BLOCK_C=block_c,
            num_warps=num_warps)
    return out
