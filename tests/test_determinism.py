"""Determinism (issue 8): the same seed gives the same masks on every backend; the same backend gives the same bits
run after run; fm.info() names what is not deterministic; deterministic mode (fm.set_deterministic /
torch.use_deterministic_algorithms) takes the Triton mask gradient off its atomic adds."""

from __future__ import annotations

import importlib

import pytest
import torch

import fastmask as fm
from fastmask import ref
from fastmask.ops import _modes

from conftest import DECISION_MARGIN, backends_for, decision_distance, device_backend_params

ESTIMATORS = list(ref.ESTIMATORS)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_same_seed_same_masks_on_every_backend(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    backends = backends_for(device)
    if len(backends) < 2:
        pytest.skip(f"only {backends} run on {device} here: no second backend to compare")
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(19, 31, generator=gen) * 2).to(device)
    seed, offset = 2024, 7 * 19 * 31  # the noise of training step 7
    for backend in backends:
        fm.set_backend(backend)
        assert torch.equal(fm.ops.uniform(logits.shape, seed=seed, offset=offset, device=device).cpu(),
                           ref.uniform_ref(logits.shape, seed, offset)), backend
    for estimator in ESTIMATORS:
        clear = decision_distance(logits, estimator, seed, offset) > DECISION_MARGIN
        assert clear.float().mean() > 0.99  # the comparison below covers (almost) every gate
        for training in (True, False):
            masks = {}
            for backend in backends:
                fm.set_backend(backend)
                masks[backend] = fm.ops.gate(logits, estimator=estimator, seed=seed, offset=offset,
                                             training=training).cpu()
            # The oracle is fastmask.ref itself (not the op on the reference backend), so every backend is compared.
            want = ref.gate_ref(logits.cpu(), estimator=estimator, seed=seed, offset=offset, training=training,
                                beta=fm.ops._common.default_beta(estimator, None))
            assert set(masks) == set(backends) and len(masks) >= 2
            for backend, got in masks.items():
                if estimator == "hard_concrete":  # continuous gates: exact 0 / 1 agree, the rest within 1 ulp-ish
                    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
                    inside = (want > 1e-5) & (want < 1 - 1e-5)
                    assert torch.equal(got[~inside], want[~inside]), (backend, training)
                else:  # binary gates: identical wherever the decision is not within 1e-4 of its threshold
                    sel = clear if training else torch.ones_like(clear)
                    assert torch.equal(got[sel], want[sel]), (backend, estimator, training)


