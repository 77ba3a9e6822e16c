"""fastmask::l0_norm: the expected number of non-zero gates, the differentiable sparsity penalty."""

from __future__ import annotations

from typing import Optional

import torch

from .. import ref
from ._common import DEFAULT_GAMMA, DEFAULT_TAU, DEFAULT_ZETA, allow_dtensor, default_beta
from ._modes import refuse_nan
from ._validate import check_float_tensor, check_gate_params, estimator_code

_WHERE = "fastmask.ops.l0_norm"


@torch.library.custom_op("fastmask::l0_norm", mutates_args=())
def _l0_norm_op(logits: torch.Tensor, estimator: str, beta: float, gamma: float, zeta: float, tau: float
                ) -> torch.Tensor:
    refuse_nan(logits, "logits", _WHERE)
    # O(#logits) elementwise + one reduction: the reference is already memory-bound, no kernel needed.
    return ref.l0_norm_ref(logits, estimator, beta, gamma, zeta, tau)


@_l0_norm_op.register_fake
def _(logits, estimator, beta, gamma, zeta, tau):
    return torch.empty((), dtype=ref.compute_dtype(logits), device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, *scalars = inputs
    ctx.save_for_backward(logits)
    ctx.scalars = scalars


def _backward(ctx, grad):
    (logits,) = ctx.saved_tensors
    return (ref.l0_norm_backward_ref(grad, logits, *ctx.scalars),) + (None,) * len(ctx.scalars)


_l0_norm_op.register_autograd(_backward, setup_context=_setup_context)


def l0_norm(logits: torch.Tensor, beta: Optional[float] = None, gamma: float = DEFAULT_GAMMA,
            zeta: float = DEFAULT_ZETA, *, estimator: str = "hard_concrete", tau: float = DEFAULT_TAU
            ) -> torch.Tensor:
    """Expected number of non-zero gates (a 0-dim tensor), differentiable in ``logits``.

    hard_concrete: sum of sigmoid(l - beta log(-gamma / zeta)) = sum of 1 - P(z = 0);
    gumbel_sigmoid_st / bernoulli_st: sum of sigmoid(l); threshold_st: the count of l > tau (straight-through).
    """
    check_float_tensor(logits, "logits", _WHERE)
    allow_dtensor(logits)
    estimator_code(estimator, _WHERE)
    beta = default_beta(estimator, beta)
    check_gate_params(beta, gamma, zeta, _WHERE, tau)
    return _l0_norm_op(logits, estimator, beta, float(gamma), float(zeta), float(tau))
