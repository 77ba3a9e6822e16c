"""Configuration of the knowledge experiment: ``KnowledgeConfig`` (every field is a ``fastmask run knowledge`` flag,
with its default and help text) and its validation, and the experiment's name."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal, Optional

from ..runner import RunConfig, check, help_metadata

EXPERIMENT = "knowledge"


# --- configuration ------------------------------------------------------------------------------------------
@dataclass
class KnowledgeConfig(RunConfig):
    """Defaults: the paper's method with a CPU-sized budget on the packaged SmolLM2-135M
    (docs/experiments/knowledge.md)."""

    steps: int = field(default=300, metadata=help_metadata("optimisation steps"))
    checkpoint_every: int = field(default=50, metadata=help_metadata("steps between checkpoints (0: only at the end)"))
    model: str = field(default="smollm2-135m", metadata=help_metadata(
        "causal LM: a fastmask asset name (smollm2-135m), a local folder or a hub id (gpt2, gpt2-xl, ...)"))
    target: str = field(default="building.n.01", metadata=help_metadata("WordNet synset whose TargetKG is suppressed"))
    targets: list[str] = field(default_factory=list, metadata=help_metadata(
        "a study: the whole experiment once per target x seed (--seeds, or --seed), each in <out>/<target>/seed-<s>/ "
        "(resumable per run; targets and seeds can be added on --resume), then mean and 95% t-interval of every "
        "figure over the runs and per target (comma separated; empty: one run of --target)"))
    seeds: list[int] = field(default_factory=list, metadata=help_metadata(
        "seeds of a study (with or without --targets; empty: --seed only)"))
    random_draws: int = field(default=5, metadata=help_metadata(
        "random subnetworks of the learned one's per-layer size scored as the baseline (their mean in the ratios, "
        "their range in the report; about 14 s each on SmolLM2-135M, 1 CPU thread)"))
    targetkg_source: Literal["auto", "paper", "wordnet"] = field(default="auto", metadata=help_metadata(
        "paper: the released set of the synset; wordnet: built from WordNet 3.0; auto: paper when released"))
    targetkg_size: Optional[int] = field(default=20, metadata=help_metadata(
        "wordnet TargetKG: triplets sampled from the synset's graph (none: all)"))
    targetkg_depth: int = field(default=2, metadata=help_metadata("wordnet TargetKG: depth of the hyponym tree"))
    targetkg_ancestors: int = field(default=2, metadata=help_metadata(
        "wordnet TargetKG: hypernym edges above the synset"))
    controlkg_source: Literal["auto", "wordnet", "paper"] = field(default="auto", metadata=help_metadata(
        "training ControlKG: wordnet (sampled from WordNet 3.0) or paper (the released validation set minus the "
        "evaluation part; the paper's training set was not released); auto: wordnet when reachable"))
    controlkg_size: int = field(default=64, metadata=help_metadata("training ControlKG triplets"))
    controlkg_eval_size: int = field(default=50, metadata=help_metadata(
        "held-out ControlKG triplets for evaluation (the first of the released validation set, as the paper)"))
    template: Literal["auto", "lowest-ppl", "released", "fixed"] = field(default="auto", metadata=help_metadata(
        "sentence per triplet: lowest-ppl under the model (the paper's rule), released (the paper's choice, GPT-2 "
        "models), fixed (the first template); auto: released for gpt2* models, else lowest-ppl"))
    tail_tokens: Literal["all", "last"] = field(default="all", metadata=help_metadata(
        "scored tokens of the tail word: all of them or only the last (the released code)"))
    objective_position: Literal["shifted", "released"] = field(default="shifted", metadata=help_metadata(
        "where the training loss reads the logits of a scored tail token: shifted, at the position before it (the "
        "distribution that predicts it, as evaluated); released, at the token's own position (the released code: "
        "the distribution of the token after it)"))
    lm_source: Literal["auto", "local", "hub"] = field(default="auto", metadata=help_metadata(
        "WikiText-2: local shared data folder or the hub (wikitext-2-raw-v1); auto: local when present"))
    lm_block_size: int = field(default=64, metadata=help_metadata("tokens per WikiText-2 block"))
    lm_train_blocks: int = field(default=64, metadata=help_metadata("WikiText-2 blocks for the LM-maintenance loss"))
    lm_eval_blocks: int = field(default=16, metadata=help_metadata("held-out WikiText-2 blocks for LM perplexity"))
    lm_batch: int = field(default=2, metadata=help_metadata("WikiText-2 blocks per step"))
    controlkg_batch: int = field(default=16, metadata=help_metadata("ControlKG sentences per step"))
    targetkg_batch: Optional[int] = field(default=None, metadata=help_metadata(
        "TargetKG sentences per step (none: all)"))
    top_k_layers: int = field(default=6, metadata=help_metadata(
        "mask the attention+MLP projections of the top k blocks"))
    estimator: Literal["gumbel_sigmoid_st", "hard_concrete"] = field(
        default="gumbel_sigmoid_st", metadata=help_metadata(
        "mask estimator"))
    granularity: Literal["weight", "unit_in", "unit_out", "block"] = field(default="weight", metadata=help_metadata(
        "one gate per weight (the paper), per unit, or per block"))
    temperature: float = field(default=1.0, metadata=help_metadata("estimator temperature"))
    init_keep: float = field(default=0.05, metadata=help_metadata(
        "initial probability of a weight being in the subnetwork: logits = logit(init_keep). The paper uses 0.45 "
        "with 40,000 steps; with a few hundred steps that start leaves the logits random-walking around the "
        "threshold (docs/experiments/knowledge.md), so the CPU-budget default starts at 0.05"))
    lr: float = field(default=0.2, metadata=help_metadata("Adam learning rate of the mask logits"))
    warmup_frac: float = field(default=0.1, metadata=help_metadata(
        "linear learning-rate warm-up, fraction of the steps"))
    lambda_target: float = field(default=1.5, metadata=help_metadata("weight of the TargetKG suppression KL"))
    lambda_control: float = field(default=1.0, metadata=help_metadata("weight of the ControlKG maintenance KL"))
    lambda_lm: float = field(default=1.0, metadata=help_metadata("weight of the LM maintenance KL"))
    lambda_reg_init: float = field(default=2.0, metadata=help_metadata(
        "sparsity weight for the first half of the steps"))
    lambda_reg_final: float = field(default=3.0, metadata=help_metadata(
        "sparsity weight reached linearly at the last step"))
    eval_every: int = field(default=0, metadata=help_metadata(
        "steps between TargetKG/ControlKG evaluations (0: at the end)"))
    eval_batch: int = field(default=32, metadata=help_metadata("sentences / blocks per evaluation batch"))
    data_parallel: Literal["fsdp", "ddp"] = field(default="fsdp", metadata=help_metadata(
        "under torchrun: fsdp shards the masked blocks (logits, frozen weights, Adam state) over the processes "
        "with FSDP2; ddp keeps a whole copy on every process and all-reduces the logits' gradients"))

    def validate(self) -> "KnowledgeConfig":
        super().validate()
        for name in ("controlkg_size", "controlkg_eval_size", "lm_block_size", "lm_train_blocks", "lm_eval_blocks",
                     "lm_batch", "controlkg_batch", "top_k_layers", "eval_batch"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, name, "an int >= 1", value)
        for name in ("targetkg_size", "targetkg_batch"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, int) and value >= 1), name, "an int >= 1 or none", value)
        check(self.targetkg_depth >= 1, "targetkg_depth", "an int >= 1", self.targetkg_depth)
        check(self.targetkg_ancestors >= 0, "targetkg_ancestors", "an int >= 0", self.targetkg_ancestors)
        check(self.eval_every >= 0, "eval_every", "an int >= 0", self.eval_every)
        for target in [self.target, *self.targets]:
            check(re.fullmatch(r"[A-Za-z0-9_'.-]+\.n\.\d\d", target) is not None, "targets" if self.targets else
                  "target", "a WordNet noun synset name like building.n.01", target)
        check(len(set(self.targets)) == len(self.targets), "targets", "distinct targets", self.targets)
        check(all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63 for s in self.seeds)
              and len(set(self.seeds)) == len(self.seeds), "seeds", "distinct ints in [0, 2**63)", self.seeds)
        check(isinstance(self.random_draws, int) and self.random_draws >= 1, "random_draws", "an int >= 1",
              self.random_draws)
        for name in ("temperature", "lr"):
            value = getattr(self, name)
            check(math.isfinite(value) and value > 0, name, "a finite number > 0", value)
        check(0 < self.init_keep < 1, "init_keep", "a probability in (0, 1)", self.init_keep)
        check(0 <= self.warmup_frac < 1, "warmup_frac", "a fraction in [0, 1)", self.warmup_frac)
        for name in ("lambda_target", "lambda_control", "lambda_lm", "lambda_reg_init", "lambda_reg_final"):
            value = getattr(self, name)
            check(math.isfinite(value) and value >= 0, name, "a finite number >= 0", value)
        return self


__all__ = ["EXPERIMENT", "KnowledgeConfig"]
