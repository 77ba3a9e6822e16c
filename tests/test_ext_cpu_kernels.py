"""The C++ CPU kernels of fastmask._C (csrc/cpu/mask_kernels.cpp) against fastmask/ref.py, op by op.

Uses the installed extension when `import fastmask._C` works and has CPU kernels; otherwise (a source checkout
that was never built) compiles csrc/ with torch's JIT loader into a cached build folder. FASTMASK_TEST_CPU_JIT=1
forces the JIT build of the current sources (kernel development: the installed build may be stale).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
OPS = ("_uniform_fill", "_gumbel_fill", "_gate_fwd", "_gate_bwd", "_masked_weight", "_mask_grad",
       "_mask_grad_masked_weight")
ESTIMATOR_CODES = {"hard_concrete": 0, "gumbel_sigmoid_st": 1, "threshold_st": 2, "bernoulli_st": 3}
BETA, GAMMA, ZETA, TAU = 2 / 3, -0.1, 1.1, 0.3
DECISION_MARGIN = 1e-5  # hard 0/1 decisions may differ from the reference only this close to their threshold


# ---------------------------------------------------------------------------------------------------------------
# Loading the extension and the reference
# ---------------------------------------------------------------------------------------------------------------


def _load_ref():
    try:
        return importlib.import_module("fastmask.ref")
    except Exception:  # the package may not import while it is being wired up: load the file itself
        spec = importlib.util.spec_from_file_location("_fastmask_ref_for_cpu_tests", ROOT / "fastmask" / "ref.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


ref = _load_ref()


def _has_cpu_kernels() -> bool:
    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmask::{op}", "CPU") for op in OPS)
    except RuntimeError:  # schema not registered
        return False


def _schemas_registered() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw("fastmask::_mask_grad", "")
        return True
    except RuntimeError:
        return False


def load_extension() -> str:
    """Make torch.ops.fastmask's CPU kernels available; returns where they came from."""
    if os.environ.get("FASTMASK_TEST_CPU_JIT") != "1":
        try:
            importlib.import_module("fastmask._C")
        except Exception:
            pass
        if _has_cpu_kernels():
            return "installed fastmask._C"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("fastmask._C is not built and no C++ compiler is found for a JIT build")
    from torch.utils.cpp_extension import load

    # The schemas (csrc/ops.cpp) may be registered already by an installed fastmask._C: then compile only the
    # CPU kernels, which register their impls into those schemas.
    sources = [CSRC / "cpu" / "mask_kernels.cpp"]
    if not _schemas_registered():
        sources.insert(0, CSRC / "ops.cpp")
    tag = hashlib.sha1((torch.__version__ + sys.version + "".join(map(str, sources))).encode()).hexdigest()[:10]
    build_dir = Path(tempfile.gettempdir()) / f"fastmask_cpu_kernels_test_{tag}"
    build_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", "2")
    # -fopenmp: at::parallel_for is header code that runs serially unless the extension is built with OpenMP.
    load(name=f"fastmask_cpu_kernels_test_{len(sources)}", sources=[str(s) for s in sources],
         extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], extra_include_paths=[str(CSRC)],
         is_python_module=False, build_directory=str(build_dir), verbose=False)
    assert _has_cpu_kernels(), "the JIT-built library did not register the CPU kernels"
    return f"JIT build in {build_dir}"


@pytest.fixture(scope="module", autouse=True)
def ext():
    return load_extension()


def fm_ops():
    return torch.ops.fastmask


