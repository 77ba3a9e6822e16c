"""Classifier probes of what a representation carries: a logistic-regression (linear) probe on frozen features,
fitted exactly, and its held-out accuracy. ``fastmask run disentangle`` probes every representation for every factor
with it (the leakage table).

    predict = probing.fit_linear_probe(train_features, train_labels, l2=1e-3)
    accuracy = probing.linear_probe_accuracy(train_features, train_labels, test_features, test_labels)
"""

from __future__ import annotations

import numpy as np
import torch


def fit_linear_probe(features, labels, l2: float = 1e-3, iterations: int = 25):
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


def linear_probe_accuracy(train_x, train_y, test_x, test_y, l2: float = 1e-3) -> float:
    """Accuracy on (test_x, test_y) of a fresh ``fit_linear_probe`` trained on (train_x, train_y)."""
    predict = fit_linear_probe(train_x, train_y, l2)
    return (predict(test_x) == torch.as_tensor(test_y)).double().mean().item()


__all__ = ["fit_linear_probe", "linear_probe_accuracy"]
