"""Numerical robustness (issue 8): extreme and infinite logits, the extreme outputs of the Philox noise (u exactly 0
and the largest u), fp16 / bf16 inputs of large magnitude, and zero-size batches, on every backend."""

from __future__ import annotations

import math

import pytest
import torch

import fastmask as fm
from fastmask import ref

from conftest import assert_within_pytorch_error, device_backend_params

ESTIMATORS = list(ref.ESTIMATORS)
EXTREME = [-math.inf, -1e4, -88.0, -1e-3, 0.0, 1e-3, 88.0, 1e4, math.inf]

# Found by scanning the first words of seed 0's counters with the C++ kernel (about 2^32 draws); position 4c is
# counter c's first word. The test re-derives them from the reference, so it fails loudly if the Philox mapping
# ever changes.
SEED = 0
OFFSET_U_ZERO = 4 * 5145262111  # uniform(seed 0, offset + 0) == 0.0 exactly: log(u) would be -inf
OFFSET_U_MAX = 4 * 9297664  # uniform(seed 0, offset + 0) == 1 - 2^-24, the largest value: log1p(-u) ~ -16.6


def test_the_extreme_noise_positions_are_what_they_claim():
    assert ref.uniform_ref((1,), SEED, OFFSET_U_ZERO).item() == 0.0
    assert ref.uniform_ref((1,), SEED, OFFSET_U_MAX).item() == 1.0 - 2.0**-24
    # the largest value any word can give: (2^31 - 1) rounded to float32 is 2^31, times the scale
    assert ref.uniform_ref((1,), SEED, OFFSET_U_MAX).item() == torch.tensor(
        2.0**31, dtype=torch.float32).mul(torch.tensor(4.6566127342e-10, dtype=torch.float32)).item()


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("offset", [OFFSET_U_ZERO, OFFSET_U_MAX], ids=["u=0", "u=max"])
def test_noise_at_its_extremes_never_gives_log0(device, backend, offset):
    fm.set_backend(backend)
    assert fm.ops.uniform((1,), seed=SEED, offset=offset, device=device).item() == \
        ref.uniform_ref((1,), SEED, offset).item()
    u_clamped = min(max(ref.uniform_ref((1,), SEED, offset).item(), ref.UNIFORM_EPS), 1 - ref.UNIFORM_EPS)
    noise = math.log(u_clamped) - math.log1p(-u_clamped)
    for value in (-3.0, 0.0, 2.5):
        logits = torch.full((1, 1), value, device=device, requires_grad=True)
        for estimator in ESTIMATORS:
            beta = fm.ops._common.default_beta(estimator, None)
            z = fm.ops.gate(logits, estimator=estimator, seed=SEED, offset=offset)
            z.sum().backward()
            assert torch.isfinite(z).all() and torch.isfinite(logits.grad).all(), estimator
            if estimator == "hard_concrete":  # the guard: u is clamped to [eps, 1 - eps] before logit(u)
                s = 1 / (1 + math.exp(-(noise + value) / beta))
                want = min(max(s * 1.2 - 0.1, 0.0), 1.0)
                assert z.item() == pytest.approx(want, abs=1e-5)
            logits.grad = None
        # the fused layer regenerates the same noise in its kernels (forward and mask gradient)
        x = torch.randn(3, 1, device=device, requires_grad=True)
        weight = torch.randn(1, 1, device=device)
        y = fm.ops.masked_linear(x, weight, logits, seed=SEED, offset=offset)
        y.sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(logits.grad).all()
        logits.grad = None


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("training", [True, False])
def test_extreme_and_infinite_logits_give_exact_gates_and_finite_gradients(device, backend, training):
    fm.set_backend(backend)
    logits = torch.tensor([EXTREME], device=device).repeat(3, 1)  # (3, 9): also the weight grid below
    x = torch.randn(4, 9, device=device)
    weight = torch.randn(3, 9, device=device)
    for estimator in ESTIMATORS:
        for inverse in (False, True):
            kwargs = dict(estimator=estimator, seed=5, offset=11, training=training, inverse=inverse)
            leaf = logits.clone().requires_grad_()
            z = fm.ops.gate(leaf, **kwargs)
            z.sum().backward()
            assert torch.isfinite(z).all() and torch.isfinite(leaf.grad).all(), (estimator, inverse)
            z_ref = ref.gate_ref(logits.cpu(), beta=fm.ops._common.default_beta(estimator, None), **kwargs)
            saturated = logits.cpu().abs() >= 1e4  # the noise cannot move these: exactly 0 or 1
            assert torch.equal(z.detach().cpu()[saturated], z_ref[saturated]), (estimator, inverse)
            assert set(z.detach().cpu()[saturated].tolist()) <= {0.0, 1.0}
            if estimator != "threshold_st":  # infinite logits: (numerically) zero slope; threshold_st passes it on
                assert (leaf.grad.cpu()[logits.cpu().isinf()].abs() <= 1e-30).all(), (estimator, inverse)

            leaf = logits.clone().requires_grad_()
            x_leaf = x.clone().requires_grad_()
            y = fm.ops.masked_linear(x_leaf, weight, leaf, **kwargs)
            y.sum().backward()
            for name, t in (("y", y), ("grad_x", x_leaf.grad), ("grad_logits", leaf.grad)):
                assert torch.isfinite(t).all(), (estimator, inverse, name)
    leaf = logits.clone().requires_grad_()
    for estimator in ESTIMATORS:
        l0 = fm.ops.l0_norm(leaf, estimator=estimator)
        (grad,) = torch.autograd.grad(l0, leaf)
        assert torch.isfinite(l0) and torch.isfinite(grad).all() and 0 <= l0.item() <= leaf.numel(), estimator


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype,magnitude", [(torch.float16, 30.0), (torch.bfloat16, 1e18)],
                         ids=["fp16-near-max", "bf16-huge"])
