"""Property-based tests (hypothesis) of the ops against the reference over shapes (0-size, 1, primes), strides
(transposed, sliced), dtypes (float32 / float64 / float16 / bfloat16) and devices (CUDA parameters skip without a
GPU): uniform is bit-exact, gates and masked_linear forward / backward match within the house tolerance, l0_norm
keeps its closed form. Examples are derandomised (the same every run) and few, so the file stays fast under the
Triton interpreter."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastmask as fm
from fastmask import ref

from conftest import DECISION_MARGIN, assert_within_pytorch_error, decision_distance, device_backend_params

SIZES = st.sampled_from([0, 1, 2, 3, 5, 7, 13])  # empty, one, primes
POSITIVE_SIZES = st.sampled_from([1, 2, 3, 5, 7, 13])
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])
SEEDS = st.integers(0, 2**63 - 1)
OFFSETS = st.one_of(st.integers(0, 2**40), st.integers(2**63 - 2**20, 2**63 - 1))  # incl. the counter's top
ESTIMATORS = list(ref.ESTIMATORS)


def budget(backend: str, examples: int):
    """Hypothesis settings: derandomised, no example database, few examples (fewer under the interpreter)."""
    n = max(3, examples // 4) if backend == "triton" else examples
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def _randn(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values in another memory layout: "contiguous", "transposed" (column-major 2-D) or "sliced" (every
    other element of a larger tensor along the last dimension)."""
    if how == "transposed" and t.dim() == 2:
        return t.t().contiguous().t()
    if how == "sliced":
        wide = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


LAYOUTS = st.sampled_from(["contiguous", "transposed", "sliced"])


def _leaf(t: torch.Tensor, device, dtype) -> torch.Tensor:
    """A fresh leaf copy (``.to`` may return ``t`` itself, whose .grad would then accumulate across runs)."""
    return t.detach().to(device, dtype).clone().requires_grad_()


def _decision_clear(logits, estimator, seed, offset, training):
    """Gates whose decision is clear of the backend-dependent last bits (eval gates: all of them)."""
    if not training:
        return torch.ones(logits.shape, dtype=torch.bool)
    return decision_distance(logits, estimator, seed, offset) > DECISION_MARGIN


# --- uniform ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", device_backend_params())
def test_uniform_is_bit_exact(device, backend):
    fm.set_backend(backend)

    @budget(backend, 15)
    @given(shape=st.lists(SIZES, max_size=3), seed=SEEDS, offset=OFFSETS)
    def check(shape, seed, offset):
        u = fm.ops.uniform(shape, seed=seed, offset=offset, device=device)
        want = ref.uniform_ref(shape, seed, offset)
        assert u.dtype == torch.float32 and tuple(u.shape) == tuple(shape)
        assert torch.equal(u.cpu(), want)
        assert bool(((want >= 0) & (want < 1)).all())

    check()


# --- gates ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", device_backend_params())
def test_gates_match_the_reference(device, backend):
    fm.set_backend(backend)

    @budget(backend, 30)
    @given(rows=SIZES, cols=SIZES, dtype=DTYPES, layout=LAYOUTS, estimator=st.sampled_from(ESTIMATORS),
           training=st.booleans(), inverse=st.booleans(), seed=SEEDS, offset=OFFSETS, data_seed=st.integers(0, 99),
           scale=st.sampled_from([0.1, 3.0, 1e4]))
    def check(rows, cols, dtype, layout, estimator, training, inverse, seed, offset, data_seed, scale):
        values = _randn((rows, cols), data_seed, scale).to(dtype)
        logits = _layout(values.to(device), layout).detach().requires_grad_()
        kwargs = dict(estimator=estimator, seed=seed, offset=offset, training=training, inverse=inverse)
        z = fm.ops.gate(logits, **kwargs)
        grad_z = _randn((rows, cols), data_seed + 1).to(z.dtype)
        z.backward(grad_z.to(device))
        ref_kwargs = dict(kwargs, beta=fm.ops._common.default_beta(estimator, None))
        z_ref = ref.gate_ref(values, **ref_kwargs)
        g_ref = ref.gate_backward_ref(grad_z, values, **ref_kwargs).to(dtype)
        assert z.dtype == ref.compute_dtype(values) and logits.grad.dtype == dtype and z.shape == values.shape
        clear = _decision_clear(values, estimator, seed, offset, training)
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(z.detach().cpu()[clear], z_ref[clear], atol=tol, rtol=0)
        grad_tol = 1e-10 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 1e-2)
        torch.testing.assert_close(logits.grad.cpu()[clear].double(), g_ref[clear].double(), atol=grad_tol,
                                   rtol=grad_tol)

    check()


