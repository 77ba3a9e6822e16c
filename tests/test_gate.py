"""fm.ops.gate / fm.ops.hard_concrete: every estimator on every backend against the reference, the estimators'
distributions, float64 gradcheck and opcheck."""

import math

import pytest
import torch

import fastmask as fm
from fastmask import ref

from conftest import decision_distance, device_backend_params

ESTIMATORS = list(ref.ESTIMATORS)
SHAPES = [(1, 1), (7, 13), (31, 1), (2, 129)]
_DECISION_MARGIN = 1e-4


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gate_matches_reference(device, backend, estimator, training, inverse, dtype):
    fm.set_backend(backend)
    gen = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        logits = (torch.randn(shape, generator=gen, dtype=dtype) * 3).to(device).requires_grad_()
        kwargs = dict(estimator=estimator, seed=17, offset=2**33 + 5, training=training, inverse=inverse, tau=0.3)
        z = fm.ops.gate(logits, **kwargs)
        grad_z = torch.randn(shape, generator=gen, dtype=z.dtype).to(device)
        z.backward(grad_z)
        beta = fm.ops._common.default_beta(estimator, None)
        ref_kwargs = dict(estimator=estimator, seed=17, offset=2**33 + 5, beta=beta, tau=0.3, training=training,
                          inverse=inverse)
        z_ref = ref.gate_ref(logits.detach().cpu(), **ref_kwargs)
        g_ref = ref.gate_backward_ref(grad_z.cpu(), logits.detach().cpu(), **ref_kwargs)
        assert z.dtype == ref.compute_dtype(logits) and logits.grad.dtype == dtype
        tol = 1e-6 if dtype == torch.float32 else 1e-12
        clear = decision_distance(logits, estimator, 17, 2**33 + 5, tau=0.3) > _DECISION_MARGIN
        if not training:
            clear = torch.ones_like(clear)
        torch.testing.assert_close(z.detach().cpu()[clear], z_ref[clear], atol=tol, rtol=0)
        torch.testing.assert_close(logits.grad.cpu()[clear], g_ref[clear], atol=tol * 10, rtol=tol * 10)


def _sample(estimator, logit_value, n, seed, **kwargs):
    logits = torch.full((n,), float(logit_value))
    return fm.ops.gate(logits, estimator=estimator, seed=seed, **kwargs)


def _assert_binomial(hits: int, n: int, p: float, what: str):
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(hits / n - p) <= 4.5 * sd + 1e-9, f"{what}: observed {hits / n:.5f}, expected {p:.5f} (sd {sd:.5f})"


@pytest.mark.parametrize("logit_value", [-2.0, 0.0, 1.5])
def test_hard_concrete_zero_and_one_probabilities(logit_value):
    """P(z = 0) = sigmoid(beta log(-gamma / zeta) - l), P(z = 1) = sigmoid(l - beta log((1 - gamma) / (zeta - 1)))."""
    beta, gamma, zeta, n = 2 / 3, -0.1, 1.1, 200_000
    z = _sample("hard_concrete", logit_value, n, seed=5, beta=beta, gamma=gamma, zeta=zeta)
    p_zero = torch.sigmoid(torch.tensor(beta * math.log(-gamma / zeta) - logit_value)).item()
    p_one = torch.sigmoid(torch.tensor(logit_value - beta * math.log((1 - gamma) / (zeta - 1)))).item()
    _assert_binomial(int((z == 0).sum()), n, p_zero, "P(z=0)")
    _assert_binomial(int((z == 1).sum()), n, p_one, "P(z=1)")
    # The expected number of non-zeros is what l0_norm returns.
    expected_nonzero = fm.ops.l0_norm(torch.full((n,), logit_value), beta, gamma, zeta).item()
    _assert_binomial(int((z != 0).sum()), n, expected_nonzero / n, "l0_norm vs sampled non-zeros")


@pytest.mark.parametrize("estimator", ["gumbel_sigmoid_st", "bernoulli_st"])
@pytest.mark.parametrize("logit_value", [-1.0, 0.4, 2.5])
def test_binary_estimators_keep_probability(estimator, logit_value):
    """Gumbel-sigmoid (any temperature) and Bernoulli keep a gate with probability sigmoid(l); gates are 0/1."""
    n = 200_000
    z = _sample(estimator, logit_value, n, seed=11, beta=0.5)
    assert set(z.unique().tolist()) <= {0.0, 1.0}
    _assert_binomial(int(z.sum()), n, torch.sigmoid(torch.tensor(logit_value)).item(), estimator)


