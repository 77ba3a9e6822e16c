"""fm.ops.masked_linear: every backend against the fp64 reference, over odd shapes, dtypes, both weight layouts
and every granularity; float64 gradcheck, opcheck, torch.compile, and bad input."""

from dataclasses import dataclass

import pytest
import torch

import fastmask as fm
from fastmask import ref

from conftest import assert_compiled_matches_eager, assert_within_pytorch_error, device_backend_params


@dataclass(frozen=True)
class Case:
    """x of shape lead + (in,), weight (out, in) in out_in terms, and the gate grid in out_in terms."""

    name: str
    lead: tuple
    in_features: int
    out_features: int
    grid: tuple  # (rows, cols) of the logits in the out_in layout
    block: tuple  # (bh, bw) in the out_in layout


CASES = [
    Case("weight-1d-x", (), 7, 13, (13, 7), (1, 1)),
    Case("weight-3d-x", (2, 3), 37, 29, (29, 37), (1, 1)),
    Case("weight-one", (1,), 1, 1, (1, 1), (1, 1)),
    Case("unit_in", (33,), 16, 5, (1, 16), (5, 1)),
    Case("unit_out", (4,), 11, 29, (29, 1), (1, 11)),
    Case("block-partial", (4,), 37, 29, (4, 10), (8, 4)),
    Case("head", (6,), 24, 20, (1, 4), (20, 6)),
    Case("layer", (3,), 9, 5, (1, 1), (5, 9)),
]


def _tensors(case: Case, layout: str, dtype, device, bias: bool, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.lead + (case.in_features,), generator=gen)
    weight = torch.randn(case.out_features, case.in_features, generator=gen) / case.in_features**0.5
    logits = torch.randn(case.grid, generator=gen) * 2
    b = torch.randn(case.out_features, generator=gen) if bias else None
    block = case.block
    if layout == "in_out":
        weight, logits, block = weight.t().contiguous(), logits.t().contiguous(), block[::-1]
    grad_out = torch.randn(case.lead + (case.out_features,), generator=gen)
    to = lambda t, dt=dtype: None if t is None else t.to(device=device, dtype=dt)  # noqa: E731
    return to(x), to(weight), to(logits, torch.float32), to(b), tuple(block), to(grad_out)


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


def _check_case(device, backend, case, dtype, layout, estimator="hard_concrete", bias=True, weight_grad=False,
                training=True, inverse=False, memory="recompute"):
    fm.set_backend(backend)
    x, weight, logits, b, block, grad_out = _tensors(case, layout, dtype, device, bias)
    kwargs = dict(estimator=estimator, seed=1234, offset=2**32 + 77, training=training, inverse=inverse,
                  weight_layout=layout)
    beta = fm.ops._common.default_beta(estimator, None)

    def run(fn, x, weight, logits, b, **extra):
        x, logits, b = _leaf(x), _leaf(logits), _leaf(b)
        weight = _leaf(weight) if weight_grad else weight.detach()
        y = fn(x, weight, logits, b, **kwargs, **extra)
        y.backward(grad_out.to(y.dtype))
        return y.detach(), x.grad, logits.grad, (b.grad if b is not None else None), \
            (weight.grad if weight_grad else None)

    outs = run(fm.ops.masked_linear, x, weight, logits, b, block=block, memory=memory)
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    oracle = run(ref.masked_linear_naive, f64(x), f64(weight), f64(logits), f64(b), block=block, beta=beta)
    baseline = run(ref.masked_linear_naive, x, weight, logits, b, block=block, beta=beta)
    for name, out, want, base in zip(("y", "grad_x", "grad_logits", "grad_bias", "grad_weight"), outs, oracle,
                                     baseline):
        if want is None:
            assert out is None, name
            continue
        assert out is not None, f"{name} missing"
        assert out.dtype == base.dtype, f"{name}: dtype {out.dtype} != {base.dtype}"
        assert_within_pytorch_error(out, want, base, f"{case.name}/{name}")


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("memory", ["recompute", "keep"])
def test_masked_linear_matches_reference(device, backend, case, layout, dtype, memory):
    _check_case(device, backend, case, dtype, layout, bias=case.name != "head", memory=memory)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("estimator", ref.ESTIMATORS)
