"""Evaluation of setting 3 (``--data syntax``), on frozen pooled features of each representation (mask_0 =
semantics, mask_1 = syntax, the unmasked encoder, the fine-tuned baseline per factor):

* semantic similarity: MRPC test paraphrase ROC-AUC of the cosine of the two sentences' features (chance 0.5), and
  F1 of "paraphrase" at the cosine threshold that maximises F1 on the dev pairs (picked on dev, applied to test;
  trivial baseline: every pair called a paraphrase);
* syntactic similarity on EWT test: nearest-neighbour template retrieval (for each sentence whose template has
  another member in the set, is its cosine-nearest other sentence of the same template? chance: the expected
  accuracy of a random neighbour), the mean edit distance between the template sequences of every sentence and its
  nearest neighbour (a tree-edit-distance in kind, over the top-level structure; baseline: random pairs), and a
  linear probe of the root word's UPOS (a token-free syntactic feature) trained on EWT dev (majority baseline).
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch

from ...probing.classifiers import linear_probe_accuracy

MIN_ROOT_CLASS = 10  # root UPOS classes with fewer dev sentences are left out of the probe


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative), ties counting 1/2
    (the Mann-Whitney U statistic over n_pos * n_neg). ValueError unless both classes occur."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    labels = torch.as_tensor(labels).bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not n_pos or not n_neg:
        raise ValueError(f"roc_auc: needs both classes, got {n_pos} positives and {n_neg} negatives")
    order = torch.argsort(scores, stable=True)
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    for value in torch.unique(scores):  # average ranks over ties
        tied = scores == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def f1_at(scores, labels, threshold: float) -> float:
    """F1 of the positive class when ``score >= threshold`` is called positive."""
    scores, labels = torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels).bool()
    predicted = scores >= threshold
    tp = int((predicted & labels).sum())
    fp, fn = int((predicted & ~labels).sum()), int((~predicted & labels).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def best_threshold(scores, labels) -> tuple:
    """(threshold, F1): the score threshold (one of the scores) with the highest F1 on (scores, labels); the
    highest threshold among ties."""
    best = (float("inf"), -1.0)
    for t in sorted(set(torch.as_tensor(scores, dtype=torch.float64).tolist()), reverse=True):
        f1 = f1_at(scores, labels, t)
        if f1 > best[1]:
            best = (t, f1)
    return best


def pair_cosines(features, n: int) -> torch.Tensor:
    """Cosine of rows i and n + i of ``features`` (the two sentences of pair i), for i < n."""
    return torch.nn.functional.cosine_similarity(features[:n].double(), features[n:2 * n].double(), dim=-1)


def semantic_scores(dev_features, dev_labels, test_features, test_labels) -> dict:
    """Paraphrase AUC and F1 from cosines: the threshold picked on dev, F1 measured on test."""
    dev = pair_cosines(dev_features, len(dev_labels))
    test = pair_cosines(test_features, len(test_labels))
    threshold, dev_f1 = best_threshold(dev, dev_labels)
    return {"auc": roc_auc(test, test_labels), "f1": f1_at(test, test_labels, threshold), "threshold": threshold,
            "dev_auc": roc_auc(dev, dev_labels), "dev_f1": dev_f1}


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance between two sequences (insert, delete, substitute: 1 each)."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def nearest_neighbours(features) -> torch.Tensor:
    """Index of every row's cosine-nearest other row."""
    x = torch.nn.functional.normalize(features.double(), dim=-1)
    similarity = x @ x.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.argmax(1)


def template_retrieval(features, templates: Sequence[str]) -> dict:
    """Nearest-neighbour syntax: accuracy (queries: the rows whose template occurs again), its chance (a random
    other row: mean over the queries of (count - 1) / (n - 1)), the mean edit distance between the template
    sequences of every row and its nearest neighbour, and of every row and every other row (a random pair)."""
    n = len(templates)
    if n < 2:
        raise ValueError(f"template_retrieval: needs at least 2 sentences, got {n}")
    counts = Counter(templates)
    nn = nearest_neighbours(features).tolist()
    queries = [i for i in range(n) if counts[templates[i]] > 1]
    hits = sum(templates[nn[i]] == templates[i] for i in queries)
    tokens = [t.split() for t in templates]
    nn_distance = sum(edit_distance(tokens[i], tokens[nn[i]]) for i in range(n)) / n
    distinct = list(counts)
    pair_sum = sum(counts[a] * counts[b] * edit_distance(a.split(), b.split()) for a in distinct for b in distinct)
    return {"nn_accuracy": hits / len(queries) if queries else float("nan"), "queries": len(queries),
            "nn_chance": sum((counts[templates[i]] - 1) / (n - 1) for i in queries) / len(queries) if queries
            else float("nan"),
            "nn_edit_distance": nn_distance, "random_edit_distance": pair_sum / (n * (n - 1))}


def root_upos(template: str) -> str:
    """The root's UPOS from a template of ``syntax.syntactic_template``."""
    return next(t for t in template.split() if t.startswith("ROOT:"))[5:]


def root_probe(train_features, train_templates, test_features, test_templates, l2: float = 1e-3) -> dict:
    """A linear probe of the root's UPOS (classes with >= MIN_ROOT_CLASS training sentences; others left out of
    both sets), trained on (train_features, train_templates), scored on the test set; with the majority baseline
    (the training set's most frequent class, scored on the test set)."""
    train_y, test_y = [root_upos(t) for t in train_templates], [root_upos(t) for t in test_templates]
    classes = sorted(c for c, k in Counter(train_y).items() if k >= MIN_ROOT_CLASS)
    if len(classes) < 2:
        raise ValueError(f"root_probe: fewer than 2 root classes with {MIN_ROOT_CLASS} training sentences")
    index = {c: i for i, c in enumerate(classes)}
    tr = [i for i, y in enumerate(train_y) if y in index]
    te = [i for i, y in enumerate(test_y) if y in index]
    ytr = torch.tensor([index[train_y[i]] for i in tr])
    yte = torch.tensor([index[test_y[i]] for i in te])
    majority = Counter(ytr.tolist()).most_common(1)[0][0]
    return {"root_probe": linear_probe_accuracy(train_features[tr], ytr, test_features[te], yte, l2),
            "root_majority": float((yte == majority).double().mean()), "root_classes": classes,
            "root_test_sentences": len(te)}


def own_minus_other(semantic: dict, syntactic: dict) -> dict:
    """Per representation made for a factor (mask_k, finetuned_k): its score on its own factor (semantics: AUC,
    syntax: nearest-neighbour accuracy) minus the other factor's representation's score on that factor, and minus
    the unmasked encoder's."""
    own = {0: lambda r: semantic[r]["auc"], 1: lambda r: syntactic[r]["nn_accuracy"]}
    gaps = {}
    for rep in semantic:
        if rep.startswith(("mask_", "finetuned_")):
            kind, k = rep.rsplit("_", 1)
            other = f"{kind}_{1 - int(k)}"
            if other in semantic:
                gaps[rep] = {"other": own[int(k)](rep) - own[int(k)](other),
                             "unmasked": own[int(k)](rep) - own[int(k)]("unmasked")}
    return gaps


__all__ = ["roc_auc", "f1_at", "best_threshold", "pair_cosines", "semantic_scores", "edit_distance",
           "nearest_neighbours", "template_retrieval", "root_upos", "root_probe", "own_minus_other"]
