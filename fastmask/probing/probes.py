"""Depth and distance probes on frozen hidden states, their losses, training and evaluation.

    n_i   = ||B h_i||^2            DepthProbe     (Hewitt & Manning's one-word probe; B: hidden x rank)
    d_ij  = ||B (h_i - h_j)||^2    DistanceProbe  (their two-word probe)

Depth targets (``kind``):
    "sp"    gold dependency depth, root = 1; word pieces inherit their word's depth       -> X_sp
    "ssp"   tree-topological pseudo-labels of the probe's own predictions (no treebank)   -> X_ssp
    "essp"  the same pseudo-labels reversed in position (a control that should fit worse) -> X_essp
The metric is the validation MSE (Li et al. 2023). By default only word pieces enter the loss ([CLS], [SEP] and
padding do not). ``include_padding=True`` replays the released code, whose MSE runs over the whole padded
(batch, seq) tensor: [CLS], [SEP] and padding take part, with gold target 2.0 for "sp" (its ``constructData``) and
inside the pseudo-label sort for "ssp"/"essp"; the paper's figures (the logs in the released doc-assets, e.g.
1.525 at layer 0 and 0.518 at layer 16 for "sp") were made that way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .features import FeatureBatch, pool_words, word_piece_targets
from .pseudo_labels import reverse_in_position, tree_topological_labels

DEPTH_KINDS = ("sp", "ssp", "essp")
RELEASED_SPECIAL_TARGET = 2.0  # the released constructData's label for [CLS], [SEP] and padding


class DepthProbe(nn.Module):
    """n_i = ||B h_i||^2, B of shape (hidden_size, rank); rank defaults to hidden_size // 2 (the paper's choice)."""

    def __init__(self, hidden_size: int, rank: Optional[int] = None, generator: Optional[torch.Generator] = None):
        super().__init__()
        rank = hidden_size // 2 if rank is None else rank
        if not isinstance(hidden_size, int) or hidden_size < 1 or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"{type(self).__name__}: hidden_size and rank must be positive ints, got "
                             f"{hidden_size!r}, {rank!r}")
        # uniform(-0.05, 0.05) as in the structural-probe and released code
        self.proj = nn.Parameter(torch.empty(hidden_size, rank).uniform_(-0.05, 0.05, generator=generator))

    @property
    def rank(self) -> int:
        return self.proj.shape[1]

    def _check(self, hidden: torch.Tensor) -> None:
        if hidden.dim() != 3 or hidden.shape[-1] != self.proj.shape[0]:
            raise ValueError(f"{type(self).__name__}: hidden states must be (batch, seq, {self.proj.shape[0]}), got "
                             f"{tuple(hidden.shape)}")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self._check(hidden)
        projected = hidden @ self.proj
        return (projected * projected).sum(-1)


class DistanceProbe(DepthProbe):
    """d_ij = ||B (h_i - h_j)||^2 for all pairs of a sentence: (batch, seq, seq). Computed from the Gram matrix of
    the projected vectors (memory O(seq^2), not O(seq^2 rank)), clamped at 0 against rounding."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self._check(hidden)
        projected = hidden @ self.proj
        squared = (projected * projected).sum(-1)
        gram = projected @ projected.transpose(1, 2)
        return (squared.unsqueeze(2) + squared.unsqueeze(1) - 2 * gram).clamp(min=0)


def masked_mse(predicted: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared error over the positions where ``mask`` is True (all positions when mask is None)."""
    if predicted.shape != target.shape:
        raise ValueError(f"masked_mse: predicted {tuple(predicted.shape)} vs target {tuple(target.shape)}")
    if mask is None:
        return ((predicted - target) ** 2).mean()
    weight = mask.to(predicted.dtype)
    return (((predicted - target) ** 2) * weight).sum() / weight.sum().clamp(min=1)


