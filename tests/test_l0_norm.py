"""fm.ops.l0_norm: closed forms, gradients, opcheck, compile."""

import math

import pytest
import torch

import fastmask as fm


def test_hard_concrete_closed_form():
    logits = torch.randn(17, 5)
    beta, gamma, zeta = 0.5, -0.2, 1.3
    expected = (1 - torch.sigmoid(beta * math.log(-gamma / zeta) - logits)).sum()
    torch.testing.assert_close(fm.ops.l0_norm(logits, beta, gamma, zeta), expected)


@pytest.mark.parametrize("estimator", ["gumbel_sigmoid_st", "bernoulli_st"])
def test_binary_estimators_expect_sigmoid(estimator):
    logits = torch.randn(40)
    torch.testing.assert_close(fm.ops.l0_norm(logits, estimator=estimator), torch.sigmoid(logits).sum())


def test_threshold_counts_and_passes_gradient_through():
    logits = torch.tensor([-1.0, 0.2, 0.9, 3.0], requires_grad=True)
    value = fm.ops.l0_norm(logits, estimator="threshold_st", tau=0.5)
    assert value.item() == 2.0
    value.backward()
    assert torch.equal(logits.grad, torch.ones(4))


@pytest.mark.parametrize("estimator", ["hard_concrete", "gumbel_sigmoid_st", "bernoulli_st"])
def test_l0_norm_gradcheck(estimator):
    logits = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l: fm.ops.l0_norm(l, estimator=estimator), (logits,))


def test_l0_norm_opcheck_and_compile():
    logits = torch.randn(5, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.fastmask.l0_norm.default, (logits, "hard_concrete", 2 / 3, -0.1, 1.1, 0.0))
    compiled = torch.compile(lambda l: fm.ops.l0_norm(l) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(logits), fm.ops.l0_norm(logits) * 2)


def test_l0_norm_bad_input():
    with pytest.raises(ValueError, match="estimator must be one of"):
        fm.ops.l0_norm(torch.zeros(3), estimator="dropout")
    with pytest.raises(TypeError, match="logits must be a floating tensor"):
        fm.ops.l0_norm(torch.zeros(3, dtype=torch.int32))
