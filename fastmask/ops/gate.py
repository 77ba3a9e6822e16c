"""fastmask::gate (and its public forms hard_concrete / gate): logits -> gates z in [0, 1] of an estimator.

The backward op regenerates the noise from (seed, offset); nothing but the logits is saved for backward.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..ref import compute_dtype
from ._backend import resolve
from ._common import DEFAULT_GAMMA, DEFAULT_TAU, DEFAULT_ZETA, allow_dtensor, default_beta, make_params
from ._modes import refuse_nan
from ._validate import check_float_tensor

_WHERE = "fastmask.ops.gate"


@torch.library.custom_op("fastmask::gate", mutates_args=())
def _gate_op(logits: torch.Tensor, estimator: str, seed: int, offset: int, beta: float, gamma: float, zeta: float,
             tau: float, training: bool, inverse: bool) -> torch.Tensor:
    check_float_tensor(logits, "logits", _WHERE)
    params = make_params(estimator, seed, offset, beta, gamma, zeta, tau, training, inverse, _WHERE)
    refuse_nan(logits, "logits", _WHERE)
    return resolve(logits.device).gate_forward(logits.contiguous(), params)


@_gate_op.register_fake
def _(logits, estimator, seed, offset, beta, gamma, zeta, tau, training, inverse):
    check_float_tensor(logits, "logits", _WHERE)
    return torch.empty(logits.shape, dtype=compute_dtype(logits), device=logits.device)


@torch.library.custom_op("fastmask::gate_backward", mutates_args=())
def _gate_backward_op(grad_gates: torch.Tensor, logits: torch.Tensor, estimator: str, seed: int, offset: int,
                      beta: float, gamma: float, zeta: float, tau: float, training: bool, inverse: bool
                      ) -> torch.Tensor:
    params = make_params(estimator, seed, offset, beta, gamma, zeta, tau, training, inverse, _WHERE)
    grad = resolve(logits.device).gate_backward(grad_gates.contiguous(), logits.contiguous(), params)
    return grad.to(logits.dtype)


@_gate_backward_op.register_fake
def _(grad_gates, logits, estimator, seed, offset, beta, gamma, zeta, tau, training, inverse):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, *scalars = inputs
    ctx.save_for_backward(logits)
    ctx.scalars = scalars


def _backward(ctx, grad_gates):
    (logits,) = ctx.saved_tensors
    return (_gate_backward_op(grad_gates, logits, *ctx.scalars),) + (None,) * len(ctx.scalars)


_gate_op.register_autograd(_backward, setup_context=_setup_context)


def gate(logits: torch.Tensor, *, estimator: str = "hard_concrete", seed: int = 0, offset: int = 0,
         beta: Optional[float] = None, gamma: float = DEFAULT_GAMMA, zeta: float = DEFAULT_ZETA,
         tau: float = DEFAULT_TAU, training: bool = True, inverse: bool = False) -> torch.Tensor:
    """Gates of ``logits`` under an estimator (float32, or float64 for float64 logits), differentiable.

    estimator: "hard_concrete" (Louizos et al. 2018), "gumbel_sigmoid_st", "threshold_st" or "bernoulli_st"
    (forward/backward rules in fastmask/ref.py). beta is the temperature (default 2/3 for hard concrete, 1
    otherwise), (gamma, zeta) the hard-concrete stretch, tau the threshold_st threshold. The noise of element j
    is ``uniform(seed, offset + j)``. ``inverse=True`` gives 1 - z (the complement subnetwork).
    """
    check_float_tensor(logits, "logits", _WHERE)
    allow_dtensor(logits)
    beta = default_beta(estimator, beta)
    make_params(estimator, seed, offset, beta, gamma, zeta, tau, training, inverse, _WHERE)
    return _gate_op(logits, estimator, seed, offset, beta, float(gamma), float(zeta), float(tau), bool(training),
                    bool(inverse))


def hard_concrete(logits: torch.Tensor, seed: int = 0, offset: int = 0, beta: float = 2 / 3,
                  gamma: float = DEFAULT_GAMMA, zeta: float = DEFAULT_ZETA, training: bool = True,
                  inverse: bool = False) -> torch.Tensor:
    """Hard-concrete gates: ``clamp(sigmoid((logit(u) + l) / beta) * (zeta - gamma) + gamma, 0, 1)`` in training,
    ``clamp(sigmoid(l) * (zeta - gamma) + gamma, 0, 1)`` in eval. Differentiable in ``logits``."""
    return gate(logits, estimator="hard_concrete", seed=seed, offset=offset, beta=beta, gamma=gamma, zeta=zeta,
                training=training, inverse=inverse)