def distance_l1_loss(predicted: torch.Tensor, gold: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """H&M's distance loss: per sentence, sum |d_pred - d_gold| over its n x n word pairs divided by n^2; averaged
    over sentences. predicted/gold: (batch, words, words); lengths: (batch,) word counts."""
    n = gold.shape[1]
    valid = torch.arange(n, device=gold.device).unsqueeze(0) < lengths.unsqueeze(1)
    pair = (valid.unsqueeze(2) & valid.unsqueeze(1)).to(predicted.dtype)
    per_sentence = ((predicted - gold).abs() * pair).sum((1, 2)) / (lengths.to(predicted.dtype) ** 2).clamp(min=1)
    return per_sentence.mean()


def depth_targets(kind: str, norms: torch.Tensor, batch: FeatureBatch, gold_depths: Optional[Sequence] = None,
                  include_padding: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(target, loss mask) of a batch for a depth probe of ``kind`` (see the module docstring). The mask is None
    with include_padding (every position counts)."""
    if kind not in DEPTH_KINDS:
        raise ValueError(f"depth_targets: kind must be one of {DEPTH_KINDS}, got {kind!r}")
    mask = None if include_padding else batch.word_mask
    if kind == "sp":
        if gold_depths is None:
            raise ValueError("depth_targets: kind 'sp' needs gold_depths (one depth list per sentence)")
        rows = [gold_depths[int(i)] for i in batch.index]
        fill = RELEASED_SPECIAL_TARGET if include_padding else 0.0
        return word_piece_targets(batch.word_ids, rows, fill=fill).to(norms.device, norms.dtype), mask
    labels = tree_topological_labels(norms, mask)
    return (reverse_in_position(labels, mask) if kind == "essp" else labels), mask


def depth_diagnostics(residuals: torch.Tensor, labels: torch.Tensor, max_level: int = 12) -> list[dict]:
    """Per depth level (the target label; levels above ``max_level`` pooled into it): count, mean and std of
    n - label. residuals and labels: 1-D over the tokens that entered the loss."""
    level = labels.round().long().clamp(min=1, max=max_level)
    rows = []
    for value in range(1, max_level + 1):
        chosen = residuals[level == value].double()
        if chosen.numel():
            rows.append({"level": value if value < max_level else f">={max_level}", "count": int(chosen.numel()),
                         "mean": float(chosen.mean()),
                         "std": float(chosen.std(unbiased=False)) if chosen.numel() > 1 else 0.0})
    return rows


def probe_regulariser_loss(norms: torch.Tensor, word_mask: torch.Tensor, sentence_weight: torch.Tensor,
                           include_padding: bool = False) -> torch.Tensor:
    """The tree-topological probe loss used as a fine-tuning regulariser (Li et al. 2023): MSE between the probe's
    depths and their pseudo-labels, on the sentences with ``sentence_weight`` 1 (CoLA: the acceptable ones).

    Default: pseudo-labels over each selected sentence's word pieces, mean over those pieces (0 when the batch
    selects none). include_padding=True is the released code: labels over every position, then norms and labels
    multiplied by the sentence weight and the mean taken over the whole (batch, seq) tensor."""
    weight = sentence_weight.to(norms.dtype).unsqueeze(1)
    if include_padding:
        labels = tree_topological_labels(norms)
        return masked_mse(norms * weight, labels * weight)
    mask = word_mask & (weight > 0)
    return masked_mse(norms, tree_topological_labels(norms, mask), mask)


@dataclass
class ProbeSettings:
    """How probes are trained: rank None = hidden // 2; Adam with a linear decay of the learning rate to 0."""

    rank: Optional[int] = None
    epochs: int = 10
    lr: float = 1e-3
    seed: int = 0
    include_padding: bool = False
    progress: bool = True

    def validate(self) -> "ProbeSettings":
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"ProbeSettings.rank must be a positive int or None, got {self.rank!r}")
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"ProbeSettings.epochs must be a positive int, got {self.epochs!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"ProbeSettings.lr must be a positive number, got {self.lr!r}")
        return self


@dataclass
class DepthProbeResult:
    kind: str
    layer: int
    val_mse: float
    train_mse: float
    val_history: list = field(default_factory=list)
    diagnostics: list = field(default_factory=list)
    spearman: Optional[float] = None
    root_accuracy: Optional[float] = None
    probe: Optional[DepthProbe] = None

    def summary(self) -> dict:
        out = {"kind": self.kind, "layer": self.layer, "val_mse": self.val_mse, "train_mse": self.train_mse,
               "val_history": self.val_history, "diagnostics": self.diagnostics}
        if self.kind == "sp":
            out.update(spearman=self.spearman, root_accuracy=self.root_accuracy)
        return out


def _optimizer(probe: nn.Module, settings: ProbeSettings, steps: int):
    optimizer = torch.optim.Adam(probe.parameters(), lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / max(1, steps)))
    return optimizer, scheduler


