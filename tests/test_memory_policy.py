"""The memory policy of per-weight / block masked linear layers (fastmask/ops/_modes.py): "keep" (the forward keeps
W * m and the gate slopes; the backward evaluates no gate) against "recompute" (the backward regenerates the
gates): same gradients (bit for bit on the cpu backend for per-weight gates), exactly the documented bytes kept,
one gate evaluation per step, the per-device default, and the cases that must fall back to "recompute"."""

import pytest
import torch

import fastmask as fm
from fastmask import ref
from fastmask.ops import _modes

from conftest import assert_compiled_matches_eager, device_backend_params


@pytest.fixture(autouse=True)
def _restore_policy():
    previous = fm.get_memory_policy()
    yield
    fm.set_memory_policy(previous)


def _problem(layout="out_in", dtype=torch.float32, grid=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out_features, in_features = 29, 37
    x = torch.randn(2, 5, in_features, generator=gen).to(dtype)
    weight = (torch.randn(out_features, in_features, generator=gen) / 6).to(dtype)
    logits = torch.randn(grid or (out_features, in_features), generator=gen) * 2
    bias = torch.randn(out_features, generator=gen).to(dtype)
    grad_out = torch.randn(2, 5, out_features, generator=gen).to(dtype)
    if layout == "in_out":
        weight, logits = weight.t().contiguous(), logits.t().contiguous()
    return x, weight, logits, bias, grad_out


def _step(memory, x, weight, logits, bias, grad_out, **kwargs):
    x, logits, bias = (t.detach().clone().requires_grad_() for t in (x, logits, bias))
    y = fm.ops.masked_linear(x, weight, logits, bias, seed=11, offset=5 * logits.numel(), memory=memory, **kwargs)
    y.backward(grad_out)
    return y.detach(), x.grad, logits.grad, bias.grad


@pytest.mark.parametrize("estimator", ref.ESTIMATORS)
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_keep_is_bit_identical_to_recompute_on_cpu(estimator, layout, dtype):
    # Per-weight gates: the same gate kernel, the same products and the same GEMMs in both policies, so every
    # output and gradient has the same bits (an experiment's numbers do not depend on the policy).
    fm.set_backend("cpu")
    problem = _problem(layout, dtype)
    kwargs = dict(estimator=estimator, weight_layout=layout)
    keep, recompute = _step("keep", *problem, **kwargs), _step("recompute", *problem, **kwargs)
    for name, a, b in zip(("y", "grad_x", "grad_logits", "grad_bias"), keep, recompute):
        assert a.dtype == b.dtype, name
        assert torch.equal(a, b), f"{name}: max difference {(a.double() - b.double()).abs().max().item():.3g}"


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("grid,block", [(None, None), ((8, 10), (4, 4))], ids=["weight", "block"])
def test_keep_matches_recompute_on_every_backend(device, backend, grid, block):
    fm.set_backend(backend)
    problem = [t.to(device) for t in _problem(grid=grid)]
    keep, recompute = _step("keep", *problem, block=block), _step("recompute", *problem, block=block)
    for name, a, b in zip(("y", "grad_x", "grad_logits", "grad_bias"), keep, recompute):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def _saved_bytes(memory, weight, logits, x):
    """Bytes autograd keeps from the forward for the backward, beyond what it keeps under the other policy."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fm.ops.masked_linear(x, weight, logits, memory=memory)
    inputs = {id(weight), id(logits), id(x)}
    return sum(t.numel() * t.element_size() for t in saved if id(t) not in inputs), saved


@pytest.mark.parametrize("dtype,per_weight", [(torch.float32, 8), (torch.bfloat16, 6)], ids=["fp32", "bf16"])
def test_keep_holds_the_documented_bytes_per_weight(dtype, per_weight):
    x = torch.randn(3, 40, dtype=dtype, requires_grad=True)
    weight = torch.randn(24, 40, dtype=dtype)
    logits = torch.randn(24, 40, requires_grad=True)
    extra, _ = _saved_bytes("keep", weight, logits, x)
    assert extra == per_weight * weight.numel()  # W * m in the weight's dtype + one float32 slope per gate
    extra, saved = _saved_bytes("recompute", weight, logits, x)
    assert extra == 0 and len(saved) == 3  # x, W and the logits only


def test_keep_evaluates_each_gate_once_per_step(monkeypatch):
    # Count the cpu backend's gate-evaluating kernels over one forward + backward.
    fm.set_backend("cpu")
    calls = []
    backend = fm.ops._backend.resolve(torch.device("cpu"))
    for name in ("gate_forward", "gate_backward", "masked_weight_and_slope", "_masked_weight", "mask_grad"):
        original = getattr(backend, name)
        monkeypatch.setattr(backend, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    problem = _problem()
    _step("keep", *problem)
    assert calls == ["masked_weight_and_slope"]
    calls.clear()
    _step("recompute", *problem)
    assert calls == ["_masked_weight", "mask_grad"]


def test_policy_defaults_per_device_and_switches():
    assert fm.get_memory_policy() in _modes.MEMORY_POLICIES
    fm.set_memory_policy("auto")
    assert _modes.memory_policy_for("cpu") == "keep"
    assert _modes.memory_policy_for("cuda") == "recompute"
    assert _modes.memory_policy_for("cuda", "keep") == "keep"
    fm.set_memory_policy("recompute")
    assert _modes.memory_policy_for("cpu") == "recompute"
    assert _modes.memory_policy_for("cpu", "auto") == "keep"
    with pytest.raises(ValueError, match="policy must be one of"):
        fm.set_memory_policy("always")
    x, weight, logits, *_ = _problem()
    with pytest.raises(ValueError, match="memory must be one of"):
        fm.ops.masked_linear(x, weight, logits, memory="sometimes")


def test_global_setting_reaches_masked_layers():
    # fm.set_memory_policy governs MaskedLinear layers (they pass no per-call choice): count saved tensors.
    linear = torch.nn.Linear(12, 6)
    layer = fm.nn.MaskedLinear(linear.weight.detach(), linear.bias.detach())
    x = torch.randn(4, 12)
    counts = {}
    for policy in ("keep", "recompute"):
        fm.set_memory_policy(policy)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
            layer(x)
        counts[policy] = len(saved)
    assert counts["keep"] == counts["recompute"] + 1  # x, W, W * m, slopes vs x, W, logits


def _ran_keep(y) -> bool:
    """Whether y came from the "keep" route: the custom op or its eager twin (fastmask/ops/masked_linear.py)."""
    name = y.grad_fn.name()
    return "masked_linear_keep" in name or "MaskedLinearKeepFunction" in name


@pytest.mark.parametrize("eager_twin", [True, False], ids=["twin", "custom_op"])
def test_trainable_weight_and_no_grad_fall_back_to_recompute(monkeypatch, eager_twin):
    monkeypatch.setattr(fm.ops._common, "EAGER_FUNCTIONS", eager_twin)
    x, weight, logits, bias, grad_out = _problem()
    weight = weight.clone().requires_grad_()
    logits = logits.requires_grad_()
    assert _ran_keep(fm.ops.masked_linear(x, weight.detach(), logits, memory="keep"))
    y = fm.ops.masked_linear(x, weight, logits, bias, seed=3, memory="keep")
    assert not _ran_keep(y)  # a trainable weight needs m itself in backward
    y.backward(grad_out)
    want = ref.masked_linear_backward_ref(grad_out.reshape(-1, 29), x.reshape(-1, 37), weight.detach(),
                                          logits.detach(), fm._params.GateParams.of("hard_concrete", 3, 0, 2 / 3,
                                                                                    -0.1, 1.1, 0.0, True, False),
                                          needs_weight_grad=True)[1]
    torch.testing.assert_close(weight.grad, want, rtol=1e-5, atol=1e-5)
    saved = []
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        y = fm.ops.masked_linear(x, weight.detach(), logits, memory="keep")
    assert y.grad_fn is None and not saved


def test_keep_op_gradcheck_float64():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    bias = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    for block, grid in (((1, 1), (4, 5)), ((2, 3), (2, 2))):
        logits = (torch.randn(grid, generator=gen, dtype=torch.float64) * 2).requires_grad_()
        fn = lambda x, l, b: fm.ops.masked_linear(x, weight, l, b, seed=9, block=block, memory="keep")  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, logits, bias), eps=1e-6, atol=1e-6)


def test_keep_op_opcheck():
    x = torch.randn(3, 7, requires_grad=True)
    args = (x, torch.randn(5, 7), torch.randn(5, 7, requires_grad=True), torch.randn(5, requires_grad=True),
            "hard_concrete", 3, 4, True, False, "out_in", [1, 1], 2 / 3, -0.1, 1.1, 0.0)
    torch.library.opcheck(torch.ops.fastmask.masked_linear_keep.default, args)


def test_keep_compiles_fullgraph():
    fm.set_memory_policy("keep")
    x = torch.randn(4, 7, 16, requires_grad=True)
    weight = torch.randn(16, 12)

    def step(x, logits, seed):
        return fm.ops.masked_linear(x, weight, logits, seed=seed, weight_layout="in_out").square().mean()

    assert_compiled_matches_eager(step, x, torch.randn(16, 12, requires_grad=True), 3)