@pytest.fixture
def isa(monkeypatch):
    """Run a test under one instruction-set path of the kernels (FASTMASK_CPU_ISA caps the detected one)."""

    def use(name: str | None):
        if name is None:
            monkeypatch.delenv("FASTMASK_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("FASTMASK_CPU_ISA", name)

    return use


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def params(estimator, seed=17, offset=2**33 + 5, training=True, inverse=False, beta=BETA):
    """(positional C++ args, ref kwargs) of one gate configuration."""
    cpp = (ESTIMATOR_CODES[estimator], seed, offset, beta, GAMMA, ZETA, TAU, training, inverse)
    kw = dict(estimator=estimator, seed=seed, offset=offset, beta=beta, gamma=GAMMA, zeta=ZETA, tau=TAU,
              training=training, inverse=inverse)
    return cpp, kw


def decision_clear(logits, kw):
    """True where the reference's hard decision (gumbel / bernoulli / threshold) is not within DECISION_MARGIN of
    its threshold, and where hard_concrete's s_bar is not that close to 0 or 1 (its slope jumps there)."""
    l = logits.double()
    est, seed, offset = kw["estimator"], kw["seed"], kw["offset"]
    if est == "threshold_st":
        return (l - kw["tau"]).abs() > DECISION_MARGIN
    if not kw["training"]:
        if est == "hard_concrete":
            s_bar = torch.sigmoid(l) * (ZETA - GAMMA) + GAMMA
            return ((s_bar.abs() > DECISION_MARGIN) & ((s_bar - 1).abs() > DECISION_MARGIN))
        return l.abs() > DECISION_MARGIN
    u = ref.uniform_ref(l.shape, seed, offset).double()
    if est == "bernoulli_st":
        return (u - torch.sigmoid(l)).abs() > DECISION_MARGIN
    uc = u.clamp(ref.UNIFORM_EPS, 1 - ref.UNIFORM_EPS)
    v = l + torch.log(uc) - torch.log1p(-uc)
    if est == "gumbel_sigmoid_st":
        return v.abs() > DECISION_MARGIN
    s_bar = torch.sigmoid(v / kw["beta"]) * (ZETA - GAMMA) + GAMMA
    return (s_bar.abs() > DECISION_MARGIN) & ((s_bar - 1).abs() > DECISION_MARGIN)


def gate_tol(dtype):
    return 1e-6 if dtype != torch.float64 else 1e-12


def assert_close_where(actual, expected, where, atol, rtol, what):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    a, e = actual[where].double(), expected[where].double()
    bad = (a - e).abs() > atol + rtol * e.abs()
    assert not bad.any(), f"{what}: {int(bad.sum())} mismatches, max err {(a - e).abs().max().item():.3g}"


def assert_within_ulp(actual, expected, where, ulps, what):
    """|actual - expected| <= ulps units in the last place of expected's dtype (float16 / bfloat16)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a, e = actual[where].double(), expected[where].double()
    fi = torch.finfo(expected.dtype)
    mag = e.abs().clamp_min(fi.tiny)
    ulp = torch.exp2(torch.floor(torch.log2(mag))) * fi.eps  # spacing of numbers around |e|
    ulp = ulp.clamp_min(fi.tiny * fi.eps)  # subnormals
    bad = (a - e).abs() > ulps * ulp
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off by more than {ulps} ulp"


# ---------------------------------------------------------------------------------------------------------------
# _uniform_fill
# ---------------------------------------------------------------------------------------------------------------

SEEDS = [0, 1, 2**32 + 5, 2**63 - 1, -3]
OFFSETS = [0, 2**32 - 7, 2**33 + 3, 2**40 + 11]


@pytest.mark.parametrize("path", [None, "avx2", "scalar"])
def test_uniform_bits_equal_reference(isa, path):
    isa(path)
    for seed in SEEDS:
        for offset in OFFSETS:
            for n in (1, 7, 37, 1000):
                out = torch.empty(n)
                fm_ops()._uniform_fill(out, seed, offset)
                assert torch.equal(out, ref.uniform_ref((n,), seed, offset)), (seed, offset, n)


def test_uniform_parallel_and_shaped(isa):
    isa(None)
    out = torch.empty(301, 333)  # > one parallel chunk, counter wraps its low word in the middle
    fm_ops()._uniform_fill(out, 2**33 + 1, 2**32 - 50_000)
    assert torch.equal(out, ref.uniform_ref((301, 333), 2**33 + 1, 2**32 - 50_000))
    assert float(out.min()) >= 0.0 and float(out.max()) < 1.0


def test_uniform_rejects_bad_out():
    with pytest.raises(RuntimeError, match="out must be float32"):
        fm_ops()._uniform_fill(torch.empty(4, dtype=torch.float64), 0, 0)
    with pytest.raises(RuntimeError, match="out must be contiguous"):
        fm_ops()._uniform_fill(torch.empty(4, 6).t(), 0, 0)


# ---------------------------------------------------------------------------------------------------------------
# _gumbel_fill (the learned N:M masks' noise)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [None, "avx2", "scalar"])
def test_gumbel_fill_matches_reference(isa, path):
    """-log(-log u) of the library's uniform stream, within a few float32 ulp of the reference's torch logs, on every
    instruction-set path, across parallel chunks and a wrap of the counter's low word."""
    isa(path)
    for seed, offset, shape in ((0, 0, (7,)), (2**32 + 5, 2**32 - 50_000, (301, 333)), (-3, 2**40 + 11, (1000,))):
        out = torch.empty(shape)
        fm_ops()._gumbel_fill(out, seed, offset)
        want = ref._gumbel_noise(shape, seed, offset, torch.float32, None)
        # near g = 0 (u near 1/e) the absolute error of the outer log counts, not its relative error
        torch.testing.assert_close(out, want, rtol=4e-6, atol=4e-7)
        assert torch.isfinite(out).all()


def test_gumbel_fill_rejects_bad_out():
    with pytest.raises(RuntimeError, match="out must be float32"):
        fm_ops()._gumbel_fill(torch.empty(4, dtype=torch.float64), 0, 0)
    with pytest.raises(RuntimeError, match="out must be contiguous"):
        fm_ops()._gumbel_fill(torch.empty(4, 6).t(), 0, 0)


# ---------------------------------------------------------------------------------------------------------------
# _gate_fwd / _gate_bwd
# ---------------------------------------------------------------------------------------------------------------

GATE_SHAPES = [(1, 1), (7, 13), (31, 1), (5, 300)]


@pytest.mark.parametrize("estimator", list(ESTIMATOR_CODES))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gate_fwd_bwd_match_reference(estimator, training, inverse, dtype):
    gen = torch.Generator().manual_seed(1)
    cpp, kw = params(estimator, training=training, inverse=inverse)
    tol = gate_tol(dtype)
    for shape in GATE_SHAPES:
        logits = torch.randn(shape, generator=gen, dtype=dtype) * 3
        grad = torch.randn(shape, generator=gen, dtype=dtype)
        z = fm_ops()._gate_fwd(logits, *cpp)
        g = fm_ops()._gate_bwd(grad, logits, *cpp)
        z_ref = ref.gate_ref(logits, **kw)
        g_ref = ref.gate_backward_ref(grad, logits, **kw)
        clear = decision_clear(logits, kw)
        assert_close_where(z, z_ref, clear, tol, tol, f"gates {shape}")
        assert_close_where(g, g_ref, clear, tol, tol, f"grad_logits {shape}")
        if estimator in ("gumbel_sigmoid_st", "threshold_st", "bernoulli_st"):
            assert torch.equal(z[clear], z_ref[clear])  # hard decisions are exact away from the threshold


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gate_half_logits_compute_in_float32(dtype):
    logits = (torch.randn(9, 11) * 3).to(dtype)
    cpp, kw = params("hard_concrete")
    z = fm_ops()._gate_fwd(logits, *cpp)
    assert z.dtype == torch.float32
    assert_close_where(z, ref.gate_ref(logits, **kw), torch.ones_like(z, dtype=torch.bool), 1e-6, 1e-6, "gates")
    grad = torch.randn(9, 11).to(dtype)
    g = fm_ops()._gate_bwd(grad, logits, *cpp)
    clear = decision_clear(logits.float(), kw)
    assert_close_where(g, ref.gate_backward_ref(grad, logits, **kw), clear, 1e-6, 1e-6, "grad_logits")


def test_gate_noncontiguous_logits():
    logits = torch.randn(40, 30).t() * 3
    cpp, _ = params("hard_concrete")
    assert torch.equal(fm_ops()._gate_fwd(logits, *cpp), fm_ops()._gate_fwd(logits.contiguous(), *cpp))


def test_instruction_set_paths_agree(isa):
    """AVX2 and AVX-512 paths run the same IEEE operations: equal bits; the portable path (no FMA) within tol."""
    logits = torch.randn(37, 301, generator=torch.Generator().manual_seed(2)) * 3
    for estimator in ESTIMATOR_CODES:
        cpp, _ = params(estimator)
        out = {}
        for path in (None, "avx2", "scalar"):
            isa(path)
            out[path] = (fm_ops()._gate_fwd(logits, *cpp), fm_ops()._gate_bwd(torch.ones_like(logits), logits, *cpp))
        for a, b in zip(out[None], out["avx2"]):
            assert torch.equal(a, b), estimator
        clear = decision_clear(logits, params(estimator)[1])
        for a, b in zip(out[None], out["scalar"]):
            assert_close_where(b, a, clear, 1e-6, 1e-6, f"scalar path {estimator}")
    # float16 rows: F16C conversions (AVX2 / AVX-512 paths) round like c10::Half (portable path).
    weight = torch.randn(37, 301).half()
    gates = torch.rand(37, 301)
    cpp, _ = params("threshold_st")  # gates exactly 0 / 1: isolates the conversions
    cpp_hc, _ = params("hard_concrete")
    res = {}
    for path in (None, "scalar"):
        isa(path)
        res[path] = (fm_ops()._masked_weight(weight, logits, 1, 1, *cpp),
                     fm_ops()._mask_grad(gates, weight, logits, 1, 1, *cpp_hc, True)[1])
    assert torch.equal(res[None][0], res["scalar"][0])
    assert_within_ulp(res[None][1], res["scalar"][1], torch.ones(37, 301, dtype=torch.bool), 1, "grad_weight fp16")


# ---------------------------------------------------------------------------------------------------------------
# _masked_weight
# ---------------------------------------------------------------------------------------------------------------

# (weight shape, block): per weight, partial edge blocks, output units (bw = C), input units (bh = R),
# wide blocks (bw >= 16, the broadcast path), a whole layer.
MASK_LAYOUTS = [
    ((1, 1), (1, 1)),
    ((7, 13), (1, 1)),
    ((31, 1), (1, 1)),
    ((37, 29), (8, 4)),
    ((37, 29), (1, 29)),
    ((37, 29), (37, 1)),
    ((37, 45), (3, 20)),
    ((37, 29), (37, 29)),
]
WEIGHT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _grid(shape, block):
    return (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))


