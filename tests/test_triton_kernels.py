"""The Triton backend (kernels/, installed as fastmask.kernels) against the reference fastmask/ref.py.

On CPU the kernels run through the Triton interpreter (TRITON_INTERPRET=1, set below when no GPU is present, and
best set in the environment of the test command, before anything imports triton); on CUDA they run compiled.
Shapes stay small: the interpreter runs every program in Python (the whole file takes about a minute there).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Saturated logits (+-1e4) overflow exp() inside sigmoid by design (the gate is then exactly 0 or 1).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load_ref():
    try:
        from fastmask import ref
        return ref
    except Exception:  # the package may be mid-edit: the oracle is one self-contained file
        spec = importlib.util.spec_from_file_location("_fastmask_ref", ROOT / "fastmask" / "ref.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


def _load_kernels():
    try:
        kernels = importlib.import_module("fastmask.kernels")
    except Exception:  # not installed: import the directory itself
        sys.path.insert(0, str(ROOT))
        kernels = importlib.import_module("kernels")
    if INTERPRET and not isinstance(kernels.masked_linear._masked_gemm_kernel,
                                    triton.runtime.interpreter.InterpretedFunction):
        # Imported (by another test module) before TRITON_INTERPRET was set: @triton.jit decides at decoration
        # time, so re-run the kernel modules' decorators now.
        name = kernels.__name__
        for sub in ("_gate_math", "uniform", "gate", "masked_linear"):
            importlib.reload(sys.modules[f"{name}.{sub}"])
        kernels = importlib.reload(kernels)
    return kernels


ref = _load_ref()
K = _load_kernels()
ESTIMATORS = list(ref.ESTIMATORS)


class Params:
    """Duck-typed stand-in for fastmask._params.GateParams (kept here so this file needs only ref.py)."""

    def __init__(self, estimator=0, seed=7, offset=2**33 - 3, beta=None, gamma=-0.1, zeta=1.1, tau=0.0,
                 training=True, inverse=False):
        self.estimator, self.seed, self.offset = estimator, seed, offset
        self.beta = (2 / 3 if estimator == 0 else 1.0) if beta is None else beta
        self.gamma, self.zeta, self.tau, self.training, self.inverse = gamma, zeta, tau, training, inverse

    def ref_kwargs(self):
        return dict(estimator=ESTIMATORS[self.estimator], seed=self.seed, offset=self.offset, beta=self.beta,
                    gamma=self.gamma, zeta=self.zeta, tau=self.tau, training=self.training, inverse=self.inverse)


def _devices():
    params = [pytest.param("cpu", marks=[] if INTERPRET else
                           [pytest.mark.skip(reason="Triton on CPU tensors needs TRITON_INTERPRET=1")])]
    params.append(pytest.param("cuda", marks=[] if torch.cuda.is_available() and not INTERPRET else
                               [pytest.mark.skip(reason="no CUDA GPU (or interpreter mode)")]))
    return params


DEVICES = _devices()
# Small tiles under the interpreter so that the odd shapes below span several tiles (edge tiles, atomics).
SMALL = K.GemmConfig(16, 16, 16, group=2, num_warps=1, num_stages=1)


def _max_err(a, b):
    return (a.double().cpu() - b.double().cpu()).abs().max().item() if a.numel() else 0.0


def _assert_within(out, oracle, baseline, name, rel_floor=1e-5):
    """House tolerance: error(out) <= 2 x error(PyTorch in the same dtype) + a floor relative to the values."""
    assert out.shape == oracle.shape, f"{name}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    scale = oracle.abs().max().item() if oracle.numel() else 0.0
    err, base = _max_err(out, oracle), _max_err(baseline, oracle)
    bound = 2 * base + rel_floor * max(scale, 1.0)
    assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (PyTorch's own error {base:.3e})"


# ----------------------------------------------------------------------------------------------------------------
# uniform / gates
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed,offset", [(0, 0), (1, 1), (123456789, 5), (2**40 + 7, 2**33 - 3), (2**62 + 11, 2**45)])
@pytest.mark.parametrize("shape", [(1,), (7, 13), (3, 1, 37), (1100,)])
def test_uniform_bit_exact(device, seed, offset, shape):
    u = K.uniform(shape, seed, offset, device)
    assert u.dtype == torch.float32 and tuple(u.shape) == shape and u.device.type == device
    assert torch.equal(u.cpu(), ref.uniform_ref(shape, seed, offset)), "noise must equal the reference bit for bit"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("estimator", range(4))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("inverse", [False, True])
def test_gate_forward_backward(device, dtype, estimator, training, inverse):
    gen = torch.Generator().manual_seed(estimator)
    logits = torch.randn(31, 9, generator=gen, dtype=dtype) * 3
    logits[0, :4] = torch.tensor([-1e4, -80.0, 80.0, 1e4], dtype=dtype)  # saturated gates stay finite
    grad = torch.randn(31, 9, generator=gen, dtype=dtype)
    p = Params(estimator, seed=2**40 + 7, offset=2**33 - 3, tau=0.3, training=training, inverse=inverse)
    z = K.gate_forward(logits.to(device), p)
    g = K.gate_backward(grad.to(device), logits.to(device), p)
    z_ref = ref.gate_ref(logits, **p.ref_kwargs())
    g_ref = ref.gate_backward_ref(grad, logits, **p.ref_kwargs())
    assert z.dtype == dtype and g.dtype == dtype and z.shape == logits.shape
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    # Hard (0/1) gates decided within an ulp of their threshold may legitimately differ: none here (checked).
    torch.testing.assert_close(z.cpu(), z_ref, atol=tol, rtol=0)
    torch.testing.assert_close(g.cpu(), g_ref, atol=tol * 10, rtol=tol * 10)


@pytest.mark.parametrize("device", DEVICES)
def test_gate_half_precision_logits(device):
    logits = (torch.randn(5, 17) * 2).to(torch.bfloat16)
    p = Params(0)
    z = K.gate_forward(logits.to(device), p)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.cpu(), ref.gate_ref(logits, **p.ref_kwargs()), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# masked linear
# ----------------------------------------------------------------------------------------------------------------

def _grid(rows, cols, block):
    bh = rows if block[0] == "R" else block[0]
    bw = cols if block[1] == "C" else block[1]
    return (bh, bw), (-(-rows // bh), -(-cols // bw))


def _check_masked_linear(device, tokens, n_in, n_out, block, in_out, dtype, has_bias=True, needs_weight_grad=True,
                         p=None, strategy="fused", non_contiguous_x=False, config=SMALL):
    p = p or Params()
    gen = torch.Generator().manual_seed(tokens * 1000 + n_in * 10 + n_out)
    rows, cols = (n_in, n_out) if in_out else (n_out, n_in)
    blk, grid = _grid(rows, cols, block)
    layout = "in_out" if in_out else "out_in"
    if non_contiguous_x:
        x32 = torch.randn(n_in, tokens, generator=gen).t()
    else:
        x32 = torch.randn(tokens, n_in, generator=gen)
    w32 = torch.randn(rows, cols, generator=gen) / max(n_in, 1) ** 0.5
    logits = torch.randn(grid, generator=gen) * 2
    b32 = torch.randn(n_out, generator=gen) if has_bias else None
    dy32 = torch.randn(tokens, n_out, generator=gen)
    x, w, dy = x32.to(dtype), w32.to(dtype), dy32.to(dtype)
    b = b32.to(dtype) if has_bias else None
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    x_dev = x.to(device)
    if non_contiguous_x:  # keep the transposed (column-major) view on the device too
        x_dev = x.t().contiguous().to(device).t()
        assert not x_dev.is_contiguous()

    # Triton.
    y = K.masked_linear_forward(x_dev, dev(w), dev(logits), dev(b), blk, in_out, p, strategy=strategy,
                                config=config)
    gx, gw, gl, gb = K.masked_linear_backward(dev(dy), x_dev, dev(w), dev(logits), has_bias, blk, in_out, p, True,
                                              needs_weight_grad, strategy=strategy, config=config,
                                              grad_config=config)
    # Oracle: float64 activations and weights (the gates themselves are float32, as in every backend).
    kw = dict(weight_layout=layout, block=blk, **p.ref_kwargs())
    b64 = b.double() if has_bias else None
    y_ref = ref.masked_linear_ref(x.double(), w.double(), logits, b64, **kw)
    rgx, rgw, rgl, rgb = ref.masked_linear_backward_ref(dy.double(), x.double(), w.double(), logits, p,
                                                        has_bias=has_bias, weight_layout=layout, block=blk,
                                                        needs_weight_grad=True)
    # PyTorch in the same dtype (the naive autograd version): the yardstick of the tolerance.
    xn, wn, ln = x.clone().requires_grad_(), w.clone().requires_grad_(), logits.clone().requires_grad_()
    bn = b.clone().requires_grad_() if has_bias else None
    yn = ref.masked_linear_naive(xn, wn, ln, bn, **kw)
    yn.backward(dy)

    assert y.dtype == dtype and y.device.type == device and gl.dtype == logits.dtype
    _assert_within(y, y_ref, yn.detach(), "y")
    _assert_within(gx, rgx, xn.grad, "grad_x")
    _assert_within(gl, rgl, ln.grad, "grad_logits")
    if needs_weight_grad:
        assert gw.dtype == dtype
        _assert_within(gw, rgw, wn.grad, "grad_weight")
    else:
        assert gw is None
    if has_bias:
        _assert_within(gb, rgb, bn.grad, "grad_bias")
    else:
        assert gb is None


# (block, description): per weight, output units, input units, 2-D blocks with partial edge blocks.
GRIDS = {"out_in": [(1, 1), (1, "C"), ("R", 1), (8, 4)], "in_out": [(1, 1), ("R", 1), (1, "C"), (8, 4)]}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("in_out", [False, True], ids=["out_in", "in_out"])
@pytest.mark.parametrize("grid_index", range(4), ids=["per_weight", "unit_rows", "unit_cols", "block8x4"])
def test_masked_linear_grids(device, dtype, in_out, grid_index):
    block = GRIDS["in_out" if in_out else "out_in"][grid_index]
    # Rotate estimators, bias and weight-gradient flags over the grid so each appears with each layout.
    estimator = (grid_index + 2 * in_out) % 4
    p = Params(estimator, seed=2**40 + 7, offset=2**33 - 3, training=grid_index != 3)
    _check_masked_linear(device, 33, 37, 29, block, in_out, dtype, has_bias=grid_index % 2 == 0,
                         needs_weight_grad=(grid_index + in_out) % 2 == 0, p=p)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens,n_in,n_out", [(1, 1, 1), (5, 7, 13), (1, 37, 13), (5, 1, 29), (33, 7, 1)])
@pytest.mark.parametrize("in_out", [False, True], ids=["out_in", "in_out"])
@pytest.mark.parametrize("block", [(1, 1), (8, 4)], ids=["per_weight", "block8x4"])
def test_masked_linear_odd_shapes(device, tokens, n_in, n_out, in_out, block):
    _check_masked_linear(device, tokens, n_in, n_out, block, in_out, torch.float32, p=Params(0, seed=3, offset=11))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_out", [False, True], ids=["out_in", "in_out"])
def test_masked_linear_float16(device, in_out):
    _check_masked_linear(device, 33, 37, 29, (1, 1), in_out, torch.float16, p=Params(0))
    _check_masked_linear(device, 33, 37, 29, (8, 4), in_out, torch.float16, p=Params(1), strategy="materialize")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_out", [False, True], ids=["out_in", "in_out"])
def test_masked_linear_non_power_of_two_blocks(device, in_out):
    """Blocks that are not powers of two (or span tiles) take the atomic d(logits) path."""
    _check_masked_linear(device, 17, 37, 29, (3, 5), in_out, torch.float32, p=Params(1, inverse=True))
    _check_masked_linear(device, 17, 37, 29, (32, 1), in_out, torch.bfloat16, p=Params(3), has_bias=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_out", [False, True], ids=["out_in", "in_out"])
def test_masked_linear_non_contiguous_x_eval_inverse(device, in_out):
    _check_masked_linear(device, 19, 37, 13, (1, 1), in_out, torch.bfloat16, non_contiguous_x=True,
                         p=Params(0, training=False, inverse=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_out", [False, True], ids=["out_in", "in_out"])
def test_masked_linear_materialized_strategy(device, in_out):
    """The materialise-once path (large token counts) computes the same as the fused one."""
    _check_masked_linear(device, 21, 37, 29, (1, 1), in_out, torch.float32, strategy="materialize",
                         p=Params(2, tau=0.2))
    _check_masked_linear(device, 21, 37, 29, (1, 1), in_out, torch.bfloat16, strategy="auto", p=Params(0))
    _check_masked_linear(device, 21, 37, 29, (8, 4), in_out, torch.bfloat16, strategy="materialize", p=Params(1))


@pytest.mark.parametrize("device", DEVICES)
def test_masked_linear_float64_matches_reference(device):
    """float64 (gradcheck's dtype) runs the same fused kernels without tl.dot; it must match to ~1e-12."""
    for in_out, block in ((False, (1, 1)), (True, (2, 3))):
        p = Params(0, seed=9, offset=4)
        rows, cols = (7, 5) if in_out else (5, 7)
        blk, grid = _grid(rows, cols, block)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(6, 7, generator=gen, dtype=torch.float64)
        w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
        logits = torch.randn(grid, generator=gen, dtype=torch.float64)
        b = torch.randn(5, generator=gen, dtype=torch.float64)
        dy = torch.randn(6, 5, generator=gen, dtype=torch.float64)
        kw = dict(weight_layout="in_out" if in_out else "out_in", block=blk, **p.ref_kwargs())
        y = K.masked_linear_forward(x.to(device), w.to(device), logits.to(device), b.to(device), blk, in_out, p)
        torch.testing.assert_close(y.cpu(), ref.masked_linear_ref(x, w, logits, b, **kw), atol=1e-12, rtol=1e-12)
        got = K.masked_linear_backward(dy.to(device), x.to(device), w.to(device), logits.to(device), True, blk, in_out,
                                       p, True, True)
        want = ref.masked_linear_backward_ref(dy, x, w, logits, p, has_bias=True, weight_layout=kw["weight_layout"],
                                              block=blk, needs_weight_grad=True)
        for name, g, r in zip(("grad_x", "grad_weight", "grad_logits", "grad_bias"), got, want):
            assert g.dtype == torch.float64, name
            torch.testing.assert_close(g.cpu(), r, atol=1e-12, rtol=1e-12, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_linear_gradcheck(device):
    """The backward kernels are the derivative of the forward kernel (float64, hard concrete, per weight)."""
    p = Params(0, seed=5, offset=1)

    class _Fn(torch.autograd.Function):  # test harness only: the library registers torch.library ops instead
        @staticmethod
        def forward(ctx, x, w, logits, b):
            ctx.save_for_backward(x, w, logits)
            return K.masked_linear_forward(x, w, logits, b, (1, 1), True, p)

        @staticmethod
        def backward(ctx, dy):
            x, w, logits = ctx.saved_tensors
            gx, gw, gl, gb = K.masked_linear_backward(dy.contiguous(), x, w, logits, True, (1, 1), True, p, True, True)
            return gx, gw, gl, gb

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(4, 2, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    logits = torch.randn(4, 2, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(2, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(_Fn.apply, (x, w, logits, b), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", ["auto", "fused"])
def test_masked_linear_default_gpu_config(device, strategy):
    """The default GPU tiles and policy (config=None) on shapes spanning several tiles, both layouts, bf16."""
    if device == "cpu":
        pytest.skip("default GPU tiles are too slow for the interpreter")
    for in_out in (False, True):
        for block in ((1, 1), (1, "C"), ("R", 1), (64, 64), (3, 5)):
            _check_masked_linear(device, 300, 200, 260, block, in_out, torch.bfloat16, config=None, strategy=strategy,
                                 p=Params(0, seed=123, offset=2**33 - 3))
    # Many tokens: the 16-warp mask-gradient tiles and the materialised path.
    _check_masked_linear(device, 4100, 64, 72, (1, 1), False, torch.bfloat16, config=None, strategy=strategy)
    _check_masked_linear(device, 4100, 64, 72, (1, "C"), True, torch.float32, config=None, strategy=strategy)
