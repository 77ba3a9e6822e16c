"""GPU tests of the CUDA kernels of the extension fastmask._C (csrc/cuda/mask_kernels.cu).

Every op runs on CUDA and is compared with fastmask/ref.py run on CPU: the noise bit for bit; gates, slopes and
masked weights within float rounding (the CUDA expf/logf may differ from the CPU ones by an ulp, so a hard 0/1
decision may differ only where the reference is within a hair of the decision boundary); block gradients within
summation-order error, and bit-identical from run to run. Skipped without a CUDA GPU.

Loads `fastmask._C` if it is built; otherwise JIT-builds csrc/ops.cpp + csrc/cuda/mask_kernels.cu (+ csrc/cpu/*.cpp)
with torch.utils.cpp_extension (a few minutes the first time; cached afterwards).
"""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

from fastmask import ref

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPS = ("_uniform_fill", "_gate_fwd", "_gate_bwd", "_masked_weight", "_mask_grad")
HC, GS, TH, BE = range(4)  # estimator codes: hard_concrete, gumbel_sigmoid_st, threshold_st, bernoulli_st
BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU: the CUDA kernels of fastmask._C cannot run on this machine"),
]


# --------------------------------------------------------------------------------------------------------------
# Loading the extension
# --------------------------------------------------------------------------------------------------------------

def _has_cuda_kernels() -> bool:
    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmask::{op}", "CUDA") for op in OPS)
    except RuntimeError:  # the op is not defined at all
        return False


def _jit_build() -> None:
    from torch.utils import cpp_extension

    cuda_sources = [ROOT / "csrc" / "ops.cpp", ROOT / "csrc" / "cuda" / "mask_kernels.cu"]
    cpu_sources = sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))
    includes = [str(ROOT / "csrc")]
    # pip's CUDA headers (cuBLAS, cuSPARSE...) when the system CUDA lacks them.
    pip_cuda = pathlib.Path(torch.__file__).resolve().parent.parent / "nvidia" / "cu13" / "include"
    if pip_cuda.is_dir():
        includes.append(str(pip_cuda))

    def build(name, sources):
        cpp_extension.load(name=name, sources=[str(s) for s in sources], extra_include_paths=includes,
                           extra_cflags=["-O3"], extra_cuda_cflags=["-O3"], is_python_module=False,
                           verbose=os.environ.get("FASTMASK_VERBOSE_BUILD") == "1")

    try:
        build("fastmask_C_cuda_test", cuda_sources + cpu_sources)
    except Exception:  # the CPU sources did not build: these tests need only the CUDA kernels
        if not cpu_sources:
            raise
        build("fastmask_C_cuda_only_test", cuda_sources)


@pytest.fixture(scope="module", autouse=True)
def _extension():
    if not _has_cuda_kernels():
        try:
            import fastmask._C  # noqa: F401
        except ImportError:
            _jit_build()
    if not _has_cuda_kernels():
        pytest.fail("fastmask._C is loaded but has no CUDA kernels for the fastmask ops: rebuild it with CUDA "
                    "(csrc/cuda/mask_kernels.cu)")


ops = torch.ops.fastmask


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------

def _cpp_args(est, seed, offset, training, inverse, tau=0.0):
    return (est, seed, offset, BETA, GAMMA, ZETA, tau, training, inverse)


def _ref_kwargs(est, seed, offset, training, inverse, tau=0.0):
    return dict(estimator=ref.ESTIMATORS[est], seed=seed, offset=offset, beta=BETA, gamma=GAMMA, zeta=ZETA, tau=tau,
                training=training, inverse=inverse)


def _near_boundary(logits, est, seed, offset, training, tau, width):
    """Where the reference's hard decision (0/1 gate, or hard_concrete's clamp edges) is within `width` of flipping:
    the only places where CUDA and CPU may disagree beyond rounding, because expf/logf differ by an ulp."""
    l = logits.detach().cpu().double()
    u = ref.uniform_ref(l.shape, seed, offset).double()
    uc = u.clamp(ref.UNIFORM_EPS, 1 - ref.UNIFORM_EPS)
    noise = torch.log(uc) - torch.log1p(-uc)
    if est == HC:
        s = torch.sigmoid((noise + l) / BETA) if training else torch.sigmoid(l)
        s_bar = s * (ZETA - GAMMA) + GAMMA
        margin = torch.minimum(s_bar.abs(), (s_bar - 1).abs())
    elif est == GS:
        margin = (l + noise).abs() if training else l.abs()
    elif est == BE:
        margin = (u - torch.sigmoid(l)).abs() if training else l.abs()
    else:  # threshold_st: an exact comparison on identical inputs
        margin = torch.full_like(l, float("inf"))
    return margin < width