def _norms(probe: DepthProbe, hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """probe(hidden), computed on the masked-in tokens only (0 elsewhere): padding is most of a padded batch."""
    if mask is None:
        return probe(hidden)
    packed = probe(hidden[mask].unsqueeze(0)).squeeze(0)
    return torch.zeros(mask.shape, dtype=packed.dtype).masked_scatter(mask, packed)


def _constant_mse(batches, kind: str, gold, include_padding: bool, predict) -> float:
    """The token-weighted validation MSE of depth predictions ``predict(shape, loss mask)`` that ignore the hidden
    states, with the targets and the loss mask of a probe of ``kind`` (as ``_depth_pass`` weighs them)."""
    total, weight = 0.0, 0.0
    for _, batch in batches:
        in_loss = torch.ones_like(batch.word_mask) if include_padding else batch.word_mask
        norms = predict(batch.word_mask.shape, in_loss)
        target, mask = depth_targets(kind, norms, batch, gold, include_padding)
        count = float(norms.numel() if mask is None else mask.sum())
        total, weight = total + float(masked_mse(norms, target, mask)) * count, weight + count
    return total / max(weight, 1.0)


def depth_baselines(train_batches: list, val_batches: list, gold_train: Sequence, gold_val: Sequence,
                    pseudo_val_batches: Optional[list] = None, include_padding: bool = False) -> dict:
    """X_* of trivial predictors, the floor a learned probe must beat (Li et al. report none):

        sp_mean_depth   every token predicted the mean training target: the best constant under MSE (X_sp)
        ssp_constant    every token predicted 2: its pseudo-labels put one token at 1 and the rest at 2 (X_ssp
        essp_constant   = X_essp = about 1 / sentence length)
        ssp_star        the first token predicted 1 and every other 2 (a star tree): its own pseudo-labels, so X_ssp
        essp_star       = 0; reversed in position they disagree at both ends (X_essp > 0)

    Batches as ``train_depth_probe`` takes them; ``pseudo_val_batches``: the sentences X_ssp / X_essp are
    validated on when they differ from the treebank's (the --pseudo-corpus option)."""
    total, count = 0.0, 0.0
    for _, batch in train_batches:  # the mean target over the tokens that enter the loss
        target, mask = depth_targets("sp", torch.zeros(batch.word_mask.shape), batch, gold_train, include_padding)
        total += float(target.sum() if mask is None else target[mask].sum())
        count += float(target.numel() if mask is None else mask.sum())
    mean_depth = total / max(count, 1.0)

    def constant(value):
        return lambda shape, in_loss: torch.full(shape, value)

    def star(shape, in_loss):
        first = in_loss & (in_loss.long().cumsum(1) == 1)
        return torch.where(first, 1.0, 2.0)

    pseudo = val_batches if pseudo_val_batches is None else pseudo_val_batches
    return {"mean_depth": mean_depth,
            "sp_mean_depth": _constant_mse(val_batches, "sp", gold_val, include_padding, constant(mean_depth)),
            **{f"{kind}_{name}": _constant_mse(pseudo, kind, None, include_padding, predict)
               for kind in ("ssp", "essp") for name, predict in (("constant", constant(2.0)), ("star", star))}}


def _depth_pass(probe, batches, kind, gold, include_padding, optimizer=None, scheduler=None, order=None):
    """One epoch (training when an optimizer is given); returns the token-weighted MSE and the evaluation data."""
    total, weight, kept = 0.0, 0.0, []
    for position in (order if order is not None else range(len(batches))):
        hidden, batch = batches[position]
        with torch.set_grad_enabled(optimizer is not None):
            norms = _norms(probe, hidden, None if include_padding else batch.word_mask)
            target, mask = depth_targets(kind, norms, batch, gold, include_padding)
            loss = masked_mse(norms, target, mask)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(probe.parameters(), 1.0)  # as the released code; tames the quartic loss
            optimizer.step()
            scheduler.step()
        else:
            kept.append((norms.detach(), target, mask, batch))
        count = float(norms.numel() if mask is None else mask.sum())
        total, weight = total + float(loss.detach()) * count, weight + count
    return total / max(weight, 1.0), kept


def train_depth_probe(kind: str, train_batches: list, val_batches: list, settings: ProbeSettings, *,
                      gold_train: Optional[Sequence] = None, gold_val: Optional[Sequence] = None,
                      val_sentences=None, layer: int = -1) -> DepthProbeResult:
    """Train a depth probe of ``kind`` and evaluate it on the validation batches: MSE (the X_* metric), the
    validation MSE after every epoch, diagnostics per depth level, and for "sp" with ``val_sentences``
    (conllu.Sentence, in the order the validation features were extracted from) H&M's depth Spearman and root
    accuracy at word level (a word's predicted depth = the mean over its pieces).

    Batches: ``LayerFeatures.layer_batches(layer)`` (float32 hidden states of one layer with their FeatureBatch);
    gold depths: one list per sentence, indexed like the sentences the features were extracted from."""
    settings.validate()
    if kind == "sp" and (gold_train is None or gold_val is None):
        raise ValueError("train_depth_probe: kind 'sp' needs gold_train and gold_val depths")
    if not train_batches or not val_batches:
        raise ValueError("train_depth_probe: train_batches and val_batches must be non-empty")
    generator = torch.Generator().manual_seed(settings.seed)
    probe = DepthProbe(int(train_batches[0][0].shape[-1]), settings.rank, generator=generator)
    optimizer, scheduler = _optimizer(probe, settings, settings.epochs * len(train_batches))
    history = []
    from tqdm.auto import tqdm

    train_mse = math.nan
    for _ in tqdm(range(settings.epochs), desc=f"{kind} probe, layer {layer}", disable=not settings.progress,
                  leave=False):
        order = torch.randperm(len(train_batches), generator=generator).tolist()
        probe.train()
        train_mse, _ = _depth_pass(probe, train_batches, kind, gold_train, settings.include_padding, optimizer,
                                   scheduler, order)
        probe.eval()
        val_mse, kept = _depth_pass(probe, val_batches, kind, gold_val, settings.include_padding)
        history.append(val_mse)
    residuals, labels = [], []
    for norms, target, mask, _ in kept:
        chosen = torch.ones_like(norms, dtype=torch.bool) if mask is None else mask
        residuals.append((norms - target)[chosen])
        labels.append(target[chosen])
    result = DepthProbeResult(kind, layer, history[-1], train_mse, history,
                              depth_diagnostics(torch.cat(residuals), torch.cat(labels)), probe=probe)
    if kind == "sp" and val_sentences is not None:
        predicted, gold, roots, punct = [], [], [], []
        for norms, _, _, batch in kept:
            words = pool_words(norms, batch.word_ids, int(batch.word_ids.max()) + 1)
            for row, index in enumerate(batch.index.tolist()):
                sentence = val_sentences[index]
                predicted.append(words[row, :len(sentence)].tolist())
                gold.append(sentence.depths())
                roots.append(sentence.root())
                punct.append(sentence.punctuation())
        from .metrics import depth_spearman, root_accuracy

        result.spearman = depth_spearman(predicted, gold)
        result.root_accuracy = root_accuracy(predicted, roots, punct)
    return result


def _word_batches(batches: list, sentences) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]]:
    """(word-pooled hidden (batch, words, hidden), gold distances (batch, words, words), word counts, indices)."""
    out = []
    for hidden, batch in batches:
        index = batch.index.tolist()
        lengths = torch.tensor([len(sentences[i]) for i in index])
        width = int(lengths.max())
        words = pool_words(hidden, batch.word_ids, width)
        gold = torch.zeros(len(index), width, width)
        for row, i in enumerate(index):
            n = len(sentences[i])
            gold[row, :n, :n] = torch.tensor(sentences[i].distances(), dtype=torch.float32)
        out.append((words, gold, lengths, index))
    return out


