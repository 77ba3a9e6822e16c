"""MaskConfig: what ``fastmask.apply`` masks and how (a JSON-serialisable dataclass).

    cfg = fm.MaskConfig(granularity="head", init_keep=0.9)
    cfg.to_json()                       # stored next to the logits by fm.save_masks
    fm.MaskConfig.from_json(text)       # every field is validated; errors name the field

Block sizes are given in the ``nn.Linear`` orientation ``(rows of the (out, in) weight, cols)`` = ``(out, in)``
for every layer, including GPT-2's Conv1D (whose (in, out) storage fastmask.nn.MaskedLinear handles).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from typing import Optional

from .ops._common import DEFAULT_GAMMA, DEFAULT_TAU, DEFAULT_ZETA
from .ops._validate import GRANULARITIES, check_mask_fields, subject
from .ops.nm import NM_ESTIMATOR, check_nm, check_nm_params

_WHERE = "MaskConfig."  # messages name the field: "MaskConfig.seed must be ..."
_NM_FIELDS = ("n", "m", "nm_scale", "nm_hard")  # granularity="nm" only (checked for every config)


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
    n, m          granularity="nm": learned N:M masks (fastmask.nn.nm.NMMaskedLinear; 1 <= n < m <= 8), one choice
                  among the C(m, n) patterns per group of m consecutive input weights. The estimator is "nm_gumbel"
                  (left at its default, ``estimator`` becomes it), ``beta`` the Gumbel-softmax temperature (default
                  1), ``nm_scale`` the logit scale, ``nm_hard`` straight-through hard masks (else soft); logits
                  start at 0 (init_keep / init_logit do not apply: fastmask.nm_priors sets a prior). n_masks must be 1.
    """

    estimator: str = "hard_concrete"
    granularity: str = "weight"
    block: tuple = (32, 32)
    targets: Optional[list] = None
    init_keep: Optional[float] = 0.9
    init_logit: Optional[float] = None
    beta: Optional[float] = None
    gamma: float = DEFAULT_GAMMA
    zeta: float = DEFAULT_ZETA
    tau: float = DEFAULT_TAU
    n_masks: int = 1
    seed: int = 0
    n: int = 2
    m: int = 4
    nm_scale: float = 1.0
    nm_hard: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> "MaskConfig":
        """Check every field (also called on construction); returns self. Errors name the field. The checks are
        MaskedLinear's own (fastmask.ops._validate.check_mask_fields), so a valid config builds valid layers."""
        nm = self.granularity == "nm"
        if nm and self.estimator not in ("hard_concrete", NM_ESTIMATOR):  # hard_concrete: the field's default
            raise ValueError(f"{subject('estimator', _WHERE)} must be {NM_ESTIMATOR!r} for granularity='nm', got "
                             f"{self.estimator!r}")
        shared = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("targets",) + _NM_FIELDS}
        if nm:  # the shared checks know the gate estimators and grids only: the other fields are checked alike
            shared.update(estimator="hard_concrete", granularity="weight")
        checked = check_mask_fields(_WHERE, **shared)
        if nm:
            checked.update(estimator=NM_ESTIMATOR, granularity="nm")
            if checked["n_masks"] != 1:
                raise ValueError(f"{subject('n_masks', _WHERE)} must be 1 for granularity='nm', got {self.n_masks}")
        for name, value in checked.items():
            setattr(self, name, value)
        self.n, self.m = check_nm(self.n, self.m, _WHERE)
        _, self.nm_scale, self.nm_hard = check_nm_params(1.0, self.nm_scale, self.nm_hard, _WHERE,
                                                         ("beta", "nm_scale", "nm_hard"))
        self.nm_scale = float(self.nm_scale)
        if self.targets is not None:
            if isinstance(self.targets, str):
                self.targets = [self.targets]
            if not isinstance(self.targets, (list, tuple)) or not self.targets:
                raise ValueError(f"{subject('targets', _WHERE)} must be None or a non-empty list of regex strings, "
                                 f"got {self.targets!r}")
            self.targets = list(self.targets)
            for i, pattern in enumerate(self.targets):
                if not isinstance(pattern, str):
                    raise ValueError(f"{subject(f'targets[{i}]', _WHERE)} must be a regex string, got {pattern!r}")
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"{subject(f'targets[{i}]', _WHERE)} is not a valid regex ({exc}): "
                                     f"{pattern!r}") from None
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
