"""fastmask.nn.MaskedLinear: wraps nn.Linear and GPT-2 Conv1D without copying, every granularity."""

import pytest
import torch
from torch import nn

import fastmask as fm
from fastmask.nn import MaskedLinear, replace_linear_layers


@pytest.mark.parametrize("granularity", ["weight", "block", "unit_in", "unit_out", "layer"])
def test_masked_linear_module_matches_op(granularity):
    linear = nn.Linear(37, 29)
    masked = MaskedLinear.from_module(linear, granularity=granularity, block=(8, 4), seed=3)
    assert masked.weight is linear.weight and not masked.weight.requires_grad
    x = torch.randn(5, 37)
    masked.eval()
    expected = fm.ops.masked_linear(x, linear.weight, masked.logits, linear.bias, training=False, block=masked.block)
    torch.testing.assert_close(masked(x), expected)
    masked.train()
    masked(x).sum().backward()
    assert masked.logits.grad is not None and masked.logits.grad.abs().sum() > 0
    assert linear.weight.grad is None


def test_conv1d_layout_is_read_in_place():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(12, 8)  # weight (in=8, out=12)
    masked = MaskedLinear.from_module(conv, granularity="unit_out", init_logit=10.0)
    assert masked.weight_layout == "in_out" and masked.logits.shape == (1, 12)
    x = torch.randn(3, 8)
    masked.eval()
    torch.testing.assert_close(masked(x), conv(x))  # gates saturate at 1 for logit 10


def test_training_draws_fresh_noise_each_call_and_is_reproducible():
    torch.manual_seed(0)
    make = lambda: MaskedLinear(torch.randn(6, 5), init_keep=0.5, seed=7)  # noqa: E731
    a, b = make(), make()
    b.weight.data.copy_(a.weight.data)
    x = torch.randn(2, 5)
    first, second = a(x), a(x)
    assert not torch.equal(first, second)
    torch.testing.assert_close(b(x), first)
    torch.testing.assert_close(b(x), second)


def test_init_keep_sets_training_keep_probability():
    layer = MaskedLinear(torch.randn(400, 500), init_keep=0.7, seed=1)
    density = fm.ops.l0_norm(layer.logits).item() / layer.logits.numel()
    assert density == pytest.approx(0.7, abs=1e-4)


def test_replace_linear_layers_targets_by_name():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)))
    replaced = replace_linear_layers(model, include=r"^2\.")
    assert sorted(replaced) == ["2.0", "2.1"]
    assert isinstance(model[0], nn.Linear) and isinstance(model[2][0], MaskedLinear)
    assert model(torch.randn(3, 4)).shape == (3, 2)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="granularity"):
        MaskedLinear(torch.randn(3, 3), granularity="row")
    with pytest.raises(ValueError, match="estimator"):
        MaskedLinear(torch.randn(3, 3), estimator="magic")
    with pytest.raises(ValueError, match="init_keep"):
        MaskedLinear(torch.randn(3, 3), init_keep=1.0)
    with pytest.raises(TypeError, match="expected nn.Linear or transformers Conv1D"):
        MaskedLinear.from_module(nn.Conv2d(1, 1, 1))
