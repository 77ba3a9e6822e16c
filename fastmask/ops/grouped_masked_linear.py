"""fastmask::grouped_masked_linear: K masks over one frozen weight, in one call (one mask per row of the batch).

    y = fm.ops.grouped_masked_linear(x, weight, logits, bias, index=idx)   # logits (K, GR, GC), idx (batch,)
    y = fm.ops.grouped_masked_linear(x, weight, logits, bias)              # batch = K equal contiguous groups

Row b of x (its leading dimension) uses mask ``index[b]``; ``index=None`` means x.shape[0] is K equal contiguous
groups, group k using mask k. Mask k is exactly ``masked_linear(x_k, weight, logits[k], bias,
offset=offset + k * GR * GC)``: the stack of grids is one Philox stream (fastmask/ref.py).

Unit, head and layer grids take the unit path (fastmask/ops/gated_units.py): each row's gates scale x before the
GEMM (or its output after it), so all K masks cost the two GEMMs of one masked layer. Other grids:

How it runs (one grouped computation, not K passes): the K masked weights (K, R, C) are built once in the weight
dtype (Triton: one launch for all K; C++: one fused call per mask; no fp32 mask is kept), the tokens are grouped
by mask (a pure reshape for index=None; a stable sort + gather into K groups padded to the largest otherwise),
and one torch.bmm runs the K products. Backward goes one mask at a time, as the single-mask op does: the dWm_k
GEMM (float32 for half dtypes), one fused pass (the backend's ``mask_grad``) for d(logits_k) and W * m_k, then dx_k;
so it keeps one dWm and one masked weight at a time, not K of each. Padding costs K x (largest group) rows instead of
the batch size: balanced batches, or index=None, pay nothing (an index tensor costs one host sync, for the largest
group's size).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from .. import ref
from ._backend import matmul_acc, resolve
from ._common import DEFAULT_GAMMA, DEFAULT_TAU, DEFAULT_ZETA, default_beta, make_params
from ._modes import refuse_nan
from ._validate import check_grouped_masked_linear, check_index_values
from .gated_units import unit_masked_linear

_WHERE = "fastmask.ops.grouped_masked_linear"


class _TokenGroups:
    """Tokens (rows of x flattened to (T, D)) grouped by mask into a (K, G, D) batch, and back.

    index None: the batch is K contiguous groups, a view. Else each token goes to slot ``k * G + rank`` of a
    zero-padded (K * G, D) buffer, ``rank`` its position among the tokens of mask k (stable order), G the largest
    group; ``slots`` maps tokens to those rows for the gather and the scatter.
    """

    def __init__(self, x: torch.Tensor, index: Optional[torch.Tensor], n_masks: int):
        self.n_masks = n_masks
        tokens = x.shape[:-1].numel()
        if index is None:
            self.slots, self.size = None, tokens // n_masks
            return
        token_mask = index.repeat_interleave(tokens // x.shape[0]) if x.shape[0] else index
        counts = torch.bincount(token_mask, minlength=n_masks)
        self.size = int(counts.max()) if tokens else 0
        order = torch.argsort(token_mask, stable=True)
        sorted_mask = token_mask[order]
        first = torch.cumsum(counts, 0) - counts  # first sorted position of each mask
        rank = torch.arange(tokens, device=x.device) - first[sorted_mask]
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


def _as_weight_product(wm: torch.Tensor, in_out: bool) -> torch.Tensor:
    """(K, in, out) views of the masked weights, the right operand of x @ W^T."""
    return wm if in_out else wm.transpose(1, 2)


@torch.library.custom_op("fastmask::grouped_masked_linear", mutates_args=())
def _grouped_masked_linear_op(x: torch.Tensor, weight: torch.Tensor, logits: torch.Tensor,
                              bias: Optional[torch.Tensor], index: Optional[torch.Tensor], estimator: str, seed: int,
                              offset: int, training: bool, inverse: bool, weight_layout: str, block: Sequence[int],
                              beta: float, gamma: float, zeta: float, tau: float) -> torch.Tensor:
    _, out_features, blk, n_masks = check_grouped_masked_linear(x, weight, logits, bias, index, weight_layout,
                                                                tuple(block), _WHERE)
    check_index_values(index, n_masks, _WHERE)
    params = make_params(estimator, seed, offset, beta, gamma, zeta, tau, training, inverse, _WHERE)
    refuse_nan(logits, "logits", _WHERE)
    wm = resolve(x.device).grouped_masked_weight(weight, logits.contiguous(), blk, params)
    groups = _TokenGroups(x, index, n_masks)
    xg = groups.gather(ref.flatten_tokens(x))
    rhs = _as_weight_product(wm, weight_layout == "in_out")
    yg = torch.bmm(xg, rhs) if bias is None else torch.baddbmm(bias, xg, rhs)
    return groups.scatter(yg).reshape(*x.shape[:-1], out_features)


@_grouped_masked_linear_op.register_fake
def _(x, weight, logits, bias, index, estimator, seed, offset, training, inverse, weight_layout, block, beta, gamma,
      zeta, tau):
    _, out_features, _, _ = check_grouped_masked_linear(x, weight, logits, bias, index, weight_layout, tuple(block),
                                                        _WHERE)
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("fastmask::grouped_masked_linear_backward", mutates_args=())
def _grouped_masked_linear_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                       logits: torch.Tensor, has_bias: bool, index: Optional[torch.Tensor],
                                       estimator: str, seed: int, offset: int, training: bool, inverse: bool,
                                       weight_layout: str, block: Sequence[int], beta: float, gamma: float,
                                       zeta: float, tau: float, needs_input_grad: bool, needs_weight_grad: bool
                                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_logits, grad_bias); gradients that were not asked for are empty tensors."""
    n_masks = logits.shape[0]
    blk = tuple(block)
    in_out = weight_layout == "in_out"
    params = make_params(estimator, seed, offset, beta, gamma, zeta, tau, training, inverse, _WHERE)
    backend = resolve(x.device)
    logits = logits.contiguous()
    groups = _TokenGroups(x, index, n_masks)
    dy2 = ref.flatten_tokens(grad_out)
    dyg, xg = groups.gather(dy2), groups.gather(ref.flatten_tokens(x))
    # One mask at a time, as the single-mask backward: dWm_k (float32 from the GEMM for half dtypes), then one fused
    # pass for d(logits_k) and W * m_k, then dx_k. Per-weight temporaries: one dWm, one W * m, not K of each.
    grad_logits = torch.empty(logits.shape, dtype=ref.compute_dtype(logits), device=logits.device)
    grad_xg = torch.empty_like(xg) if needs_input_grad else None
    grad_weight_acc = torch.zeros(weight.shape, dtype=ref.compute_dtype(weight), device=weight.device) \
        if needs_weight_grad else None
    n_gates = logits[0].numel()
    for k in range(n_masks):
        params_k = dataclasses.replace(params, offset=ref.mask_offset(params.offset, k, n_gates))
        grad_wm = matmul_acc(xg[k].t(), dyg[k]) if in_out else matmul_acc(dyg[k].t(), xg[k])
        grad_logits[k], grad_weight_k, wm = backend.mask_grad(grad_wm, weight, logits[k], blk, params_k,
                                                              needs_weight_grad, needs_input_grad)
        if needs_input_grad:
            torch.mm(dyg[k], wm.t() if in_out else wm, out=grad_xg[k])
        if needs_weight_grad:
            grad_weight_acc += grad_weight_k
    grad_x = groups.scatter(grad_xg).reshape(x.shape) if needs_input_grad else x.new_empty(0)
    grad_logits = grad_logits.to(logits.dtype)
    grad_weight = grad_weight_acc.to(weight.dtype) if needs_weight_grad else x.new_empty(0)
    grad_bias = dy2.sum(0).to(grad_out.dtype) if has_bias else x.new_empty(0)
    return grad_x, grad_weight, grad_logits, grad_bias