def test_eval_gates_are_deterministic():
    logits = torch.linspace(-4, 4, 101)
    hc = fm.ops.hard_concrete(logits, training=False)
    torch.testing.assert_close(hc, (torch.sigmoid(logits) * 1.2 - 0.1).clamp(0, 1))
    for estimator in ("gumbel_sigmoid_st", "bernoulli_st"):
        z = fm.ops.gate(logits, estimator=estimator, training=False, seed=1)
        # sigmoid(l) > 0.5 exactly when l > 0 (decided on l, so no rounding of sigmoid near 0.5 matters).
        assert torch.equal(z, (logits > 0).float())
        assert torch.equal(z, fm.ops.gate(logits, estimator=estimator, training=False, seed=2))
    assert torch.equal(fm.ops.gate(logits, estimator="threshold_st", tau=1.0), (logits > 1.0).float())


def test_inverse_is_the_complement():
    logits = torch.randn(50, 7)
    for estimator in ESTIMATORS:
        z = fm.ops.gate(logits, estimator=estimator, seed=3)
        zi = fm.ops.gate(logits, estimator=estimator, seed=3, inverse=True)
        torch.testing.assert_close(z + zi, torch.ones_like(z))


def test_straight_through_gradients():
    logits = torch.randn(64, requires_grad=True)
    fm.ops.gate(logits, estimator="threshold_st").sum().backward()
    assert torch.equal(logits.grad, torch.ones(64)), "threshold_st passes the gradient straight through"
    logits.grad = None
    fm.ops.gate(logits, estimator="bernoulli_st", seed=4).sum().backward()
    p = torch.sigmoid(logits.detach())
    torch.testing.assert_close(logits.grad, p * (1 - p))


@pytest.mark.parametrize("device,backend", device_backend_params(fast_only=True))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("inverse", [False, True])
def test_hard_concrete_gradcheck_float64(device, backend, training, inverse):
    fm.set_backend(backend)
    logits = (torch.randn(6, 5, dtype=torch.float64) * 2).to(device).requires_grad_()
    fn = lambda l: fm.ops.hard_concrete(l, seed=7, offset=3, training=training, inverse=inverse)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gate_opcheck(estimator):
    logits = torch.randn(5, 3, requires_grad=True)
    args = (logits, estimator, 1, 2, 0.7, -0.1, 1.1, 0.0, True, False)
    torch.library.opcheck(torch.ops.fastmask.gate.default, args)
    # The backward op is not itself differentiable (no double backward): check it on plain tensors.
    torch.library.opcheck(torch.ops.fastmask.gate_backward.default, (torch.randn(5, 3), logits.detach()) + args[1:])


def test_gate_compiles_fullgraph():
    logits = torch.randn(8, 9, requires_grad=True)
    fn = torch.compile(lambda l: fm.ops.hard_concrete(l, seed=2).sum(), fullgraph=True)
    out = fn(logits)
    out.backward()
    torch.testing.assert_close(out, fm.ops.hard_concrete(logits, seed=2).sum())
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_gate_bad_input():
    with pytest.raises(ValueError, match="estimator must be one of"):
        fm.ops.gate(torch.zeros(3), estimator="concrete")
    with pytest.raises(TypeError, match="logits must be a floating tensor"):
        fm.ops.gate(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="beta"):
        fm.ops.hard_concrete(torch.zeros(3), beta=0.0)
    with pytest.raises(ValueError, match="gamma < 0 < 1 < zeta"):
        fm.ops.hard_concrete(torch.zeros(3), gamma=0.1)


def test_extreme_logits_stay_finite():
    logits = torch.tensor([-1e4, -80.0, 0.0, 80.0, 1e4], requires_grad=True)
    for estimator in ESTIMATORS:
        for training in (True, False):
            z = fm.ops.gate(logits, estimator=estimator, seed=1, training=training)
            z.sum().backward()
            assert torch.isfinite(z).all() and torch.isfinite(logits.grad).all(), estimator
            logits.grad = None
