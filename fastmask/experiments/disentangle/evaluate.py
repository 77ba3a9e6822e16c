"""Evaluation of `fastmask run disentangle`, all on frozen features: the features of the unmasked encoder and of
each mask per split, the logistic-regression probes and the leakage table built from them (each representation
probed for every factor), the disentanglement score (own factor - best other) and the fraction of a mask's zero
weights."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import numpy as np
import torch

import fastmask as fm

from .config import SPLITS
from .model import DisentangleModel, _features, mean_pool


# --- features -----------------------------------------------------------------------------------------------
def _unmasked_features(encoder, encoded: dict, first: int, batch: int, device) -> dict:
    """{split: mean-pooled features of the unmasked encoder}; sets every split's ``h0`` (the input of block
    ``first``, None for first 0) from the same forward pass."""
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
    layers = fm.masked_modules(model.encoder).values()
    for layer in layers:
        layer.eval()  # deterministic gates
    features = {f"mask_{k}": {s: _features(lambda i, m, h, k=k: model.represent(i, m, k, h), encoded[s], batch,
                                           device) for s in splits} for k in range(model.n_masks)}
    for layer in layers:
        layer.train()
    return features


# --- probes -------------------------------------------------------------------------------------------------
def fit_probe(features, labels, l2: float = 1e-3, iterations: int = 25):
    """Logistic regression on standardised features (one-vs-rest for more than two classes; L2 penalty ``l2`` x n
    on the weights, not the bias), fitted by Newton's method in float64 numpy (a few exact steps: no learning rate,
    no autograd overhead). Returns a function features -> predicted labels (a LongTensor)."""
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


__all__ = ["fit_probe", "probe_accuracy", "leakage_table", "best_other", "disentanglement_score", "zero_fraction"]
