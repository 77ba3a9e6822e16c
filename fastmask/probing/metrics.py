"""Structural-probe and fine-tuning metrics, in plain numpy (no scipy / sklearn needed).

- ``spearman``: rank correlation with average ranks for ties (scipy.stats.spearmanr's definition); NaN when a
  side is constant.
- ``length_averaged``: Hewitt & Manning's summary: average the per-sentence (or per-word) correlations of each
  sentence length, then average those means over the lengths 5..50 that occur.
- ``root_accuracy``: the shallowest predicted non-punctuation word is the gold root.
- ``uuas``: undirected unlabeled attachment of the minimum spanning tree of the predicted distances against the
  gold tree, both over the non-punctuation words (H&M), corpus-level (correct edges / gold edges).
- ``matthews_corrcoef`` over the whole corpus and ``per_batch_mcc``, the mean of per-batch MCCs that the released
  fine-tuning code reports (0 for a batch whose MCC is undefined, as sklearn does).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) with ties sharing the mean of their positions."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0  # mean of 1-based positions start+1 .. end
            start = end
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho of two equal-length sequences (NaN if either is constant or shorter than 2)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman: x and y must be 1-D of the same length, got {x.shape} and {y.shape}")
    if len(x) < 2:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denominator) if denominator > 0 else math.nan


def length_averaged(values_by_length: dict[int, list[float]], min_length: int = 5, max_length: int = 50) -> float:
    """Mean over sentence lengths in [min_length, max_length] of the mean value at that length (NaNs skipped)."""
    means = []
    for length, values in values_by_length.items():
        finite = [v for v in values if not math.isnan(v)]
        if min_length <= length <= max_length and finite:
            means.append(sum(finite) / len(finite))
    return float(np.mean(means)) if means else math.nan


def depth_spearman(predicted: Iterable[Sequence[float]], gold: Iterable[Sequence[float]], min_length: int = 5,
                   max_length: int = 50) -> float:
    """H&M's depth Spearman: one correlation per sentence (all words), averaged per length, then over lengths."""
    by_length: dict[int, list[float]] = {}
    for p, g in zip(predicted, gold):
        by_length.setdefault(len(g), []).append(spearman(p, g))
    return length_averaged(by_length, min_length, max_length)


def distance_spearman(predicted: Iterable[np.ndarray], gold: Iterable[np.ndarray], min_length: int = 5,
                      max_length: int = 50) -> float:
    """H&M's distance Spearman: one correlation per word (its row of distances), averaged per sentence length
    over all words of all sentences of that length, then over lengths."""
    by_length: dict[int, list[float]] = {}
    for p, g in zip(predicted, gold):
        p, g = np.asarray(p), np.asarray(g)
        n = len(g)
        by_length.setdefault(n, []).extend(spearman(p[i, :n], g[i, :n]) for i in range(n))
    return length_averaged(by_length, min_length, max_length)


def root_accuracy(predicted_depths: Iterable[Sequence[float]], roots: Iterable[int],
                  punctuation: Iterable[Sequence[bool]]) -> float:
    """Fraction of sentences whose shallowest predicted non-punctuation word is the gold root."""
    correct = total = 0
    for depths, root, punct in zip(predicted_depths, roots, punctuation):
        candidates = [i for i in range(len(depths)) if not punct[i]]
        if not candidates:
            continue
        best = min(candidates, key=lambda i: depths[i])
        correct += int(best == root)
        total += 1
    return correct / total if total else math.nan


def minimum_spanning_tree(distances: np.ndarray) -> set[tuple[int, int]]:
    """Edges (i < j) of a minimum spanning tree of a symmetric distance matrix (Prim, O(n^2))."""
    distances = np.asarray(distances, dtype=np.float64)
    n = distances.shape[0]
    if distances.shape != (n, n):
        raise ValueError(f"minimum_spanning_tree: expected a square matrix, got {distances.shape}")
    if n < 2:
        return set()
    in_tree = np.zeros(n, dtype=bool)
    in_tree[0] = True
    best = distances[0].copy()
    parent = np.zeros(n, dtype=np.int64)
    edges = set()
    for _ in range(n - 1):
        candidates = np.where(in_tree, np.inf, best)
        j = int(np.argmin(candidates))
        edges.add((min(j, int(parent[j])), max(j, int(parent[j]))))
        in_tree[j] = True
        closer = distances[j] < best
        best = np.where(closer, distances[j], best)
        parent = np.where(closer, j, parent)
    return edges


def uuas(predicted_distances: Iterable[np.ndarray], gold_distances: Iterable[np.ndarray],
         punctuation: Iterable[Sequence[bool]]) -> float:
    """Corpus UUAS: edges shared by the MSTs of predicted and gold distances over non-punctuation words, divided by
    the number of gold edges."""
    correct = total = 0
    for predicted, gold, punct in zip(predicted_distances, gold_distances, punctuation):
        keep = np.flatnonzero(~np.asarray(punct, dtype=bool))
        if len(keep) < 2:
            continue
        sub = np.ix_(keep, keep)
        gold_edges = minimum_spanning_tree(np.asarray(gold)[sub])
        predicted_edges = minimum_spanning_tree(np.asarray(predicted)[sub])
        correct += len(gold_edges & predicted_edges)
        total += len(gold_edges)
    return correct / total if total else math.nan


def matthews_corrcoef(predicted: Sequence[int], gold: Sequence[int]) -> float:
    """Binary Matthews correlation; 0 when undefined (a constant prediction or gold), like sklearn."""
    p, g = np.asarray(predicted).astype(bool), np.asarray(gold).astype(bool)
    if p.shape != g.shape:
        raise ValueError(f"matthews_corrcoef: {p.shape} predictions vs {g.shape} labels")
    tp, tn = float(np.sum(p & g)), float(np.sum(~p & ~g))
    fp, fn = float(np.sum(p & ~g)), float(np.sum(~p & g))
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator > 0 else 0.0


def per_batch_mcc(predicted: Sequence[int], gold: Sequence[int], batch_size: int = 32) -> float:
    """Mean of the MCCs of consecutive batches of ``batch_size`` (the released code's validation figure)."""
    if batch_size < 1:
        raise ValueError(f"per_batch_mcc: batch_size must be >= 1, got {batch_size}")
    p, g = list(predicted), list(gold)
    values = [matthews_corrcoef(p[i:i + batch_size], g[i:i + batch_size]) for i in range(0, len(p), batch_size)]
    return float(np.mean(values)) if values else math.nan


__all__ = ["spearman", "length_averaged", "depth_spearman", "distance_spearman", "root_accuracy",
           "minimum_spanning_tree", "uuas", "matthews_corrcoef", "per_batch_mcc"]