def _check(actual, expected, *, tol, near=None, what=""):
    """|actual - expected| <= tol elementwise (NaN fails), except where `near` (a decision boundary) is set."""
    a = actual.detach().cpu().double()
    e = expected.detach().cpu().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    bad = ~((a - e).abs() <= tol)
    if near is not None:
        assert near.double().mean() < 0.01, f"{what}: too many elements near a decision boundary"
        bad &= ~near
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements differ beyond the tolerance; "
                             f"first at {idx}: got {a[bad][:5].tolist()}, expected {e[bad][:5].tolist()}")


# One rounding of the output dtype: relative (EPS, normal numbers) and absolute (TINY, the subnormal spacing).
EPS = {torch.float32: 2.0**-23, torch.float64: 2.0**-52, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
TINY = {torch.float32: 2.0**-149, torch.float64: 2.0**-1074, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133}


def _gate_tol(dtype):
    """(abs error of a gate / slope, boundary width) for the compute dtype."""
    return (1e-6, 1e-5) if dtype != torch.float64 else (1e-12, 1e-10)


def _ref_mask_grad(grad_wm, weight, logits, block, kw):
    """fastmask.ref's mask-gradient path (masked_linear_backward_ref from grad_wm on): grad_logits, grad_weight,
    and the block sums of |grad_wm * W| (float64) that bound the summation-order error."""
    gates = ref.gate_ref(logits, **kw)
    mask = ref.expand_gates(gates, block, weight.shape)
    up = weight if weight.dtype == torch.float64 else weight.float()
    per_weight = (grad_wm * up).to(gates.dtype)
    grad_gates = ref.reduce_to_grid(per_weight, block, logits.shape)
    grad_logits = ref.gate_backward_ref(grad_gates, logits, **kw)
    grad_weight = (grad_wm * mask.to(grad_wm.dtype)).to(weight.dtype)
    bound = ref.reduce_to_grid((grad_wm.double() * weight.double()).abs(), block, logits.shape)
    return grad_logits, grad_weight, bound


def _grid_shape(shape, block):
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def _make(shape, block, wdtype, ldtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g).to(wdtype)
    logits = (torch.randn(_grid_shape(shape, block), generator=g) * scale).to(ldtype)
    return weight, logits


# --------------------------------------------------------------------------------------------------------------
# _uniform_fill
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("numel", [1, 7, 1073, 1000003])
@pytest.mark.parametrize("seed,offset", [(0, 0), (1, 3), (2**32 + 5, 2**32 - 5), (0x1EADBEEF12345678, 2**40 + 7),
                                         (2**63 - 1, 12345)])
def test_uniform_fill_bit_exact(numel, seed, offset):
    out = torch.empty(numel, dtype=torch.float32, device="cuda")
    ops._uniform_fill(out, seed, offset)
    expected = ref.uniform_ref((numel,), seed, offset)
    assert torch.equal(out.cpu(), expected), "uniform noise differs from fastmask.ref.uniform_ref"


def test_uniform_fill_2d_row_major():
    out = torch.empty(37, 29, dtype=torch.float32, device="cuda")
    ops._uniform_fill(out, 2**33 + 1, 2**32 + 11)
    assert torch.equal(out.cpu(), ref.uniform_ref((37, 29), 2**33 + 1, 2**32 + 11))


def test_uniform_fill_bad_out():
    with pytest.raises(RuntimeError, match="out"):
        ops._uniform_fill(torch.empty(10, 4, device="cuda").t(), 0, 0)  # not contiguous
    with pytest.raises(RuntimeError, match="out"):
        ops._uniform_fill(torch.empty(10, dtype=torch.float64, device="cuda"), 0, 0)


# --------------------------------------------------------------------------------------------------------------
# _gate_fwd / _gate_bwd
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(37, 29), (1, 1), (1001,), (8, 129)])
@pytest.mark.parametrize("est", [HC, GS, TH, BE])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("inverse", [False, True])
def test_gates_and_slopes(dtype, shape, est, training, inverse):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(shape, generator=g) * 3).to(dtype)
    grad = torch.randn(shape, generator=g).to(dtype)
    seed, offset, tau = 2**32 + 77, 2**32 - 100, 0.25
    kw = _ref_kwargs(est, seed, offset, training, inverse, tau)
    args = _cpp_args(est, seed, offset, training, inverse, tau)
    atol, width = _gate_tol(dtype)
    near = _near_boundary(logits, est, seed, offset, training, tau, width)

    gates = ops._gate_fwd(logits.cuda(), *args)
    assert gates.dtype == dtype and gates.is_cuda
    _check(gates, ref.gate_ref(logits, **kw), tol=atol, near=near, what="gates")

    slopes = ops._gate_bwd(torch.ones_like(logits).cuda(), logits.cuda(), *args)
    _check(slopes, ref.gate_backward_ref(torch.ones_like(logits), logits, **kw), tol=atol, near=near, what="slopes")

    grad_logits = ops._gate_bwd(grad.cuda(), logits.cuda(), *args)
    assert grad_logits.dtype == dtype
    _check(grad_logits, ref.gate_backward_ref(grad, logits, **kw), tol=atol * (1 + grad.double().abs()), near=near,
           what="grad_logits")