def _expected_mask_clear(logits, kw, block, shape):
    return ref.expand_gates(decision_clear(logits, kw), block, shape)


def _check_weight_like(out, expected, clear, wdtype, ldtype, what):
    """float16 / bfloat16: within 1 ulp; else the gate's error (float32 gates unless the logits are float64)."""
    if wdtype in (torch.float16, torch.bfloat16):
        assert_within_ulp(out, expected, clear, 1, what)
    else:
        tol = 1e-12 if (wdtype == torch.float64 and ldtype == torch.float64) else 2e-6
        assert_close_where(out, expected, clear, tol, tol, what)


@pytest.mark.parametrize("wdtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("ldtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("estimator,inverse", [("hard_concrete", False), ("gumbel_sigmoid_st", True),
                                               ("bernoulli_st", False)])
def test_masked_weight_matches_reference(wdtype, ldtype, estimator, inverse):
    gen = torch.Generator().manual_seed(3)
    for shape, block in MASK_LAYOUTS:
        weight = torch.randn(shape, generator=gen).to(wdtype)
        logits = torch.randn(_grid(shape, block), generator=gen, dtype=ldtype) * 3
        cpp, kw = params(estimator, inverse=inverse, offset=2**32 - 100)
        out = fm_ops()._masked_weight(weight, logits, block[0], block[1], *cpp)
        expected = ref.masked_weight_ref(weight, logits, block, **kw)
        assert out.is_contiguous()
        clear = _expected_mask_clear(logits, kw, block, shape)
        _check_weight_like(out, expected, clear, wdtype, ldtype, f"{shape} block {block}")


def test_masked_weight_eval_threshold_exact():
    weight = torch.randn(37, 29)
    logits = torch.randn(5, 8) * 3
    for code, name in ((2, "threshold_st"), (0, "hard_concrete")):
        cpp, kw = params(name, training=False)
        out = fm_ops()._masked_weight(weight, logits, 8, 4, *cpp)
        expected = ref.masked_weight_ref(weight, logits, (8, 4), **kw)
        tol = 0 if name == "threshold_st" else 2e-6
        assert_close_where(out, expected, torch.ones_like(out, dtype=torch.bool), tol, tol, name)


def test_masked_weight_noncontiguous_and_empty():
    cpp, _ = params("hard_concrete")
    weight = torch.randn(29, 37).t()  # (37, 29), not contiguous
    logits = torch.randn(5, 8)[:, ::1]
    out = fm_ops()._masked_weight(weight, logits, 8, 4, *cpp)
    assert torch.equal(out, fm_ops()._masked_weight(weight.contiguous(), logits, 8, 4, *cpp))
    empty = fm_ops()._masked_weight(torch.empty(0, 5), torch.empty(0, 5), 1, 1, *cpp)
    assert empty.shape == (0, 5)


def test_masked_weight_per_weight_large_and_thread_count_independent():
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(300, 700, generator=gen)
    logits = torch.randn(300, 700, generator=gen) * 2
    cpp, kw = params("hard_concrete", seed=2**35 + 3, offset=2**32 - 100_000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fm_ops()._masked_weight(weight, logits, 1, 1, *cpp)
        torch.set_num_threads(max(2, threads))
        many = fm_ops()._masked_weight(weight, logits, 1, 1, *cpp)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    _check_weight_like(many, ref.masked_weight_ref(weight, logits, (1, 1), **kw),
                       torch.ones_like(many, dtype=torch.bool), torch.float32, torch.float32, "per-weight")


def test_masked_weight_rejects_bad_inputs():
    cpp, _ = params("hard_concrete")
    ops = fm_ops()
    with pytest.raises(RuntimeError, match=r"logits must be a 2-D grid of shape \[3, 5\] for weight \[6, 10\] "
                                           r"with block \(2, 2\), got \[3, 4\]"):
        ops._masked_weight(torch.randn(6, 10), torch.randn(3, 4), 2, 2, *cpp)
    with pytest.raises(RuntimeError, match="weight must be 2-D"):
        ops._masked_weight(torch.randn(6), torch.randn(6, 1), 1, 1, *cpp)
    with pytest.raises(RuntimeError, match="weight must be float32, float64, float16 or bfloat16"):
        ops._masked_weight(torch.ones(6, 10, dtype=torch.int32), torch.randn(6, 10), 1, 1, *cpp)
    with pytest.raises(RuntimeError, match=r"block \(bh, bw\) must be positive, got \(0, 2\)"):
        ops._masked_weight(torch.randn(6, 10), torch.randn(3, 5), 0, 2, *cpp)
    with pytest.raises(RuntimeError, match="logits must be a floating-point tensor"):
        ops._masked_weight(torch.randn(6, 10), torch.ones(6, 10, dtype=torch.int64), 1, 1, *cpp)
    bad = (7,) + cpp[1:]
    with pytest.raises(RuntimeError, match=r"estimator must be an integer code in \[0, 3\]"):
        ops._masked_weight(torch.randn(6, 10), torch.randn(6, 10), 1, 1, *bad)


# ---------------------------------------------------------------------------------------------------------------
# _mask_grad
# ---------------------------------------------------------------------------------------------------------------


def _mask_grad_ref(grad_wm, weight, logits, block, kw, needs_weight_grad):
    """grad_logits (compute dtype) and grad_weight as fastmask.ref.masked_linear_backward_ref computes them."""
    gates = ref.gate_ref(logits, **kw)
    up = weight.double() if weight.dtype == torch.float64 else weight.float()
    per_weight = (grad_wm * up).to(gates.dtype)
    grad_gates = ref.reduce_to_grid(per_weight, block, logits.shape)
    grad_logits = ref.gate_backward_ref(grad_gates, logits, **kw)
    abs_sum = ref.reduce_to_grid(per_weight.abs(), block, logits.shape)  # scale of the rounding of the sums
    grad_weight = None
    if needs_weight_grad:
        mask = ref.expand_gates(gates, block, weight.shape)
        grad_weight = (grad_wm * mask.to(grad_wm.dtype)).to(weight.dtype)
    return grad_logits, grad_weight, abs_sum


@pytest.mark.parametrize("wdtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("ldtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("estimator,training,inverse", [("hard_concrete", True, False), ("hard_concrete", False, True),
                                                        ("gumbel_sigmoid_st", True, True),
                                                        ("threshold_st", True, False), ("bernoulli_st", True, False)])
def test_mask_grad_matches_reference(wdtype, ldtype, estimator, training, inverse):
    gen = torch.Generator().manual_seed(5)
    acc = torch.float64 if wdtype == torch.float64 else torch.float32
    for shape, block in MASK_LAYOUTS:
        weight = torch.randn(shape, generator=gen).to(wdtype)
        logits = torch.randn(_grid(shape, block), generator=gen, dtype=ldtype) * 3
        grad_wm = torch.randn(shape, generator=gen, dtype=acc)
        cpp, kw = params(estimator, training=training, inverse=inverse)
        gl, gw = fm_ops()._mask_grad(grad_wm, weight, logits, block[0], block[1], *cpp, True)
        gl_ref, gw_ref, abs_sum = _mask_grad_ref(grad_wm, weight, logits, block, kw, True)
        clear = decision_clear(logits, kw)
        assert gl.dtype == ref.compute_dtype(logits) and gl.shape == logits.shape
        # The block sums round differently from torch's: allow a few ulps of the sum of |terms|.
        if gl.dtype == torch.float64:
            atol = 1e-12 * (abs_sum + 1)
        else:
            atol = 1e-6 * (abs_sum + 1)  # slope error (~1e-7) times the block sum, plus the sum's rounding
        a, e = gl[clear].double(), gl_ref[clear].double()
        assert ((a - e).abs() <= atol[clear].double()).all(), f"grad_logits {shape} block {block}"
        _check_weight_like(gw, gw_ref, _expected_mask_clear(logits, kw, block, shape), wdtype, ldtype,
                           f"grad_weight {shape} block {block}")
        gl2, gw2 = fm_ops()._mask_grad(grad_wm, weight, logits, block[0], block[1], *cpp, False)
        assert torch.equal(gl2, gl)
        assert gw2.numel() == 0 and gw2.dtype == wdtype


@pytest.mark.parametrize("wdtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("ldtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("estimator,training", [("hard_concrete", True), ("gumbel_sigmoid_st", True),
                                                ("hard_concrete", False)])
def test_mask_grad_masked_weight_is_both_ops_in_one_pass(wdtype, ldtype, estimator, training):
    """_mask_grad_masked_weight == (_mask_grad, _masked_weight) bit for bit, for every layout and dtype."""
    gen = torch.Generator().manual_seed(15)
    acc = torch.float64 if wdtype == torch.float64 else torch.float32
    for shape, block in MASK_LAYOUTS:
        weight = torch.randn(shape, generator=gen).to(wdtype)
        logits = torch.randn(_grid(shape, block), generator=gen, dtype=ldtype) * 3
        grad_wm = torch.randn(shape, generator=gen, dtype=acc)
        cpp, _ = params(estimator, training=training)
        for needs_weight_grad in (True, False):
            gl, gw, wm = fm_ops()._mask_grad_masked_weight(grad_wm, weight, logits, block[0], block[1], *cpp,
                                                           needs_weight_grad)
            gl_want, gw_want = fm_ops()._mask_grad(grad_wm, weight, logits, block[0], block[1], *cpp,
                                                   needs_weight_grad)
            wm_want = fm_ops()._masked_weight(weight, logits, block[0], block[1], *cpp)
            assert torch.equal(gl, gl_want) and torch.equal(gw, gw_want), f"{shape} block {block}"
            assert wm.dtype == wdtype and torch.equal(wm, wm_want), f"masked weight {shape} block {block}"


def test_mask_grad_per_weight_is_elementwise_exact():
    """bh = bw = 1: grad_logits = slope * (grad_wm * W) per element, no summation order involved."""
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(64, 97, generator=gen, dtype=torch.float64)
    logits = torch.randn(64, 97, generator=gen, dtype=torch.float64) * 3
    grad_wm = torch.randn(64, 97, generator=gen, dtype=torch.float64)
    cpp, kw = params("hard_concrete")
    gl, _ = fm_ops()._mask_grad(grad_wm, weight, logits, 1, 1, *cpp, False)
    gl_ref, _, _ = _mask_grad_ref(grad_wm, weight, logits, (1, 1), kw, False)
    clear = decision_clear(logits, kw)
    assert_close_where(gl, gl_ref, clear, 1e-12, 1e-12, "grad_logits")


@pytest.mark.parametrize("shape,block", [((37, 29), (37, 1)), ((37, 29), (8, 4)), ((37, 29), (37, 29)),
                                         ((200, 300), (1, 1)), ((64, 300), (64, 20))])
def test_mask_grad_does_not_depend_on_thread_count(shape, block):
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(shape, generator=gen)
    logits = torch.randn(_grid(shape, block), generator=gen)
    grad_wm = torch.randn(shape, generator=gen)
    cpp, _ = params("hard_concrete")
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(fm_ops()._mask_grad(grad_wm, weight, logits, block[0], block[1], *cpp, True))
    finally:
        torch.set_num_threads(threads)
    for gl, gw in results[1:]:
        assert torch.equal(gl, results[0][0]) and torch.equal(gw, results[0][1])


def test_mask_grad_rejects_bad_inputs():
    cpp, _ = params("hard_concrete")
    ops = fm_ops()
    with pytest.raises(RuntimeError, match=r"grad_wm must have the shape of weight \[6, 10\], got \[6, 9\]"):
        ops._mask_grad(torch.randn(6, 9), torch.randn(6, 10), torch.randn(6, 10), 1, 1, *cpp, False)
    with pytest.raises(RuntimeError, match=r"logits must be a 2-D grid of shape \[2, 10\]"):
        ops._mask_grad(torch.randn(6, 10), torch.randn(6, 10), torch.randn(6, 10), 3, 1, *cpp, False)
    with pytest.raises(RuntimeError, match="grad_gates must have the shape of logits"):
        ops._gate_bwd(torch.randn(3), torch.randn(4), *cpp)
