"""fastmask::masked_linear: y = x (W * m(logits))^T + b with the gates sampled inside the op.

Two ways to train per-weight and block gates, one per memory policy (fastmask/ops/_modes.py):
  recompute  fastmask::masked_linear + fastmask::masked_linear_backward: the autograd formula saves only x, W and
             the logits (no noise, no fp32 mask); the backward op regenerates the gates from (seed, offset).
             Weights are frozen unless they require grad, in which case grad_weight = dWm * m is returned too.
  keep       fastmask::masked_linear_keep: the forward also returns W * m and the gates' slopes (each gate
             evaluated once), autograd saves them, and the backward is torch ops: dx = dy (W * m), dWm = dy^T x,
             d(logits) = block sums of dWm * W times the slopes. Frozen weights only.

Eager calls with plain tensors run each op's ``torch.autograd.Function`` twin, built from the same implementation
functions (``_recompute_*``, ``_keep_*``): bit-identical results without the custom op's per-call Python cost;
torch.compile, export, FakeTensor and DTensor calls run the custom ops (``_common.eager_function``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import ref
from ..ref import flatten_tokens, unit_axis
from ._backend import resolve
from ._common import (DEFAULT_GAMMA, DEFAULT_TAU, DEFAULT_ZETA, asked_grads, default_beta, eager_function,
                      make_params, register_backward_op)
from ._composed import matmul_acc
from ._modes import MEMORY_POLICIES, memory_policy_for, refuse_nan
from ._validate import check_choice
from ._validate import check_masked_linear
from .gated_units import unit_masked_linear

_WHERE = "fastmask.ops.masked_linear"


def _recompute_forward(x, weight, logits, bias, weight_layout: str, block, params) -> torch.Tensor:
    """The "recompute" policy's forward (arguments validated), shared by the custom op and its eager twin."""
    refuse_nan(logits, "logits", _WHERE)
    out_features = weight.shape[0] if weight_layout == "out_in" else weight.shape[1]
    y = resolve(x.device).masked_linear_forward(flatten_tokens(x), weight, logits.contiguous(), bias, block,
                                                weight_layout == "in_out", params)
    return y.reshape(*x.shape[:-1], out_features)


def _recompute_grads(grad_out, x, weight, logits, has_bias: bool, weight_layout: str, block, params,
                     needs_input_grad: bool, needs_weight_grad: bool):
    """(grad_x, grad_weight, grad_logits, grad_bias) of the "recompute" policy: the backend regenerates the gates
    from (seed, offset). Gradients not asked for are empty tensors (distinct: custom-op outputs may not alias)."""
    grad_x, grad_weight, grad_logits, grad_bias = resolve(x.device).masked_linear_backward(
        flatten_tokens(grad_out), flatten_tokens(x), weight, logits.contiguous(), has_bias, tuple(block),
        weight_layout == "in_out", params, needs_input_grad, needs_weight_grad)
    return (grad_x.reshape(x.shape).to(x.dtype) if needs_input_grad else x.new_empty(0),
            grad_weight.to(weight.dtype) if needs_weight_grad else x.new_empty(0),
            grad_logits.to(logits.dtype),
            grad_bias.to(grad_out.dtype) if has_bias else x.new_empty(0))


def _keep_forward(x, weight, logits, bias, weight_layout: str, block, params):
    """(y, W * m, dz/dl): the "keep" policy's forward (arguments validated), each gate evaluated once."""
    refuse_nan(logits, "logits", _WHERE)
    out_features = weight.shape[0] if weight_layout == "out_in" else weight.shape[1]
    wm, slope = resolve(x.device).masked_weight_and_slope(weight, logits.contiguous(), block, params)
    y = F.linear(flatten_tokens(x), wm.t() if weight_layout == "in_out" else wm, bias)
    return y.reshape(*x.shape[:-1], out_features), wm, slope


