"""fastmask::gated_units: y = x * z[feature // group] + b, unit gates sampled inside the op; and the unit-gate path
of masked_linear built on it.

Why a separate op: a gate that covers whole input or output units (units, heads, a layer) needs neither a masked
weight nor a weight-gradient GEMM. Input units: y = (x * z) W^T; the backward of the GEMM gives g = dy W and this
op's backward gives dx = g * z and dz = sum_t x * g. Output units: y = (x W^T) * z + b; dx = (dy * z) W and
dz = sum_t dy * (x W^T). Two GEMMs per step, one fewer than fine-tuning the layer, and the gates are evaluated
once in forward and once (their slope) in backward, O(units) each.

Memory kept between forward and backward: the op's input (x for input units, which every masked layer keeps
anyway; the pre-gate GEMM output x W^T, tokens x out in the activation dtype, for output units) and the logits.
The noise of gate j is ``uniform(seed, offset + j)`` as for every gate grid, so the results equal those of the
masked-weight path of ``masked_linear`` on the same grid (the tests compare them).

Eager calls with plain tensors run the ops' ``torch.autograd.Function`` twins, built from the same implementation
functions, which also keep the forward's gates (O(gates) bytes) for the backward (``_common.eager_function``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import ref
from ._backend import resolve
from ._common import (DEFAULT_GAMMA, DEFAULT_TAU, DEFAULT_ZETA, asked_grads, default_beta, eager_function,
                      make_params)
from ._composed import matmul_acc
from ._modes import refuse_nan
from ._validate import check_float_tensor, check_index_values, check_same_device

_WHERE = "fastmask.ops.gated_units"
_WHERE_LINEAR = "fastmask.ops.masked_linear"


def _check(x, logits, group, bias, where=_WHERE) -> None:
    check_float_tensor(x, "x", where)
    check_float_tensor(logits, "logits", where)
    if bias is not None:
        check_float_tensor(bias, "bias", where)
    check_same_device(where, x=x, logits=logits, bias=bias)
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"{where}: group must be a positive int (features per gate), got {group!r}")
    if x.dim() < 1:
        raise ValueError(f"{where}: x must have a feature dimension, got a 0-d tensor")
    features = x.shape[-1]
    if logits.numel() != -(-features // group):
        raise ValueError(f"{where}: logits must hold ceil(features / group) = ceil({features} / {group}) = "
                         f"{-(-features // group)} gates for x of shape {list(x.shape)}, got {logits.numel()} "
                         f"(shape {list(logits.shape)})")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != features):
        raise ValueError(f"{where}: bias must have shape [{features}], got {list(bias.shape)}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"{where}: bias must have the dtype of x ({x.dtype}), got {bias.dtype}")


def _gated_forward(x, logits, bias, group: int, params) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, gates) of gated_units (arguments validated), shared by the custom op and its eager twin."""
    refuse_nan(logits, "logits", _WHERE)
    gates = resolve(x.device).gate_forward(logits.reshape(-1).contiguous(), params)
    return ref.scale_units(x, gates, group, bias), gates


def _gated_grads(grad_out, x, logits, gates, has_bias: bool, group: int, params, needs_input_grad: bool):
    """(grad_x, grad_logits, grad_bias) of gated_units from the forward's gates; gradients that were not asked for
    are empty tensors."""
    flat_logits = logits.reshape(-1).contiguous()
    grad_x = x.new_empty(0)
    if needs_input_grad:
        grad_x = ref.scale_units(grad_out, gates, group)
    # d(gate j): float32 (float64) sum over tokens and the group's features, as the masked-weight path's dWm * W.
    grad_gates = ref.reduce_units(grad_out.to(ref.compute_dtype(grad_out)) * x.to(ref.compute_dtype(x)), group,
                                  flat_logits.shape[0])[0]
    grad_logits = resolve(x.device).gate_backward(grad_gates.to(ref.compute_dtype(logits)), flat_logits, params)
    grad_bias = ref.flatten_tokens(grad_out).sum(0).to(grad_out.dtype) if has_bias else x.new_empty(0)
    return grad_x, grad_logits.reshape(logits.shape).to(logits.dtype), grad_bias


