"""fm.ops.grouped_masked_linear: K masks over one weight in one call equal K separate masked_linear passes (same
noise: mask k at offset + k * n_gates) on every backend, both layouts, every granularity, both index modes;
fp64 oracle for bf16, float64 gradcheck, opcheck, torch.compile, and bad input."""

import dataclasses

import pytest
import torch

import fastmask as fm
from fastmask import ref
from fastmask.ops import _backend

from conftest import assert_within_pytorch_error, device_backend_params

K = 3
# (name, weight (out, in), gate grid (out_in), block (out_in)): every granularity, partial edge blocks.
GRIDS = [
    ("weight", (5, 7), (5, 7), (1, 1)),
    ("block", (9, 10), (3, 4), (4, 3)),
    ("unit_in", (5, 7), (1, 7), (5, 1)),
    ("unit_out", (5, 7), (5, 1), (1, 7)),
    ("head", (6, 8), (1, 4), (6, 2)),
    ("layer", (5, 7), (1, 1), (5, 7)),
]
INDEX = torch.tensor([2, 0, 2, 2, 0, 0])  # batch 6; mask 1 gets no rows (an empty group)


def _make(grid_case, layout, dtype=torch.float32, device="cpu", seed=0, lead=(6, 2)):
    _, (out_f, in_f), grid, block = grid_case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(lead + (in_f,), generator=gen)
    weight = torch.randn(out_f, in_f, generator=gen) / in_f**0.5
    logits = torch.randn((K,) + grid, generator=gen) * 2
    bias = torch.randn(out_f, generator=gen)
    grad_out = torch.randn(lead + (out_f,), generator=gen)
    if layout == "in_out":
        weight, logits, block = weight.t().contiguous(), logits.transpose(1, 2).contiguous(), block[::-1]
    to = lambda t, dt=dtype: t.to(device=device, dtype=dt)  # noqa: E731
    return to(x), to(weight), to(logits, torch.float32), to(bias), tuple(block), to(grad_out)


def _rows(index, mask, batch):
    if index is None:
        return torch.arange(mask * batch // K, (mask + 1) * batch // K)
    return (index == mask).nonzero().flatten()


def _grads(fn, x, weight, logits, bias, grad_out, weight_grad=False):
    x, logits, bias = (t.detach().clone().requires_grad_() for t in (x, logits, bias))
    weight = weight.detach().clone().requires_grad_(weight_grad)
    y = fn(x, weight, logits, bias)
    y.backward(grad_out)
    return y.detach(), x.grad, logits.grad, bias.grad, weight.grad


def _separate(x, weight, logits, bias, index, block, layout, **kwargs):
    """The K masks as K single-mask masked_linear calls, mask k at offset + k * n_gates, rows scattered back."""
    y = None
    for k in range(K):
        rows = _rows(index, k, x.shape[0])
        offset = ref.mask_offset(kwargs["offset"], k, logits[0].numel())
        y_k = fm.ops.masked_linear(x[rows], weight, logits[k], bias, block=block, weight_layout=layout,
                                   **dict(kwargs, offset=offset))
        y = y_k.new_zeros(*x.shape[:-1], y_k.shape[-1]) if y is None else y
        y = y.index_put((rows,), y_k)
    return y


def _params(estimator="hard_concrete", seed=0, offset=0, beta=None, training=True, inverse=False):
    """The GateParams of the ops' gate keywords (the backward references take one)."""
    beta = fm.ops._common.default_beta(estimator, beta)
    return fm.ops._common.make_params(estimator, seed, offset, beta, -0.1, 1.1, 0.0, training, inverse, "test")


def _reference(x, weight, logits, bias, index, block, layout, **kwargs):
    """fastmask.ref's K-pass oracle as an autograd function of (x, logits, bias) (its own backward)."""

    class Loop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, logits, bias):
            ctx.save_for_backward(x, logits, bias)
            return ref.grouped_masked_linear_ref(x, weight, logits, bias, index, weight_layout=layout, block=block,
                                                 **kwargs)

        @staticmethod
        def backward(ctx, grad):
            x, logits, bias = ctx.saved_tensors
            gx, _, gl, gb = ref.grouped_masked_linear_backward_ref(grad, x, weight, logits, _params(**kwargs),
                                                                   index=index, has_bias=bias is not None,
                                                                   weight_layout=layout, block=block)
            return gx, gl, gb

    return Loop.apply(x, logits, bias)


