"""fm.ops.gated_units and the unit path of fm.ops.masked_linear (unit, head and layer grids: two GEMMs, no masked
weight): every backend against the fp64 oracle and against the masked-weight route on the same noise; float64
gradcheck, opcheck, torch.compile, bad input."""

import pytest
import torch

import fastmask as fm
from fastmask import ref
from fastmask.ops import _backend

from conftest import assert_compiled_matches_eager, assert_within_pytorch_error, device_backend_params

# (lead shape of x, features, group): per-unit gates, heads, a partial last group, one gate for everything.
SHAPES = [((5,), 7, 1), ((2, 3), 12, 4), ((4,), 11, 3), ((6,), 9, 9), ((1,), 1, 1)]


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


def _naive_gated_units(x, logits, bias, group, **kw):
    """Hand-written: torch-op gates (straight-through trick for the binary estimators), broadcast multiply."""
    z, slope = ref._gate_and_slope(logits.reshape(-1), kw["estimator"], kw["seed"], kw["offset"], kw["beta"], -0.1,
                                   1.1, 0.0, kw["training"])
    if kw["inverse"]:
        z, slope = 1 - z, -slope
    l = logits.reshape(-1).to(z.dtype)
    z = z.detach() + slope.detach() * (l - l.detach())
    y = x * z.repeat_interleave(group)[: x.shape[-1]].to(x.dtype)
    return y if bias is None else y + bias


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("lead,features,group", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("estimator,training,inverse", [("hard_concrete", True, False),
                                                        ("hard_concrete", False, False),
                                                        ("gumbel_sigmoid_st", True, True),
                                                        ("bernoulli_st", True, False)])
def test_gated_units_matches_oracle(device, backend, lead, features, group, dtype, estimator, training, inverse):
    fm.set_backend(backend)
    gen = torch.Generator().manual_seed(features * 7 + group)
    n_gates = -(-features // group)
    x = torch.randn(lead + (features,), generator=gen).to(device, dtype)
    logits = (torch.randn(1, n_gates, generator=gen) * 2).to(device)
    bias = torch.randn(features, generator=gen).to(device, dtype)
    grad_out = torch.randn(lead + (features,), generator=gen).to(device, dtype)
    kw = dict(estimator=estimator, seed=11, offset=2**33 + 5, training=training, inverse=inverse,
              beta=fm.ops._common.default_beta(estimator, None))

    def run(fn, x, logits, bias):
        x, logits, bias = _leaf(x), _leaf(logits), _leaf(bias)
        y = fn(x, logits, bias, group=group, **kw)
        y.backward(grad_out.to(y.dtype))
        return y.detach(), x.grad, logits.grad, bias.grad

    got = run(fm.ops.gated_units, x, logits, bias)
    oracle = run(_naive_gated_units, x.double(), logits.double(), bias.double())
    baseline = run(_naive_gated_units, x, logits, bias)
    for name, out, want, base in zip(("y", "grad_x", "grad_logits", "grad_bias"), got, oracle, baseline):
        assert out.dtype == base.dtype, f"{name}: dtype {out.dtype} != {base.dtype}"
        assert_within_pytorch_error(out, want, base, name)
    # The reference formulas of ref.py, forward and backward, are the same functions.
    want_y = ref.gated_units_ref(x, logits, group, bias, **kw)
    torch.testing.assert_close(got[0], want_y, rtol=0, atol=0 if backend == "reference" else 1e-6)
    params = fm.ops._common.make_params(gamma=-0.1, zeta=1.1, tau=0.0, where="test", **kw)
    want_gx, want_gl, want_gb = ref.gated_units_backward_ref(grad_out, x, logits, group, params, has_bias=True)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got[1], want_gx, **tol)
    torch.testing.assert_close(got[2], want_gl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[3], want_gb.to(got[3].dtype), **tol)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("grid,block", [((1, 16), (5, 1)), ((5, 1), (1, 16)), ((1, 4), (5, 4)), ((1, 3), (5, 6)),
                                        ((2, 1), (3, 16)), ((1, 1), (5, 16))],
                         ids=["unit_in", "unit_out", "head", "head_partial", "unit_out_group", "layer"])
def test_unit_path_equals_masked_weight_route(device, backend, layout, grid, block):
    """fm.ops.masked_linear on a unit grid (the unit path) == the masked-weight op on the same grid and noise, in
    float64 (the two algebras agree to rounding); the weight gradient too when the weight is trained."""
    fm.set_backend(backend)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 7, 16, generator=gen, dtype=torch.float64).to(device)
    weight = torch.randn(5, 16, generator=gen, dtype=torch.float64).to(device)
    logits = (torch.randn(grid, generator=gen, dtype=torch.float64) * 2).to(device)
    bias = torch.randn(5, generator=gen, dtype=torch.float64).to(device)
    grad_out = torch.randn(3, 7, 5, generator=gen, dtype=torch.float64).to(device)
    if layout == "in_out":
        weight, logits, block = weight.t().contiguous(), logits.t().contiguous(), block[::-1]
    assert ref.unit_axis(logits.shape, layout) is not None

    def run(fn):
        xs, w, ls, b = _leaf(x), _leaf(weight), _leaf(logits), _leaf(bias)
        y = fn(xs, w, ls, b)
        y.backward(grad_out)
        return y.detach(), xs.grad, ls.grad, b.grad, w.grad

    unit = run(lambda x, w, l, b: fm.ops.masked_linear(x, w, l, b, seed=3, offset=9, weight_layout=layout,
                                                       block=block))
    weight_route = run(lambda x, w, l, b: torch.ops.fastmask.masked_linear(
        x, w, l, b, "hard_concrete", 3, 9, True, False, layout, list(block), 2 / 3, -0.1, 1.1, 0.0))
    for name, a, b in zip(("y", "grad_x", "grad_logits", "grad_bias", "grad_weight"), unit, weight_route):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_unit_path_builds_no_masked_weight(monkeypatch):
    """Unit, head and layer grids never reach the backend's masked-weight forward/backward; per-weight grids do."""
    def refuse(*args, **kwargs):
        raise AssertionError("the masked-weight route ran")

    backend = _backend.resolve(torch.device("cpu"))
    monkeypatch.setattr(backend, "masked_linear_forward", refuse, raising=False)
    monkeypatch.setattr(backend, "masked_linear_backward", refuse, raising=False)
    monkeypatch.setattr(backend, "masked_weight_and_slope", refuse, raising=False)  # the "keep" policy's forward
    x = torch.randn(4, 12, requires_grad=True)
    weight = torch.randn(6, 12)
    for grid, block in (((1, 12), None), ((6, 1), None), ((1, 3), (6, 4)), ((1, 1), None)):
        logits = torch.randn(grid, requires_grad=True)
        fm.ops.masked_linear(x, weight, logits, block=block).sum().backward()
        assert logits.grad is not None and torch.isfinite(logits.grad).all()
    with pytest.raises(AssertionError, match="masked-weight route ran"):
        fm.ops.masked_linear(x, weight, torch.randn(6, 12, requires_grad=True))


