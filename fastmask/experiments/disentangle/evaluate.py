"""Evaluation of `fastmask run disentangle`, all on frozen features: the features of the unmasked encoder and of
each mask per split, the leakage table (each representation probed for every factor by a logistic-regression probe,
``fastmask.probing.linear_probe_accuracy``), the disentanglement score (own factor - best other) and the fraction of
a mask's zero weights. ``probe="mlp"``: the same table with MLP probes (one hidden layer, early stopping on a
dev split held out of the probe's training split, ``fastmask.probing.classifiers.mlp_probe_accuracy``)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch

import fastmask as fm

from ...probing.classifiers import linear_probe_accuracy, mlp_probe_accuracy
from ..blocks import TopBlocks, block_inputs, block_list
from .config import SPLITS
from .model import DisentangleModel, _features, mean_pool


# --- features -----------------------------------------------------------------------------------------------
def _unmasked_features(encoder, encoded: dict, first: int, batch: int, device, weights_key=None) -> dict:
    """{split: mean-pooled features of the unmasked encoder}; first sets every split's ``h0``, the input of block
    ``first`` (None for first 0; cached on disk under ``weights_key`` when given, ``..blocks.block_inputs``), and
    runs the features from it."""
    top = TopBlocks(encoder, first, block_list(encoder)[0])
    unmasked = fm.bypass(encoder) if fm.masked_modules(encoder) else nullcontext()
    features = {}
    with torch.no_grad(), unmasked:
        for s, data in encoded.items():
            data.h0 = block_inputs(top, data.input_ids, data.attention_mask, batch, device, weights_key,
                                   trim=True) if first else None
            features[s] = _features(lambda ids, mask, h0: mean_pool(top.hidden(ids, mask, h0), mask), data, batch,
                                    device)
    return features


def _mask_features(model: DisentangleModel, encoded: dict, batch: int, device, splits=SPLITS) -> dict:
    layers = fm.masked_modules(model.encoder).values()
    for layer in layers:
        layer.eval()  # deterministic gates
    features = {f"mask_{k}": {s: _features(lambda i, m, h, k=k: model.represent(i, m, k, h), encoded[s], batch,
                                           device) for s in splits} for k in range(model.n_masks)}
    for layer in layers:
        layer.train()
    return features


# --- probes -------------------------------------------------------------------------------------------------
PROBES = ("linear", "mlp")


def leakage_table(features: dict, labels: dict, l2: float = 1e-3, train: str = "probe", test: str = "test",
                  probe: str = "linear", seed: int = 0) -> dict:
    """{representation: [accuracy of a fresh probe for factor j]}: probes trained on split ``train``, scored on
    ``test``. ``features[rep][split]``: (n, d) tensor; ``labels[split]``: (n, K) tensor. ``probe``: "linear"
    (logistic regression, L2 ``l2``) or "mlp" (one hidden layer; its dev split for early stopping is held out of
    ``train``, drawn with ``seed``)."""
    if probe not in PROBES:
        raise ValueError(f"leakage_table: probe must be one of {list(PROBES)}, got {probe!r}")
    table = {}
    for rep, by_split in features.items():
        if probe == "linear":
            table[rep] = [linear_probe_accuracy(by_split[train], labels[train][:, j], by_split[test],
                                                labels[test][:, j], l2) for j in range(labels[train].shape[1])]
        else:
            table[rep] = [mlp_probe_accuracy(by_split[train], labels[train][:, j], by_split[test],
                                             labels[test][:, j], seed=seed + j) for j in range(labels[train].shape[1])]
    return table


def best_other(row: Sequence[float], k: int) -> float:
    """The largest probe accuracy of a leakage-table row on a factor other than ``k``."""
    return max(a for j, a in enumerate(row) if j != k)


def own_minus_other(table: dict) -> dict:
    """{representation: own-factor accuracy - the best other-factor accuracy} for the representations made for one
    factor (``mask_k``, ``adversarial_k``, ``finetuned_k``) of a leakage table."""
    gaps = {}
    for rep, row in table.items():
        if rep.startswith(("mask_", "adversarial_", "finetuned_")):
            k = int(rep.rsplit("_", 1)[1])
            gaps[rep] = row[k] - best_other(row, k)
    return gaps


def disentanglement_score(table: dict, n_factors: int) -> float:
    """Mean over masks k of (own-factor accuracy - the largest other-factor accuracy), from a leakage table."""
    return sum(table[f"mask_{k}"][k] - best_other(table[f"mask_{k}"], k) for k in range(n_factors)) / n_factors


def zero_fraction(model, mask: int) -> float:
    """Fraction of the masked layers' weights that are zero under mask ``mask`` (eval gates): pruned OR gated off.
    (fm.sparsity counts closed gates only; a pruned weight's gate gets no gradient and stays open.)"""
    zeros, total = 0, 0
    with torch.no_grad():
        for layer in fm.masked_modules(model).values():
            closed = layer.mask(mask=mask) == 0  # expanded in the weight's own layout (Conv1D: (in, out))
            zeros += int(((layer.weight.detach() == 0) | closed.to(layer.weight.device)).sum())
            total += layer.weight.numel()
    return zeros / total


__all__ = ["PROBES", "leakage_table", "best_other", "own_minus_other", "disentanglement_score", "zero_fraction"]