def _compare_grouped(expected_fn, tensors, index, layout, training):
    """The grouped op's output and gradients (x, logits, bias) against ``expected_fn``'s; returns the op's."""
    x, weight, logits, bias, block, grad_out = tensors
    kwargs = dict(estimator="hard_concrete", seed=77, offset=2**33 + 5, training=training)
    grouped = _grads(lambda x, w, l, b: fm.ops.grouped_masked_linear(
        x, w, l, b, index=index, block=block, weight_layout=layout, **kwargs), x, weight, logits, bias, grad_out)
    expected = _grads(lambda x, w, l, b: expected_fn(x, w, l, b, index, block, layout, **kwargs),
                      x, weight, logits, bias, grad_out)
    for name, a, b in zip(("y", "grad_x", "grad_logits", "grad_bias"), grouped, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{name} training={training}")
    return grouped


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("grid_case", GRIDS, ids=[g[0] for g in GRIDS])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("grouping", ["index", "equal_groups"])
def test_grouped_matches_the_k_pass_reference(device, backend, grid_case, layout, grouping):
    """Every granularity, layout and grouping, training and eval, against fastmask.ref's loop over the K masks
    (mask k = masked_linear_ref at offset + k * n_gates)."""
    fm.set_backend(backend)
    tensors = _make(grid_case, layout, device=device)
    index = INDEX.to(device) if grouping == "index" else None
    for training in (True, False):
        grouped = _compare_grouped(_reference, tensors, index, layout, training)
        if grouping == "index":  # the empty mask 1 gets exactly no gradient
            assert grouped[2][1].abs().max() == 0


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_grouped_equals_k_separate_masked_linear_calls(device, backend, layout):
    """The same backend's single-mask op, called K times (mask k on its rows at offset + k * n_gates), gives the
    grouped op's outputs and gradients."""
    fm.set_backend(backend)
    _compare_grouped(_separate, _make(GRIDS[0], layout, device=device), INDEX.to(device), layout, True)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("estimator", ref.ESTIMATORS)
def test_grouped_matches_the_fp64_loop_oracle_in_bf16(device, backend, estimator):
    """House tolerance against the K-pass fp64 reference (fastmask.ref.grouped_masked_linear_ref), the naive
    per-mask PyTorch code in bf16 as the yardstick; weight gradient included."""
    fm.set_backend(backend)
    x, weight, logits, bias, block, grad_out = _make(GRIDS[1], "out_in", dtype=torch.bfloat16, device=device)
    index = INDEX.to(device)
    beta = fm.ops._common.default_beta(estimator, None)
    kwargs = dict(estimator=estimator, seed=3, offset=11, weight_layout="out_in", block=block, beta=beta)
    out = _grads(lambda x, w, l, b: fm.ops.grouped_masked_linear(x, w, l, b, index=index, **kwargs),
                 x, weight, logits, bias, grad_out, weight_grad=True)

    f64 = [t.double() for t in (x, weight, logits, bias, grad_out)]
    oracle = _grads(lambda x, w, l, b: _naive_grouped(x, w, l, b, index, **kwargs), *f64[:4], f64[4],
                    weight_grad=True)
    baseline = _grads(lambda x, w, l, b: _naive_grouped(x, w, l, b, index, **kwargs), x, weight, logits, bias,
                      grad_out, weight_grad=True)
    for name, o, want, base in zip(("y", "grad_x", "grad_logits", "grad_bias", "grad_weight"), out, oracle,
                                   baseline):
        assert o.dtype == base.dtype, name
        assert_within_pytorch_error(o, want, base, f"{estimator}/{name}")
    fwd = ref.grouped_masked_linear_ref(*f64[:4], index, **kwargs)  # the reference module's own loop
    torch.testing.assert_close(fwd, oracle[0])
    params = _params(estimator=estimator, seed=3, offset=11, beta=beta)
    gx, gw, gl, gb = ref.grouped_masked_linear_backward_ref(f64[4], *f64[:3], params, index=index, has_bias=True,
                                                            weight_layout="out_in", block=block,
                                                            needs_weight_grad=True)
    for got, want in zip((gx, gl, gb, gw), (oracle[1], oracle[2], oracle[3], oracle[4])):
        torch.testing.assert_close(got, want)


def _naive_grouped(x, weight, logits, bias, index, **kwargs):
    """Hand-written K masks: masked_linear_naive (torch ops, autograd) per mask on its rows."""
    y = None
    for k in range(K):
        rows = _rows(index, k, x.shape[0])
        offset = ref.mask_offset(kwargs.get("offset", 0), k, logits[0].numel())
        y_k = ref.masked_linear_naive(x[rows], weight, logits[k], bias, **dict(kwargs, offset=offset))
        y = y_k.new_zeros(*x.shape[:-1], y_k.shape[-1]) if y is None else y
        y = y.index_put((rows,), y_k)
    return y


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("grid_case", [GRIDS[0], GRIDS[1]], ids=["weight", "block"])
def test_grouped_masked_weight_is_k_single_masked_weights_bit_for_bit(device, backend, grid_case):
    """The K masked weights come from one noise stream: mask k equals the single-grid masked weight at offset
    + k * n_gates exactly (same backend, same bits)."""
    fm.set_backend(backend)
    _, weight, logits, _, block, _ = _make(grid_case, "out_in", dtype=torch.bfloat16, device=device)
    impl = _backend.resolve(torch.device(device))
    params = fm.ops._common.make_params("hard_concrete", 5, 123, 2 / 3, -0.1, 1.1, 0.0, True, False, "test")
    stack = impl.grouped_masked_weight(weight, logits, block, params)
    assert stack.shape == (K,) + tuple(weight.shape) and stack.dtype == weight.dtype
    n_gates = logits[0].numel()
    for k in range(K):
        shifted = dataclasses.replace(params, offset=ref.mask_offset(params.offset, k, n_gates))
        single = ref.masked_weight_ref(weight, logits[k], block, **shifted.ref_kwargs())
        assert torch.equal(stack[k], single), k


@pytest.mark.parametrize("device,backend", device_backend_params(fast_only=True))
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_grouped_gradcheck_float64(device, backend, layout):
    fm.set_backend(backend)
    gen = torch.Generator().manual_seed(1)
    rows, cols = (4, 5) if layout == "out_in" else (5, 4)
    x = torch.randn(4, 2, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    weight = torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    logits = (torch.randn(2, rows, cols, generator=gen, dtype=torch.float64) * 2).to(device).requires_grad_()
    bias = torch.randn(4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    index = torch.tensor([1, 0, 1, 1], device=device)
    fn = lambda x, w, l, b: fm.ops.grouped_masked_linear(x, w, l, b, index=index, seed=9,  # noqa: E731
                                                         weight_layout=layout)
    assert torch.autograd.gradcheck(fn, (x, weight, logits, bias), eps=1e-6, atol=1e-6)


def _op_args(index, requires_grad=True):
    x = torch.randn(4, 3, 7, requires_grad=requires_grad)
    weight = torch.randn(5, 7)
    logits = torch.randn(2, 5, 7, requires_grad=requires_grad)
    bias = torch.randn(5, requires_grad=requires_grad)
    return (x, weight, logits, bias, index, "hard_concrete", 3, 4, True, False, "out_in", [1, 1], 2 / 3, -0.1, 1.1,
            0.0)


@pytest.mark.parametrize("index", [None, torch.tensor([1, 1, 0, 1])], ids=["equal_groups", "index"])
def test_grouped_opcheck(index):
    torch.library.opcheck(torch.ops.fastmask.grouped_masked_linear.default, _op_args(index))
    x, weight, logits, bias, index, *scalars = _op_args(index, requires_grad=False)
    torch.library.opcheck(torch.ops.fastmask.grouped_masked_linear_backward.default,
                          (torch.randn(4, 3, 5), x, weight, logits, True, index, *scalars, True, False))


def test_grouped_compiles_fullgraph():
    from torch._dynamo.testing import CompileCounterWithBackend

    x = torch.randn(4, 5, 16, requires_grad=True)
    weight = torch.randn(16, 12)  # GPT-2 Conv1D layout
    logits = torch.randn(2, 16, 12, requires_grad=True)

    def step(x, logits, index, seed):
        return fm.ops.grouped_masked_linear(x, weight, logits, index=index, seed=seed,
                                            weight_layout="in_out").square().mean()

    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    for index in (torch.tensor([0, 1, 1, 0]), torch.tensor([1, 1, 1, 0])):
        loss = compiled(x, logits, index, 3)
        loss.backward()
        grads = x.grad.clone(), logits.grad.clone()
        x.grad = logits.grad = None
        eager = step(x, logits, index, 3)
        eager.backward()
        torch.testing.assert_close(loss, eager)
        torch.testing.assert_close(grads[0], x.grad)
        torch.testing.assert_close(grads[1], logits.grad)
        x.grad = logits.grad = None
    assert counter.frame_count == 1  # new index values: no recompilation


BAD_INPUTS = [
    (dict(index=torch.tensor([0, 1, 2, 1])), r"index values must be mask numbers in \[0, 2\), got values in \[0, 2\]"),
    (dict(index=torch.tensor([0, -1, 1, 1])), r"index values must be mask numbers in \[0, 2\)"),
    (dict(index=torch.tensor([0, 1, 1])), r"index must have shape \[4\]"),
    (dict(index=torch.tensor([[0, 1, 1, 0]])), r"index must have shape \[4\]"),
    (dict(index=torch.tensor([0, 1, 1, 0], dtype=torch.int32)), "index must be an int64"),
    (dict(index=torch.tensor([0.0, 1.0, 1.0, 0.0])), "index must be an int64"),
    (dict(index=[0, 1, 1, 0]), "index must be a LongTensor"),
    (dict(index=torch.tensor([0, 1, 1, 0], device="meta")), "all tensors must be on one device"),
    (dict(x=torch.randn(3, 7)), "must be a multiple of n_masks=2"),
    (dict(x=torch.randn(7)), "leading batch dimension"),
    (dict(logits=torch.randn(5, 7)), r"logits must be a stack \(n_masks, grid_rows, grid_cols\)"),
    (dict(logits=torch.randn(0, 5, 7)), r"logits must be a stack"),
    (dict(logits=torch.randn(2, 5, 6)), "cannot infer the block size"),
    (dict(x=torch.randn(4, 6)), "x must have last dimension in_features=7"),
    (dict(seed=-1), "seed must be in"),
]


@pytest.mark.parametrize("override,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_grouped_bad_input(override, message):
    kwargs = dict(x=torch.randn(4, 7), weight=torch.randn(5, 7), logits=torch.randn(2, 5, 7), index=None)
    kwargs.update(override)
    with pytest.raises((ValueError, TypeError), match=message):
        fm.ops.grouped_masked_linear(**kwargs)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("grid,block", [((1, 16), (5, 1)), ((5, 1), (1, 16)), ((1, 4), (5, 4)), ((1, 1), (5, 16))],
                         ids=["unit_in", "unit_out", "head", "layer"])
@pytest.mark.parametrize("shuffled", [False, True], ids=["groups", "index"])
def test_grouped_unit_path_equals_the_masked_weight_route(device, backend, layout, grid, block, shuffled):
    """K unit / head / layer masks through the unit path (every row's gates scale x or the GEMM output: two GEMMs
    for all K) == the grouped masked-weight op on the same noise, in float64, gradients included."""
    fm.set_backend(backend)
    gen = torch.Generator().manual_seed(8)
    n_masks = 3
    x = torch.randn(6, 2, 16, generator=gen, dtype=torch.float64).to(device)
    weight = torch.randn(5, 16, generator=gen, dtype=torch.float64).to(device)
    logits = (torch.randn((n_masks,) + grid, generator=gen, dtype=torch.float64) * 2).to(device)
    bias = torch.randn(5, generator=gen, dtype=torch.float64).to(device)
    grad_out = torch.randn(6, 2, 5, generator=gen, dtype=torch.float64).to(device)
    index = torch.tensor([2, 0, 1, 1, 0, 2], device=device) if shuffled else None
    if layout == "in_out":
        weight, logits, block = weight.t().contiguous(), logits.transpose(1, 2).contiguous(), block[::-1]
    assert ref.unit_axis(logits.shape[1:], layout) is not None

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, logits, bias)]
        y = fn(*leaves)
        y.backward(grad_out)
        return [y.detach()] + [t.grad for t in leaves]

    unit = run(lambda x, w, l, b: fm.ops.grouped_masked_linear(x, w, l, b, index=index, seed=4, offset=3,
                                                               weight_layout=layout, block=block))
    weight_route = run(lambda x, w, l, b: torch.ops.fastmask.grouped_masked_linear(
        x, w, l, b, index, "hard_concrete", 4, 3, True, False, layout, list(block), 2 / 3, -0.1, 1.1, 0.0))
    for name, a, b in zip(("y", "grad_x", "grad_weight", "grad_logits", "grad_bias"), unit, weight_route):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_grouped_unit_path_refuses_bad_index_values():
    x, weight = torch.randn(4, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"index values must be mask numbers in \[0, 2\)"):
        fm.ops.grouped_masked_linear(x, weight, torch.randn(2, 1, 8), index=torch.tensor([0, 1, 2, 0]))
