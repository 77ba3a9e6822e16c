"""The eager autograd.Function twins of the training ops (fastmask/ops/_common.py ``eager_function``): the same bits
as the torch.library custom ops on every route (unit / head / layer grids, K masks, per-weight and block grids under
both memory policies, trainable weights), every backend and dtype; which route runs when (plain eager tensors: the
twin; FakeTensor tracing and torch.compile: the custom op)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastmask as fm
from fastmask.ops import _common

from conftest import device_backend_params

# (name, weight shape (out, in), grid, block, memory, trainable weight, K masks)
ROUTES = [
    ("unit_in", (6, 8), (1, 8), None, None, False, 1),
    ("unit_out", (6, 8), (6, 1), None, None, False, 1),
    ("head", (6, 8), (1, 4), (6, 2), None, False, 1),
    ("head_partial", (6, 8), (1, 3), (6, 3), None, False, 1),
    ("layer_trainable_weight", (6, 8), (1, 1), None, None, True, 1),
    ("unit_out_k3", (6, 8), (6, 1), None, None, False, 3),
    ("weight_keep", (6, 8), (6, 8), None, "keep", False, 1),
    ("weight_recompute", (6, 8), (6, 8), None, "recompute", False, 1),
    ("block_keep", (6, 8), (3, 2), (2, 4), "keep", False, 1),
    ("weight_trainable_weight", (6, 8), (6, 8), None, "keep", True, 1),
]


def _problem(route, dtype, device):
    _, (out_f, in_f), grid, block, memory, trainable, k = route
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3 * k, 5, in_f, generator=gen).to(device, dtype)
    weight = torch.randn(out_f, in_f, generator=gen).to(device, dtype)
    logits = (torch.randn((k,) + grid if k > 1 else grid, generator=gen) * 2).to(device)
    bias = torch.randn(out_f, generator=gen).to(device, dtype)
    grad_out = torch.randn(3 * k, 5, out_f, generator=gen).to(device, dtype)
    return x, weight, logits, bias, grad_out


def _run(route, x, weight, logits, bias, grad_out, layout="out_in"):
    _, _, _, block, memory, trainable, k = route
    x, logits, bias = (t.detach().clone().requires_grad_() for t in (x, logits, bias))
    weight = weight.detach().clone().requires_grad_(trainable)
    if layout == "in_out":
        weight_arg, logits_arg = weight.t(), logits.transpose(-1, -2)
        block = None if block is None else block[::-1]
    else:
        weight_arg, logits_arg = weight, logits
    kw = dict(estimator="hard_concrete", seed=5, offset=2**33 + 3, weight_layout=layout, block=block)
    if k > 1:
        y = fm.ops.grouped_masked_linear(x, weight_arg, logits_arg, bias, **kw)
    else:
        y = fm.ops.masked_linear(x, weight_arg, logits_arg, bias, memory=memory, **kw)
    y.backward(grad_out)
    return y.grad_fn.name(), [y.detach(), x.grad, logits.grad, bias.grad, weight.grad]


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("route", ROUTES, ids=[r[0] for r in ROUTES])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_twin_equals_custom_op(monkeypatch, device, backend, route, layout, dtype):
    fm.set_backend(backend)
    problem = _problem(route, dtype, device)
    monkeypatch.setattr(_common, "EAGER_FUNCTIONS", True)
    twin_name, twin = _run(route, *problem, layout=layout)
    monkeypatch.setattr(_common, "EAGER_FUNCTIONS", False)
    op_name, op = _run(route, *problem, layout=layout)
    assert "Function" in twin_name, twin_name  # the twin ran
    assert "Function" not in op_name and "fastmask" in op_name, op_name  # the custom op ran
    for name, a, b in zip(("y", "grad_x", "grad_logits", "grad_bias", "grad_weight"), twin, op):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name}: max |twin - op| = {(a.double() - b.double()).abs().max().item():.3g}"


def test_routes_chosen_by_context():
    """Plain eager tensors take the twin; autocast, FakeTensor tracing, torch.compile and disabled twins take the
    custom op;
    the twin's backward is once-differentiable, like the custom op's (no double backward)."""
    x = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(6, 8)
    logits = torch.randn(1, 8, requires_grad=True)
    assert _common.eager_function(x, weight, logits, None)
    y = fm.ops.masked_linear(x, weight, logits)
    assert "UnitMaskedLinearFunction" in y.grad_fn.name()
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|double backward"):
        gx.sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast sees an op call and a Function's insides differently
        assert not _common.eager_function(x, weight, logits, None)
        y = fm.ops.masked_linear(x, weight, logits)
        assert "unit_masked_linear" in y.grad_fn.name() and "Function" not in y.grad_fn.name()
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (x, weight, logits)]
        assert not _common.eager_function(*fake)
        y = fm.ops.masked_linear(*fake)
        assert y.shape == (4, 6) and "unit_masked_linear" in y.grad_fn.name()
    calls = []

    @torch.compile(backend="eager", fullgraph=True)
    def step(x, logits):
        calls.append(_common.eager_function(x, weight, logits))
        return fm.ops.masked_linear(x, weight, logits, seed=1)

    torch.testing.assert_close(step(x, logits), fm.ops.masked_linear(x, weight, logits, seed=1), rtol=0, atol=0)
    assert calls == [False]  # traced once, by dynamo: the custom op


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("features,group", [(8, 1), (12, 4), (11, 3)], ids=["units", "heads", "partial"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gated_units_twin_equals_custom_op(monkeypatch, device, backend, features, group, dtype):
    fm.set_backend(backend)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, features, generator=gen).to(device, dtype)
    logits = (torch.randn(-(-features // group), generator=gen) * 2).to(device)
    bias = torch.randn(features, generator=gen).to(device, dtype)
    grad_out = torch.randn(2, 5, features, generator=gen).to(device, dtype)

    def run(twin):
        monkeypatch.setattr(_common, "EAGER_FUNCTIONS", twin)
        leaves = [t.detach().clone().requires_grad_() for t in (x, logits, bias)]
        y = fm.ops.gated_units(*leaves, group=group, estimator="gumbel_sigmoid_st", seed=2, offset=9)
        y.backward(grad_out)
        return y.grad_fn.name(), [y.detach()] + [t.grad for t in leaves]

    (twin_name, twin), (op_name, op) = run(True), run(False)
    assert "GatedUnitsFunction" in twin_name and "gated_units" in op_name, (twin_name, op_name)
    for name, a, b in zip(("y", "grad_x", "grad_logits", "grad_bias"), twin, op):
        assert a.dtype == b.dtype and torch.equal(a, b), name