def train_distance_probe(train_batches: list, val_batches: list, train_sentences, val_sentences,
                         settings: ProbeSettings, *, layer: int = -1) -> dict:
    """H&M's distance probe on word representations (the mean of each word's pieces), trained with their L1 loss;
    evaluated with UUAS and the distance Spearman (lengths 5-50). Batches as for ``train_depth_probe``."""
    from tqdm.auto import tqdm

    from .metrics import distance_spearman, uuas

    settings.validate()
    if not train_batches or not val_batches:
        raise ValueError("train_distance_probe: train_batches and val_batches must be non-empty")
    train_batches = _word_batches(train_batches, train_sentences)
    val_batches = _word_batches(val_batches, val_sentences)
    generator = torch.Generator().manual_seed(settings.seed)
    probe = DistanceProbe(int(train_batches[0][0].shape[-1]), settings.rank, generator=generator)
    optimizer, scheduler = _optimizer(probe, settings, settings.epochs * len(train_batches))
    for _ in tqdm(range(settings.epochs), desc=f"distance probe, layer {layer}", disable=not settings.progress,
                  leave=False):
        probe.train()
        for position in torch.randperm(len(train_batches), generator=generator).tolist():
            words, gold, lengths, _ = train_batches[position]
            loss = distance_l1_loss(probe(words), gold, lengths)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    probe.eval()
    predicted, gold_matrices, punct, losses = [], [], [], []
    with torch.no_grad():
        for words, gold, lengths, index in val_batches:
            distances = probe(words)
            losses.append(float(distance_l1_loss(distances, gold, lengths)) * len(index))
            for row, i in enumerate(index):
                n = len(val_sentences[i])
                predicted.append(distances[row, :n, :n].numpy())
                gold_matrices.append(np.asarray(val_sentences[i].distances()))
                punct.append(val_sentences[i].punctuation())
    return {"layer": layer, "val_l1": sum(losses) / max(1, len(predicted)),
            "uuas": uuas(predicted, gold_matrices, punct),
            "spearman": distance_spearman(predicted, gold_matrices)}


__all__ = ["DepthProbe", "DistanceProbe", "masked_mse", "distance_l1_loss", "depth_targets", "depth_diagnostics",
           "probe_regulariser_loss", "ProbeSettings", "DepthProbeResult", "train_depth_probe", "train_distance_probe",
           "DEPTH_KINDS", "RELEASED_SPECIAL_TARGET"]