@_grouped_masked_linear_backward_op.register_fake
def _(grad_out, x, weight, logits, has_bias, index, estimator, seed, offset, training, inverse, weight_layout, block,
      beta, gamma, zeta, tau, needs_input_grad, needs_weight_grad):
    return (torch.empty_like(x, memory_format=torch.contiguous_format) if needs_input_grad else x.new_empty(0),
            torch.empty_like(weight, memory_format=torch.contiguous_format) if needs_weight_grad else x.new_empty(0),
            torch.empty_like(logits, memory_format=torch.contiguous_format),
            grad_out.new_empty(grad_out.shape[-1]) if has_bias else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, logits, bias, index, *scalars = inputs
    ctx.save_for_backward(x, weight, logits, index)
    ctx.has_bias = bias is not None
    ctx.scalars = scalars


def _backward(ctx, grad_out):
    x, weight, logits, index = ctx.saved_tensors
    needs_x, needs_weight, needs_logits, needs_bias = ctx.needs_input_grad[:4]
    grad_x, grad_weight, grad_logits, grad_bias = _grouped_masked_linear_backward_op(
        grad_out, x, weight, logits, ctx.has_bias, index, *ctx.scalars, needs_x, needs_weight)
    return ((grad_x if needs_x else None), (grad_weight if needs_weight else None),
            (grad_logits if needs_logits else None), (grad_bias if needs_bias else None), None) \
        + (None,) * len(ctx.scalars)


_grouped_masked_linear_op.register_autograd(_backward, setup_context=_setup_context)


def grouped_masked_linear(x: torch.Tensor, weight: torch.Tensor, logits: torch.Tensor,
                          bias: Optional[torch.Tensor] = None, *, index: Optional[torch.Tensor] = None,
                          estimator: str = "hard_concrete", seed: int = 0, offset: int = 0, training: bool = True,
                          inverse: bool = False, weight_layout: str = "out_in", block: Optional[Sequence[int]] = None,
                          beta: Optional[float] = None, gamma: float = DEFAULT_GAMMA, zeta: float = DEFAULT_ZETA,
                          tau: float = DEFAULT_TAU) -> torch.Tensor:
    """K masked linear layers over one weight in one call: ``y[b] = x[b] (W * m_{index[b]})^T + bias``.

    x: (batch, ..., in_features). weight: (out, in) (``weight_layout="out_in"``) or (in, out) (``"in_out"``, GPT-2
    Conv1D), read in place. logits (float32, trainable): a stack (K, GR, GC) of gate grids in the weight's layout,
    one per mask, every granularity of ``masked_linear`` (``block`` inferred when it divides the weight). index:
    LongTensor (batch,) of mask numbers in [0, K), or None: the batch is K equal contiguous groups, group k using
    mask k (a pure reshape, no gather). Mask k equals ``masked_linear(..., logits[k], offset=offset + k * GR * GC)``
    exactly. Gradients flow to x, logits (per mask) and bias; to weight only if it requires grad.
    """
    _, _, blk, _ = check_grouped_masked_linear(x, weight, logits, bias, index, weight_layout, block, _WHERE)
    beta = default_beta(estimator, beta)
    make_params(estimator, seed, offset, beta, gamma, zeta, tau, training, inverse, _WHERE)
    axis = ref.unit_axis(logits.shape[1:], weight_layout)
    if axis is not None:  # whole units, heads or the layer: every mask in the same two GEMMs, no masked weights
        token_mask = None if index is None else index.repeat_interleave(x.shape[1:-1].numel())
        return unit_masked_linear(x, weight, logits, bias, axis, blk, weight_layout, estimator, seed, offset,
                                  bool(training), bool(inverse), beta, float(gamma), float(zeta), float(tau),
                                  token_mask=token_mask)
    return _grouped_masked_linear_op(x, weight, logits, bias, index, estimator, seed, offset, bool(training),
                                     bool(inverse), weight_layout, list(blk), beta, float(gamma), float(zeta),
                                     float(tau))