def _keep_grads(grad_out, x, weight, wm, slope, logits_dtype, in_out: bool, block, needs_x: bool,
                needs_logits: bool, needs_bias: bool):
    """(grad_x, grad_logits, grad_bias) of the "keep" policy (None where not asked for): torch ops only,
    dx = dy (W * m), dWm = dy^T x and d(logits) = block sums of dWm * W times the kept slopes."""
    dy, x2 = flatten_tokens(grad_out), flatten_tokens(x)
    grad_logits = grad_x = grad_bias = None
    if needs_logits:
        grad_wm = matmul_acc(x2.t(), dy) if in_out else matmul_acc(dy.t(), x2)
        grad_logits = ref.mask_grad_from_slope(grad_wm, weight, slope, block).to(logits_dtype)
    if needs_x:
        grad_x = (dy @ (wm.t() if in_out else wm)).reshape(x.shape).to(x.dtype)
    if needs_bias:
        grad_bias = dy.sum(0)
    return grad_x, grad_logits, grad_bias


@torch.library.custom_op("fastmask::masked_linear", mutates_args=())
def _masked_linear_op(x: torch.Tensor, weight: torch.Tensor, logits: torch.Tensor, bias: Optional[torch.Tensor],
                      estimator: str, seed: int, offset: int, training: bool, inverse: bool, weight_layout: str,
                      block: Sequence[int], beta: float, gamma: float, zeta: float, tau: float) -> torch.Tensor:
    _, _, blk = check_masked_linear(x, weight, logits, bias, weight_layout, tuple(block), _WHERE)
    params = make_params(estimator, seed, offset, beta, gamma, zeta, tau, training, inverse, _WHERE)
    return _recompute_forward(x, weight, logits, bias, weight_layout, blk, params)


@_masked_linear_op.register_fake
def _(x, weight, logits, bias, estimator, seed, offset, training, inverse, weight_layout, block, beta, gamma, zeta,
      tau):
    _, out_features, _ = check_masked_linear(x, weight, logits, bias, weight_layout, tuple(block), _WHERE)
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("fastmask::masked_linear_backward", mutates_args=())
def _masked_linear_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, logits: torch.Tensor,
                               has_bias: bool, estimator: str, seed: int, offset: int, training: bool,
                               inverse: bool, weight_layout: str, block: Sequence[int], beta: float, gamma: float,
                               zeta: float, tau: float, needs_input_grad: bool, needs_weight_grad: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_logits, grad_bias); gradients that were not asked for are empty tensors."""
    params = make_params(estimator, seed, offset, beta, gamma, zeta, tau, training, inverse, _WHERE)
    return _recompute_grads(grad_out, x, weight, logits, has_bias, weight_layout, tuple(block), params,
                            needs_input_grad, needs_weight_grad)


@_masked_linear_backward_op.register_fake
def _(grad_out, x, weight, logits, has_bias, estimator, seed, offset, training, inverse, weight_layout, block, beta,
      gamma, zeta, tau, needs_input_grad, needs_weight_grad):
    return (torch.empty_like(x, memory_format=torch.contiguous_format) if needs_input_grad else x.new_empty(0),
            torch.empty_like(weight, memory_format=torch.contiguous_format) if needs_weight_grad else x.new_empty(0),
            torch.empty_like(logits, memory_format=torch.contiguous_format),
            grad_out.new_empty(grad_out.shape[-1]) if has_bias else x.new_empty(0))


register_backward_op(_masked_linear_op, _masked_linear_backward_op)


@torch.library.custom_op("fastmask::masked_linear_keep", mutates_args=())
def _masked_linear_keep_op(x: torch.Tensor, weight: torch.Tensor, logits: torch.Tensor, bias: Optional[torch.Tensor],
                           estimator: str, seed: int, offset: int, training: bool, inverse: bool, weight_layout: str,
                           block: Sequence[int], beta: float, gamma: float, zeta: float, tau: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, W * m, dz/dl): masked_linear's forward that also returns what the "keep" policy's backward needs."""
    _, _, blk = check_masked_linear(x, weight, logits, bias, weight_layout, tuple(block), _WHERE)
    params = make_params(estimator, seed, offset, beta, gamma, zeta, tau, training, inverse, _WHERE)
    return _keep_forward(x, weight, logits, bias, weight_layout, blk, params)


@_masked_linear_keep_op.register_fake
def _(x, weight, logits, bias, estimator, seed, offset, training, inverse, weight_layout, block, beta, gamma, zeta,
      tau):
    _, out_features, _ = check_masked_linear(x, weight, logits, bias, weight_layout, tuple(block), _WHERE)
    return (x.new_empty(*x.shape[:-1], out_features),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            logits.new_empty(logits.shape, dtype=ref.compute_dtype(logits)))


