"""fastmask::nm_masked_linear (learned N:M masks): the reference against an autograd oracle, exact N:M in eval, the
sampled patterns' statistics, backends bit for bit, float64 gradcheck, opcheck, torch.compile, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastmask as fm
from fastmask import ref
from fastmask.ops.nm import _fused_cpu, nm_mask, nm_masked_linear

from conftest import assert_within_pytorch_error, backends_for

NM_CASES = [(2, 4), (1, 4), (4, 8), (2, 5), (1, 2)]


def _inputs(out_f, in_f, m, n, dtype=torch.float32, layout="out_in", tokens=(3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, in_f, generator=g).to(dtype)
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    w = w if layout == "out_in" else w.t().contiguous()
    logits = torch.randn(out_f, in_f // m, math.comb(m, n), generator=g)
    bias = torch.randn(out_f, generator=g).to(dtype)
    return x, w, logits, bias


def _oracle(x, w, logits, bias, n, m, layout, training, hard, temperature, scale, seed, offset):
    """Autograd through torch ops (float64): Gumbel-softmax over the patterns, straight-through for hard masks."""
    l = logits.double()
    patterns = ref.nm_patterns(n, m, torch.float64)
    z = scale * l
    if training:
        u = ref.uniform_ref(l.shape, seed, offset).clamp(ref.UNIFORM_EPS, 1 - ref.UNIFORM_EPS).double()
        z = z - torch.log(-torch.log(u))
    y = torch.softmax(z / temperature, -1)
    soft = y @ patterns
    if hard or not training:
        pick = (z if training else l).argmax(-1)
        soft = patterns[pick] + soft - soft.detach()
    mask = soft.reshape(l.shape[0], -1)
    w_oi = (w if layout == "out_in" else w.t()).double()
    return F.linear(x.double(), w_oi * mask, None if bias is None else bias.double())


def test_patterns():
    for n, m in NM_CASES + [(4, 8), (3, 8)]:
        p = ref.nm_patterns(n, m)
        assert p.shape == (math.comb(m, n), m)
        assert (p.sum(1) == n).all()
        assert len({tuple(r.tolist()) for r in p}) == p.shape[0]
    assert ref.nm_patterns(2, 4)[0].tolist() == [1, 1, 0, 0] and ref.nm_patterns(2, 4)[-1].tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("n,m", NM_CASES)
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("training,hard", [(True, True), (True, False), (False, True)])
def test_forward_backward_against_autograd_oracle(n, m, layout, training, hard):
    out_f, in_f = 7, 3 * m
    x, w, logits, bias = _inputs(out_f, in_f, m, n, torch.float64, layout)
    kw = dict(n=n, m=m, seed=11, offset=5, training=training, hard=hard, temperature=0.7, scale=1.5)
    xs, ls, bs = (t.clone().requires_grad_(True) for t in (x, logits.double(), bias))
    y = nm_masked_linear(xs, w, ls, bs, weight_layout=layout, **kw)
    xo, lo, bo = (t.clone().requires_grad_(True) for t in (x, logits.double(), bias))
    yo = _oracle(xo, w, lo, bo, n, m, layout, training, hard, 0.7, 1.5, 11, 5)
    torch.testing.assert_close(y, yo, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    y.backward(dy)
    yo.backward(dy)
    for got, want in ((xs.grad, xo.grad), (ls.grad, lo.grad), (bs.grad, bo.grad)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 4), (13, 28), (5, 68)])
def test_dtypes_odd_shapes_noncontiguous(dtype, shape):
    out_f, in_f = shape
    x, w, logits, bias = _inputs(out_f, in_f, 4, 2, dtype, tokens=(6,), seed=3)
    x_nc = torch.randn(in_f, 6).to(dtype).t()  # non-contiguous input
    for xi in (x, x_nc):
        kw = dict(seed=2, offset=0, training=True, hard=True)
        y = nm_masked_linear(xi, w, logits, bias, **kw)
        oracle = ref.nm_masked_linear_ref(xi.double(), w.double(), logits, bias.double(), n=2, m=4, **kw)
        pytorch = ref.nm_masked_linear_ref(xi, w, logits, bias, n=2, m=4, **kw)
        assert_within_pytorch_error(y, oracle, pytorch, f"nm forward {dtype}")


@pytest.mark.parametrize("n,m", NM_CASES)
def test_eval_mask_is_exactly_n_of_m(n, m):
    x, w, logits, _ = _inputs(9, 4 * m, m, n)
    mask = nm_mask(logits, n=n, m=m)
    assert ((mask.reshape(9, 4, m)).sum(-1) == n).all()
    picked = ref.nm_patterns(n, m)[logits.argmax(-1)].reshape(9, -1)
    assert torch.equal(mask, picked)
    # a hard training mask is exactly N:M as well, whatever the noise
    hard = nm_mask(logits, n=n, m=m, training=True, seed=4)
    assert ((hard.reshape(9, 4, m)).sum(-1) == n).all()
    y = nm_masked_linear(x, w, logits, training=False, n=n, m=m)
    torch.testing.assert_close(y, F.linear(x, w * mask))


def test_sampled_pattern_frequencies():
    """Gumbel-max: with temperature 1 and scale s, pattern c is drawn with probability softmax(s * l)_c."""
    groups, c = 6000, 6
    l = torch.tensor([0.5, -1.0, 0.0, 1.2, -0.3, 0.2])
    logits = l.expand(1, groups, c).contiguous()
    for scale in (1.0, 0.5):
        probs = torch.softmax(scale * l, 0)
        mask = nm_mask(logits, n=2, m=4, training=True, seed=7, offset=123, scale=scale).reshape(groups, 4)
        pick = (mask[:, None, :] == ref.nm_patterns(2, 4)).all(-1).float().argmax(-1)
        counts = torch.bincount(pick, minlength=c).float()
        sd = (groups * probs * (1 - probs)).sqrt()
        assert ((counts - groups * probs).abs() <= 4.5 * sd).all(), (counts, groups * probs)


def test_noise_contract():
    _, w, logits, _ = _inputs(6, 16, 4, 2)
    kw = dict(n=2, m=4, training=True, hard=True)
    a = nm_mask(logits, seed=5, offset=10, **kw)
    assert torch.equal(a, nm_mask(logits, seed=5, offset=10, **kw))
    assert not torch.equal(a, nm_mask(logits, seed=5, offset=10 + logits.numel(), **kw))
    # logit j draws uniform(seed, offset + j): the ref with explicit noise agrees
    u = ref.uniform_ref(logits.shape, 5, 10).clamp(ref.UNIFORM_EPS, 1 - ref.UNIFORM_EPS)
    z = logits - torch.log(-torch.log(u))
    assert torch.equal(a, ref.nm_patterns(2, 4)[z.argmax(-1)].reshape(6, -1))


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_backends_bit_identical(backend):
    if backend == "triton":
        pytest.skip("no Triton N:M kernel: the Triton backend runs the reference composition")
    x, w, logits, bias = _inputs(10, 24, 4, 2, tokens=(7,))
    kw = dict(seed=9, offset=3, training=True, hard=True, temperature=0.5, scale=2.0)
    outs = []
    for name in ("reference", backend):
        with fm.use_backend(name):
            ls = logits.clone().requires_grad_(True)
            y = nm_masked_linear(x, w, ls, bias, **kw)
            y.sum().backward()
            outs.append((y.detach(), ls.grad))
    assert torch.equal(outs[0][0], outs[1][0])  # the same noise picks the same patterns
    # gradients within float32 rounding of the largest one (the softmax Jacobian cancels terms)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-5 * outs[0][1].abs().max().item())


def test_fused_cpu_kernel_flag_follows_backend():
    with fm.use_backend("reference"):
        assert not _fused_cpu(torch.device("cpu"))


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_gradcheck_float64(layout):
    x, w, logits, bias = _inputs(5, 8, 4, 2, torch.float64, layout, tokens=(3,))
    w = w.requires_grad_(True)
    args = (x.requires_grad_(True), w, logits.double().requires_grad_(True), bias.requires_grad_(True))
    kw = dict(seed=1, offset=0, training=True, hard=False, temperature=0.9, scale=1.3, weight_layout=layout)
    assert torch.autograd.gradcheck(lambda *a: nm_masked_linear(*a, **kw), args)
    # hard masks: the output is piecewise constant in the logits, so check x, W and bias only
    kw["hard"] = True
    assert torch.autograd.gradcheck(lambda xx, ww, bb: nm_masked_linear(xx, ww, args[2].detach(), bb, **kw),
                                    (args[0], w, args[3]))


def _op_args(requires_grad=True):
    x, w, logits, bias = _inputs(6, 12, 4, 2, tokens=(4,))
    return (x.requires_grad_(requires_grad), w, logits.requires_grad_(requires_grad), bias, 2, 4, 3, 7, True, True,
            0.8, 1.5, "out_in")


def test_opcheck():
    torch.library.opcheck(torch.ops.fastmask.nm_masked_linear.default, _op_args())
    x, w, logits, bias, *scalars = _op_args(False)
    grad = torch.randn(4, 6)
    torch.library.opcheck(torch.ops.fastmask.nm_masked_linear_backward.default,
                          (grad, x, w, logits, True, *scalars, True, False))


def test_compile_fullgraph():
    x, w, logits, bias = _inputs(6, 12, 4, 2, tokens=(4,))

    def step(x, logits, offset: int, training: bool):
        return nm_masked_linear(x, w, logits, bias, seed=3, offset=offset, training=training, temperature=0.8)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for training in (True, False):
        l1, l2 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        y1, y2 = step(x, l1, 12, training), compiled(x, l2, 12, training)
        torch.testing.assert_close(y1, y2)
        y1.square().sum().backward()
        y2.square().sum().backward()
        torch.testing.assert_close(l1.grad, l2.grad)


def test_bad_input():
    x, w, logits, bias = _inputs(6, 12, 4, 2)
    with pytest.raises(ValueError, match="n must be"):
        nm_masked_linear(x, w, logits, n=4, m=4)
    with pytest.raises(ValueError, match="m must be"):
        nm_masked_linear(x, w, logits, n=2, m=9)
    with pytest.raises(ValueError, match="logits must have shape"):
        nm_masked_linear(x, w, logits[:, :, :5])
    with pytest.raises(ValueError, match="multiple of m=4"):
        nm_masked_linear(torch.randn(2, 10), torch.randn(6, 10), logits)
    with pytest.raises(ValueError, match="temperature"):
        nm_masked_linear(x, w, logits, temperature=0.0)
    with pytest.raises(ValueError, match="scale"):
        nm_masked_linear(x, w, logits, scale=-1.0)
    with pytest.raises(TypeError, match="hard must be a bool"):
        nm_masked_linear(x, w, logits, hard="yes")
    with pytest.raises(TypeError, match="same dtype"):
        nm_masked_linear(x.double(), w, logits)
    with pytest.raises(ValueError, match="weight_layout"):
        nm_masked_linear(x, w, logits, weight_layout="io")
    bad = logits.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        nm_masked_linear(x, w, bad)
    with pytest.raises(ValueError, match="logits must be"):
        nm_mask(logits[0])


_FUSED = "cpu" in backends_for("cpu") and fm.ops.nm._extension_has_nm_kernels()


@pytest.mark.skipif(not _FUSED, reason="fastmask._C built without csrc/cpu/nm_kernels.cpp")
@pytest.mark.parametrize("isa", ["avx2", "scalar"])
@pytest.mark.parametrize("hard", [True, False])
def test_fused_cpu_kernel_on_every_instruction_set(monkeypatch, isa, hard):
    """The float32 training backward (vectorised exps) and the noise on the capped instruction-set paths: the same
    picks and, within rounding, the same logits gradient as the torch composition (the detected path: the test
    below)."""
    from fastmask.ops import nm as nm_module

    monkeypatch.setenv("FASTMASK_CPU_ISA", isa)
    x, w, logits, bias = _inputs(13, 40, 4, 2, torch.float32, "out_in", tokens=(9,), seed=3)
    kw = dict(n=2, m=4, seed=2, offset=5, training=True, hard=hard, temperature=0.7, scale=1.3)
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(nm_module, "_fused_cpu", lambda device: False)
        with fm.use_backend("cpu"):
            ls = logits.float().clone().requires_grad_(True)
            y = nm_masked_linear(x, w, ls, bias, **kw)
            y.square().sum().backward()
            results.append((y.detach(), ls.grad))
    (y1, gl1), (y2, gl2) = results
    torch.testing.assert_close(y1, y2, rtol=0 if hard else 1e-5, atol=0 if hard else 1e-5)
    torch.testing.assert_close(gl1, gl2, rtol=1e-5, atol=1e-5 * gl2.abs().max().item())


@pytest.mark.skipif(not _FUSED, reason="fastmask._C built without csrc/cpu/nm_kernels.cpp")
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (2, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("training,hard", [(True, True), (True, False), (False, True)])
def test_fused_cpu_kernel_matches_the_composition(monkeypatch, n, m, dtype, layout, training, hard):
    """The C++ kernels sample the same patterns from the same noise (hard / eval: identical outputs and masks; the
    scores are the reference's bit for bit), and their logits gradient agrees with the torch composition within
    rounding (per-pattern sums in another order)."""
    from fastmask.ops import nm as nm_module

    x, w, logits, bias = _inputs(11, 5 * m, m, n, dtype, layout, tokens=(9,), seed=m)
    logits = logits.to(torch.float64 if dtype == torch.float64 else torch.float32)
    kw = dict(n=n, m=m, seed=4, offset=17, training=training, hard=hard, temperature=0.6, scale=1.7,
              weight_layout=layout)
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(nm_module, "_fused_cpu", lambda device: False)
        with fm.use_backend("cpu"):
            assert nm_module._fused_cpu(torch.device("cpu")) == fused
            ls, xs = logits.clone().requires_grad_(True), x.clone().requires_grad_(True)
            y = nm_masked_linear(xs, w, ls, bias, **kw)
            y.float().square().sum().backward()
            results.append((y.detach(), ls.grad, xs.grad))
    (y1, gl1, gx1), (y2, gl2, gx2) = results
    if hard or not training:
        assert torch.equal(y1, y2) and torch.equal(gx1, gx2)
    else:  # soft masks: C(m, n) patterns summed in another order (70 for 4:8), so the bound scales with the values
        for fused_out, composed in ((y1, y2), (gx1, gx2)):
            torch.testing.assert_close(fused_out, composed, rtol=1.3e-6, atol=1e-5 * composed.abs().max().item())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(gl1, gl2, rtol=tol, atol=tol * gl2.abs().max().item())


@pytest.mark.parametrize("hard", [True, False])
def test_learning_recovers_a_planted_mask(hard):
    """Adam on the logits through the estimator finds the 2:4 mask that generated the targets."""
    from fastmask.nm_priors import nm_mask_from_scores

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(16, 32, generator=g), torch.randn(256, 32, generator=g)
    planted = nm_mask_from_scores(torch.rand(16, 32, generator=g))
    target = x @ (w * planted).t()
    logits = torch.zeros(16, 8, 6, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    for step in range(300):
        y = nm_masked_linear(x, w, logits, seed=1, offset=step * logits.numel(), hard=hard)
        loss = (y - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    agreement = (nm_mask(logits.detach()) == planted).float().mean().item()
    assert agreement >= 0.95, agreement
    start = (x @ (w * nm_mask(torch.zeros(16, 8, 6))).t() - target).pow(2).mean()
    final = (x @ (w * nm_mask(logits.detach())).t() - target).pow(2).mean()
    assert final < 0.1 * start