@pytest.mark.parametrize("device,backend", device_backend_params(fast_only=True))
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("grid,block", [((1, 5), (4, 1)), ((4, 1), (1, 5)), ((1, 2), (4, 3)), ((1, 1), (4, 5))],
                         ids=["unit_in", "unit_out", "head", "layer"])
def test_unit_path_gradcheck_float64(device, backend, layout, grid, block):
    fm.set_backend(backend)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    weight = torch.randn(4, 5, generator=gen, dtype=torch.float64).to(device)
    logits = (torch.randn(grid, generator=gen, dtype=torch.float64) * 2).to(device)
    if layout == "in_out":
        weight, logits, block = weight.t().contiguous(), logits.t().contiguous(), block[::-1]
    weight.requires_grad_()
    logits.requires_grad_()
    bias = torch.randn(4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    fn = lambda x, w, l, b: fm.ops.masked_linear(x, w, l, b, seed=9, weight_layout=layout, block=block)  # noqa
    assert torch.autograd.gradcheck(fn, (x, weight, logits, bias), eps=1e-6, atol=1e-6)
    unit_logits = (torch.randn(3, generator=gen, dtype=torch.float64) * 2).to(device).requires_grad_()
    unit_bias = torch.randn(5, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    fn = lambda x, l, b: fm.ops.gated_units(x, l, b, group=2, seed=9)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, unit_logits, unit_bias), eps=1e-6, atol=1e-6)


