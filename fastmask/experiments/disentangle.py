"""`fastmask run disentangle`: disentangled representations of text by masking a frozen transformer (Zhang, van de
Meent, Wallace, EMNLP 2021), one mask per factor, all K masks learned in one forward pass.

* Model: a frozen encoder (all-MiniLM-L6-v2 offline; any Hugging Face encoder id or folder via ``--model``);
  ``fastmask.apply`` with ``MaskConfig(n_masks=K)`` over the attention/MLP linear layers of its top ``top_blocks``
  transformer blocks (0: every block; ``--granularity weight | unit_in | unit_out``), estimator ``threshold_st``
  (the paper's), ``hard_concrete`` or ``gumbel_sigmoid_st``. The representation z_k is the attention-masked mean
  of the last hidden states under mask k.
* Top-block caching: the blocks below the masked ones are frozen and unmasked, so their output (the input of the
  first masked block) is computed once per text, in the same pass as the unmasked baseline's features, and every
  training / evaluation forward runs from it (the lower blocks swapped for pass-throughs). A step then costs the
  masked blocks only: measured on the shared 2-core CPU (1 thread, 48 texts of <= 24 tokens, K = 2, weight masks)
  0.7 s with the top 2 blocks and 1.2 s with the top 3, against 1.5-1.7 s for 36 texts through all 6 blocks.
* One step: B anchors; per factor k a positive (same value of factor k; with ``triplet_sampling=contrast`` also a
  different value of the other factors) and a negative (other value of factor k; contrast: the same other factors);
  the K groups (anchors, positives, negatives) run as ONE batch with ``fm.mask_index(encoder, "grouped")`` (group k
  through mask k). Loss = sum_k [ CE(head_k(z_k(anchor)), y_k) + triplet_weight * max(0, |z_a - z_p| - |z_a - z_n|
  + margin) + l0_weight * expected density of mask k ] + overlap_weight * mean over gates of the product of the K
  masks' keep probabilities (pairs, for K > 2).
* Magnitude pruning (the paper prunes, then masks): the smallest-magnitude weights of the masked layers (globally
  or per layer, an exact fraction) are set to zero in the frozen weight before the masks are learned. Multiplying
  the frozen weight by a fixed 0/1 mask is the clean way here: the weights are frozen anyway, so a pruned weight
  can never come back, it needs no extra parameters or frozen logits (which Adam's state and the L0 penalty would
  still count), it works for every granularity and estimator, and the masked model's sparsity is then the union
  of the pruned weights and the closed gates. The unmasked baseline uses the unpruned model.
* Evaluation (all on frozen features, eval-mode gates): fresh logistic-regression probes per representation (each
  mask, the unmasked model, the adversarial baseline per factor) and per factor, trained on a balanced
  (uncorrelated) probe split and scored on a balanced test split: the leakage table (own factor high, others near
  chance 0.5). Robustness: a probe for a representation's own factor trained on the CORRELATED training split
  (factors agree on ``train_agreement`` of it) and tested on the SHIFTED split (agreement 1 - train_agreement): a
  representation that carries the other factor lets the probe lean on it and loses accuracy there. A
  sparsity-vs-disentanglement curve: masks retrained (``sweep_steps``) at each pruning sparsity of the sweep.
* Adversarial-removal baseline (gradient reversal), per factor k: an MLP over the frozen unmasked features trained on
  the same training split to predict factor k while adversaries predicting the other factors see its output
  through a gradient-reversal layer (a deviation from fine-tuning the whole encoder adversarially, for CPU budget;
  it removes the factor from the pooled representation the same way).
* Fine-tuned baseline, per factor k: a fresh copy of the encoder whose masked blocks (the same top blocks; their
  input cached the same way) are fine-tuned with a linear head for factor k (cross-entropy, ``finetune_steps``).
* Data (``--data``, see disentangle_data): ``tweets`` (default; the paper's setting 2, toxicity x dialect) or
  ``reviews`` (an offline stand-in for setting 1, sentiment x genre: Pang & Lee sentence polarity x the aspect a
  sentence talks about, acting or story, from a keyword lexicon). Split sizes and max_length default per setting.
* Not implemented: fine-tuning the whole encoder when ``top_blocks`` > 0; pruning WITH masking (gradual); the
  paper's genre labels (IMDB reviews with genre: not reachable offline) and setting 3 (syntax vs semantics).
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

from torch import nn

from .. import distributed as fmd
from .blocks import block_index, block_list, run_from_block
from .runner import (BatchStream, ConfigError, Run, RunConfig, TrainState, add_config_arguments, check, help_metadata,
                     markdown_table, open_run, pyplot, resolve_device, save_figure, run_cli, seed_everything)

EXPERIMENT = "disentangle"
ESTIMATORS = ("threshold_st", "hard_concrete", "gumbel_sigmoid_st")
# Per-setting defaults of the fields left None. Reviews: the rarest cell (negative x acting) holds 301 sentences, and
# the shifted split needs 40% of its size from it; 40 tokens keep a sentence's aspect word in 97% of them (24: 81%).
SETTING_DEFAULTS = {
    "tweets": {"train_size": 600, "probe_size": 300, "test_size": 300, "shifted_size": 300, "max_length": 24},
    "reviews": {"train_size": 500, "probe_size": 250, "test_size": 250, "shifted_size": 250, "max_length": 40},
}


@dataclass
class DisentangleConfig(RunConfig):
    """Defaults: the paper's method on the offline tweets, sized for a few minutes on a 2-core CPU
    (docs/experiments/disentangle.md)."""

    steps: int = field(default=200, metadata=help_metadata("mask-learning steps"))
    checkpoint_every: int = field(default=50, metadata=help_metadata("steps between checkpoints (0: only at the end)"))
    model: str = field(default="all-minilm-l6-v2", metadata=help_metadata(
        "encoder: a packaged model name, a local folder or a Hugging Face hub id"))
    data: Literal["tweets", "reviews"] = field(default="tweets", metadata=help_metadata(
        "two-factor data: tweets = Davidson toxicity x TwitterAAE dialect (the paper's setting 2); reviews = Pang & "
        "Lee sentence polarity x the aspect a sentence talks about (acting / story, keyword lexicon), an offline "
        "stand-in for the paper's setting 1, sentiment x genre of movie reviews (no genre-labelled review set is "
        "packaged or downloaded)"))
    data_limit: Optional[int] = field(default=None, metadata=help_metadata(
        "read only the first N raw examples (tests)"))
    dialect_confidence: float = field(default=0.6, metadata=help_metadata(
        "AAE share of the AAE+White proportions needed for an AAE (or 1 - it for a White-aligned) label"))
    train_size: Optional[int] = field(default=None, metadata=help_metadata(
        "training split size (masks, heads, robustness probes) (default: 600 tweets, 500 reviews)"))
    probe_size: Optional[int] = field(default=None, metadata=help_metadata(
        "balanced split the leakage probes are trained on (default: 300 tweets, 250 reviews)"))
    test_size: Optional[int] = field(default=None, metadata=help_metadata(
        "balanced split the leakage probes are scored on (default: 300 tweets, 250 reviews)"))
    shifted_size: Optional[int] = field(default=None, metadata=help_metadata(
        "test split with the reversed factor correlation (default: 300 tweets, 250 reviews)"))
    train_agreement: float = field(default=0.8, metadata=help_metadata(
        "fraction of training examples whose two factor labels agree (0.5: uncorrelated)"))
    max_length: Optional[int] = field(default=None, metadata=help_metadata(
        "tokens per text, longer ones are cut (default: 24 tweets, 40 reviews)"))
    batch_size: int = field(default=8, metadata=help_metadata("anchors per step (x 3 texts x K masks per forward)"))
    estimator: Literal["threshold_st", "hard_concrete", "gumbel_sigmoid_st"] = field(
        default="threshold_st", metadata=help_metadata("mask estimator (threshold_st: the paper's)"))
    granularity: Literal["weight", "unit_in", "unit_out"] = field(default="weight", metadata=help_metadata(
        "mask weights or hidden units of the attention/MLP linear layers"))
    top_blocks: int = field(default=3, metadata=help_metadata(
        "mask the linear layers of the top N transformer blocks only: the blocks below stay frozen and unmasked, "
        "so their output is computed once per text and cached (0: every block)"))
    triplet_sampling: Literal["contrast", "random"] = field(default="contrast", metadata=help_metadata(
        "contrast: the positive differs from the anchor in the other factors and the negative shares them; "
        "random: any positive / negative"))
    init_keep: float = field(default=0.55, metadata=help_metadata(
        "initial keep probability of every gate (near 0.5: the logits start near the threshold, so a few Adam steps "
        "can close a gate)"))
    lr: float = field(default=0.1, metadata=help_metadata("Adam learning rate of the mask logits"))
    head_lr: float = field(default=0.003, metadata=help_metadata("Adam learning rate of the classification heads"))
    triplet_weight: float = field(default=1.0, metadata=help_metadata("weight of the triplet loss"))
    margin: float = field(default=1.0, metadata=help_metadata("triplet margin (Euclidean distance of pooled vectors)"))
    overlap_weight: float = field(default=0.0, metadata=help_metadata("weight of the mask-overlap penalty"))
    l0_weight: float = field(default=0.0, metadata=help_metadata("weight of each mask's expected density (L0)"))
    prune_sparsity: float = field(default=0.0, metadata=help_metadata(
        "fraction of the masked layers' weights removed by magnitude pruning before masking"))
    prune_scope: Literal["global", "layer"] = field(default="global", metadata=help_metadata(
        "magnitude threshold over all masked layers together, or per layer"))
    sweep_sparsities: list[float] = field(default_factory=lambda: [0.5, 0.8], metadata=help_metadata(
        "pruning sparsities of the sparsity-vs-disentanglement curve (comma separated; empty: no sweep)"))
    sweep_steps: int = field(default=200, metadata=help_metadata("mask-learning steps per sweep point"))
    adv_steps: int = field(default=300, metadata=help_metadata("full-batch steps of the adversarial baseline"))
    finetune_steps: int = field(default=100, metadata=help_metadata(
        "steps of the fine-tuned baseline (the masked blocks' weights trained per factor; 0: no such baseline)"))
    finetune_lr: float = field(default=1e-4, metadata=help_metadata("Adam learning rate of the fine-tuned baseline"))
    adv_lambda: float = field(default=1.0, metadata=help_metadata(
        "gradient-reversal strength of the adversarial baseline"))
    probe_l2: float = field(default=1e-3, metadata=help_metadata("L2 penalty of the logistic-regression probes"))
    eval_batch: int = field(default=64, metadata=help_metadata("texts per forward when extracting features"))
    backend: Literal["auto", "reference", "cpu", "cuda", "triton"] = field(default="auto", metadata=help_metadata(
        "fastmask op backend (fastmask.set_backend); auto: the fastest available per device"))

    def validate(self) -> "DisentangleConfig":
        super().validate()
        check(self.data in SETTING_DEFAULTS, "data", f"one of {sorted(SETTING_DEFAULTS)}", self.data)
        for name, value in SETTING_DEFAULTS[self.data].items():  # the setting's defaults for the fields left None
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("train_size", "probe_size", "test_size", "shifted_size", "max_length", "batch_size",
                     "eval_batch", "adv_steps", "sweep_steps"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, name, "an int >= 1", value)
        check(isinstance(self.top_blocks, int) and self.top_blocks >= 0, "top_blocks", "an int >= 0",
              self.top_blocks)
        check(isinstance(self.finetune_steps, int) and self.finetune_steps >= 0, "finetune_steps", "an int >= 0",
              self.finetune_steps)
        check(self.data_limit is None or self.data_limit >= 1, "data_limit", "None or an int >= 1", self.data_limit)
        check(0.5 < self.dialect_confidence < 1, "dialect_confidence", "a number in (0.5, 1)", self.dialect_confidence)
        check(0 <= self.train_agreement <= 1, "train_agreement", "a fraction in [0, 1]", self.train_agreement)
        check(0 < self.init_keep < 1, "init_keep", "a probability in (0, 1)", self.init_keep)
        for name in ("lr", "head_lr", "margin", "finetune_lr"):
            check(math.isfinite(getattr(self, name)) and getattr(self, name) > 0, name, "a finite number > 0",
                  getattr(self, name))
        for name in ("triplet_weight", "overlap_weight", "l0_weight", "adv_lambda", "probe_l2"):
            check(math.isfinite(getattr(self, name)) and getattr(self, name) >= 0, name, "a finite number >= 0",
                  getattr(self, name))
        check(0 <= self.prune_sparsity < 1, "prune_sparsity", "a fraction in [0, 1)", self.prune_sparsity)
        for s in self.sweep_sparsities:
            check(0 <= s < 1, "sweep_sparsities", "fractions in [0, 1)", self.sweep_sparsities)
        return self


# --- losses -------------------------------------------------------------------------------------------------
def mean_pool(hidden, attention_mask):
    """The mean of the hidden states over the real (attention_mask = 1) tokens: (batch, hidden)."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def triplet_loss(anchor, positive, negative, margin: float):
    """mean over rows of max(0, |a - p|_2 - |a - n|_2 + margin)."""
    import torch

    return torch.relu((anchor - positive).norm(dim=-1) - (anchor - negative).norm(dim=-1) + margin).mean()


