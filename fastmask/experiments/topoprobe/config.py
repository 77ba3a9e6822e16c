"""Configuration of the topoprobe experiment: TopoprobeConfig (the CLI flags, their checks and the --full preset)
and its constants."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal, Optional

from ..runner import RunConfig, check, help_metadata

EXPERIMENT = "topoprobe"
FULL_SEEDS = list(range(1, 41, 4))  # the released sweep: seeds 1, 5, ..., 37
# The paper's BERT-large X_sp (released doc-assets/sp_l*.csv, last epoch), for the report.
PAPER_SP = {0: 1.525, 16: 0.518, 24: 1.23}


@dataclass
class TopoprobeConfig(RunConfig):
    """Defaults: a CPU-sized budget on the packaged all-MiniLM-L6-v2; --full: the paper's setting."""

    steps: int = field(default=40, metadata=help_metadata(
        "fine-tuning optimisation steps per run: with 40 the default 8 runs took 7.5 min on 1 thread of a shared "
        "2-core CPU (about 1.2 s a step of 32); full: 3 CoLA epochs"))
    model: str = field(default="all-minilm-l6-v2", metadata=help_metadata(
        "HF encoder: a fastmask asset name (all-minilm-l6-v2), a local folder or a hub id (bert-large-uncased)"))
    masks: Optional[str] = field(default=None, metadata=help_metadata(
        "fastmask masks (fm.save_masks folder) of this model: probe the subnetwork too"))
    layers: Optional[list[int]] = field(default=None, metadata=help_metadata(
        "layers to probe (none: all, 0 = embeddings)"))
    val_split: Literal["dev", "test"] = field(default="dev", metadata=help_metadata(
        "treebank split the probes are validated on (full: test, as the released code)"))
    probe_train_sentences: int = field(default=1000, metadata=help_metadata("treebank training sentences (0: all)"))
    probe_val_sentences: int = field(default=300, metadata=help_metadata("treebank validation sentences (0: all)"))
    pseudo_corpus: Literal["treebank", "cola"] = field(default="treebank", metadata=help_metadata(
        "sentences of X_ssp / X_essp: the treebank's (comparable with X_sp) or acceptable CoLA training sentences "
        "(part of the released code's mixture)"))
    probe_rank: Optional[int] = field(default=None, metadata=help_metadata("probe rank (none: hidden size / 2)"))
    probe_epochs: int = field(default=10, metadata=help_metadata("probe training epochs (full: 30)"))
    probe_lr: float = field(default=1e-3, metadata=help_metadata(
        "Adam learning rate of the probes (linear decay to 0)"))
    batch_size: int = field(default=32, metadata=help_metadata("sentences per batch (features, probes, fine-tuning)"))
    include_padding: bool = field(default=False, metadata=help_metadata(
        "the released code's behaviour: [CLS], [SEP] and padding enter the probe losses"))
    distance_probe: bool = field(default=True, metadata=help_metadata("also train H&M's distance probe (UUAS)"))
    feature_dtype: Literal["float16", "float32"] = field(default="float16", metadata=help_metadata(
        "storage of the hidden states (the probes compute in float32)"))
    feature_memory_gb: float = field(default=4.0, metadata=help_metadata(
        "hidden states held at once; more layers than fit are extracted in several passes"))
    max_length: int = field(default=128, metadata=help_metadata("pieces per sentence; longer sentences are left out"))
    finetune: bool = field(default=True, metadata=help_metadata("run the probe-regularised fine-tuning on CoLA"))
    finetune_layers: Optional[list[int]] = field(default=None, metadata=help_metadata(
        "layers of the regularising probe (none: three spread layers; full: all)"))
    finetune_seeds: list[int] = field(default_factory=lambda: [1, 5], metadata=help_metadata(
        "fine-tuning seeds (full: 1, 5, ..., 37)"))
    finetune_train_sentences: int = field(default=0, metadata=help_metadata(
        "CoLA training sentences (0: all; the 40 default steps see 1280 of the 8551, so no subset is needed)"))
    finetune_lr: float = field(default=1e-4, metadata=help_metadata("AdamW learning rate (full: 2e-5), 10% warm-up"))
    freeze_word_embeddings: bool = field(default=True, metadata=help_metadata(
        "keep the word-embedding matrix frozen while fine-tuning (a third of the step time on a CPU; full: false)"))
    class_weighted: bool = field(default=False, metadata=help_metadata(
        "class-weighted cross-entropy (weights n / (2 n_class) of the training rows; not the paper's). CoLA is 70% "
        "acceptable: short MiniLM runs end on one class with or without it (measured, 40 steps of 32 at lr 1e-4: plain "
        "CE all 'acceptable'; weighted, one class per run, either one); a 200-step run of 16 with it reached dev MCC "
        "0.06-0.14 (docs/experiments/topoprobe.md)"))
    probe_weight: float = field(default=10.0, metadata=help_metadata("weight w of the probe loss (released: 10)"))
    full: bool = field(default=False, metadata=help_metadata(
        "the paper's setting: overrides the budget flags (sentences, epochs, layers, seeds, steps, lr, val split)"))

    def validate(self) -> "TopoprobeConfig":
        super().validate()
        for name in ("probe_train_sentences", "probe_val_sentences", "finetune_train_sentences"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 0, name, "an int >= 0 (0: all / auto)", value)
        for name in ("probe_epochs", "batch_size", "max_length"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, name, "an int >= 1", value)
        check(self.max_length >= 3, "max_length", "an int >= 3", self.max_length)
        check(self.probe_rank is None or self.probe_rank >= 1, "probe_rank", "an int >= 1 or none", self.probe_rank)
        for name in ("probe_lr", "finetune_lr", "feature_memory_gb"):
            value = getattr(self, name)
            check(math.isfinite(value) and value > 0, name, "a finite number > 0", value)
        check(math.isfinite(self.probe_weight) and self.probe_weight >= 0, "probe_weight", "a finite number >= 0",
              self.probe_weight)
        for name in ("layers", "finetune_layers"):
            value = getattr(self, name)
            check(value is None or (len(value) > 0 and all(v >= 0 for v in value)), name,
                  "none or a non-empty list of layer indices >= 0", value)
        check(len(self.finetune_seeds) > 0 and all(s >= 0 for s in self.finetune_seeds), "finetune_seeds",
              "a non-empty list of ints >= 0", self.finetune_seeds)
        return self

    def effective(self) -> "TopoprobeConfig":
        """The config with --full's values applied (the paper's setting)."""
        if not self.full:
            return self
        return replace(self, probe_train_sentences=0, probe_val_sentences=0, val_split="test", probe_epochs=30,
                       finetune_layers=None, finetune_seeds=list(FULL_SEEDS), finetune_train_sentences=0,
                       finetune_lr=2e-5, freeze_word_embeddings=False, steps=3 * math.ceil(8551 / self.batch_size))