@torch.library.custom_op("fastmask::gated_units", mutates_args=())
def _gated_units_op(x: torch.Tensor, logits: torch.Tensor, bias: Optional[torch.Tensor], group: int,
                    estimator: str, seed: int, offset: int, training: bool, inverse: bool, beta: float, gamma: float,
                    zeta: float, tau: float) -> torch.Tensor:
    _check(x, logits, group, bias)
    params = make_params(estimator, seed, offset, beta, gamma, zeta, tau, training, inverse, _WHERE)
    return _gated_forward(x, logits, bias, group, params)[0]


@_gated_units_op.register_fake
def _(x, logits, bias, group, estimator, seed, offset, training, inverse, beta, gamma, zeta, tau):
    _check(x, logits, group, bias)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastmask::gated_units_backward", mutates_args=())
def _gated_units_backward_op(grad_out: torch.Tensor, x: torch.Tensor, logits: torch.Tensor, has_bias: bool,
                             group: int, estimator: str, seed: int, offset: int, training: bool, inverse: bool,
                             beta: float, gamma: float, zeta: float, tau: float, needs_input_grad: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_logits, grad_bias); gradients that were not asked for are empty tensors. The gates are
    regenerated from (seed, offset): O(gates) work."""
    params = make_params(estimator, seed, offset, beta, gamma, zeta, tau, training, inverse, _WHERE)
    gates = resolve(x.device).gate_forward(logits.reshape(-1).contiguous(), params)
    return _gated_grads(grad_out, x, logits, gates, has_bias, group, params, needs_input_grad)


@_gated_units_backward_op.register_fake
def _(grad_out, x, logits, has_bias, group, estimator, seed, offset, training, inverse, beta, gamma, zeta, tau,
      needs_input_grad):
    return (torch.empty_like(x, memory_format=torch.contiguous_format) if needs_input_grad else x.new_empty(0),
            torch.empty_like(logits, memory_format=torch.contiguous_format),
            grad_out.new_empty(grad_out.shape[-1]) if has_bias else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, logits, bias, *scalars = inputs
    ctx.save_for_backward(x, logits)
    ctx.has_bias = bias is not None
    ctx.scalars = scalars


def _backward(ctx, grad_out):
    x, logits = ctx.saved_tensors
    grads = _gated_units_backward_op(grad_out, x, logits, ctx.has_bias, *ctx.scalars, ctx.needs_input_grad[0])
    return asked_grads(ctx.needs_input_grad, grads)


_gated_units_op.register_autograd(_backward, setup_context=_setup_context)


class _GatedUnitsFunction(torch.autograd.Function):
    """The eager twin of fastmask::gated_units (``_common.eager_function`` says when it runs): ``_gated_forward`` /
    ``_gated_grads`` behind one Python layer, the forward's gates kept (O(gates) bytes)."""

    @staticmethod
    def forward(ctx, x, logits, bias, group, params):
        y, gates = _gated_forward(x, logits, bias, group, params)
        ctx.save_for_backward(x, logits, gates)
        ctx.config = (bias is not None, group, params)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, logits, gates = ctx.saved_tensors
        has_bias, group, params = ctx.config
        grads = _gated_grads(grad_out, x, logits, gates, has_bias, group, params, ctx.needs_input_grad[0])
        return asked_grads(ctx.needs_input_grad, grads)


