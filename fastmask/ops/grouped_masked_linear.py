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
by mask (``_composed.TokenGroups``: a pure reshape for index=None; a stable sort + gather into K groups padded to
the largest otherwise), and one torch.bmm runs the K products. Backward is the backend's
``grouped_masked_linear_backward`` (every backend today: ``_composed.composed_grouped_backward``), one mask at a
time as the single-mask op does: the dWm_k GEMM (float32 for half dtypes), one fused pass (the backend's
``mask_grad``) for d(logits_k) and W * m_k, then dx_k; so it keeps one dWm and one masked weight at a time, not K of
each. Padding costs K x (largest group) rows instead of the batch size: balanced batches, or index=None, pay nothing
(an index tensor costs one host sync, for the largest group's size).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import ref
from ._backend import resolve
from ._common import DEFAULT_GAMMA, DEFAULT_TAU, DEFAULT_ZETA, asked_grads, default_beta, make_params
from ._composed import TokenGroups
from ._modes import refuse_nan
from ._validate import check_grouped_masked_linear, check_index_values
from .gated_units import unit_masked_linear

_WHERE = "fastmask.ops.grouped_masked_linear"


def _token_mask(x: torch.Tensor, index: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The mask of every token (row of x flattened to (T, D)): ``index`` (one per row of x's leading dimension)
    repeated over each row's tokens; None for index None (K equal contiguous groups)."""
    return None if index is None else index.repeat_interleave(x.shape[1:-1].numel())


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
    x2 = ref.flatten_tokens(x)
    groups = TokenGroups(_token_mask(x, index), n_masks, x2.shape[0])
    xg = groups.gather(x2)
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
    params = make_params(estimator, seed, offset, beta, gamma, zeta, tau, training, inverse, _WHERE)
    grad_x, grad_weight, grad_logits, grad_bias = resolve(x.device).grouped_masked_linear_backward(
        ref.flatten_tokens(grad_out), ref.flatten_tokens(x), weight, logits.contiguous(), has_bias,
        _token_mask(x, index), tuple(block), weight_layout == "in_out", params, needs_input_grad, needs_weight_grad)
    return (grad_x.reshape(x.shape) if needs_input_grad else x.new_empty(0),
            grad_weight.to(weight.dtype) if needs_weight_grad else x.new_empty(0),
            grad_logits.to(logits.dtype),
            grad_bias.to(grad_out.dtype) if has_bias else x.new_empty(0))


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
    needs_x, needs_weight = ctx.needs_input_grad[:2]
    grads = _grouped_masked_linear_backward_op(grad_out, x, weight, logits, ctx.has_bias, index, *ctx.scalars,
                                               needs_x, needs_weight)
    return asked_grads(ctx.needs_input_grad, grads)


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
        return unit_masked_linear(x, weight, logits, bias, axis, blk, weight_layout, estimator, seed, offset,
                                  bool(training), bool(inverse), beta, float(gamma), float(zeta), float(tau),
                                  token_mask=_token_mask(x, index))
    return _grouped_masked_linear_op(x, weight, logits, bias, index, estimator, seed, offset, bool(training),
                                     bool(inverse), weight_layout, list(blk), beta, float(gamma), float(zeta),
                                     float(tau))