def keep_probability(layer):
    """Differentiable keep probability of every gate of a MaskedLinear, (K, GR, GC): sigmoid(l - tau) for
    threshold_st, sigmoid(l) otherwise (gumbel_sigmoid_st's P(open); hard concrete's logit of the open state)."""
    import torch

    shift = layer.tau if layer.estimator == "threshold_st" else 0.0
    return torch.sigmoid(layer.logits - shift)


def overlap_penalty(model):
    """Mean over every gate (each weighted by the weights it covers) of the product of two masks' keep
    probabilities, averaged over the pairs of masks: 0 when no weight is kept by two masks."""
    import fastmask as fm

    total, count = 0.0, 0
    for layer in fm.masked_modules(model).values():
        p = keep_probability(layer)
        weights = layer.gate_weight_counts().to(p.device, p.dtype)
        pairs = [(i, j) for i in range(p.shape[0]) for j in range(i + 1, p.shape[0])]
        for i, j in pairs:
            total = total + (p[i] * p[j] * weights).sum() / len(pairs)
        count += layer.weight.numel()
    return total / count


def grad_reverse(x, strength: float):
    """Identity forward, gradient multiplied by -strength backward (the gradient-reversal layer), without an
    autograd.Function: x.detach() carries the value, strength * (x.detach() - x) is 0 with gradient -strength."""
    return x.detach() + strength * (x.detach() - x)