def _keep_setup_context(ctx, inputs, output):
    x, weight, logits, bias, *scalars = inputs
    weight_layout, block = scalars[5:7]  # after estimator, seed, offset, training, inverse (the op's schema)
    _, wm, slope = output
    ctx.mark_non_differentiable(wm, slope)
    ctx.set_materialize_grads(False)  # no zero-filled (R, C) gradient for the W * m output that nothing uses
    ctx.save_for_backward(x, weight, wm, slope)
    ctx.logits_dtype = logits.dtype
    ctx.in_out = weight_layout == "in_out"
    ctx.block = tuple(block)
    ctx.n_scalars = len(scalars)


def _keep_backward(ctx, grad_out, _grad_wm, _grad_slope):
    x, weight, wm, slope = ctx.saved_tensors
    if grad_out is None:  # grads are not materialised: y took no part in the loss
        return (None,) * (4 + ctx.n_scalars)
    needs_x, needs_weight, needs_logits, needs_bias = ctx.needs_input_grad[:4]
    if needs_weight:  # masked_linear routes trainable weights to the recompute ops; a direct call cannot do this
        raise RuntimeError(f"{_WHERE}: the 'keep' memory policy has no weight gradient (it keeps W * m, not m); "
                           f"use memory='recompute' for a trainable weight")
    grad_x, grad_logits, grad_bias = _keep_grads(grad_out, x, weight, wm, slope, ctx.logits_dtype, ctx.in_out,
                                                 ctx.block, needs_x, needs_logits, needs_bias)
    return (grad_x, None, grad_logits, grad_bias) + (None,) * ctx.n_scalars


class _MaskedLinearFunction(torch.autograd.Function):
    """The eager twin of fastmask::masked_linear + masked_linear_backward ("recompute"; ``_common.eager_function``
    says when it runs): the same ``_recompute_forward`` / ``_recompute_grads`` behind one Python layer."""

    @staticmethod
    def forward(ctx, x, weight, logits, bias, weight_layout, block, params):
        ctx.save_for_backward(x, weight, logits)
        ctx.config = (bias is not None, weight_layout, block, params)
        return _recompute_forward(x, weight, logits, bias, weight_layout, block, params)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, logits = ctx.saved_tensors
        has_bias, weight_layout, block, params = ctx.config
        needs_x, needs_weight = ctx.needs_input_grad[:2]
        grads = _recompute_grads(grad_out, x, weight, logits, has_bias, weight_layout, block, params, needs_x,
                                 needs_weight)
        return asked_grads(ctx.needs_input_grad, grads)


class _MaskedLinearKeepFunction(torch.autograd.Function):
    """The eager twin of fastmask::masked_linear_keep (frozen weights only, as the op): ``_keep_forward`` /
    ``_keep_grads`` behind one Python layer."""

    @staticmethod
    def forward(ctx, x, weight, logits, bias, weight_layout, block, params):
        y, wm, slope = _keep_forward(x, weight, logits, bias, weight_layout, block, params)
        ctx.save_for_backward(x, weight, wm, slope)
        ctx.config = (logits.dtype, weight_layout == "in_out", block)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, wm, slope = ctx.saved_tensors
        needs_x, _, needs_logits, needs_bias = ctx.needs_input_grad[:4]
        grad_x, grad_logits, grad_bias = _keep_grads(grad_out, x, weight, wm, slope, *ctx.config, needs_x,
                                                     needs_logits, needs_bias)
        return grad_x, None, grad_logits, grad_bias, None, None, None


_masked_linear_keep_op.register_autograd(_keep_backward, setup_context=_keep_setup_context)


def _keeps(x: torch.Tensor, weight: torch.Tensor, logits: torch.Tensor, memory: Optional[str]) -> bool:
    """Whether this call runs the "keep" ops: the policy says so for x's device, the logits' gradient will be asked
    for (a keep forward outside autograd would only waste its slope pass) and the weight is frozen."""
    if memory_policy_for(x.device.type, memory) != "keep" or not torch.is_grad_enabled():
        return False
    return logits.requires_grad and not weight.requires_grad


