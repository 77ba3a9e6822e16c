"""fastmask.nn.MaskedLinear: wraps nn.Linear and GPT-2 Conv1D without copying, every granularity."""

import pytest
import torch
from torch import nn

import fastmask as fm
from fastmask.nn import MaskedLinear, replace_linear_layers, set_step


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


# --- granularities, modes, noise position, compile (fastmask.nn additions) ------------------------------------
def _conv1d(nf, nx):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    return Conv1D(nf, nx)


@pytest.mark.parametrize("layout,side,grid,block", [
    ("out_in", "in", (1, 4), (24, 8)),    # attention output projection (nn.Linear): heads are column groups
    ("out_in", "out", (3, 1), (8, 32)),   # q / k / v projection (nn.Linear): heads are row groups
    ("in_out", "in", (4, 1), (8, 24)),    # GPT-2 attn.c_proj (Conv1D (in, out)): heads are row groups
    ("in_out", "out", (1, 3), (32, 8)),   # GPT-2 c_attn-like (Conv1D): heads are column groups
])
def test_head_granularity_grids(layout, side, grid, block):
    out_features, in_features = (24, 32) if side == "in" else (24, 32)
    module = nn.Linear(in_features, out_features) if layout == "out_in" else _conv1d(out_features, in_features)
    masked = MaskedLinear.from_module(module, granularity="head", head_dim=8, head_side=side, init_logit=10.0)
    assert masked.logits.shape == grid and masked.block == block
    with torch.no_grad():
        masked.logits.view(-1)[1] = -10.0  # head 1 off
    masked.eval()
    x = torch.randn(5, in_features)
    w = module.weight.detach() if layout == "out_in" else module.weight.detach().t()  # (out, in)
    w = w.clone()
    if side == "in":
        w[:, 8:16] = 0
    else:
        w[8:16, :] = 0
    torch.testing.assert_close(masked(x), x @ w.t() + module.bias, rtol=1e-5, atol=1e-5)
    assert masked.head_gates().tolist() == [1.0, 0.0] + [1.0] * (grid[0] * grid[1] - 2)
    with pytest.raises(ValueError, match="head_dim"):
        MaskedLinear.from_module(module, granularity="head", head_dim=7, head_side=side)


def test_gate_weight_counts_and_merged_weight_with_partial_blocks():
    linear = nn.Linear(37, 29)
    masked = MaskedLinear.from_module(linear, granularity="block", block=(8, 16))
    counts = masked.gate_weight_counts()
    assert counts.shape == masked.logits.shape == (4, 3)
    assert counts.sum() == 29 * 37 and counts[0, 0] == 128 and counts[-1, -1] == 5 * 5
    with torch.no_grad():
        masked.logits.normal_(0, 3)
    mask = fm.ref.expand_gates(masked.gates(), masked.block, linear.weight.shape)
    torch.testing.assert_close(masked.merged_weight(), linear.weight * mask, rtol=0, atol=0)
    torch.testing.assert_close(masked.merged_weight(inverse=True), linear.weight * (1 - mask), rtol=0, atol=0)
    assert masked.to_module() is linear and linear.weight is masked.weight


def test_to_module_builds_a_layer_when_there_was_none():
    from transformers.pytorch_utils import Conv1D

    weight, bias = torch.randn(6, 5), torch.randn(5)
    masked = MaskedLinear(weight, bias, weight_layout="in_out")
    plain = masked.to_module(masked.merged_weight())
    assert isinstance(plain, Conv1D) and plain.weight.shape == (6, 5) and plain.bias is masked.bias
    x = torch.randn(3, 6)
    masked.eval()
    torch.testing.assert_close(plain(x), masked(x), rtol=1e-5, atol=1e-5)
    linear = MaskedLinear(torch.randn(4, 3)).to_module()
    assert isinstance(linear, nn.Linear) and linear.bias is None and linear.weight.device.type == "cpu"


def test_inverse_and_bypass_modes():
    linear = nn.Linear(16, 8)
    masked = MaskedLinear.from_module(linear, granularity="unit_in", init_logit=10.0)
    with torch.no_grad():
        masked.logits[0, :4] = -10.0
    masked.eval()
    x = torch.randn(3, 16)
    kept = x.clone()
    kept[:, :4] = 0
    torch.testing.assert_close(masked(x), linear(kept))
    masked.inverse = True
    torch.testing.assert_close(masked(x), linear(x - kept))  # only the removed units
    masked.inverse, masked.bypass = False, True
    torch.testing.assert_close(masked(x), linear(x), rtol=0, atol=0)
    assert "bypass" in repr(masked)


def test_set_step_pins_the_noise_and_auto_step_advances_it():
    layer = MaskedLinear(torch.randn(6, 5), init_keep=0.5, seed=7)
    x = torch.randn(2, 5)
    draws = [layer(x) for _ in range(3)]  # auto: steps 0, 1, 2
    assert layer.step == 3 and not torch.equal(draws[0], draws[1])
    set_step(layer, 1)
    torch.testing.assert_close(layer(x), draws[1], rtol=0, atol=0)
    torch.testing.assert_close(layer(x), draws[1], rtol=0, atol=0)  # pinned: the same noise again
    assert layer.step == 1 and not layer.auto_step
    set_step(layer, 1, auto=True)
    layer(x)
    torch.testing.assert_close(layer(x), draws[2], rtol=0, atol=0)
    expected = fm.ops.masked_linear(x, layer.weight, layer.logits, estimator="hard_concrete", seed=7,
                                    offset=5 * layer.logits.numel(), block=layer.block)
    set_step(layer, 5)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    layer.eval()
    layer(x)
    assert layer.step == 5  # eval forwards draw no noise
    with pytest.raises(ValueError, match="step must be >= 0"):
        set_step(layer, -1)
    with pytest.raises(ValueError, match="no MaskedLinear"):
        set_step(nn.Linear(2, 2), 0)


def test_masked_linear_compiles_fullgraph():
    from torch._dynamo.testing import CompileCounterWithBackend

    model = nn.Sequential(MaskedLinear(torch.randn(12, 10), torch.randn(12), granularity="unit_out", seed=1),
                          nn.GELU(), MaskedLinear(torch.randn(4, 12), granularity="block", block=(2, 4), seed=2))
    x = torch.randn(3, 10)
    model.eval()
    expected = model(x)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend=counter)(x), expected)
    assert counter.frame_count == 1

    model.train()

    def step(x, i):
        set_step(model, i)
        return model(x)

    compiled = torch.compile(step, fullgraph=True, backend=counter)
    for i in range(4):
        out = compiled(x, i)
        out.sum().backward()
        set_step(model, i)
        torch.testing.assert_close(out, model(x), rtol=1e-6, atol=1e-6)
    assert counter.frame_count <= 1 + 2  # the eval graph, then at most one static and one dynamic training graph
