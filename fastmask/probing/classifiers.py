"""Classifier probes of what a representation carries, on frozen features: a logistic-regression (linear) probe
fitted exactly, and an MLP probe (one hidden layer) trained with early stopping on a dev split carved from its
training set; each with its held-out accuracy. ``fastmask run disentangle`` probes every representation for every
factor with both (the leakage tables: information a linear probe misses may still be recoverable non-linearly).

    predict = probing.fit_linear_probe(train_features, train_labels, l2=1e-3)
    accuracy = probing.linear_probe_accuracy(train_features, train_labels, test_features, test_labels)
    accuracy = classifiers.mlp_probe_accuracy(train_features, train_labels, test_features, test_labels, seed=0)
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


def _dev_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, dev indices): ``fraction`` of each class (at least one of a class with two or more examples)
    held out for early stopping, stratified so that a small dev split keeps the class balance."""
    fit, dev = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_dev = min(max(1, int(round(fraction * members.size))), members.size - 1) if members.size >= 2 else 0
        dev.append(members[:n_dev])
        fit.append(members[n_dev:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(dev))


def fit_mlp_probe(features, labels, *, hidden: int = 128, dev_fraction: float = 0.2, max_epochs: int = 500,
                  patience: int = 30, lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0):
    """An MLP probe: standardised features -> Linear(d, ``hidden``) -> ReLU -> Linear(hidden, classes), trained
    full batch with Adam (cross-entropy, ``weight_decay``) on the examples left after holding out a stratified
    ``dev_fraction`` of them, for at most ``max_epochs`` epochs; early stopping on the dev cross-entropy: training
    stops after ``patience`` epochs without a new best, and the weights of the best dev epoch are returned.
    Deterministic for a given ``seed`` (its own generator: the caller's RNG streams are left alone). Returns
    (predict: features -> LongTensor of labels, info: {"best_epoch", "epochs", "dev_size", "dev_accuracy"})."""
    if not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"fit_mlp_probe: hidden must be an int >= 1, got {hidden!r}")
    if not 0 < dev_fraction < 1:
        raise ValueError(f"fit_mlp_probe: dev_fraction must be in (0, 1), got {dev_fraction!r}")
    if not isinstance(max_epochs, int) or max_epochs < 1:
        raise ValueError(f"fit_mlp_probe: max_epochs must be an int >= 1, got {max_epochs!r}")
    if not isinstance(patience, int) or patience < 1:
        raise ValueError(f"fit_mlp_probe: patience must be an int >= 1, got {patience!r}")
    x = torch.as_tensor(features).detach().float().cpu()
    y = torch.as_tensor(labels).detach().long().cpu()
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"fit_mlp_probe: features must be (n, d) and labels (n,), got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    fit, dev = _dev_split(y.numpy(), dev_fraction, np.random.default_rng(seed))
    if fit.size == 0 or dev.size == 0:
        raise ValueError(f"fit_mlp_probe: {x.shape[0]} examples leave no fit or no dev split at dev_fraction "
                         f"{dev_fraction}")
    fit_t, dev_t = torch.from_numpy(fit), torch.from_numpy(dev)
    mean, std = x[fit_t].mean(0), x[fit_t].std(0, unbiased=False).clamp_min(1e-8)
    z = (x - mean) / std
    n_classes = max(int(y.max()) + 1, 2)
    generator = torch.Generator().manual_seed(seed)
    # Built without their default init (which would draw from the global RNG), then initialised as torch does,
    # from the probe's own generator.
    first = torch.nn.utils.skip_init(torch.nn.Linear, x.shape[1], hidden)
    second = torch.nn.utils.skip_init(torch.nn.Linear, hidden, n_classes)
    with torch.no_grad():
        for layer in (first, second):
            bound = 1.0 / layer.in_features ** 0.5
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)
    model = torch.nn.Sequential(first, torch.nn.ReLU(), second)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_epoch, best_state, epoch = float("inf"), -1, None, 0
    for epoch in range(max_epochs):
        model.train()
        loss = torch.nn.functional.cross_entropy(model(z[fit_t]), y[fit_t])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            dev_loss = torch.nn.functional.cross_entropy(model(z[dev_t]), y[dev_t]).item()
        if dev_loss < best - 1e-6:
            best, best_epoch = dev_loss, epoch
            best_state = [p.detach().clone() for p in model.parameters()]
        elif epoch - best_epoch >= patience:
            break
    with torch.no_grad():
        for p, kept in zip(model.parameters(), best_state):
            p.copy_(kept)
    model.eval()

    def predict(f):
        with torch.no_grad():
            return model((torch.as_tensor(f).detach().float().cpu() - mean) / std).argmax(1)

    dev_accuracy = (predict(x[dev_t]) == y[dev_t]).double().mean().item()
    return predict, {"best_epoch": best_epoch, "epochs": epoch + 1, "dev_size": int(dev.size),
                     "dev_accuracy": dev_accuracy}


def mlp_probe_accuracy(train_x, train_y, test_x, test_y, seed: int = 0, **settings) -> float:
    """Accuracy on (test_x, test_y) of a fresh ``fit_mlp_probe`` trained (with its dev split held out for early
    stopping) on (train_x, train_y); ``settings``: fit_mlp_probe's keyword arguments."""
    predict, _ = fit_mlp_probe(train_x, train_y, seed=seed, **settings)
    return (predict(test_x) == torch.as_tensor(test_y)).double().mean().item()


__all__ = ["fit_linear_probe", "linear_probe_accuracy", "fit_mlp_probe", "mlp_probe_accuracy"]