def _as_grid(logits: torch.Tensor, weight: torch.Tensor, weight_layout: str) -> torch.Tensor:
    """1-D unit logits -> the 2-D grid view in the weight's layout ((out, 1) / (1, in) for out_in)."""
    if logits.dim() != 1:
        return logits
    if weight.dim() != 2 or weight_layout not in ("out_in", "in_out"):
        return logits  # check_masked_linear reports the real problem
    out_features, in_features = weight.shape if weight_layout == "out_in" else weight.shape[::-1]
    n = logits.shape[0]
    if n == out_features == in_features:
        raise ValueError(f"{_WHERE}: 1-D logits of length {n} are ambiguous for a square weight: pass them as a "
                         f"2-D grid in the weight's layout, ({n}, 1) or (1, {n})")
    if n == out_features:
        return logits.view(-1, 1) if weight_layout == "out_in" else logits.view(1, -1)
    if n == in_features:
        return logits.view(1, -1) if weight_layout == "out_in" else logits.view(-1, 1)
    raise ValueError(f"{_WHERE}: 1-D logits must have length out_features={out_features} (output units) or "
                     f"in_features={in_features} (input units), got {n}")


def masked_linear(x: torch.Tensor, weight: torch.Tensor, logits: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  *, estimator: str = "hard_concrete", seed: int = 0, offset: int = 0, training: bool = True,
                  inverse: bool = False, weight_layout: str = "out_in", block: Optional[Sequence[int]] = None,
                  beta: Optional[float] = None, gamma: float = DEFAULT_GAMMA, zeta: float = DEFAULT_ZETA,
                  tau: float = DEFAULT_TAU, memory: Optional[str] = None) -> torch.Tensor:
    """Masked linear layer ``y = x (W * m)^T + b`` with the mask ``m`` sampled from ``logits`` inside the op.

    x: (..., in_features). weight: (out, in) for ``weight_layout="out_in"`` (nn.Linear) or (in, out) for
    ``"in_out"`` (GPT-2 Conv1D), read in place. logits (float32, trainable): a 2-D gate grid in the weight's
    layout: the weight's shape (per weight), (out, 1) / (1, in) or 1-D (units), a block grid
    ``(ceil(R / bh), ceil(C / bw))`` with ``block=(bh, bw)`` (inferred when it divides the weight), (1, 1) (the
    layer). Gradients flow to x, logits and bias; to weight only if it requires grad. The noise of gate j is
    ``uniform(seed, offset + j)``: change ``seed`` or ``offset`` every step for fresh samples. ``memory``: what a
    per-weight / block training forward keeps for the backward, "keep" (W * m and the gate slopes, 8 bytes per
    float32 weight: no gate evaluation in backward) or "recompute" (nothing); None: ``fm.set_memory_policy``'s
    setting ("auto": keep on CPU, recompute on GPUs; fastmask/ops/_modes.py).
    """
    logits = _as_grid(logits, weight, weight_layout)
    _, _, blk = check_masked_linear(x, weight, logits, bias, weight_layout, block, _WHERE)
    beta = default_beta(estimator, beta)
    make_params(estimator, seed, offset, beta, gamma, zeta, tau, training, inverse, _WHERE)
    axis = unit_axis(logits.shape, weight_layout)
    if axis is not None:  # whole units, heads or the layer: no masked weight, no weight-gradient GEMM
        return unit_masked_linear(x, weight, logits, bias, axis, blk, weight_layout, estimator=estimator, seed=seed,
                                  offset=offset, training=bool(training), inverse=bool(inverse), beta=beta,
                                  gamma=float(gamma), zeta=float(zeta), tau=float(tau))
    if memory is not None:
        check_choice(memory, MEMORY_POLICIES, "memory", _WHERE)
    keeps = _keeps(x, weight, logits, memory)
    if eager_function(x, weight, logits, bias):
        params = make_params(estimator, seed, offset, beta, gamma, zeta, tau, training, inverse, _WHERE)
        twin = _MaskedLinearKeepFunction if keeps else _MaskedLinearFunction
        return twin.apply(x, weight, logits, bias, weight_layout, blk, params)
    args = (x, weight, logits, bias, estimator, seed, offset, bool(training), bool(inverse), weight_layout, list(blk),
            beta, float(gamma), float(zeta), float(tau))
    if keeps:
        return _masked_linear_keep_op(*args)[0]
    return _masked_linear_op(*args)
