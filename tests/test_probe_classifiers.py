"""fastmask.probing.classifiers: the MLP probe (one hidden layer, early stopping on a stratified dev split) recovers
what a linear probe cannot (an XOR of two feature signs), stops early where nothing is to be learned and returns
its best dev epoch's weights, is deterministic per seed, and names its bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmask.probing.classifiers import _dev_split, fit_mlp_probe, linear_probe_accuracy, mlp_probe_accuracy


def _xor(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()


def test_mlp_probe_recovers_a_non_linear_factor_a_linear_probe_misses():
    x, y = _xor(800, 0)
    tx, ty = _xor(400, 1)
    linear = linear_probe_accuracy(x, y, tx, ty)
    mlp = mlp_probe_accuracy(x, y, tx, ty, seed=0)
    assert linear < 0.62 and mlp > 0.85, (linear, mlp)


def test_mlp_probe_stops_early_on_noise_and_keeps_its_best_dev_epoch():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(200, 50, generator=g), torch.randint(0, 2, (200,), generator=g)  # labels carry nothing
    predict, info = fit_mlp_probe(x, y, max_epochs=400, patience=10, lr=1e-2, seed=0)
    assert info["epochs"] < 400 and info["epochs"] == info["best_epoch"] + 11
    assert info["dev_size"] == 40
    # learnable labels, ample patience: training goes on well past the first epochs
    x2, y2 = _xor(400, 3)
    _, info2 = fit_mlp_probe(x2, y2, max_epochs=60, patience=60, seed=0)
    assert info2["epochs"] == 60 and info2["best_epoch"] >= 50
    # the weights returned are the best dev epoch's: refitting with max_epochs = best_epoch + 1 gives the same model
    again, _ = fit_mlp_probe(x, y, max_epochs=info["best_epoch"] + 1, patience=10, lr=1e-2, seed=0)
    probe = torch.randn(64, 50, generator=g)
    assert torch.equal(predict(probe), again(probe))


def test_mlp_probe_is_deterministic_per_seed_and_leaves_global_rng_alone():
    x, y = _xor(300, 4)
    tx, _ = _xor(200, 5)
    state = torch.get_rng_state()
    a, _ = fit_mlp_probe(x, y, seed=7, max_epochs=50)
    assert torch.equal(torch.get_rng_state(), state)
    b, _ = fit_mlp_probe(x, y, seed=7, max_epochs=50)
    c, _ = fit_mlp_probe(x, y, seed=8, max_epochs=50)
    assert torch.equal(a(tx), b(tx))
    assert not torch.equal(a(tx), c(tx))


def test_dev_split_is_stratified_and_disjoint():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    fit, dev = _dev_split(labels, 0.2, np.random.default_rng(0))
    assert sorted(np.concatenate([fit, dev]).tolist()) == list(range(100))
    assert [int((labels[dev] == c).sum()) for c in range(3)] == [10, 6, 4]


def test_mlp_probe_bad_arguments_name_themselves():
    x, y = _xor(40, 0)
    for kwargs, name in (({"hidden": 0}, "hidden"), ({"dev_fraction": 1.0}, "dev_fraction"),
                         ({"max_epochs": 0}, "max_epochs"), ({"patience": 0}, "patience")):
        with pytest.raises(ValueError, match=f"fit_mlp_probe: {name}"):
            fit_mlp_probe(x, y, **kwargs)
    with pytest.raises(ValueError, match=r"features must be \(n, d\)"):
        fit_mlp_probe(x, y[:10])
    with pytest.raises(ValueError, match="no fit or no dev split"):
        fit_mlp_probe(x[:1], y[:1])