def gated_units(x: torch.Tensor, logits: torch.Tensor, bias: Optional[torch.Tensor] = None, *, group: int = 1,
                estimator: str = "hard_concrete", seed: int = 0, offset: int = 0, training: bool = True,
                inverse: bool = False, beta: Optional[float] = None, gamma: float = DEFAULT_GAMMA,
                zeta: float = DEFAULT_ZETA, tau: float = DEFAULT_TAU) -> torch.Tensor:
    """Gate the features of ``x`` (its last dimension) by unit gates: ``y = x * z[feature // group] + bias``.

    logits: ceil(features / group) gates (any shape holding that many; float32, trainable), gate j drawing
    ``uniform(seed, offset + j)``; ``group`` consecutive features share a gate (a head of ``group`` = head_dim
    features), the last group may be partial. Gradients flow to x, logits and bias. Hidden-unit masks on
    activations, and the unit / head / layer masks of ``masked_linear`` (which needs no masked weight for them).
    """
    _check(x, logits, group, bias)
    beta = default_beta(estimator, beta)
    params = make_params(estimator, seed, offset, beta, gamma, zeta, tau, training, inverse, _WHERE)
    if eager_function(x, logits, bias):
        return _GatedUnitsFunction.apply(x, logits, bias, group, params)
    return _gated_units_op(x, logits, bias, group, estimator, seed, offset, bool(training), bool(inverse), beta,
                           float(gamma), float(zeta), float(tau))


def _row_gates(gates: torch.Tensor, n_masks: int, token_mask: Optional[torch.Tensor], rows: int) -> torch.Tensor:
    """The gate vector of every row: (G,) for one mask; (rows, G) for K masks (rows in K contiguous groups, or row r
    using mask ``token_mask[r]``)."""
    stack = gates.view(n_masks, -1)
    if n_masks == 1:
        return stack[0]
    if token_mask is None:
        return stack.repeat_interleave(rows // n_masks, dim=0)
    return stack.index_select(0, token_mask)


def _unit_forward(x, weight, logits, bias, token_mask, gate_outputs: bool, group: int, weight_layout: str,
                  params) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, y_pre, gates): the forward of the unit path, shared by the custom op and its eager twin. y_pre = x W^T
    (what the backward of output-unit gates needs; an empty tensor for input-unit gates); gates: the flat gate
    vector of every mask (O(gates) bytes: the eager twin keeps it for the backward)."""
    refuse_nan(logits, "logits", _WHERE_LINEAR)
    n_masks = logits.shape[0] if logits.dim() == 3 else 1
    check_index_values(token_mask, n_masks, "fastmask.ops.grouped_masked_linear")  # index values: reads them
    x2 = ref.flatten_tokens(x)
    gates = resolve(x.device).gate_forward(logits.reshape(-1).contiguous(), params)
    row_gates = _row_gates(gates, n_masks, token_mask, x2.shape[0])
    w = weight if weight_layout == "out_in" else weight.t()
    if gate_outputs:
        y_pre = F.linear(x2, w)
        y = ref.scale_units(y_pre, row_gates, group, bias)
    else:
        y_pre = x.new_empty(0)
        y = F.linear(ref.scale_units(x2, row_gates, group), w, bias)
    return y.reshape(*x.shape[:-1], y.shape[-1]), y_pre, gates


def _unit_grads(grad_out, x, weight, logits, y_pre, gates, has_bias: bool, token_mask, gate_outputs: bool, group: int,
                weight_layout: str, params, needs_input_grad: bool, needs_weight_grad: bool):
    """(grad_x, grad_weight, grad_logits, grad_bias) of the unit path from the forward's gates; gradients that were
    not asked for are empty tensors (distinct ones: custom-op outputs may not alias)."""
    backend = resolve(x.device)
    n_masks = logits.shape[0] if logits.dim() == 3 else 1
    dy, x2 = ref.flatten_tokens(grad_out), ref.flatten_tokens(x)
    row_gates = _row_gates(gates, n_masks, token_mask, x2.shape[0])
    w = weight if weight_layout == "out_in" else weight.t()
    acc = ref.compute_dtype(x)
    grad_x, grad_weight = x.new_empty(0), x.new_empty(0)
    if gate_outputs:  # y = (x W^T) * z + b
        dy_gated = ref.scale_units(dy, row_gates, group) if (needs_input_grad or needs_weight_grad) else None
        per_unit = dy.to(acc) * y_pre.to(acc)
        if needs_input_grad:
            grad_x = (dy_gated @ w).reshape(x.shape)
        if needs_weight_grad:
            grad_weight = dy_gated.t() @ x2
    else:  # y = (x * z) W^T + b
        g = matmul_acc(dy, w)  # dL/d(x * z), float32 for half dtypes
        per_unit = x2.to(acc) * g.to(acc)
        if needs_input_grad:
            grad_x = ref.scale_units(g, row_gates, group).to(x.dtype).reshape(x.shape)
        if needs_weight_grad:
            grad_weight = dy.t() @ ref.scale_units(x2, row_gates, group)
    if needs_weight_grad and weight_layout == "in_out":
        grad_weight = grad_weight.t()
    grad_gates = ref.reduce_units(per_unit, group, gates.shape[0] // n_masks, n_masks, token_mask)
    grad_logits = backend.gate_backward(grad_gates.reshape(-1).to(gates.dtype), logits.reshape(-1).contiguous(),
                                        params)
    grad_logits = grad_logits.reshape(logits.shape).to(logits.dtype)
    grad_bias = dy.sum(0) if has_bias else x.new_empty(0)
    return grad_x, grad_weight.contiguous() if needs_weight_grad else grad_weight, grad_logits, grad_bias


@torch.library.custom_op("fastmask::unit_masked_linear", mutates_args=())
def _unit_masked_linear_op(x: torch.Tensor, weight: torch.Tensor, logits: torch.Tensor, bias: Optional[torch.Tensor],
                           token_mask: Optional[torch.Tensor], gate_outputs: bool, group: int, weight_layout: str,
                           estimator: str, seed: int, offset: int, training: bool, inverse: bool, beta: float,
                           gamma: float, zeta: float, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, y_pre): y_pre = x W^T (the unmasked GEMM output, what the backward of output-unit gates needs), an empty
    tensor for input-unit gates. ``logits``: one grid, or a stack (K, ...) of K masks' grids (one noise stream), row r
    of the flattened x using mask ``token_mask[r]`` (None: K equal contiguous groups of rows)."""
    params = make_params(estimator, seed, offset, beta, gamma, zeta, tau, training, inverse, _WHERE_LINEAR)
    y, y_pre, _ = _unit_forward(x, weight, logits, bias, token_mask, gate_outputs, group, weight_layout, params)
    return y, y_pre


