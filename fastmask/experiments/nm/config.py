"""Configuration of the nm experiment: ``NMConfig`` (every field is a ``fastmask run nm`` flag) and its checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ..runner import RunConfig, check, help_metadata

EXPERIMENT = "nm"
PRIOR_CHOICES = ("magnitude", "wanda")


@dataclass
class NMConfig(RunConfig):
    """Defaults: a CPU-sized budget on the packaged SmolLM2-135M (docs/experiments/nm.md)."""

    steps: int = field(default=100, metadata=help_metadata(
        "optimisation steps of EACH learned mask (one per --learn-from prior)"))
    checkpoint_every: int = field(default=50, metadata=help_metadata(
        "steps between checkpoints (0: only at the end); a SmolLM2 checkpoint holds 0.6 GB of logits + 1.3 GB of Adam "
        "moments"))
    keep_checkpoints: int = field(default=1, metadata=help_metadata("newest checkpoints kept on disk per learned mask"))
    model: str = field(default="smollm2-135m", metadata=help_metadata(
        "causal LM: a fastmask asset name (smollm2-135m), a local folder or a hub id"))
    n: int = field(default=2, metadata=help_metadata("N of N:M: weights kept per group"))
    m: int = field(default=4, metadata=help_metadata("M of N:M: consecutive input weights per group (<= 8)"))
    priors: list[str] = field(default_factory=lambda: list(PRIOR_CHOICES), metadata=help_metadata(
        "one-shot masks evaluated as baselines (magnitude, wanda)"))
    learn_from: list[str] = field(default_factory=lambda: ["wanda"], metadata=help_metadata(
        "priors (among --priors) that a mask is learned from, one learned mask each; default the stronger one, "
        "wanda (magnitude,wanda: both, about twice the time)"))
    lm_source: Literal["auto", "local", "hub"] = field(default="auto", metadata=help_metadata(
        "WikiText-2: local shared data folder (train on valid, evaluate on test) or the hub (train on train, evaluate "
        "on test); auto: local when present"))
    block_size: int = field(default=128, metadata=help_metadata("tokens per WikiText-2 block"))
    train_blocks: int = field(default=64, metadata=help_metadata("training blocks (the first of the training split)"))
    calib_blocks: int = field(default=16, metadata=help_metadata(
        "Wanda calibration blocks (the first training blocks)"))
    eval_blocks: int = field(default=16, metadata=help_metadata(
        "evaluation blocks (the first of the test split; 0: the whole test split)"))
    batch: int = field(default=2, metadata=help_metadata("training blocks per step"))
    eval_batch: int = field(default=4, metadata=help_metadata("blocks per evaluation forward"))
    lr: float = field(default=0.05, metadata=help_metadata(
        "Adam learning rate of the logits (Adam moves every logit by about lr per step: 0.5 made a SmolLM2 run's loss "
        "climb from 9.6 to 30 in 6 steps; 0.1 with prior strength 2 flipped a third of the groups on noise)"))
    optimizer: Literal["adam", "adafactor"] = field(default="adam", metadata=help_metadata(
        "adam: torch.optim.Adam (24 B of mask state per weight for 2:4: fp32 logits, gradient, two moments); "
        "adafactor: torch.optim.Adafactor stepped inside the backward (fastmask.optim.OptimizerInBackward: no "
        "gradient kept, a factored second moment, no first moment; 7 B per weight for 2:4). Adafactor's step is "
        "relative: about lr x RMS(logits) per step"))
    prior_strength: float = field(default=5.0, metadata=help_metadata(
        "logit of the prior pattern over a pattern sharing none of its kept weights (MaskLLM's prior; 2 let a third "
        "of the groups leave the prior on noise, 10 kept every group at the prior: docs/experiments/nm.md)"))
    temperature: float = field(default=0.5, metadata=help_metadata(
        "Gumbel-softmax temperature at step 0 (low: the samples stay near the prior, whose one-shot loss is already "
        "far above the dense model's)"))
    temperature_final: float = field(default=0.2, metadata=help_metadata(
        "temperature at the last step (linear schedule; MaskLLM anneals 4 -> 0.05 over 2000 steps)"))
    scale: float = field(default=1.0, metadata=help_metadata(
        "logit scale factor kappa (MaskLLM: 100 -> 500 with logits of another range)"))
    hard: bool = field(default=True, metadata=help_metadata(
        "straight-through hard masks (exactly N:M every step); false: soft masks"))

    def validate(self) -> "NMConfig":
        super().validate()
        check(isinstance(self.m, int) and 2 <= self.m <= 8, "m", "an int in [2, 8]", self.m)
        check(isinstance(self.n, int) and 1 <= self.n < self.m, "n", f"an int in [1, m - 1 = {self.m - 1}]", self.n)
        check(len(self.priors) > 0 and all(p in PRIOR_CHOICES for p in self.priors)
              and len(set(self.priors)) == len(self.priors), "priors",
              f"a non-empty list of distinct values among {list(PRIOR_CHOICES)}", self.priors)
        check(all(p in self.priors for p in self.learn_from) and len(set(self.learn_from)) == len(self.learn_from),
              "learn_from", f"distinct values among --priors {self.priors} (empty: no learned mask)", self.learn_from)
        for name in ("block_size", "train_blocks", "calib_blocks", "batch", "eval_batch"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, name, "an int >= 1", value)
        check(isinstance(self.eval_blocks, int) and self.eval_blocks >= 0, "eval_blocks", "an int >= 0 (0: all)",
              self.eval_blocks)
        check(self.batch <= self.train_blocks, "batch", f"at most train_blocks={self.train_blocks}", self.batch)
        check(self.calib_blocks <= self.train_blocks, "calib_blocks", f"at most train_blocks={self.train_blocks}",
              self.calib_blocks)
        for name in ("lr", "temperature", "temperature_final", "scale"):
            value = getattr(self, name)
            check(math.isfinite(value) and value > 0, name, "a finite number > 0", value)
        check(math.isfinite(self.prior_strength) and self.prior_strength >= 0, "prior_strength",
              "a finite number >= 0", self.prior_strength)
        return self


def temperature_at(config: NMConfig, step: int) -> float:
    """The linear temperature schedule from ``temperature`` (step 0) to ``temperature_final`` (the last step)."""
    frac = step / max(1, config.steps - 1)
    return config.temperature + (config.temperature_final - config.temperature) * frac