@pytest.mark.parametrize("ldtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("est", [HC, GS, TH, BE])
def test_gates_half_logits(ldtype, est):
    logits = (torch.randn(37, 29, generator=torch.Generator().manual_seed(2)) * 3).to(ldtype)
    grad = torch.randn(37, 29, generator=torch.Generator().manual_seed(3)).to(ldtype)
    kw = _ref_kwargs(est, 5, 9, True, False)
    args = _cpp_args(est, 5, 9, True, False)
    near = _near_boundary(logits, est, 5, 9, True, 0.0, 1e-5)
    gates = ops._gate_fwd(logits.cuda(), *args)
    assert gates.dtype == torch.float32, "half logits compute (and return) in float32"
    _check(gates, ref.gate_ref(logits, **kw), tol=1e-6, near=near, what="gates")
    grad_logits = ops._gate_bwd(grad.cuda(), logits.cuda(), *args)
    assert grad_logits.dtype == torch.float32
    _check(grad_logits, ref.gate_backward_ref(grad, logits, **kw), tol=1e-6 * (1 + grad.double().abs()), near=near,
           what="grad_logits")


def test_gates_non_contiguous_logits():
    logits = torch.randn(29, 37, generator=torch.Generator().manual_seed(4)).t()
    args = _cpp_args(HC, 3, 0, True, False)
    got = ops._gate_fwd(logits.cuda(), *args)
    _check(got, ref.gate_ref(logits.contiguous(), **_ref_kwargs(HC, 3, 0, True, False)), tol=1e-6,
           near=_near_boundary(logits, HC, 3, 0, True, 0.0, 1e-5), what="gates of a transposed view")


# --------------------------------------------------------------------------------------------------------------
# _masked_weight and _mask_grad on small odd shapes
# --------------------------------------------------------------------------------------------------------------

SHAPES = [(37, 29), (40, 64), (1, 1), (129, 8)]


def _blocks(shape):
    r, c = shape
    # per weight, small blocks with partial edge blocks, output units, input units, whole layer, blocks bigger than
    # the weight, and a wide block (warp-per-block reduction).
    return [(1, 1), (8, 4), (3, 5), (1, c), (r, 1), (r, c), (64, 64), (2, 40)]


CASES = [(shape, block) for shape in SHAPES for block in dict.fromkeys(_blocks(shape))]
WDTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _ldtype(wdtype):
    return torch.float64 if wdtype == torch.float64 else torch.float32


def _check_masked_weight(weight, logits, block, est, seed, offset, training, inverse, what="", weight_cuda=None):
    kw = _ref_kwargs(est, seed, offset, training, inverse)
    expected = ref.masked_weight_ref(weight, logits, block, **kw)
    w_cuda = weight.cuda() if weight_cuda is None else weight_cuda
    got = ops._masked_weight(w_cuda, logits.cuda(), block[0], block[1], *_cpp_args(est, seed, offset, training,
                                                                                   inverse))
    assert got.dtype == weight.dtype and got.shape == weight.shape and got.is_contiguous()
    gate_err, width = _gate_tol(ref.compute_dtype(logits))
    near = ref.expand_gates(_near_boundary(logits, est, seed, offset, training, 0.0, width), block, weight.shape)
    tol = gate_err * weight.double().abs() + EPS[weight.dtype] * expected.double().abs() + TINY[weight.dtype]
    _check(got, expected, tol=tol, near=near, what=f"masked weight {what}")


@pytest.mark.parametrize("shape,block", CASES)
@pytest.mark.parametrize("wdtype", WDTYPES)
@pytest.mark.parametrize("est", [HC, GS, TH, BE])
@pytest.mark.parametrize("training,inverse", [(True, False), (False, False), (True, True)])
def test_masked_weight(shape, block, wdtype, est, training, inverse):
    weight, logits = _make(shape, block, wdtype, _ldtype(wdtype))
    _check_masked_weight(weight, logits, block, est, 2**32 + 3, 17, training, inverse)


@pytest.mark.parametrize("wdtype,ldtype", [(torch.float32, torch.float64), (torch.bfloat16, torch.float64),
                                           (torch.float64, torch.float32), (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("block", [(1, 1), (8, 4)])
def test_masked_weight_mixed_dtypes(wdtype, ldtype, block):
    weight, logits = _make((37, 29), block, wdtype, ldtype)
    _check_masked_weight(weight, logits, block, HC, 11, 0, True, False)


@pytest.mark.parametrize("block", [(1, 1), (8, 4), (1, 64)])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_masked_weight_unaligned_and_non_contiguous(block, wdtype):
    shape = (40, 64)
    weight, logits = _make(shape, block, wdtype, torch.float32)
    # A weight whose data starts 1 element into its storage: no 16-byte vector access is possible.
    storage = torch.empty(weight.numel() + 1, dtype=wdtype, device="cuda")
    storage[1:].copy_(weight.reshape(-1).cuda())
    _check_masked_weight(weight, logits, block, HC, 1, 2, True, False, "unaligned",
                         weight_cuda=storage[1:].view(shape))
    # A transposed view (non-contiguous).
    _check_masked_weight(weight, logits, block, GS, 1, 2, True, False, "transposed view",
                         weight_cuda=weight.t().contiguous().cuda().t())
    # Logits starting 1 element into their storage (per-weight masks then take the tiled path).
    kw = _ref_kwargs(HC, 1, 2, True, False)
    lstore = torch.empty(logits.numel() + 1, device="cuda")
    lstore[1:].copy_(logits.reshape(-1).cuda())
    got = ops._masked_weight(weight.cuda(), lstore[1:].view(logits.shape), block[0], block[1],
                             *_cpp_args(HC, 1, 2, True, False))
    near = ref.expand_gates(_near_boundary(logits, HC, 1, 2, True, 0.0, 1e-5), block, shape)
    expected = ref.masked_weight_ref(weight, logits, block, **kw)
    _check(got, expected, tol=1e-6 * weight.double().abs() + EPS[wdtype] * expected.double().abs() + TINY[wdtype],
           near=near,
           what="masked weight, unaligned logits")


def _check_mask_grad(weight, logits, block, est, seed, offset, training, inverse, needs_weight_grad, grad_wm=None,
                     what=""):
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    if grad_wm is None:
        grad_wm = torch.randn(weight.shape, generator=torch.Generator().manual_seed(7), dtype=acc)
    kw = _ref_kwargs(est, seed, offset, training, inverse)
    gl_ref, gw_ref, bound = _ref_mask_grad(grad_wm, weight, logits, block, kw)
    gl, gw = ops._mask_grad(grad_wm.cuda(), weight.cuda(), logits.cuda(), block[0], block[1],
                            *_cpp_args(est, seed, offset, training, inverse), needs_weight_grad)
    cdtype = ref.compute_dtype(logits)
    assert gl.dtype == cdtype and gl.shape == logits.shape
    gate_err, width = _gate_tol(cdtype)
    near = _near_boundary(logits, est, seed, offset, training, 0.0, width)
    # Slope error (gate_err per unit) plus summation-order error of the block sums.
    sum_err = 1e-5 if cdtype != torch.float64 else 1e-12
    _check(gl, gl_ref, tol=(gate_err + sum_err) * bound + 1e-30, near=near, what=f"grad_logits {what}")
    if needs_weight_grad:
        assert gw.dtype == weight.dtype and gw.shape == weight.shape
        near_w = ref.expand_gates(near, block, weight.shape)
        tol = gate_err * grad_wm.double().abs() + EPS[weight.dtype] * gw_ref.double().abs() + TINY[weight.dtype]
        _check(gw, gw_ref, tol=tol, near=near_w, what=f"grad_weight {what}")
    else:
        assert gw.numel() == 0 and gw.dtype == weight.dtype and gw.is_cuda
    return gl, gw


@pytest.mark.parametrize("shape,block", CASES)
@pytest.mark.parametrize("wdtype", WDTYPES)
@pytest.mark.parametrize("est", [HC, GS, TH, BE])
@pytest.mark.parametrize("training,inverse", [(True, False), (False, False), (True, True)])
def test_mask_grad(shape, block, wdtype, est, training, inverse):
    weight, logits = _make(shape, block, wdtype, _ldtype(wdtype))
    _check_mask_grad(weight, logits, block, est, 2**32 + 3, 17, training, inverse, needs_weight_grad=True)
    _check_mask_grad(weight, logits, block, est, 2**32 + 3, 17, training, inverse, needs_weight_grad=False)


@pytest.mark.parametrize("wdtype,ldtype", [(torch.float32, torch.float64), (torch.bfloat16, torch.float64),
                                           (torch.float64, torch.float32), (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("block", [(1, 1), (8, 4), (37, 29)])
def test_mask_grad_mixed_dtypes(wdtype, ldtype, block):
    weight, logits = _make((37, 29), block, wdtype, ldtype)
    _check_mask_grad(weight, logits, block, HC, 11, 0, True, False, needs_weight_grad=True)


# --------------------------------------------------------------------------------------------------------------
# Larger shapes, determinism, many-CTA paths
# --------------------------------------------------------------------------------------------------------------

LARGE = [
    ((3072, 768), (1, 1)),       # per weight (GPT-2 sized)
    ((1600, 6400), (64, 64)),    # 64x64 blocks (GPT-2 XL MLP sized)
    ((3072, 768), (3072, 1)),    # input units: tall narrow blocks, split into row chunks
    ((3072, 768), (3072, 64)),   # heads
    ((3072, 768), (3072, 768)),  # whole layer: one block, many chunks
    ((3072, 768), (1, 768)),     # output units
]


@pytest.mark.parametrize("shape,block", LARGE)
def test_large_bf16(shape, block):
    weight, logits = _make(shape, block, torch.bfloat16, torch.float32)
    _check_masked_weight(weight, logits, block, HC, 123, 2**32 + 1, True, False, what=f"{shape} {block}")
    gl, gw = _check_mask_grad(weight, logits, block, HC, 123, 2**32 + 1, True, False, needs_weight_grad=True,
                              what=f"{shape} {block}")


@pytest.mark.parametrize("shape,block", LARGE + [((37, 29), (8, 4))])
@pytest.mark.parametrize("needs_weight_grad", [True, False])
def test_mask_grad_deterministic(shape, block, needs_weight_grad):
    weight, logits = _make(shape, block, torch.bfloat16, torch.float32)
    grad_wm = torch.randn(shape, device="cuda")
    args = (grad_wm, weight.cuda(), logits.cuda(), block[0], block[1], *_cpp_args(GS, 9, 0, True, False),
            needs_weight_grad)
    first = ops._mask_grad(*args)
    for _ in range(3):
        again = ops._mask_grad(*args)
        assert torch.equal(first[0], again[0]), "grad_logits is not bit-reproducible"
        assert torch.equal(first[1], again[1]), "grad_weight is not bit-reproducible"


def test_many_row_tiles_and_grid_stride():
    # More row tiles than gridDim.y allows (65535 * 16 rows) and more work items than one grid of threads.
    shape, block = (16 * 65535 + 17, 3), (2, 1)
    weight, logits = _make(shape, block, torch.float32, torch.float32)
    _check_masked_weight(weight, logits, block, HC, 0, 0, False, False, what="tall")
    _check_mask_grad(weight, logits, block, HC, 0, 0, False, False, needs_weight_grad=True, what="tall")


def test_float64_per_weight_large():
    weight, logits = _make((513, 257), (1, 1), torch.float64, torch.float64)
    _check_masked_weight(weight, logits, (1, 1), HC, 4, 4, True, False)
    _check_mask_grad(weight, logits, (1, 1), HC, 4, 4, True, False, needs_weight_grad=True)


def test_empty_weight():
    weight = torch.empty(0, 29, device="cuda")
    logits = torch.empty(0, 8, device="cuda")
    out = ops._masked_weight(weight, logits, 8, 4, *_cpp_args(HC, 0, 0, True, False))
    assert out.shape == (0, 29)
    gl, gw = ops._mask_grad(torch.empty(0, 29, device="cuda"), weight, logits, 8, 4,
                            *_cpp_args(HC, 0, 0, True, False), True)
    assert gl.shape == (0, 8) and gw.shape == (0, 29)


# --------------------------------------------------------------------------------------------------------------
# Bad input: a RuntimeError that names the argument
# --------------------------------------------------------------------------------------------------------------

def test_bad_input_raises_naming_the_argument():
    w = torch.randn(37, 29, device="cuda")
    l = torch.randn(5, 8, device="cuda")
    gwm = torch.randn(37, 29, device="cuda")
    a = _cpp_args(HC, 0, 0, True, False)
    with pytest.raises(RuntimeError, match="logits"):
        ops._masked_weight(w, l.cpu(), 8, 4, *a)
    with pytest.raises(RuntimeError, match="weight"):
        ops._masked_weight(w.cpu(), l, 8, 4, *a)
    with pytest.raises(RuntimeError, match="logits"):
        ops._masked_weight(w, torch.randn(5, 7, device="cuda"), 8, 4, *a)  # wrong grid shape
    with pytest.raises(RuntimeError, match="weight"):
        ops._masked_weight(torch.randn(2, 37, 29, device="cuda"), l, 8, 4, *a)  # 3-D
    with pytest.raises(RuntimeError, match="weight"):
        ops._masked_weight(w.to(torch.int32), l, 8, 4, *a)
    with pytest.raises(RuntimeError, match="block"):
        ops._masked_weight(w, l, 0, 4, *a)
    with pytest.raises(RuntimeError, match="estimator"):
        ops._masked_weight(w, l, 8, 4, 7, *a[1:])
    with pytest.raises(RuntimeError, match="grad_wm"):
        ops._mask_grad(gwm.cpu(), w, l, 8, 4, *a, True)
    with pytest.raises(RuntimeError, match="grad_wm"):
        ops._mask_grad(gwm.to(torch.int32), w, l, 8, 4, *a, True)
    with pytest.raises(RuntimeError, match="grad_wm"):
        ops._mask_grad(gwm[:, :28], w, l, 8, 4, *a, True)
    with pytest.raises(RuntimeError, match="logits"):
        ops._mask_grad(gwm, w, torch.randn(8, 5, device="cuda"), 8, 4, *a, True)
    with pytest.raises(RuntimeError, match="logits"):
        ops._gate_bwd(torch.ones(5, 8, device="cuda"), l.cpu(), *a)
    with pytest.raises(RuntimeError, match="grad_gates"):
        ops._gate_bwd(torch.ones(5, 7, device="cuda"), l, *a)
    if torch.cuda.device_count() > 1:
        with pytest.raises(RuntimeError, match="logits"):
            ops._masked_weight(w, l.to("cuda:1"), 8, 4, *a)