@pytest.mark.parametrize("training,inverse", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("memory", ["recompute", "keep"])
def test_masked_linear_estimators(device, backend, estimator, training, inverse, memory):
    _check_case(device, backend, CASES[5], torch.float32, "out_in", estimator=estimator, training=training,
                inverse=inverse, memory=memory)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_masked_linear_weight_grad_and_fp16(device, backend, layout):
    _check_case(device, backend, CASES[1], torch.float32, layout, weight_grad=True)
    if device == "cuda" or backend == "reference":
        _check_case(device, backend, CASES[5], torch.float16, layout, weight_grad=True)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_masked_linear_non_contiguous_input(device, backend):
    fm.set_backend(backend)
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(37, 10, generator=gen).to(device)
    x = base.t()  # (10, 37), stride (1, 10)
    weight = (torch.randn(37, 29, generator=gen) / 6).to(device)  # in_out layout, read in place
    logits = torch.randn(37, 29, generator=gen).to(device)
    y = fm.ops.masked_linear(x, weight, logits, weight_layout="in_out", seed=5)
    y_ref = ref.masked_linear_ref(x.contiguous().cpu(), weight.cpu(), logits.cpu(), weight_layout="in_out", seed=5)
    torch.testing.assert_close(y.cpu(), y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", device_backend_params(fast_only=True))
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("block", [(1, 1), (2, 3)])
def test_masked_linear_gradcheck_float64(device, backend, layout, block):
    fm.set_backend(backend)
    gen = torch.Generator().manual_seed(1)
    rows, cols = (4, 5) if layout == "out_in" else (5, 4)
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    weight = torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    logits = (torch.randn(grid, generator=gen, dtype=torch.float64) * 2).to(device).requires_grad_()
    bias = torch.randn(4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    fn = lambda x, w, l, b: fm.ops.masked_linear(x, w, l, b, seed=9, weight_layout=layout, block=block)  # noqa
    assert torch.autograd.gradcheck(fn, (x, weight, logits, bias), eps=1e-6, atol=1e-6)


def _op_args(requires_grad=True):
    x = torch.randn(3, 7, requires_grad=requires_grad)
    weight = torch.randn(5, 7)
    logits = torch.randn(5, 7, requires_grad=requires_grad)
    bias = torch.randn(5, requires_grad=requires_grad)
    return (x, weight, logits, bias, "hard_concrete", 3, 4, True, False, "out_in", [1, 1], 2 / 3, -0.1, 1.1, 0.0)


def test_masked_linear_opcheck():
    torch.library.opcheck(torch.ops.fastmask.masked_linear.default, _op_args())
    x, weight, logits, bias, *scalars = _op_args(requires_grad=False)
    torch.library.opcheck(torch.ops.fastmask.masked_linear_backward.default,
                          (torch.randn(3, 5), x, weight, logits, True, *scalars, True, False))


@pytest.mark.parametrize("grid,block", [((16, 12), None), ((1, 3), (16, 4))], ids=["weight", "heads_of_outputs"])
def test_masked_linear_compiles_fullgraph(grid, block):
    x = torch.randn(4, 7, 16, requires_grad=True)
    weight = torch.randn(16, 12)  # GPT-2 Conv1D layout
    logits = torch.randn(grid, requires_grad=True)

    def step(x, logits, seed):
        return fm.ops.masked_linear(x, weight, logits, seed=seed, weight_layout="in_out", block=block).square().mean()

    assert_compiled_matches_eager(step, x, logits, 3)


def test_unit_logits_1d():
    x, weight = torch.randn(2, 6), torch.randn(4, 6)
    out_units = torch.randn(4)
    torch.testing.assert_close(fm.ops.masked_linear(x, weight, out_units, seed=1),
                               fm.ops.masked_linear(x, weight, out_units.view(4, 1), seed=1))
    in_units = torch.randn(6)
    torch.testing.assert_close(fm.ops.masked_linear(x, weight, in_units, seed=1),
                               fm.ops.masked_linear(x, weight, in_units.view(1, 6), seed=1))
    with pytest.raises(ValueError, match="ambiguous"):
        fm.ops.masked_linear(torch.randn(2, 4), torch.randn(4, 4), torch.randn(4))


def test_frozen_weight_gets_no_gradient():
    x = torch.randn(3, 8, requires_grad=True)
    weight = torch.randn(5, 8)
    logits = torch.zeros(5, 8, requires_grad=True)
    fm.ops.masked_linear(x, weight, logits, seed=0).sum().backward()
    assert weight.grad is None and logits.grad is not None and x.grad is not None


BAD_INPUTS = [
    (dict(x=torch.randn(2, 6)), "x must have last dimension in_features=7"),
    (dict(logits=torch.randn(5, 6)), "cannot infer the block size"),
    (dict(logits=torch.randn(3, 3), block=(2, 2)), r"logits must have shape \[3, 4\]"),
    (dict(x=torch.randint(0, 3, (2, 7))), "x must be a floating tensor"),
    (dict(logits=torch.randn(5, 7, device="meta")), "all tensors must be on one device"),
    (dict(estimator="l0"), "estimator must be one of"),
    (dict(weight_layout="oi"), "weight_layout must be one of"),
    (dict(bias=torch.randn(4)), r"bias must have shape \[5\]"),
    (dict(x=torch.randn(2, 7, dtype=torch.float64)), "x and weight must have the same dtype"),
    (dict(block=(0, 1)), "block must be two positive ints"),
    (dict(seed=-3), "seed must be in"),
]


@pytest.mark.parametrize("override,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_masked_linear_bad_input(override, message):
    kwargs = dict(x=torch.randn(2, 7), weight=torch.randn(5, 7), logits=torch.randn(5, 7), bias=None)
    kwargs.update(override)
    with pytest.raises((ValueError, TypeError), match=message):
        fm.ops.masked_linear(**kwargs)


def test_set_backend_rejects_unknown_and_unavailable():
    with pytest.raises(ValueError, match="name must be one of"):
        fm.set_backend("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="not available"):
            fm.set_backend("cuda")


def test_every_backend_implements_the_whole_backend_interface():
    """MaskBackend's methods are stubs: a backend class that forgot one would inherit a method returning None."""
    from fastmask.ops import _backend

    methods = {name for name, value in vars(_backend.MaskBackend).items() if callable(value)
               and not name.startswith("_")}
    assert {"uniform", "gate_forward", "gate_backward", "masked_linear_forward", "masked_linear_backward",
            "grouped_masked_weight", "mask_grad", "grouped_masked_linear_backward"} <= methods
    for name, backend in _backend._INSTANCES.items():
        assert _backend.MaskBackend in type(backend).__mro__ and backend.name == name
        inherited = {m for m in methods if getattr(type(backend), m) is getattr(_backend.MaskBackend, m)}
        assert not inherited, f"{name} does not implement {sorted(inherited)}"
