"""MaskConfig: what ``fastmask.apply`` masks and how (a JSON-serialisable dataclass).

    cfg = fm.MaskConfig(granularity="head", init_keep=0.9)
    cfg.to_json()                       # stored next to the logits by fm.save_masks
    fm.MaskConfig.from_json(text)       # every field is validated; errors name the field

Block sizes are given in the ``nn.Linear`` orientation ``(rows of the (out, in) weight, cols)`` = ``(out, in)``
for every layer, including GPT-2's Conv1D (whose (in, out) storage fastmask.nn.MaskedLinear handles).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

from .ref import ESTIMATORS

GRANULARITIES = ("weight", "block", "unit_in", "unit_out", "head", "layer")

_INT64_MAX = 2**63 - 1


def _fail(name: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"MaskConfig.{name} must be {expected}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class MaskConfig:
    """How ``fastmask.apply`` masks a model.

    estimator     "hard_concrete" (Louizos et al. L0), "gumbel_sigmoid_st", "threshold_st", "bernoulli_st".
    granularity   "weight" | "block" (``block`` sized) | "unit_in" | "unit_out" | "head" (attention heads: input
                  units of the attention output projection, or output units of q/k/v projections) | "layer".
    block         (bh, bw) for granularity="block", in the (out, in) orientation of nn.Linear.
    targets       None: the architecture's defaults (fastmask.hf.default_targets); else a list of regexes, each
                  matched with ``re.search`` against qualified module names and with ``re.fullmatch`` against
                  module class names (e.g. "Linear", "Conv1D"). Only nn.Linear / Conv1D layers are masked.
    init_keep     initial keep probability of every gate (training-time P(z != 0)); ``init_logit`` overrides it.
    beta          temperature (None: 2/3 for hard_concrete, 1 otherwise); gamma, zeta: the hard-concrete
                  stretch; tau: the threshold_st threshold.
    n_masks       K independent masks per layer, learned in one forward pass (one per factor, or K samples):
                  logits (K, GR, GC); ``fastmask.mask_index(model, idx)`` says which mask each batch row uses.
    seed          base seed of the noise; layer ``name`` draws from seed ``fastmask.hf.layer_seed(seed, name)``.
    """

    estimator: str = "hard_concrete"
    granularity: str = "weight"
    block: tuple = (32, 32)
    targets: Optional[list] = None
    init_keep: Optional[float] = 0.9
    init_logit: Optional[float] = None
    beta: Optional[float] = None
    gamma: float = -0.1
    zeta: float = 1.1
    tau: float = 0.0
    n_masks: int = 1
    seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> "MaskConfig":
        """Check every field (also called on construction); returns self. Errors name the field."""
        if self.estimator not in ESTIMATORS:
            raise _fail("estimator", f"one of {ESTIMATORS}", self.estimator)
        if self.granularity not in GRANULARITIES:
            raise _fail("granularity", f"one of {GRANULARITIES}", self.granularity)
        block = self.block
        if (not isinstance(block, (tuple, list)) or len(block) != 2
                or not all(_is_int(b) and b >= 1 for b in block)):
            raise _fail("block", "two positive ints (bh, bw)", block)
        self.block = tuple(block)
        if self.targets is not None:
            if isinstance(self.targets, str):
                self.targets = [self.targets]
            if not isinstance(self.targets, (list, tuple)) or not self.targets:
                raise _fail("targets", "None or a non-empty list of regex strings", self.targets)
            self.targets = list(self.targets)
            for i, pattern in enumerate(self.targets):
                if not isinstance(pattern, str):
                    raise _fail(f"targets[{i}]", "a regex string", pattern)
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"MaskConfig.targets[{i}] is not a valid regex ({exc}): {pattern!r}") from None
        if self.init_logit is not None:
            if not _is_number(self.init_logit):
                raise _fail("init_logit", "a finite number or None", self.init_logit)
            self.init_logit = float(self.init_logit)
        if self.init_keep is not None:
            if not _is_number(self.init_keep) or not 0 < self.init_keep < 1:
                raise _fail("init_keep", "a probability in (0, 1) or None", self.init_keep)
            self.init_keep = float(self.init_keep)
        if self.init_keep is None and self.init_logit is None:
            raise ValueError("MaskConfig: set init_keep (a probability in (0, 1)) or init_logit")
        if self.beta is not None:
            if not _is_number(self.beta) or not self.beta > 0:
                raise _fail("beta", "a positive number or None (the estimator's default)", self.beta)
            self.beta = float(self.beta)
        if not _is_number(self.gamma) or not self.gamma < 0:
            raise _fail("gamma", "a negative number (hard-concrete stretch: gamma < 0 < 1 < zeta)", self.gamma)
        if not _is_number(self.zeta) or not self.zeta > 1:
            raise _fail("zeta", "a number > 1 (hard-concrete stretch: gamma < 0 < 1 < zeta)", self.zeta)
        if not _is_number(self.tau):
            raise _fail("tau", "a finite number", self.tau)
        self.gamma, self.zeta, self.tau = float(self.gamma), float(self.zeta), float(self.tau)
        if not _is_int(self.n_masks) or self.n_masks < 1:
            raise _fail("n_masks", "a positive int", self.n_masks)
        if not _is_int(self.seed) or not 0 <= self.seed <= _INT64_MAX:
            raise _fail("seed", "an int in [0, 2**63 - 1]", self.seed)
        return self

    # --- serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain JSON types only (tuples become lists)."""
        out = asdict(self)
        out["block"] = list(self.block)
        out["targets"] = None if self.targets is None else list(self.targets)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "MaskConfig":
        """Inverse of to_dict; unknown keys are an error (a config from a newer fastmask, or a typo)."""
        if not isinstance(data, dict):
            raise TypeError(f"MaskConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MaskConfig.from_dict: unknown field(s) {unknown}; known fields: {sorted(known)}")
        kwargs = dict(data)
        if isinstance(kwargs.get("block"), list):
            kwargs["block"] = tuple(kwargs["block"])
        return cls(**kwargs)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "MaskConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"MaskConfig.from_json: not valid JSON ({exc})") from None
        return cls.from_dict(data)

    def module_kwargs(self) -> dict:
        """Keyword arguments of fastmask.nn.MaskedLinear shared by every layer (granularity-specific ones and
        the per-layer seed are added by fastmask.hf.apply)."""
        return dict(estimator=self.estimator, granularity=self.granularity, block=self.block,
                    init_keep=self.init_keep, init_logit=self.init_logit, beta=self.beta, gamma=self.gamma,
                    zeta=self.zeta, tau=self.tau, n_masks=self.n_masks)


__all__ = ["MaskConfig", "GRANULARITIES"]
