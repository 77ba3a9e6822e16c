"""Helpers shared by the op modules: default estimator parameters, the GateParams they become, and the autograd
formula of the ops whose backward is a second custom op."""

from __future__ import annotations

import sys
from typing import Optional

import torch

from .._params import GateParams
from ._validate import check_flag, check_gate_params, check_seed_offset, estimator_code

# Temperature defaults: hard concrete as in Louizos et al. (2018); Gumbel-sigmoid at temperature 1 as in the
# knowledge-critical-subnetwork recipe (Bayazit et al. 2024). Other estimators ignore beta.
DEFAULT_BETA = {"hard_concrete": 2 / 3, "gumbel_sigmoid_st": 1.0, "threshold_st": 1.0, "bernoulli_st": 1.0}
DEFAULT_GAMMA, DEFAULT_ZETA, DEFAULT_TAU = -0.1, 1.1, 0.0


def default_beta(estimator: str, beta: Optional[float]) -> float:
    return DEFAULT_BETA.get(estimator, 1.0) if beta is None else float(beta)


def make_params(estimator: str, seed: int, offset: int, beta: float, gamma: float, zeta: float, tau: float,
                training: bool, inverse: bool, where: str) -> GateParams:
    """Validate the scalar arguments of an op and pack them for the backends."""
    code = estimator_code(estimator, where)
    check_seed_offset(seed, offset, where)
    check_gate_params(beta, gamma, zeta, where, tau)
    check_flag(training, "training", where)
    check_flag(inverse, "inverse", where)
    return GateParams(code, int(seed), int(offset), float(beta), float(gamma), float(zeta), float(tau),
                      bool(training), bool(inverse))


def is_dtensor(tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter that FSDP2 shards), without importing torch.distributed.tensor:
    a DTensor exists only once that module was imported (importing it costs about half a second)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


def allow_dtensor(tensor: torch.Tensor) -> None:
    """Register the DTensor sharding rules of the ops (ops/_sharding.py) once a DTensor reaches one: the mask
    logits between steps of an FSDP2 run."""
    if is_dtensor(tensor):
        from . import _sharding  # imports torch.distributed.tensor: loaded only here, see above

        _sharding.register()


# Eager calls of the training ops run as torch.autograd.Function twins of the custom ops (see ``eager_function``);
# tests switch this off to compare both routes on the same inputs.
EAGER_FUNCTIONS = True
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def eager_function(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether an op call may run as its ``torch.autograd.Function`` twin instead of the torch.library custom op.

    Why: calling a custom op with 15-20 arguments costs about 0.2 ms of Python per call (boxing the arguments,
    ``fill_defaults``, the autograd wrapper that then dispatches the op again), and its backward op as much again:
    as long as the whole step of a 384 x 384 head-masked layer at 128 tokens (measured on the 2-core CPU). The twin
    runs the same implementation functions, so results are bit-identical. The custom op stays the route wherever
    something must see an opaque op: torch.compile / torch.export (is_compiling), FakeTensor and other tensor
    subclasses (DTensor shards of FSDP2: the sharding rules are registered for the ops), functorch transforms
    (vmap, grad), dispatch modes, and autocast regions (autocast treats an op call and the torch ops inside a
    Function's forward differently: there the custom op keeps what earlier versions computed).
    """
    if not EAGER_FUNCTIONS or torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
        return False
    return all(t is None or type(t) in _PLAIN_TENSORS for t in tensors)


def asked_grads(needs_input_grad, grads) -> tuple:
    """What an autograd backward returns: ``grads[i]`` where input i asked for a gradient, else None, then None for
    every further input (the op's non-differentiable arguments)."""
    asked = tuple(g if need else None for g, need in zip(grads, needs_input_grad))
    return asked + (None,) * (len(needs_input_grad) - len(asked))


def register_backward_op(forward_op, backward_op) -> None:
    """Autograd of ``forward_op(x, weight, logits, bias, *scalars)`` through ``backward_op(grad_out, x, weight,
    logits, has_bias, *scalars, needs_input_grad, needs_weight_grad) -> (grad_x, grad_weight, grad_logits,
    grad_bias)``: the forward saves only x, W and the logits, and the backward op regenerates the rest (the noise
    is a function of the scalars). Gradients that were not asked for come back as None."""

    def setup_context(ctx, inputs, output):
        x, weight, logits, bias, *scalars = inputs
        ctx.save_for_backward(x, weight, logits)
        ctx.has_bias = bias is not None
        ctx.scalars = scalars

    def backward(ctx, grad_out):
        x, weight, logits = ctx.saved_tensors
        needs_x, needs_weight = ctx.needs_input_grad[:2]
        grads = backward_op(grad_out, x, weight, logits, ctx.has_bias, *ctx.scalars, needs_x, needs_weight)
        return asked_grads(ctx.needs_input_grad, grads)

    forward_op.register_autograd(backward, setup_context=setup_context)