def _train(device, backend, steps=2, granularity="block", block=(3, 5), dtype=torch.float32):
    """A few Adam steps of a MaskedLinear's logits; returns (logits, per-step training masks, final eval mask)."""
    fm.set_backend(backend)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(20, 24, generator=gen).to(device, dtype)
    x = torch.randn(5, 24, generator=gen).to(device, dtype)
    target = torch.randn(5, 20, generator=gen).to(device, dtype)
    layer = fm.MaskedLinear(weight, granularity=granularity, block=block, estimator="hard_concrete", seed=99)
    opt = torch.optim.Adam([layer.logits], lr=0.1)
    for _ in range(steps):
        loss = (layer(x) - target).pow(2).mean() + 1e-3 * fm.ops.l0_norm(layer.logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return layer.logits.detach().cpu().clone(), layer.eval().mask().cpu()


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("granularity,block", [("block", (3, 5)), ("layer", (1, 1)), ("weight", (1, 1))])
def test_the_same_run_twice_gives_the_same_bits(device, backend, granularity, block):
    # block (3, 5) and layer: gate blocks that span tiles (the Triton mask gradient would use atomics on a GPU)
    fm.set_deterministic(True)
    try:
        first = _train(device, backend, granularity=granularity, block=block)
        second = _train(device, backend, granularity=granularity, block=block)
    finally:
        fm.set_deterministic(False)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_deterministic_mode_switch():
    assert fm.is_deterministic() is False
    fm.set_deterministic(True)
    try:
        assert fm.is_deterministic() and fm.info()["deterministic_mode"] is True
    finally:
        fm.set_deterministic(False)
    assert fm.info()["deterministic_mode"] is False
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert fm.is_deterministic()  # torch's switch is honoured
    finally:
        torch.use_deterministic_algorithms(previous)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        fm.set_deterministic("yes")


def test_info_reports_what_breaks_determinism(monkeypatch):
    report = fm.info()
    assert set(report["nondeterminism"]) == set(report["chosen"])
    assert report["nondeterminism"]["cpu"] == []  # every CPU backend is deterministic
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    reasons = _modes.nondeterminism("cuda", "triton")
    assert any("atomic adds" in r and "set_deterministic(True)" in r for r in reasons)
    assert any("CUBLAS_WORKSPACE_CONFIG" in r for r in reasons)
    fm.set_deterministic(True)
    try:
        assert not any("atomic" in r for r in _modes.nondeterminism("cuda", "triton"))
    finally:
        fm.set_deterministic(False)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    assert _modes.nondeterminism("cuda", "cuda") == []
    assert "deterministic mode: False" in fm._info.format_info(fm.info())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_info_on_a_gpu_names_the_triton_atomics():
    with fm.use_backend("triton"):
        report = fm.info()
    assert any("atomic adds" in r for r in report["nondeterminism"]["cuda"])


class _LaunchSpy:
    """Stands in for a @triton.jit kernel: records the constexpr USE_ATOMIC of every launch, then launches."""

    def __init__(self, kernel):
        self.kernel, self.use_atomic = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.use_atomic.append(kwargs["USE_ATOMIC"])
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("switch", ["fastmask", "torch"])
# Blocks whose gates span several tiles of the dWm GEMM (unit, head and layer grids take the unit path of
# fastmask/ops/gated_units.py: no mask-gradient kernel, nothing to make deterministic).
@pytest.mark.parametrize("granularity,block", [("block", (3, 5)), ("block", (6, 7)), ("block", (5, 3))])
def test_deterministic_mode_takes_the_triton_mask_gradient_off_atomics(switch, granularity, block, monkeypatch):
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if "triton" not in backends_for(device):
        pytest.skip("the Triton backend is not available here")
    # The recompute policy (the GPU default) runs the fused mask-gradient kernel; CPU tensors default to "keep".
    monkeypatch.setattr(fm.ops._modes, "_memory_policy", "recompute")
    kernels = importlib.import_module("fastmask.kernels.masked_linear")
    spy = _LaunchSpy(kernels._mask_grad_kernel)
    monkeypatch.setattr(kernels, "_mask_grad_kernel", spy)
    fixed_order_calls = []
    fixed_order = kernels._mask_grad_fixed_order
    monkeypatch.setattr(kernels, "_mask_grad_fixed_order",
                        lambda *args: fixed_order_calls.append(1) or fixed_order(*args))
    want = _train(device, "reference", steps=1, granularity=granularity, block=block)[0]

    fast = _train(device, "triton", steps=1, granularity=granularity, block=block)[0]
    assert spy.use_atomic and all(spy.use_atomic)  # these gate blocks span tiles: atomics by default
    torch.testing.assert_close(fast, want, atol=1e-5, rtol=1e-5)

    spy.use_atomic.clear()
    previous = torch.are_deterministic_algorithms_enabled()
    if switch == "fastmask":
        fm.set_deterministic(True)
    else:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        deterministic = _train(device, "triton", steps=1, granularity=granularity, block=block)[0]
    finally:
        fm.set_deterministic(False)
        torch.use_deterministic_algorithms(previous)
    assert True not in spy.use_atomic and fixed_order_calls  # the fixed-order fallback ran instead
    torch.testing.assert_close(deterministic, want, atol=1e-5, rtol=1e-5)
