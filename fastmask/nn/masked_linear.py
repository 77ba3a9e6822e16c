"""MaskedLinear: a linear layer whose frozen weight is gated by a learned mask, through fm.ops.masked_linear."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from ..ops import masked_linear
from ..ops._common import DEFAULT_GAMMA, DEFAULT_TAU, DEFAULT_ZETA, default_beta
from ..ops._validate import estimator_code

GRANULARITIES = ("weight", "block", "unit_in", "unit_out", "layer")


def _grid(granularity: str, rows: int, cols: int, in_out: bool, block: Sequence[int]) -> tuple[tuple, tuple]:
    """(grid shape, block) in the weight's own layout for a granularity; rows x cols is the stored weight."""
    if granularity == "weight":
        return (rows, cols), (1, 1)
    if granularity == "block":
        bh, bw = block if not in_out else tuple(block)[::-1]
        return (math.ceil(rows / bh), math.ceil(cols / bw)), (bh, bw)
    if granularity == "layer":
        return (1, 1), (rows, cols)
    # Input units are the columns of an (out, in) weight and the rows of an (in, out) one.
    if (granularity == "unit_in") != in_out:
        return (1, cols), (rows, 1)
    return (rows, 1), (1, cols)


class MaskedLinear(nn.Module):
    """``y = x (W * m)^T + b`` with ``m`` sampled from trainable ``logits`` by an estimator.

    The weight (and bias) are the wrapped layer's own tensors, frozen and not copied. Each training forward
    draws fresh noise: the op's offset advances by the number of gates per call, so a run is reproducible from
    ``seed``. ``eval()`` gives the deterministic gates.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, weight_layout: str = "out_in",
                 estimator: str = "hard_concrete", granularity: str = "weight", block: Sequence[int] = (32, 32),
                 init_keep: Optional[float] = 0.9, init_logit: Optional[float] = None, beta: Optional[float] = None,
                 gamma: float = DEFAULT_GAMMA, zeta: float = DEFAULT_ZETA, tau: float = DEFAULT_TAU, seed: int = 0):
        super().__init__()
        estimator_code(estimator, "MaskedLinear")
        if granularity not in GRANULARITIES:
            raise ValueError(f"MaskedLinear: granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if weight_layout not in ("out_in", "in_out"):
            raise ValueError(f"MaskedLinear: weight_layout must be 'out_in' or 'in_out', got {weight_layout!r}")
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.weight.requires_grad_(False)
        self.bias = bias
        if isinstance(bias, nn.Parameter):
            bias.requires_grad_(False)
        self.weight_layout, self.estimator, self.granularity = weight_layout, estimator, granularity
        self.beta, self.gamma, self.zeta, self.tau = default_beta(estimator, beta), gamma, zeta, tau
        self.seed = int(seed)
        rows, cols = weight.shape
        grid, self.block = _grid(granularity, rows, cols, weight_layout == "in_out", block)
        if init_logit is None:
            init_logit = self._logit_for_keep(init_keep)
        self.logits = nn.Parameter(torch.full(grid, float(init_logit), dtype=torch.float32, device=weight.device))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64), persistent=True)

    def _logit_for_keep(self, keep: float) -> float:
        """The logit whose training-time keep probability (P(z != 0), or P(z = 1)) is ``keep``."""
        if not 0 < keep < 1:
            raise ValueError(f"MaskedLinear: init_keep must be in (0, 1), got {keep}")
        logit = math.log(keep / (1 - keep))
        if self.estimator == "hard_concrete":
            return logit + self.beta * math.log(-self.gamma / self.zeta)
        if self.estimator == "threshold_st":
            return logit + self.tau
        return logit

    @classmethod
    def from_module(cls, module: nn.Module, **kwargs) -> "MaskedLinear":
        """Wrap an nn.Linear or a transformers Conv1D (weight stored (in, out)) without copying its weight."""
        if isinstance(module, nn.Linear):
            return cls(module.weight, module.bias, weight_layout="out_in", **kwargs)
        if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            return cls(module.weight, module.bias, weight_layout="in_out", **kwargs)
        raise TypeError(f"MaskedLinear.from_module: expected nn.Linear or transformers Conv1D, got "
                        f"{type(module).__name__}")

    def gates(self) -> torch.Tensor:
        """The deterministic (eval-mode) gates on the logits grid."""
        from ..ops import gate

        return gate(self.logits.detach(), estimator=self.estimator, beta=self.beta, gamma=self.gamma,
                    zeta=self.zeta, tau=self.tau, training=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = 0
        if self.training:
            offset = int(self.calls) * self.logits.numel()
            self.calls += 1
        return masked_linear(x.to(self.weight.dtype), self.weight, self.logits, self.bias,
                             estimator=self.estimator, seed=self.seed, offset=offset, training=self.training,
                             weight_layout=self.weight_layout, block=self.block, beta=self.beta, gamma=self.gamma,
                             zeta=self.zeta, tau=self.tau)

    def extra_repr(self) -> str:
        return (f"weight={tuple(self.weight.shape)} ({self.weight_layout}), estimator={self.estimator}, "
                f"granularity={self.granularity}, gates={tuple(self.logits.shape)}")
