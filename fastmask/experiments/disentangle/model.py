"""The model side of `fastmask run disentangle`: the losses (mean pooling, triplet, mask overlap, gradient
reversal), magnitude pruning, the masked encoder with a head per factor (DisentangleModel) and one step's loss
(step_loss; StepLoss for DDP), building the encoder and its masks, and the models of the gradient-reversal and
fine-tuned baselines."""

from __future__ import annotations

import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import fastmask as fm

from ..blocks import EncodedTexts, TopBlocks, block_index, block_list, top_blocks
from ..pretrained import load_model
from ... import distributed as fmd
from ..runner import BatchStream, TrainState, seed_everything
from .config import SPLITS, DisentangleConfig


# --- losses -------------------------------------------------------------------------------------------------
def mean_pool(hidden, attention_mask):
    """The mean of the hidden states over the real (attention_mask = 1) tokens: (batch, hidden)."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def triplet_loss(anchor, positive, negative, margin: float):
    """mean over rows of max(0, |a - p|_2 - |a - n|_2 + margin)."""
    return torch.relu((anchor - positive).norm(dim=-1) - (anchor - negative).norm(dim=-1) + margin).mean()


def keep_probability(layer):
    """Differentiable keep probability of every gate of a MaskedLinear, (K, GR, GC): sigmoid(l - tau) for
    threshold_st, sigmoid(l) otherwise (gumbel_sigmoid_st's P(open); hard concrete's logit of the open state)."""
    shift = layer.tau if layer.estimator == "threshold_st" else 0.0
    return torch.sigmoid(layer.logits - shift)


def overlap_penalty(model):
    """Mean over every gate (each weighted by the weights it covers) of the product of two masks' keep
    probabilities, averaged over the pairs of masks: 0 when no weight is kept by two masks."""
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


# --- the model ----------------------------------------------------------------------------------------------
def mask_targets(encoder, first: int) -> Optional[list]:
    """MaskConfig.targets covering the default linear layers of the blocks from ``first`` up (None: every block)."""
    if first == 0:
        return None
    return [r"(?:^|\.)" + re.escape(name) + "$" for name, _ in fm.hf.find_targets(encoder, fm.MaskConfig())
            if block_index(name)[1] >= first]


class DisentangleModel(nn.Module):
    """A masked encoder with K masks (one per factor) and a linear head per factor.

    ``grouped(ids, mask, h0)``: the rows are K equal contiguous groups, group k through mask k: (K, rows / K, hidden).
    ``represent(ids, mask, k, h0)``: every row through mask k (k None: the encoder without masks).
    ``h0``: the cached input of block ``first`` (``..blocks.block_inputs``); given, the blocks below ``first`` are
    skipped (None: the whole encoder runs)."""

    def __init__(self, encoder, n_classes: Sequence[int], first: int = 0):
        super().__init__()
        self.encoder = encoder
        self.first = first
        self.top = TopBlocks(encoder, first, block_list(encoder)[0])  # not a submodule: it runs self.encoder
        self.n_masks = len(n_classes)
        if fm.masked_modules(encoder) and next(iter(fm.masked_modules(encoder).values())).n_masks != self.n_masks:
            raise ValueError(f"DisentangleModel: the encoder has masks of another count than the {self.n_masks} "
                             f"factors")
        hidden = encoder.config.hidden_size
        self.heads = nn.ModuleList(nn.Linear(hidden, c) for c in n_classes)

    def pooled(self, input_ids, attention_mask, h0=None):
        """Mean-pooled last hidden states under the current mask mode."""
        return mean_pool(self.top.hidden(input_ids, attention_mask, h0), attention_mask)

    def grouped(self, input_ids, attention_mask, h0=None):
        rows = input_ids.shape[0]
        if rows % self.n_masks:
            raise ValueError(f"DisentangleModel.grouped: {rows} rows are not {self.n_masks} equal groups")
        with fm.mask_index(self.encoder, "grouped"):
            z = self.pooled(input_ids, attention_mask, h0)
        return z.view(self.n_masks, rows // self.n_masks, -1)

    def represent(self, input_ids, attention_mask, k: Optional[int], h0=None):
        if k is None:
            with fm.bypass(self.encoder):
                return self.pooled(input_ids, attention_mask, h0)
        with fm.mask_index(self.encoder, k):
            return self.pooled(input_ids, attention_mask, h0)


def step_loss(model: DisentangleModel, data: EncodedTexts, labels, sampler, anchors: Sequence[int], step: int, config,
              device, share: float = 1.0, rank: int = 0, world: int = 1) -> tuple:
    """The training loss of one step and its row of history.csv (see the package docstring). Data parallel: the
    triplets are drawn for all ``anchors`` (the global batch, so every rank draws the one-process run's triplets),
    this rank keeps every ``world``-th from ``rank`` and weights its per-anchor means by ``share`` (its anchors x
    world / all anchors: the ranks' gradients then average to the global mean)."""
    # A sampler may map the batch's anchor slots to other rows per factor (``anchor_rows``: setting 3's semantic
    # anchors are MRPC sentences, its syntactic ones EWT sentences); the two-factor settings' anchors are the rows.
    rows, mine = [], list(anchors)[rank::world]
    for k in range(model.n_masks):
        positives, negatives = sampler.sample(anchors, k, step)
        own = sampler.anchor_rows(anchors, k) if hasattr(sampler, "anchor_rows") else list(anchors)
        rows += own[rank::world] + positives[rank::world] + negatives[rank::world]
    z = model.grouped(*data.batch(rows, device))  # (K, 3B, hidden)
    b = len(mine)
    loss, row = 0.0, {}
    for k in range(model.n_masks):
        za, zp, zn = z[k, :b], z[k, b:2 * b], z[k, 2 * b:]
        ce = None
        if config.ce_weight > 0:  # the heads' cross-entropy: off where the factors have no class labels (syntax)
            ce = F.cross_entropy(model.heads[k](za), labels[mine, k].to(device)) * share
            row[f"ce_{k}"] = ce.item()
        trip = triplet_loss(za, zp, zn, config.margin) * share
        density = fm.l0_penalty(model.encoder, mask=k, normalize=True)
        loss = loss + (0.0 if ce is None else config.ce_weight * ce) + config.triplet_weight * trip \
            + config.l0_weight * density
        row.update({f"triplet_{k}": trip.item(), f"density_{k}": density.item()})
    if config.overlap_weight > 0:
        overlap = overlap_penalty(model.encoder)
        loss = loss + config.overlap_weight * overlap
        row["overlap"] = overlap.item()
    row = {"loss": loss.item(), **row}
    return loss, row


class StepLoss(nn.Module):
    """``step_loss`` of this rank's share as a module: DDP hooks a module's forward and averages the gradients of the
    masks and heads through it."""

    def __init__(self, model: DisentangleModel, data: EncodedTexts, labels, sampler, config, device, rank: int = 0,
                 world: int = 1):
        super().__init__()
        self.model, self.data, self.labels, self.sampler = model, data, labels, sampler
        self.config, self.device, self.rank, self.world = config, device, rank, world

    def forward(self, anchors: Sequence[int], step: int) -> tuple:
        # Anchors per rank differ by at most one: weight this rank's means by its share of all anchors.
        share = len(list(anchors)[self.rank::self.world]) * self.world / len(anchors)
        return step_loss(self.model, self.data, self.labels, self.sampler, anchors, step, self.config, self.device,
                         share, self.rank, self.world)


# --- building the encoder and its masks ---------------------------------------------------------------------
def _load_encoder(config: DisentangleConfig, device):
    """(encoder in eval mode on ``device``: dropout off, its tokenizer, where it came from)."""
    return load_model(config.model, "AutoModel", device, dtype=torch.float32)


def _masked_model(encoder, config: DisentangleConfig, n_classes, prune_sparsity: float):
    """``encoder`` with K masks over its top ``config.top_blocks`` blocks (weights pruned first) and fresh heads."""
    first = top_blocks(encoder, config.top_blocks, "top_blocks")[2]
    mask_config = fm.MaskConfig(estimator=config.estimator, granularity=config.granularity,
                                init_keep=config.init_keep, n_masks=len(n_classes), seed=config.seed,
                                targets=mask_targets(encoder, first))
    fm.apply(encoder, mask_config)
    pruned = magnitude_prune(encoder, prune_sparsity, config.prune_scope) if prune_sparsity > 0 else {}
    for layer in fm.masked_modules(encoder).values():
        layer.train()  # training-mode gates; the encoder itself stays in eval (no dropout)
    return DisentangleModel(encoder, n_classes, first), pruned


def mask_training(run, model: DisentangleModel, optimizer, step_loss_module: nn.Module, n_anchors: int,
                  config: DisentangleConfig, world: int):
    """(TrainState, step_fn) of the mask training every setting runs: the masks' logits and the heads under
    ``optimizer``, the anchors drawn by one BatchStream over ``n_anchors``, the state restored from ``run``'s newest
    checkpoint (if any), ``step_loss_module`` (a StepLoss, DDP-replicated under torchrun after the restore) giving
    each step's loss and logged row; under torchrun the logged values are the global ones (the ranks' weighted
    values averaged)."""
    streams = {"train": BatchStream(n_anchors, config.batch_size, config.seed)}
    params = {name: layer.logits for name, layer in fm.masked_modules(model.encoder).items()}
    params.update({f"heads.{name}": p for name, p in model.heads.named_parameters()})
    state = TrainState(params=params, optimizer=optimizer, model=model.encoder, streams=streams)
    run.restore(state)
    if world > 1:
        step_loss_module = fmd.replicate(step_loss_module)

    def step_fn(step: int) -> dict:
        fm.set_step(model.encoder, step)
        loss, row = step_loss_module(streams["train"].next(), step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if world > 1:
            values = fmd.mean_over_ranks(torch.tensor(list(row.values()), dtype=torch.float64))
            row = dict(zip(row, values.tolist()))
        return row

    return state, step_fn


def _optimizer(model: DisentangleModel, config: DisentangleConfig):
    return torch.optim.Adam([{"params": fm.mask_parameters(model.encoder), "lr": config.lr},
                             {"params": list(model.heads.parameters()), "lr": config.head_lr}])


def _features(fn, data: EncodedTexts, batch: int, device):
    """``fn(input_ids, attention_mask, h0)`` over ``data`` in batches of ``batch``, no gradient, on the CPU."""
    with torch.no_grad():
        return torch.cat([fn(*data.batch(range(i, min(i + batch, len(data))), device)).cpu()
                          for i in range(0, len(data), batch)])


# --- the adversarial baseline -------------------------------------------------------------------------------
def adversarial_features(train_x, train_labels, factor: int, steps: int, strength: float, seed: int, lr=3e-3):
    """Gradient-reversal removal over frozen features: an MLP f trained so that a head predicts ``factor`` from
    f(x) while adversaries for the other factors, behind a gradient-reversal layer, cannot. Returns f."""
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


# --- the fine-tuned baseline --------------------------------------------------------------------------------
def finetuned_features(config: DisentangleConfig, encoded: dict, labels: dict, factor: int, n_classes, device,
                       sampler=None, splits=SPLITS) -> dict:
    """The fine-tuned baseline for ``factor``: a fresh copy of the encoder whose masked blocks (the top
    ``top_blocks``; every block for 0) are fine-tuned with a linear head on the training split's labels of
    ``factor`` (cross-entropy, Adam, ``finetune_steps`` batches of ``batch_size``). With a ``sampler`` (setting 3,
    no class labels: ``labels`` unused) the loss is instead the triplet loss of ``factor``'s triplets, batches of
    its anchor slots. {split in ``splits``: pooled features}."""
    seed_everything(config.seed + factor)
    encoder, _, _ = _load_encoder(config, device)
    first = top_blocks(encoder, config.top_blocks, "top_blocks")[2]
    model = DisentangleModel(encoder, n_classes, first).to(device)
    for p in encoder.parameters():
        p.requires_grad_(False)
    trained = list(model.top.blocks[first:].parameters())
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam([{"params": trained, "lr": config.finetune_lr},
                                  {"params": list(model.heads[factor].parameters()), "lr": config.head_lr}])
    n = len(sampler) if sampler is not None else len(encoded["train"])
    stream = BatchStream(n, config.batch_size, config.seed + factor)
    for step in range(config.finetune_steps):
        anchors = stream.next()
        if sampler is None:
            z = model.pooled(*encoded["train"].batch(anchors, device))
            loss = F.cross_entropy(model.heads[factor](z), labels["train"][list(anchors), factor].to(device))
        else:
            positives, negatives = sampler.sample(anchors, factor, step)
            rows = sampler.anchor_rows(anchors, factor) + positives + negatives
            z = model.pooled(*encoded["train"].batch(rows, device)).view(3, len(anchors), -1)
            loss = triplet_loss(z[0], z[1], z[2], config.margin)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {s: _features(model.pooled, encoded[s], config.eval_batch, device) for s in splits}


__all__ = ["DisentangleModel", "mask_training", "mean_pool", "triplet_loss", "overlap_penalty", "keep_probability",
           "grad_reverse", "magnitude_prune", "step_loss", "StepLoss", "adversarial_features", "finetuned_features"]