def test_half_precision_inputs_of_large_magnitude(device, backend, dtype, magnitude):
    # fp16: |y| reaches ~4e4 of fp16's 65504 (products summed in fp32, rounded once); bf16: values around 1e36,
    # far beyond fp16 but inside bf16's (float32's) range. The result must match PyTorch's own error.
    fm.set_backend(backend)
    gen = torch.Generator().manual_seed(7)
    in_features, out_features = 48, 5
    x = (torch.rand(6, in_features, generator=gen) * 0.5 + 0.5) * magnitude
    weight = (torch.rand(out_features, in_features, generator=gen) * 0.5 + 0.5) * magnitude
    logits = torch.randn(out_features, in_features, generator=gen) * 3
    grad_out = torch.randn(6, out_features, generator=gen)
    kwargs = dict(seed=2, offset=3)
    beta = fm.ops._common.default_beta("hard_concrete", None)

    def run(fn, dt, **extra):  # fresh leaves: .to() may return the tensor itself, whose .grad would accumulate
        xl = x.to(device, dt).clone().requires_grad_()
        ll = logits.to(device).clone().requires_grad_()
        y = fn(xl, weight.to(device, dt), ll, **kwargs, **extra)
        y.backward(grad_out.to(device, y.dtype))
        return y.detach(), xl.grad, ll.grad

    outs = run(fm.ops.masked_linear, dtype)
    oracle = run(ref.masked_linear_naive, torch.float64, beta=beta)
    baseline = run(ref.masked_linear_naive, dtype, beta=beta)
    assert torch.isfinite(oracle[0]).all() and oracle[0].abs().max() < torch.finfo(dtype).max
    for name, out, want, base in zip(("y", "grad_x", "grad_logits"), outs, oracle, baseline):
        assert_within_pytorch_error(out.cpu(), want.cpu(), base.cpu(), f"{dtype} {name}")


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("lead,in_features,out_features,grid", [
    ((0,), 7, 5, (5, 7)),  # no tokens
    ((2, 0), 7, 5, (5, 1)),  # no tokens, 3-D x, unit gates
    ((3,), 0, 5, (5, 0)),  # no input features
    ((3,), 7, 0, (0, 7)),  # no output features
], ids=["batch-0", "seq-0", "in-0", "out-0"])
def test_zero_size_problems(device, backend, lead, in_features, out_features, grid):
    fm.set_backend(backend)
    x = torch.randn(lead + (in_features,), device=device, requires_grad=True)
    weight = torch.randn(out_features, in_features, device=device)
    bias = torch.randn(out_features, device=device, requires_grad=True)
    logits = torch.randn(grid, device=device, requires_grad=True)
    block = (1, in_features if grid[1] == 1 else 1)
    y = fm.ops.masked_linear(x, weight, logits, bias, block=block, seed=1)
    assert y.shape == lead + (out_features,)
    y.sum().backward()
    want = ref.masked_linear_ref(x.detach().cpu(), weight.cpu(), logits.detach().cpu(), bias.detach().cpu(),
                                 block=block, seed=1)
    torch.testing.assert_close(y.detach().cpu(), want)  # e.g. y == bias when in_features == 0
    assert logits.grad.shape == logits.shape and x.grad.shape == x.shape and bias.grad.shape == bias.shape
    if math.prod(lead) == 0 or in_features == 0:  # nothing flows into the mask
        assert torch.equal(logits.grad, torch.zeros_like(logits))
    l0 = fm.ops.l0_norm(logits)
    assert l0.item() >= 0 and torch.isfinite(l0)
    assert fm.ops.uniform((0, 3), device=device).shape == (0, 3)