# --- pruning ------------------------------------------------------------------------------------------------
def magnitude_prune(model, sparsity: float, scope: str = "global") -> dict:
    """Zero the ``sparsity`` fraction of smallest-|w| weights of the model's masked layers (exactly floor(sparsity *
    n) per layer, or over all layers together for scope="global"; ties broken by position). In place, on the
    frozen weights. Returns {layer name: fraction pruned}."""
    import torch

    import fastmask as fm

    if scope not in ("global", "layer"):
        raise ValueError(f"magnitude_prune: scope must be 'global' or 'layer', got {scope!r}")
    if not 0 <= sparsity < 1:
        raise ValueError(f"magnitude_prune: sparsity must be a fraction in [0, 1), got {sparsity!r}")
    layers = fm.masked_modules(model)

    def zero_smallest(flat_abs, n_prune):
        keep = torch.ones_like(flat_abs, dtype=torch.bool)
        if n_prune:
            order = torch.sort(flat_abs, stable=True).indices  # stable: ties by position, an exact count
            keep[order[:n_prune]] = False
        return keep

    with torch.no_grad():
        if scope == "global":
            flat = torch.cat([layer.weight.detach().abs().flatten().float().cpu() for layer in layers.values()])
            keep = zero_smallest(flat, int(sparsity * flat.numel()))
            pieces = keep.split([layer.weight.numel() for layer in layers.values()])
        else:
            pieces = [zero_smallest(layer.weight.detach().abs().flatten().float().cpu(),
                                    int(sparsity * layer.weight.numel())) for layer in layers.values()]
        pruned = {}
        for (name, layer), keep in zip(layers.items(), pieces):
            layer.weight.mul_(keep.view(layer.weight.shape).to(layer.weight.device, layer.weight.dtype))
            pruned[name] = 1.0 - keep.float().mean().item()
    return pruned


def zero_fraction(model, mask: int) -> float:
    """Fraction of the masked layers' weights that are zero under mask ``mask`` (eval gates): pruned OR gated off.
    (fm.sparsity counts closed gates only; a pruned weight's gate gets no gradient and stays open.)"""
    import torch

    import fastmask as fm

    zeros, total = 0, 0
    with torch.no_grad():
        for layer in fm.masked_modules(model).values():
            closed = layer.mask(mask=mask) == 0  # expanded in the weight's own layout (Conv1D: (in, out))
            zeros += int(((layer.weight.detach() == 0) | closed.to(layer.weight.device)).sum())
            total += layer.weight.numel()
    return zeros / total


# --- the model ----------------------------------------------------------------------------------------------
class Encoded:
    """Token ids (padded to the longest text, cut at max_length) of a list of texts, and once set, ``h0``: the
    input of the first masked block for every text (n, tokens, hidden; None: the masks cover every block)."""

    def __init__(self, tokenizer, texts: Sequence[str], max_length: int):
        batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        self.input_ids, self.attention_mask = batch["input_ids"], batch["attention_mask"]
        self.h0 = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, indices, device):
        """(input_ids, attention_mask, h0 or None) of ``indices``, trimmed to their longest text."""
        import torch

        index = torch.as_tensor(list(indices), dtype=torch.long)
        mask = self.attention_mask[index]
        width = max(int(mask.sum(1).max()), 1)
        h0 = None if self.h0 is None else self.h0[index, :width].to(device)
        return self.input_ids[index, :width].to(device), mask[:, :width].to(device), h0


def encoder_blocks(encoder) -> tuple[str, int]:
    """(qualified name of the encoder's list of transformer blocks, its length), from the default mask targets."""
    path, n_blocks, _ = block_list(encoder)
    return path, n_blocks


def first_masked_block(encoder, top_blocks: int) -> int:
    """Index of the lowest masked block: n_blocks - top_blocks (0 for top_blocks 0, i.e. every block)."""
    _, n_blocks = encoder_blocks(encoder)
    if top_blocks > n_blocks:
        raise ConfigError(f"top_blocks must be <= the encoder's {n_blocks} blocks, got {top_blocks}")
    return n_blocks - top_blocks if top_blocks else 0


def mask_targets(encoder, first: int) -> Optional[list]:
    """MaskConfig.targets covering the default linear layers of the blocks from ``first`` up (None: every block)."""
    import re

    import fastmask as fm

    if first == 0:
        return None
    return [r"(?:^|\.)" + re.escape(name) + "$" for name, _ in fm.hf.find_targets(encoder, fm.MaskConfig())
            if block_index(name)[1] >= first]


def _torch_module():
    from torch import nn

    return nn