# --- masked_linear ----------------------------------------------------------------------------------------------
@st.composite
def masked_linear_problems(draw):
    """(x, weight, logits, bias, grad_out, kwargs) in out_in terms, then converted to the drawn layout."""
    lead = tuple(draw(st.lists(SIZES, min_size=1, max_size=2)))
    in_features, out_features = draw(POSITIVE_SIZES), draw(POSITIVE_SIZES)
    granularity = draw(st.sampled_from(["weight", "unit_in", "unit_out", "block", "layer"]))
    if granularity == "block":
        block = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    else:
        block = {"weight": (1, 1), "unit_in": (out_features, 1), "unit_out": (1, in_features),
                 "layer": (out_features, in_features)}[granularity]
    grid = (math.ceil(out_features / block[0]), math.ceil(in_features / block[1]))
    data_seed = draw(st.integers(0, 999))
    x = _randn(lead + (in_features,), data_seed)
    weight = _randn((out_features, in_features), data_seed + 1, in_features**-0.5)
    estimator = draw(st.sampled_from(["hard_concrete", "threshold_st"]))
    logits = _randn(grid, data_seed + 2, 2.0)
    if estimator == "threshold_st":  # keep every logit clear of the threshold (tau = 0): no tie to break
        logits = torch.where(logits >= 0, logits + 0.1, logits - 0.1)
    bias = _randn((out_features,), data_seed + 3) if draw(st.booleans()) else None
    grad_out = _randn(lead + (out_features,), data_seed + 4)
    weight_layout = draw(st.sampled_from(["out_in", "in_out"]))
    if weight_layout == "in_out":
        weight, logits, block = weight.t().contiguous(), logits.t().contiguous(), block[::-1]
    kwargs = dict(estimator=estimator, seed=draw(SEEDS), offset=draw(OFFSETS), training=draw(st.booleans()),
                  inverse=draw(st.booleans()), weight_layout=weight_layout, block=tuple(block))
    return x, weight, logits, bias, grad_out, kwargs


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_masked_linear_forward_backward_match_the_reference(device, backend):
    fm.set_backend(backend)

    @budget(backend, 30)
    @given(problem=masked_linear_problems(), dtype=DTYPES, x_layout=LAYOUTS, w_layout=LAYOUTS)
    def check(problem, dtype, x_layout, w_layout):
        x, weight, logits, bias, grad_out, kwargs = problem
        beta = fm.ops._common.default_beta(kwargs["estimator"], None)

        def run(fn, dt, x_how="contiguous", w_how="contiguous", **extra):
            xl = _layout(_leaf(x, device, dt), x_how).detach().requires_grad_()
            ll = _leaf(logits, device, torch.float64 if dt == torch.float64 else torch.float32)
            bl = None if bias is None else _leaf(bias, device, dt)
            y = fn(xl, _layout(weight.to(device, dt), w_how), ll, bl, **kwargs, **extra)
            y.backward(grad_out.to(device, y.dtype))
            return y.detach(), xl.grad, ll.grad, (None if bl is None else bl.grad)

        # Floor: one rounding of a half dtype (on a 1-element problem PyTorch's own error can be luckily ~0).
        floor = torch.finfo(dtype).eps if dtype in (torch.float16, torch.bfloat16) else 1e-5
        outs = run(fm.ops.masked_linear, dtype, x_layout, w_layout)
        oracle = run(ref.masked_linear_naive, torch.float64, beta=beta)
        baseline = run(ref.masked_linear_naive, dtype, beta=beta)
        for name, out, want, base in zip(("y", "grad_x", "grad_logits", "grad_bias"), outs, oracle, baseline):
            if want is None:  # no bias, or autograd gave an empty input no gradient at all
                assert out is None or not out.any(), name
                continue
            assert out.dtype == base.dtype and out.shape == want.shape, name
            assert_within_pytorch_error(out.cpu(), want.cpu(), base.cpu(), f"{name} {dtype}", rel_floor=floor)

    check()


# --- l0_norm ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_l0_norm_properties(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")

    @budget("reference", 40)
    @given(shape=st.lists(SIZES, min_size=1, max_size=2), dtype=DTYPES, layout=LAYOUTS,
           estimator=st.sampled_from(ESTIMATORS), data_seed=st.integers(0, 99),
           scale=st.sampled_from([0.1, 3.0, 1e4, math.inf]))
    def check(shape, dtype, layout, estimator, data_seed, scale):
        values = _randn(shape, data_seed, 1.0)
        if math.isinf(scale):  # +-inf logits are valid: gates exactly 0 or 1
            values = torch.where(values > 0, math.inf, -math.inf)
        else:
            values = values * scale
        values = values.to(dtype)
        logits = _layout(values.to(device), layout).detach().requires_grad_()
        beta = fm.ops._common.default_beta(estimator, None)
        l0 = fm.ops.l0_norm(logits, estimator=estimator)
        (grad,) = torch.autograd.grad(l0, logits)
        l = values.double()
        if estimator == "hard_concrete":  # sum of P(z != 0) = 1 - sigmoid(beta log(-gamma / zeta) - l)
            want = (1 - torch.sigmoid(beta * math.log(0.1 / 1.1) - l)).sum()
        elif estimator == "threshold_st":
            want = (l > 0).double().sum()
        else:
            want = torch.sigmoid(l).sum()
        assert l0.dtype == ref.compute_dtype(values) and l0.shape == ()
        assert 0 <= l0.item() <= values.numel() and torch.isfinite(grad).all() and grad.dtype == dtype
        assert l0.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-4)
        if estimator != "threshold_st":  # the derivative of a sum of sigmoids is in [0, 1/4]
            assert bool((grad.double() >= 0).all() and (grad.double() <= 0.25 + 1e-6).all())

    check()
