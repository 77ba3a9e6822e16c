"""Backward steps composed of a backend's primitives and torch ops, shared by the backends that have no fused
kernel for them (fastmask/ops/_backend.py says which backend uses which).

  matmul_acc                  a GEMM whose float32 result feeds a mask gradient (half dtypes)
  composed_mask_grad          MaskBackend.mask_grad: d(logits), dWm * m and W * m from dWm with the gate kernels
  composed_masked_weight_and_slope  MaskBackend.masked_weight_and_slope from the gate kernels
  TokenGroups                 the tokens of K masks grouped into one (K, G, D) batch (the grouped op's bmm)
  composed_grouped_backward   MaskBackend.grouped_masked_linear_backward: one mask at a time through mask_grad
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import ref
from .._params import GateParams
from ._interface import MaskBackend



def matmul_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result for half dtypes (float32 / float64 operands: their own dtype), for GEMMs whose
    output feeds a mask gradient (a sum over tokens or weights that must not start from 8-11-bit values). CUDA:
    cuBLAS writes float32 directly (torch.mm's out_dtype, torch >= 2.8); CPUs have no such kernel and multiply the
    operands in float32."""
    acc = ref.compute_dtype(a)
    if a.dtype == acc:
        return a @ b
    if a.is_cuda and hasattr(torch.ops.aten.mm, "dtype"):
        return torch.mm(a, b, out_dtype=acc)
    return a.to(acc) @ b.to(acc)


def composed_mask_grad(backend: MaskBackend, grad_wm, weight, logits, block, p: GateParams, needs_weight_grad: bool,
                       needs_masked_weight: bool):
    """(grad_logits, grad_weight or None, W * m or None) from dWm (float32 / float64, the weight's layout) with the
    backend's gate kernels and torch ops: the block sums of dWm * W times the gates' slope; dWm * m; W * m."""
    gates = backend.gate_forward(logits, p)
    grad_gates = ref.reduce_to_grid(grad_wm * weight.to(grad_wm.dtype), block, logits.shape).to(gates.dtype)
    grad_logits = backend.gate_backward(grad_gates, logits, p)
    grad_weight = ref.apply_gates(grad_wm, gates, block).to(weight.dtype) if needs_weight_grad else None
    masked = ref.apply_gates(weight, gates, block) if needs_masked_weight else None
    return grad_logits, grad_weight, masked


def composed_masked_weight_and_slope(backend: MaskBackend, weight, logits, block, p: GateParams):
    """MaskBackend.masked_weight_and_slope from the backend's gate kernels: the gates, and their slopes as the gate
    backward of ones (each gate evaluated twice: backends without a fused kernel pay it in the forward)."""
    gates = backend.gate_forward(logits, p)
    slope = backend.gate_backward(torch.ones_like(gates), logits, p)
    return ref.apply_gates(weight, gates, block).contiguous(), slope


class TokenGroups:
    """Tokens (rows of x flattened to (T, D)) grouped by mask into a (K, G, D) batch, and back.

    token_mask None: the T tokens are K contiguous groups, a view. Else each token goes to slot ``k * G + rank`` of
    a zero-padded (K * G, D) buffer, ``k = token_mask[token]``, ``rank`` its position among the tokens of mask k
    (stable order), G the largest group (one host sync); ``slots`` maps tokens to those rows for the gather and
    the scatter.
    """

    def __init__(self, token_mask: Optional[torch.Tensor], n_masks: int, tokens: int):
        self.n_masks = n_masks
        if token_mask is None:
            self.slots, self.size = None, tokens // n_masks
            return
        counts = torch.bincount(token_mask, minlength=n_masks)
        self.size = int(counts.max()) if tokens else 0
        order = torch.argsort(token_mask, stable=True)
        sorted_mask = token_mask[order]
        first = torch.cumsum(counts, 0) - counts  # first sorted position of each mask
        rank = torch.arange(tokens, device=token_mask.device) - first[sorted_mask]
        self.slots = torch.empty_like(token_mask)
        self.slots[order] = sorted_mask * self.size + rank

    def gather(self, t2: torch.Tensor) -> torch.Tensor:
        """(T, D) -> (K, G, D)."""
        if self.slots is None:
            return t2.reshape(self.n_masks, self.size, t2.shape[-1])
        out = t2.new_zeros(self.n_masks * self.size, t2.shape[-1])
        out.index_copy_(0, self.slots, t2)
        return out.view(self.n_masks, self.size, t2.shape[-1])

    def scatter(self, tg: torch.Tensor) -> torch.Tensor:
        """(K, G, D) -> (T, D), the inverse of gather."""
        flat = ref.flatten_tokens(tg)
        return flat if self.slots is None else flat.index_select(0, self.slots)


def composed_grouped_backward(backend: MaskBackend, grad_out, x, weight, logits, has_bias: bool,
                              token_mask: Optional[torch.Tensor], block, in_out: bool, p: GateParams,
                              needs_input_grad: bool, needs_weight_grad: bool):
    """MaskBackend.grouped_masked_linear_backward from the backend's mask_grad: one mask at a time, as the
    single-mask backward: dWm_k (float32 from the GEMM for half dtypes), one mask_grad call for d(logits_k) and
    W * m_k, then dx_k. Per-weight temporaries: one dWm, one W * m, not K of each; the tokens grouped once."""
    n_masks, n_gates = logits.shape[0], logits[0].numel()
    groups = TokenGroups(token_mask, n_masks, x.shape[0])
    dyg, xg = groups.gather(grad_out), groups.gather(x)
    grad_logits = torch.empty(logits.shape, dtype=ref.compute_dtype(logits), device=logits.device)
    grad_xg = torch.empty_like(xg) if needs_input_grad else None
    grad_weight = torch.zeros(weight.shape, dtype=ref.compute_dtype(weight), device=weight.device) \
        if needs_weight_grad else None
    for k in range(n_masks):
        grad_wm = matmul_acc(xg[k].t(), dyg[k]) if in_out else matmul_acc(dyg[k].t(), xg[k])
        grad_logits[k], grad_weight_k, wm = backend.mask_grad(grad_wm, weight, logits[k], block,
                                                              ref.mask_params(p, k, n_gates), needs_weight_grad,
                                                              needs_input_grad)
        if needs_input_grad:
            torch.mm(dyg[k], wm.t() if in_out else wm, out=grad_xg[k])
        if needs_weight_grad:
            grad_weight += grad_weight_k
    grad_x = groups.scatter(grad_xg) if needs_input_grad else None
    grad_bias = grad_out.sum(0) if has_bias else None
    return grad_x, grad_weight, grad_logits, grad_bias