class DisentangleModel(_torch_module().Module):
    """A masked encoder with K masks (one per factor) and a linear head per factor.

    ``grouped(ids, mask, h0)``: the rows are K equal contiguous groups, group k through mask k: (K, rows / K, hidden).
    ``represent(ids, mask, k, h0)``: every row through mask k (k None: the encoder without masks).
    ``h0``: the cached input of block ``first`` (``block_inputs``); given, the blocks below ``first`` are skipped
    (None: the whole encoder runs)."""

    def __init__(self, encoder, n_classes: Sequence[int], first: int = 0):
        from torch import nn

        import fastmask as fm

        super().__init__()
        self.encoder = encoder
        self.first = first
        self._blocks_path = encoder_blocks(encoder)[0] if first else None
        self.n_masks = len(n_classes)
        if fm.masked_modules(encoder) and next(iter(fm.masked_modules(encoder).values())).n_masks != self.n_masks:
            raise ValueError(f"DisentangleModel: the encoder has masks of another count than the {self.n_masks} "
                             f"factors")
        hidden = encoder.config.hidden_size
        self.heads = nn.ModuleList(nn.Linear(hidden, c) for c in n_classes)

    def block_inputs(self, input_ids, attention_mask):
        """The input of block ``first`` (the output of the frozen, unmasked blocks below it), no gradient."""
        import torch

        with torch.no_grad():
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states[self.first].detach()

    def pooled(self, input_ids, attention_mask, h0=None):
        """Mean-pooled last hidden states under the current mask mode."""
        blocks = self.encoder.get_submodule(self._blocks_path) if self.first else None
        with run_from_block(blocks, self.first if h0 is not None else 0, h0):
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return mean_pool(out.last_hidden_state, attention_mask)

    def grouped(self, input_ids, attention_mask, h0=None):
        import fastmask as fm

        rows = input_ids.shape[0]
        if rows % self.n_masks:
            raise ValueError(f"DisentangleModel.grouped: {rows} rows are not {self.n_masks} equal groups")
        with fm.mask_index(self.encoder, "grouped"):
            z = self.pooled(input_ids, attention_mask, h0)
        return z.view(self.n_masks, rows // self.n_masks, -1)

    def represent(self, input_ids, attention_mask, k: Optional[int], h0=None):
        import fastmask as fm

        if k is None:
            with fm.bypass(self.encoder):
                return self.pooled(input_ids, attention_mask, h0)
        with fm.mask_index(self.encoder, k):
            return self.pooled(input_ids, attention_mask, h0)


def step_loss(model: DisentangleModel, data: Encoded, labels, sampler, anchors: Sequence[int], step: int, config,
              device, share: float = 1.0, rank: int = 0, world: int = 1) -> tuple:
    """The training loss of one step and its row of history.csv (see the module docstring). Data parallel: the
    triplets are drawn for all ``anchors`` (the global batch, so every rank draws the one-process run's triplets),
    this rank keeps every ``world``-th from ``rank`` and weights its per-anchor means by ``share`` (its anchors x
    world / all anchors: the ranks' gradients then average to the global mean)."""
    import torch.nn.functional as F

    import fastmask as fm

    rows, mine = [], list(anchors)[rank::world]
    for k in range(model.n_masks):
        positives, negatives = sampler.sample(anchors, k, step)
        rows += mine + positives[rank::world] + negatives[rank::world]
    z = model.grouped(*data.batch(rows, device))  # (K, 3B, hidden)
    b = len(mine)
    loss, row = 0.0, {}
    for k in range(model.n_masks):
        za, zp, zn = z[k, :b], z[k, b:2 * b], z[k, 2 * b:]
        y = labels[mine, k].to(device)
        ce = F.cross_entropy(model.heads[k](za), y) * share
        trip = triplet_loss(za, zp, zn, config.margin) * share
        density = fm.l0_penalty(model.encoder, mask=k, normalize=True)
        loss = loss + ce + config.triplet_weight * trip + config.l0_weight * density
        row.update({f"ce_{k}": ce.item(), f"triplet_{k}": trip.item(), f"density_{k}": density.item()})
    if config.overlap_weight > 0:
        overlap = overlap_penalty(model.encoder)
        loss = loss + config.overlap_weight * overlap
        row["overlap"] = overlap.item()
    row = {"loss": loss.item(), **row}
    return loss, row


class StepLoss(nn.Module):
    """``step_loss`` of this rank's share as a module: DDP hooks a module's forward and averages the gradients of the
    masks and heads through it."""

    def __init__(self, model: DisentangleModel, data: Encoded, labels, sampler, config, device, rank: int = 0,
                 world: int = 1):
        super().__init__()
        self.model, self.data, self.labels, self.sampler = model, data, labels, sampler
        self.config, self.device, self.rank, self.world = config, device, rank, world

    def forward(self, anchors: Sequence[int], step: int) -> tuple:
        # Anchors per rank differ by at most one: weight this rank's means by its share of all anchors.
        share = len(list(anchors)[self.rank::self.world]) * self.world / len(anchors)
        return step_loss(self.model, self.data, self.labels, self.sampler, anchors, step, self.config, self.device,
                         share, self.rank, self.world)


# --- probes -------------------------------------------------------------------------------------------------
def fit_probe(features, labels, l2: float = 1e-3, iterations: int = 25):
    """Logistic regression on standardised features (one-vs-rest for more than two classes; L2 penalty ``l2`` x n
    on the weights, not the bias), fitted by Newton's method in float64 numpy (a few exact steps: no learning rate,
    no autograd overhead). Returns a function features -> predicted labels (a LongTensor)."""
    import numpy as np
    import torch

    x = features.detach().double().cpu().numpy()
    y = torch.as_tensor(labels).cpu().numpy().astype(np.int64)
    mean, std = x.mean(0), np.maximum(x.std(0), 1e-8)
    design = np.hstack([(x - mean) / std, np.ones((x.shape[0], 1))])
    ridge = l2 * x.shape[0] * np.eye(design.shape[1])
    ridge[-1, -1] = 1e-8  # the bias is not penalised
    classes = np.arange(max(int(y.max()) + 1 if y.size else 1, 2))
    columns = [1] if classes.size == 2 else list(classes)
    weights = []
    for c in columns:
        target = (y == c).astype(np.float64)
        w = np.zeros(design.shape[1])
        for _ in range(iterations):
            p = 1.0 / (1.0 + np.exp(-np.clip(design @ w, -30, 30)))
            gradient = design.T @ (p - target) + ridge @ w
            hessian = (design * (p * (1 - p))[:, None]).T @ design + ridge
            step = np.linalg.solve(hessian, gradient)
            w -= step
            if np.abs(step).max() < 1e-8:
                break
        weights.append(w)
    weights = np.stack(weights, 1)

    def predict(f):
        scores = np.hstack([((f.detach().double().cpu().numpy() - mean) / std), np.ones((f.shape[0], 1))]) @ weights
        chosen = (scores[:, 0] > 0).astype(np.int64) if classes.size == 2 else scores.argmax(1)
        return torch.from_numpy(chosen)

    return predict


def probe_accuracy(train_x, train_y, test_x, test_y, l2: float = 1e-3) -> float:
    import torch

    predict = fit_probe(train_x, train_y, l2)
    return (predict(test_x) == torch.as_tensor(test_y)).double().mean().item()


def leakage_table(features: dict, labels: dict, l2: float = 1e-3, train: str = "probe", test: str = "test") -> dict:
    """{representation: [accuracy of a fresh probe for factor j]}: probes trained on split ``train``, scored on
    ``test``. ``features[rep][split]``: (n, d) tensor; ``labels[split]``: (n, K) tensor."""
    table = {}
    for rep, by_split in features.items():
        table[rep] = [probe_accuracy(by_split[train], labels[train][:, j], by_split[test], labels[test][:, j], l2)
                      for j in range(labels[train].shape[1])]
    return table


def best_other(row: Sequence[float], k: int) -> float:
    """The largest probe accuracy of a leakage-table row on a factor other than ``k``."""
    return max(a for j, a in enumerate(row) if j != k)


def disentanglement_score(table: dict, n_factors: int) -> float:
    """Mean over masks k of (own-factor accuracy - the largest other-factor accuracy), from a leakage table."""
    return sum(table[f"mask_{k}"][k] - best_other(table[f"mask_{k}"], k) for k in range(n_factors)) / n_factors


# --- the adversarial baseline -------------------------------------------------------------------------------
def adversarial_features(train_x, train_labels, factor: int, steps: int, strength: float, seed: int, lr=3e-3):
    """Gradient-reversal removal over frozen features: an MLP f trained so that a head predicts ``factor`` from
    f(x) while adversaries for the other factors, behind a gradient-reversal layer, cannot. Returns f."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    dim = train_x.shape[1]
    n_factors = train_labels.shape[1]
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    encoder = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
    heads = nn.ModuleList(nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, int(train_labels[:, j].max()) + 1))
                          for j in range(n_factors))
    optimizer = torch.optim.Adam(list(encoder.parameters()) + list(heads.parameters()), lr=lr)
    x = (train_x - mean) / std
    for _ in range(steps):
        h = encoder(x)
        loss = 0.0
        for j in range(n_factors):
            inp = h if j == factor else grad_reverse(h, strength)
            loss = loss + nn.functional.cross_entropy(heads[j](inp), train_labels[:, j])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    encoder.eval()
    return lambda f: encoder((f - mean) / std).detach()


# --- the run ------------------------------------------------------------------------------------------------
SPLITS = ("train", "probe", "test", "shifted")


def _load_encoder(config: DisentangleConfig, device):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from .. import assets

    source = assets.resolve_model(config.model)
    encoder = AutoModel.from_pretrained(source, dtype=torch.float32).eval().to(device)  # dropout off
    tokenizer = AutoTokenizer.from_pretrained(source)
    return encoder, tokenizer, source


def _load_splits(config: DisentangleConfig) -> tuple:
    from . import disentangle_data as dd

    if config.data == "reviews":
        data = dd.load_reviews(config.data_dir, limit=config.data_limit)
    else:
        data = dd.load_tweets(config.data_dir, confidence=config.dialect_confidence, limit=config.data_limit)
    sizes = {"train": config.train_size, "probe": config.probe_size, "test": config.test_size,
             "shifted": config.shifted_size}
    agreements = {"train": config.train_agreement, "probe": 0.5, "test": 0.5, "shifted": 1 - config.train_agreement}
    try:
        splits = dd.correlated_splits(data, sizes, agreements, config.seed)
    except ValueError as error:
        raise ConfigError(f"train_size/probe_size/test_size/shifted_size: {error}") from None
    return data, splits


def _masked_model(encoder, config: DisentangleConfig, n_classes, prune_sparsity: float):
    """``encoder`` with K masks over its top ``config.top_blocks`` blocks (weights pruned first) and fresh heads."""
    import fastmask as fm

    first = first_masked_block(encoder, config.top_blocks)
    mask_config = fm.MaskConfig(estimator=config.estimator, granularity=config.granularity,
                                init_keep=config.init_keep, n_masks=len(n_classes), seed=config.seed,
                                targets=mask_targets(encoder, first))
    fm.apply(encoder, mask_config)
    pruned = magnitude_prune(encoder, prune_sparsity, config.prune_scope) if prune_sparsity > 0 else {}
    for layer in fm.masked_modules(encoder).values():
        layer.train()  # training-mode gates; the encoder itself stays in eval (no dropout)
    return DisentangleModel(encoder, n_classes, first), pruned


def _features(fn, data: Encoded, batch: int, device):
    import torch

    with torch.no_grad():
        return torch.cat([fn(*data.batch(range(i, min(i + batch, len(data))), device)).cpu()
                          for i in range(0, len(data), batch)])


def _unmasked_features(encoder, encoded: dict, first: int, batch: int, device) -> dict:
    """{split: mean-pooled features of the unmasked encoder}; sets every split's ``h0`` (the input of block
    ``first``, None for first 0) from the same forward pass."""
    from contextlib import nullcontext

    import torch

    import fastmask as fm

    unmasked = fm.bypass(encoder) if fm.masked_modules(encoder) else nullcontext()
    features = {}
    for s, data in encoded.items():
        pooled, inputs = [], []
        with torch.no_grad(), unmasked:
            for i in range(0, len(data), batch):
                ids, mask, _ = data.batch(range(i, min(i + batch, len(data))), device)
                out = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                pooled.append(mean_pool(out.last_hidden_state, mask).cpu())
                h0 = out.hidden_states[first].cpu()
                inputs.append(torch.nn.functional.pad(h0, (0, 0, 0, data.input_ids.shape[1] - h0.shape[1])))
        features[s] = torch.cat(pooled)
        data.h0 = torch.cat(inputs) if first else None
    return features


def _mask_features(model: DisentangleModel, encoded: dict, batch: int, device, splits=SPLITS) -> dict:
    import fastmask as fm

    layers = fm.masked_modules(model.encoder).values()
    for layer in layers:
        layer.eval()  # deterministic gates
    features = {f"mask_{k}": {s: _features(lambda i, m, h, k=k: model.represent(i, m, k, h), encoded[s], batch,
                                           device) for s in splits} for k in range(model.n_masks)}
    for layer in layers:
        layer.train()
    return features


def finetuned_features(config: DisentangleConfig, encoded: dict, labels: dict, factor: int, n_classes, device) -> dict:
    """The fine-tuned baseline for ``factor``: a fresh copy of the encoder whose masked blocks (the top
    ``top_blocks``; every block for 0) are fine-tuned with a linear head on the training split's labels of
    ``factor`` (cross-entropy, Adam, ``finetune_steps`` batches of ``batch_size``). {split: pooled features}."""
    import torch
    import torch.nn.functional as F

    seed_everything(config.seed + factor)
    encoder, _, _ = _load_encoder(config, device)
    first = first_masked_block(encoder, config.top_blocks)
    model = DisentangleModel(encoder, n_classes, first).to(device)
    for p in encoder.parameters():
        p.requires_grad_(False)
    trained = list(encoder.get_submodule(encoder_blocks(encoder)[0])[first:].parameters())
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam([{"params": trained, "lr": config.finetune_lr},
                                  {"params": list(model.heads[factor].parameters()), "lr": config.head_lr}])
    stream = BatchStream(len(encoded["train"]), config.batch_size, config.seed + factor)
    for _ in range(config.finetune_steps):
        anchors = stream.next()
        z = model.pooled(*encoded["train"].batch(anchors, device))
        loss = F.cross_entropy(model.heads[factor](z), labels["train"][list(anchors), factor].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {s: _features(model.pooled, encoded[s], config.eval_batch, device) for s in SPLITS}


def _optimizer(model: DisentangleModel, config: DisentangleConfig):
    import torch

    import fastmask as fm

    return torch.optim.Adam([{"params": fm.mask_parameters(model.encoder), "lr": config.lr},
                             {"params": list(model.heads.parameters()), "lr": config.head_lr}])


def _train_plain(model, optimizer, encoded_train, labels, sampler, stream, steps, config, device, desc):
    """The sweep's training loop (no checkpoints: a sweep point is cheap to redo)."""
    from tqdm.auto import tqdm

    import fastmask as fm

    for step in tqdm(range(steps), desc=desc, disable=not config.progress, dynamic_ncols=True):
        fm.set_step(model.encoder, step)
        loss, _ = step_loss(model, encoded_train, labels, sampler, stream.next(), step, config, device)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def run_experiment(config: DisentangleConfig, *, resume: bool = False, overwrite: bool = False, log=None) -> dict:
    """Learn the K masks, evaluate them against the baselines, run the pruning sweep, write the results folder."""
    import torch

    import fastmask as fm
    from .disentangle_data import TripletSampler

    # Data parallel under torchrun (as `fastmask run knowledge`): replicated masks and heads, DDP over a StepLoss
    # module, every rank the global batch's triplets and its share of them; rank 0 owns the folder, evaluates and
    # runs the sweep; the others stop after training.
    run, rank, world = open_run(config, resume=resume, overwrite=overwrite, experiment=EXPERIMENT, log=log)
    main = rank == 0
    log = run.log
    if world > 1:
        if config.batch_size < world:
            raise ConfigError(f"batch_size must be at least the {world} processes (each needs an anchor), got "
                              f"{config.batch_size}")
    seed_everything(config.seed)
    device = resolve_device(config.device)
    fm.set_backend(config.backend)
    started = time.perf_counter()
    data, splits = _load_splits(config)
    factors, values = data.factors, data.values
    n_classes = [len(v) for v in values]
    encoder, tokenizer, source = _load_encoder(config, device)
    encoded = {s: Encoded(tokenizer, splits[s].texts, config.max_length) for s in SPLITS}
    labels = {s: torch.tensor(splits[s].labels, dtype=torch.long) for s in SPLITS}
    # The unmasked baseline: the original (unpruned) encoder; the same pass caches the masked blocks' inputs.
    first = first_masked_block(encoder, config.top_blocks)
    features = {"unmasked": _unmasked_features(encoder, encoded, first, config.eval_batch, device)}
    setup_seconds = time.perf_counter() - started

    model, pruned = _masked_model(encoder, config, n_classes, config.prune_sparsity)
    model.to(device)
    optimizer = _optimizer(model, config)
    sampler = TripletSampler(splits["train"].labels, seed=config.seed, mode=config.triplet_sampling)
    streams = {"train": BatchStream(len(encoded["train"]), config.batch_size, config.seed)}
    params = {name: layer.logits for name, layer in fm.masked_modules(model.encoder).items()}
    params.update({f"heads.{name}": p for name, p in model.heads.named_parameters()})
    state = TrainState(params=params, optimizer=optimizer, model=model.encoder, streams=streams)
    run.restore(state)

    step_module = StepLoss(model, encoded["train"], labels["train"], sampler, config, device, rank, world)
    if world > 1:
        step_module = fmd.replicate(step_module)

    def step_fn(step: int) -> dict:
        fm.set_step(model.encoder, step)
        loss, row = step_module(streams["train"].next(), step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if world > 1:  # the logged values are the global ones: the ranks' (weighted) values averaged
            values = fmd.mean_over_ranks(torch.tensor(list(row.values()), dtype=torch.float64))
            row = dict(zip(row, values.tolist()))
        return row

    train_started = time.perf_counter()
    history = run.train(state, step_fn, show=("loss",))
    train_seconds = time.perf_counter() - train_started
    if not main:  # rank 0 evaluates, runs the sweep and writes the results
        return {}
    run.save_masks(model.encoder)

    eval_started = time.perf_counter()
    features.update(_mask_features(model, encoded, config.eval_batch, device))
    for k in range(len(factors)):
        transform = adversarial_features(features["unmasked"]["train"], labels["train"], k, config.adv_steps,
                                         config.adv_lambda, config.seed + k)
        features[f"adversarial_{k}"] = {s: transform(features["unmasked"][s]) for s in SPLITS}
    if config.finetune_steps:
        for k in range(len(factors)):
            features[f"finetuned_{k}"] = finetuned_features(config, encoded, labels, k, n_classes, device)
    leakage = leakage_table(features, labels, config.probe_l2)
    robust = leakage_table(features, labels, config.probe_l2, train="train", test="shifted")
    in_distribution = leakage_table(features, labels, config.probe_l2, train="train", test="test")
    sparsity = fm.sparsity(model.encoder)
    per_mask_sparsity = [s["overall"] for s in sparsity["per_mask"]]
    eval_seconds = time.perf_counter() - eval_started

    sweep = [{"prune_sparsity": config.prune_sparsity, "steps": config.steps,
              "disentanglement": disentanglement_score(leakage, len(factors)),
              "mask_sparsity": per_mask_sparsity, "leakage": {k: leakage[f"mask_{k}"] for k in range(len(factors))},
              "zero_fraction": [zero_fraction(model.encoder, k) for k in range(len(factors))]}]
    metrics = {
        "experiment": EXPERIMENT, "model": config.model, "model_source": source,
        "factors": list(factors), "values": [list(v) for v in values],
        "data": {"raw_examples": len(data), "splits": {s: len(splits[s]) for s in SPLITS},
                 "agreement": {s: (labels[s][:, 0] == labels[s][:, 1]).double().mean().item() for s in SPLITS}},
        "leakage": leakage, "robustness_shifted": robust, "in_distribution_correlated_probe": in_distribution,
        "chance": 0.5, "disentanglement": disentanglement_score(leakage, len(factors)),
        "mask_sparsity": per_mask_sparsity, "pruned_fraction": (sum(pruned.values()) / len(pruned)) if pruned else 0.0,
        "sweep": sweep, "final": history[-1] if history else {},
        "seconds": {"setup": setup_seconds, "train": train_seconds, "evaluate": eval_seconds, "sweep": 0.0},
        "hardware": {"device": str(device), "machine": platform.machine(), "processor": platform.processor(),
                     "torch_threads": torch.get_num_threads()},
    }

    def write_results() -> None:  # after the main evaluation and after each sweep point: a stopped sweep keeps them
        metrics["sweep"] = sorted(sweep, key=lambda row: row["prune_sparsity"])
        run.write_metrics(metrics)
        _plots(run, history, metrics)
        run.write_report(report_markdown(config, metrics))

    write_results()
    sweep_started = time.perf_counter()
    for s in config.sweep_sparsities:
        if s == config.prune_sparsity:
            continue
        seed_everything(config.seed)
        sweep_encoder, _, _ = _load_encoder(config, device)
        sweep_model, _ = _masked_model(sweep_encoder, config, n_classes, s)
        sweep_model.to(device)
        _train_plain(sweep_model, _optimizer(sweep_model, config), encoded["train"], labels["train"], sampler,
                     BatchStream(len(encoded["train"]), config.batch_size, config.seed), config.sweep_steps, config,
                     device, desc=f"sweep {s:g}")
        table = leakage_table(_mask_features(sweep_model, encoded, config.eval_batch, device, ("probe", "test")),
                              labels, config.probe_l2)
        sweep.append({"prune_sparsity": s, "steps": config.sweep_steps,
                      "disentanglement": disentanglement_score(table, len(factors)),
                      "mask_sparsity": [fm.sparsity(sweep_model.encoder, mask=k)["overall"]
                                        for k in range(len(factors))],
                      "zero_fraction": [zero_fraction(sweep_model.encoder, k) for k in range(len(factors))],
                      "leakage": {k: table[f"mask_{k}"] for k in range(len(factors))}})
        metrics["seconds"]["sweep"] = time.perf_counter() - sweep_started
        write_results()

    print(run.finished_message())
    return metrics


def _plots(run: Run, history, metrics) -> None:
    factors = metrics["factors"]
    run.plot_history(history, ["loss"] + [f"ce_{k}" for k in range(len(factors))]
                     + [f"triplet_{k}" for k in range(len(factors))], "loss.png", title="training loss")
    plt = pyplot()
    if plt is None:
        return
    reps = list(metrics["leakage"])
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(reps)), 4))
    width = 0.8 / len(factors)
    for j, name in enumerate(factors):
        ax.bar([i + j * width for i in range(len(reps))], [metrics["leakage"][r][j] for r in reps], width,
               label=f"probe for {name}")
    ax.axhline(metrics["chance"], color="gray", ls="--", lw=1, label="chance")
    ax.set_xticks([i + width * (len(factors) - 1) / 2 for i in range(len(reps))], reps, rotation=20)
    ax.set_ylabel("probe accuracy (balanced test)")
    ax.set_ylim(0.3, 1.0)
    ax.legend(fontsize=8)
    ax.set_title("leakage: each representation probed for every factor")
    save_figure(fig, run.path("leakage.png"))
    sweep = metrics["sweep"]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [sum(r["zero_fraction"]) / len(r["zero_fraction"]) for r in sweep]
    ax.plot(x, [r["disentanglement"] for r in sweep], "o-")
    for xi, r in zip(x, sweep):
        ax.annotate(f"pruned {r['prune_sparsity']:g}", (xi, r["disentanglement"]), fontsize=8,
                    textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("zero weights of the masked layers under a mask (pruned or closed; mean over masks)")
    ax.set_ylabel("own - other probe accuracy (mean over masks)")
    ax.grid(alpha=0.3)
    ax.set_title("sparsity vs disentanglement")
    save_figure(fig, run.path("sweep.png"))


def _setting_note(config: DisentangleConfig) -> str:
    if config.data == "reviews":
        return ("Genre is replaced by a keyword-built aspect label (see Data): the paper's sentiment x genre data are "
                "not reachable offline; setting 3 (syntax vs semantics) is not done")
    return "Only the toxicity x dialect setting here (`--data reviews`: a stand-in for sentiment x genre)"


def _data_paragraph(config: DisentangleConfig, metrics: dict) -> str:
    """What the data are and how the labels were made, for the report."""
    factors, values, raw = metrics["factors"], metrics["values"], metrics["data"]["raw_examples"]
    if config.data == "reviews":
        from .disentangle_data import ASPECT_LEXICON

        lexicon = "; ".join(f"{name}: {', '.join(words)}" for name, words in ASPECT_LEXICON.items())
        return f"""A STAND-IN for the paper's setting 1 (sentiment x genre of movie reviews: no genre-labelled
reviews are reachable offline), built from what is: the Pang & Lee (2005) sentence polarity data (Rotten Tomatoes
snippets), **{factors[0]}** ({' / '.join(values[0])}) from the file a sentence is in, x **{factors[1]}**
({' / '.join(values[1])}), a genre-like attribute built from the text itself: the aspect the sentence talks about,
by keyword lexicon ({lexicon}). A sentence is kept when its words hit exactly one of the two lexicons (sentences
naming both or neither are dropped); the keywords stay in the text. {raw} labelled sentences."""
    return f"""The paper's setting 2 built from what is reachable offline: Davidson et al. (2017) tweets,
**{factors[0]}** ({' / '.join(values[0])}) x **{factors[1]}** ({' / '.join(values[1])}) inferred with the TwitterAAE
demographic model (AAE share of AAE + White proportions >= {config.dialect_confidence}; tweets in between dropped;
re-implemented predictor, whitespace tokens). {raw} labelled tweets."""


def report_markdown(config: DisentangleConfig, metrics: dict) -> str:
    factors = metrics["factors"]
    header = ["representation"] + [f"probe: {f}" for f in factors] + ["own - other"]
    leak_rows = []
    for r, row in metrics["leakage"].items():
        k = int(r.rsplit("_", 1)[1]) if r.startswith(("mask_", "adversarial_", "finetuned_")) else None
        gap = "" if k is None else f"{row[k] - best_other(row, k):+.3f}"
        leak_rows.append([r] + row + [gap])
    leak = markdown_table(header, leak_rows, digits=3)
    own_rows = []
    for r in metrics["leakage"]:
        if r.startswith(("mask_", "adversarial_", "finetuned_")):
            k = int(r.rsplit("_", 1)[1])
            own_rows.append([r, factors[k], metrics["in_distribution_correlated_probe"][r][k],
                             metrics["robustness_shifted"][r][k]])
        else:
            for k, f in enumerate(factors):
                own_rows.append([r, f, metrics["in_distribution_correlated_probe"][r][k],
                                 metrics["robustness_shifted"][r][k]])
    robust = markdown_table(["representation", "factor", "balanced test", "shifted test"], own_rows, digits=3)
    sweep = markdown_table(["pruning sparsity", "steps", "disentanglement", "closed gates (per mask)",
                            "zero weights: pruned or closed (per mask)"]
                           + [f"mask_{k}: own / other" for k in range(len(factors))],
                           [[r["prune_sparsity"], r["steps"], r["disentanglement"],
                             ", ".join(f"{s:.3f}" for s in r["mask_sparsity"]),
                             ", ".join(f"{s:.3f}" for s in r["zero_fraction"])]
                            + [f"{r['leakage'][k][k]:.3f} / {best_other(r['leakage'][k], k):.3f}"
                               for k in range(len(factors))] for r in metrics["sweep"]], digits=3)
    data = metrics["data"]
    sec = metrics["seconds"]
    blocks = f"the top {config.top_blocks} transformer blocks" if config.top_blocks else "every transformer block"
    return f"""# fastmask run disentangle

Disentangling representations by masking (Zhang, van de Meent, Wallace, EMNLP 2021) on `{config.model}`
(`{metrics['model_source']}`): {len(factors)} masks ({config.estimator}, granularity {config.granularity}) learned in
one forward pass per batch with fastmask's K-mask layers over the linear layers of {blocks}; {config.steps} steps
of {config.batch_size} anchors (init keep {config.init_keep}, lr {config.lr}); triplet weight {config.triplet_weight}
({config.triplet_sampling} triplets), margin {config.margin}, overlap weight {config.overlap_weight}, L0 weight
{config.l0_weight}; magnitude pruning {config.prune_sparsity:g} ({config.prune_scope}) before masking.

## Data (offline setting)

{_data_paragraph(config, metrics)} Splits {data['splits']} (max {config.max_length} tokens per text); fraction of
examples whose two labels agree: {', '.join(f'{s} {a:.2f}' for s, a in data['agreement'].items())}.

## Leakage (probes trained on the balanced probe split, scored on the balanced test split; chance 0.5)

Each mask should predict its own factor well and the other near chance.

{leak}

`mask_k`: the encoder under mask k (factor k = {', '.join(f'{k}: {f}' for k, f in enumerate(factors))});
`unmasked`: the original encoder; `adversarial_k`: gradient-reversal removal of the other factors over the frozen
unmasked features, trained for factor k on the training split; `finetuned_k`: {blocks} fine-tuned for factor k
({config.finetune_steps} steps, cross-entropy only). Disentanglement (mean over masks of own - best other
accuracy): **{metrics['disentanglement']:.3f}**. Mask sparsity (closed eval gates, as a fraction of the masked
layers' weights): {', '.join(f'{s:.3f}' for s in metrics['mask_sparsity'])}.

![leakage](leakage.png)

## Robustness to a shifted correlation

Probes for the factor trained on the correlated training split (agreement {data['agreement']['train']:.2f}), scored on
the balanced test split and on the shifted split (agreement {data['agreement']['shifted']:.2f}).

{robust}

## Sparsity vs disentanglement (pruning sweep)

{sweep}

{len(metrics['sweep'])} of {len({config.prune_sparsity, *config.sweep_sparsities})} pruning sparsities done (the
main run, then each sweep point; the results are rewritten after each).

![sweep](sweep.png)

## Cost

setup {sec['setup']:.0f} s, mask training {sec['train']:.0f} s, evaluation {sec['evaluate']:.0f} s, sweep
{sec['sweep']:.0f} s on {metrics['hardware']['device']} ({metrics['hardware']['torch_threads']} torch threads).

## Deviations and what is not done

- The adversarial baseline trains an MLP over frozen mean-pooled features (not a fine-tuned encoder).
- The fine-tuned baseline trains the masked blocks only (the blocks below are frozen, as for the masks); pruning
  happens before masking only (no gradual pruning with masking).
- {_setting_note(config)}; the sweep points train for `sweep_steps` ({config.sweep_steps}) steps and are
  not checkpointed (a `--resume` repeats them).

Files: `metrics.json`, `history.csv`, `masks/`, `loss.png`, `leakage.png`, `sweep.png`, `config.json`.
"""


# --- command line -------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, DisentangleConfig)


def run_from_args(args) -> int:
    return run_cli(DisentangleConfig, run_experiment, args, EXPERIMENT)


__all__ = ["DisentangleConfig", "DisentangleModel", "Encoded", "mean_pool", "triplet_loss", "overlap_penalty",
           "keep_probability", "grad_reverse", "magnitude_prune", "step_loss", "fit_probe", "probe_accuracy",
           "leakage_table", "disentanglement_score", "adversarial_features", "run_experiment", "add_arguments",
           "run_from_args"]