@_unit_masked_linear_op.register_fake
def _(x, weight, logits, bias, token_mask, gate_outputs, group, weight_layout, estimator, seed, offset, training,
      inverse, beta, gamma, zeta, tau):
    out_features = weight.shape[0] if weight_layout == "out_in" else weight.shape[1]
    tokens = x.shape[:-1].numel()
    return x.new_empty(*x.shape[:-1], out_features), (x.new_empty(tokens, out_features) if gate_outputs
                                                         else x.new_empty(0))


@torch.library.custom_op("fastmask::unit_masked_linear_backward", mutates_args=())
def _unit_masked_linear_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                    logits: torch.Tensor, y_pre: torch.Tensor, has_bias: bool,
                                    token_mask: Optional[torch.Tensor], gate_outputs: bool, group: int,
                                    weight_layout: str, estimator: str, seed: int, offset: int, training: bool,
                                    inverse: bool, beta: float, gamma: float, zeta: float, tau: float,
                                    needs_input_grad: bool, needs_weight_grad: bool
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_logits, grad_bias); gradients that were not asked for are empty tensors. The gates
    are regenerated from (seed, offset): O(gates) work, so the op saves nothing but its inputs."""
    params = make_params(estimator, seed, offset, beta, gamma, zeta, tau, training, inverse, _WHERE_LINEAR)
    gates = resolve(x.device).gate_forward(logits.reshape(-1).contiguous(), params)
    return _unit_grads(grad_out, x, weight, logits, y_pre, gates, has_bias, token_mask, gate_outputs, group,
                       weight_layout, params, needs_input_grad, needs_weight_grad)


@_unit_masked_linear_backward_op.register_fake
def _(grad_out, x, weight, logits, y_pre, has_bias, token_mask, gate_outputs, group, weight_layout, estimator, seed,
      offset, training, inverse, beta, gamma, zeta, tau, needs_input_grad, needs_weight_grad):
    return (torch.empty_like(x, memory_format=torch.contiguous_format) if needs_input_grad else x.new_empty(0),
            torch.empty_like(weight, memory_format=torch.contiguous_format) if needs_weight_grad else x.new_empty(0),
            torch.empty_like(logits, memory_format=torch.contiguous_format),
            grad_out.new_empty(grad_out.shape[-1]) if has_bias else x.new_empty(0))


def _unit_setup_context(ctx, inputs, output):
    x, weight, logits, bias, token_mask, *scalars = inputs
    ctx.save_for_backward(x, weight, logits, output[1], token_mask)
    ctx.has_bias = bias is not None
    ctx.scalars = scalars


def _unit_backward(ctx, grad_out, _grad_y_pre):
    x, weight, logits, y_pre, token_mask = ctx.saved_tensors
    needs_x, needs_weight = ctx.needs_input_grad[:2]
    grads = _unit_masked_linear_backward_op(grad_out, x, weight, logits, y_pre, ctx.has_bias, token_mask,
                                            *ctx.scalars, needs_x, needs_weight)
    return asked_grads(ctx.needs_input_grad, grads)


_unit_masked_linear_op.register_autograd(_unit_backward, setup_context=_unit_setup_context)


class _UnitMaskedLinearFunction(torch.autograd.Function):
    """The eager twin of fastmask::unit_masked_linear (``_common.eager_function`` says when it runs): the same
    ``_unit_forward`` / ``_unit_grads``, one Python layer instead of the custom op's, and the forward's gates kept
    (O(gates) bytes) instead of regenerated."""

    @staticmethod
    def forward(ctx, x, weight, logits, bias, token_mask, gate_outputs, group, weight_layout, params):
        y, y_pre, gates = _unit_forward(x, weight, logits, bias, token_mask, gate_outputs, group, weight_layout,
                                        params)
        ctx.save_for_backward(x, weight, logits, y_pre, gates, token_mask)
        ctx.config = (bias is not None, gate_outputs, group, weight_layout, params)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, logits, y_pre, gates, token_mask = ctx.saved_tensors
        has_bias, gate_outputs, group, weight_layout, params = ctx.config
        needs_x, needs_weight = ctx.needs_input_grad[:2]
        grads = _unit_grads(grad_out, x, weight, logits, y_pre, gates, has_bias, token_mask, gate_outputs, group,
                            weight_layout, params, needs_x, needs_weight)
        return asked_grads(ctx.needs_input_grad, grads)


def unit_masked_linear(x: torch.Tensor, weight: torch.Tensor, logits: torch.Tensor, bias: Optional[torch.Tensor],
                       axis: str, block: Sequence[int], weight_layout: str, estimator: str, seed: int, offset: int,
                       training: bool, inverse: bool, beta: float, gamma: float, zeta: float, tau: float,
                       token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``masked_linear`` (one grid) or ``grouped_masked_linear`` (a stack of K grids, ``token_mask`` per flattened
    row or None: K contiguous groups) for gate grids over whole units (arguments validated by the caller;
    ``ref.unit_axis`` gives ``axis``): two GEMMs per training step whatever K, no masked weight; the weight gradient
    only when it requires grad."""
    group = block[ref.unit_dim(axis, weight_layout)]
    if eager_function(x, weight, logits, bias, token_mask):
        params = make_params(estimator, seed, offset, beta, gamma, zeta, tau, training, inverse, _WHERE_LINEAR)
        return _UnitMaskedLinearFunction.apply(x, weight, logits, bias, token_mask, axis == "out", group,
                                               weight_layout, params)
    y, _ = _unit_masked_linear_op(x, weight, logits, bias, token_mask, axis == "out", group, weight_layout, estimator,
                                  seed, offset, training, inverse, beta, gamma, zeta, tau)
    return y
