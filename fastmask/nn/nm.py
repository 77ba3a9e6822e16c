"""NMMaskedLinear: a frozen linear layer with a learned N:M mask (fastmask.ops.nm.nm_masked_linear).

A MaskedLinear whose logits are (out, in / M, C(M, N)): one choice per group of M consecutive input weights among
the patterns with N ones (MaskLLM, Fang et al. 2024). Everything that handles MaskedLinear layers (fastmask.merge /
unapply / save_masks / load_masks / set_step / sparsity, the runner's checkpoints) handles it too: its ``gates()``
and ``mask()`` are the eval-mode mask in the weight's shape (one "gate" per weight), ``merged_weight()`` is exactly
N:M. The Gumbel-softmax temperature and the logit scale are plain attributes (``temperature``, ``scale``) that a
schedule may change between steps; ``beta`` keeps the temperature the layer was built with (its saved structure).

Modes: ``bypass`` as in MaskedLinear; ``inverse`` runs W * (1 - mask) with the eval mask (no logits gradient:
the removed subnetwork is for evaluation).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._common import DEFAULT_GAMMA, DEFAULT_TAU, DEFAULT_ZETA
from ..ops._validate import check_seed
from ..ops.nm import NM_ESTIMATOR, check_nm, check_nm_params, n_patterns, nm_mask, nm_masked_linear
from .masked_linear import MaskedLinear

NM_GRANULARITY = "nm"
_WHERE = "NMMaskedLinear"


class NMMaskedLinear(MaskedLinear):
    """``y = x (W * mask)^T + b`` with an N:M ``mask`` sampled from trainable logits (out, in / m, C(m, n)).

    ``weight_layout="in_out"`` (GPT-2 Conv1D): groups are m consecutive rows of the stored (in, out) weight, i.e.
    still m consecutive input features. ``logits`` (optional): initial logits (a prior, fastmask.nm_priors), else
    zeros (every pattern equally likely). ``hard``: straight-through hard masks in training (exactly N:M every
    step), else the soft mask (a convex mix of patterns).
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, weight_layout: str = "out_in",
                 n: int = 2, m: int = 4, temperature: float = 1.0, scale: float = 1.0, hard: bool = True,
                 seed: int = 0, logits: Optional[torch.Tensor] = None):
        nn.Module.__init__(self)  # MaskedLinear.__init__ builds gate grids; the fields it shares are set below
        n, m = check_nm(n, m, _WHERE)
        temperature, scale, hard = check_nm_params(temperature, scale, hard, _WHERE)
        self._hold_frozen(weight, bias, weight_layout, _WHERE)
        out_features, in_features = weight.shape if weight_layout == "out_in" else weight.shape[::-1]
        if in_features % m:
            raise ValueError(f"{_WHERE}: in_features={in_features} must be a multiple of m={m} (groups of m "
                             f"consecutive input weights); leave this layer out of the targets")
        self.seed = check_seed(seed, _WHERE)
        self.n_masks = 1
        self.weight_layout, self.estimator, self.granularity = weight_layout, NM_ESTIMATOR, NM_GRANULARITY
        self.n, self.m, self.hard = n, m, hard
        self.beta, self.temperature, self.scale = temperature, temperature, scale
        self.gamma, self.zeta, self.tau = DEFAULT_GAMMA, DEFAULT_ZETA, DEFAULT_TAU  # unused; kept for describe()
        self.head_dim, self.head_side = None, "in"
        self.block = (1, m) if weight_layout == "out_in" else (m, 1)  # one group, in the weight's own layout
        shape = (out_features, in_features // m, n_patterns(n, m))
        if logits is None:
            init = torch.zeros(shape, dtype=torch.float32, device=weight.device)
        else:
            if not isinstance(logits, torch.Tensor) or list(logits.shape) != list(shape):
                found = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise ValueError(f"{_WHERE}: logits must have shape {list(shape)} (out, in / m, C(m, n)), got {found}")
            init = logits.detach().to(weight.device, torch.float32).clone()
        self.logits = nn.Parameter(init)
        self.mask_index = None
        self.step = 0
        self.auto_step = True
        self.inverse = False
        self.bypass = False
        object.__setattr__(self, "_base_module", None)

    # --- masks ----------------------------------------------------------------------------------------------
    @property
    def grid_shape(self) -> tuple[int, int]:
        """One mask bit per weight (what fastmask.sparsity counts)."""
        return tuple(self.weight.shape)

    def gate_weight_counts(self) -> torch.Tensor:
        return torch.ones(tuple(self.weight.shape), dtype=torch.int64)

    def nm_kwargs(self, offset: int = 0, training: Optional[bool] = None) -> dict:
        """Keyword arguments of fastmask.ops.nm.nm_masked_linear / nm_mask for one call of this layer."""
        return dict(n=self.n, m=self.m, seed=self.seed, offset=offset,
                    training=self.training if training is None else training, hard=self.hard,
                    temperature=float(self.temperature), scale=float(self.scale))

    def gates(self, inverse: bool = False, mask: Optional[int] = None) -> torch.Tensor:
        """The eval-mode mask (argmax pattern per group) in the weight's shape and layout, float32, detached."""
        self.check_mask(mask, f"{_WHERE}.gates")
        bits = nm_mask(self.logits.detach(), **self.nm_kwargs(training=False)).float()
        bits = 1 - bits if inverse else bits
        return bits if self.weight_layout == "out_in" else bits.t()

    def mask(self, inverse: bool = False, mask: Optional[int] = None) -> torch.Tensor:
        return self.gates(inverse, mask)

    def pattern_index(self) -> torch.Tensor:
        """The eval-mode pattern of every group (out, in / m), int64 (rows of fastmask.ref.nm_patterns(n, m))."""
        return self.logits.detach().argmax(dim=-1)

    def expected_kept(self) -> float:
        """Kept weights under any N:M mask: exactly n / m of the weight (the density is fixed by construction)."""
        return self.weight.numel() * self.n / self.m

    # --- forward --------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        if self.bypass or self.inverse:
            weight = self.weight if not self.inverse else self.merged_weight(inverse=True)
            return F.linear(x, weight if self.weight_layout == "out_in" else weight.t(), self.bias)
        offset = 0
        if self.training:
            offset = self.step * self.logits.numel()
            if self.auto_step:
                self.step = self.step + 1
        return nm_masked_linear(x, self.weight, self.logits, self.bias, weight_layout=self.weight_layout,
                                **self.nm_kwargs(offset))

    def describe(self) -> dict:
        return {**super().describe(), "n": self.n, "m": self.m, "scale": float(self.scale), "hard": self.hard,
                "temperature": float(self.temperature)}

    def extra_repr(self) -> str:
        mode = " inverse" if self.inverse else (" bypass" if self.bypass else "")
        return (f"weight={tuple(self.weight.shape)} ({self.weight_layout}), {self.n}:{self.m} "
                f"{'hard' if self.hard else 'soft'}, temperature={self.temperature:g}, scale={self.scale:g}, "
                f"logits={tuple(self.logits.shape)}{mode}")


__all__ = ["NMMaskedLinear", "NM_GRANULARITY"]