def test_gated_units_opcheck():
    x, logits, bias = torch.randn(3, 7, requires_grad=True), torch.randn(3, requires_grad=True), \
        torch.randn(7, requires_grad=True)
    scalars = (3, "hard_concrete", 5, 6, True, False, 2 / 3, -0.1, 1.1, 0.0)
    torch.library.opcheck(torch.ops.fastmask.gated_units.default, (x, logits, bias) + scalars)
    torch.library.opcheck(torch.ops.fastmask.gated_units_backward.default,
                          (torch.randn(3, 7), x.detach(), logits.detach(), True) + scalars + (True,))


@pytest.mark.parametrize("gate_outputs,layout", [(False, "out_in"), (True, "in_out")])
def test_unit_masked_linear_opcheck(gate_outputs, layout):
    x = torch.randn(2, 3, 8, requires_grad=True)
    weight = torch.randn(6, 8) if layout == "out_in" else torch.randn(8, 6)
    n_gates = 3 if gate_outputs else 4
    logits, bias = torch.randn(1, n_gates, requires_grad=True), torch.randn(6, requires_grad=True)
    scalars = (gate_outputs, 2, layout, "hard_concrete", 5, 6, True, False, 2 / 3, -0.1, 1.1, 0.0)
    y_pre = torch.randn(6, 6) if gate_outputs else torch.empty(0)
    # One mask; then a stack of 2 with a mask per row (the grouped op's unit path).
    token_mask = torch.tensor([0, 1, 1, 0, 1, 0])
    for grid, mask in ((logits, None), (torch.randn(2, 1, n_gates, requires_grad=True), token_mask)):
        torch.library.opcheck(torch.ops.fastmask.unit_masked_linear.default, (x, weight, grid, bias, mask) + scalars)
        torch.library.opcheck(torch.ops.fastmask.unit_masked_linear_backward.default,
                              (torch.randn(2, 3, 6), x.detach(), weight, grid.detach(), y_pre, True, mask) + scalars
                              + (True, True))


def test_gated_units_compiles_fullgraph():
    x = torch.randn(4, 7, 12, requires_grad=True)
    logits = torch.randn(3, requires_grad=True)

    def step(x, logits, seed):
        return fm.ops.gated_units(x, logits, group=4, seed=seed).square().mean()

    assert_compiled_matches_eager(step, x, logits, 3)


BAD_INPUTS = [
    (dict(logits=torch.randn(4)), r"logits must hold ceil\(features / group\)"),
    (dict(group=0), "group must be a positive int"),
    (dict(bias=torch.randn(5)), r"bias must have shape \[7\]"),
    (dict(x=torch.randint(0, 3, (2, 7))), "x must be a floating tensor"),
    (dict(estimator="l0"), "estimator must be one of"),
    (dict(logits=torch.tensor([0.0, float("nan"), 1.0])), "logits contains 1 NaN"),
]


@pytest.mark.parametrize("override,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_gated_units_bad_input(override, message):
    kwargs = dict(x=torch.randn(2, 7), logits=torch.randn(3), bias=None, group=3)
    kwargs.update(override)
    with pytest.raises((ValueError, TypeError), match=message):
        fm.ops.gated_units(**kwargs)
