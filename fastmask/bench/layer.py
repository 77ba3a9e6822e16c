"""The layer grid: one masked linear layer, forward+backward (or an eval forward), against its limits.

Per (shape, tokens, case), every method is timed in the same process, right after the dense step it is compared
with (``ratio_to_dense``):

  dense            F.linear with a trainable weight, forward+backward: the 3 GEMMs (y, dx, dW) of a fine-tuning
                   step, the lower bound of a masked layer (eval cases: the dense forward).
  naive            what users write: hard-concrete gates from torch ops (torch.rand noise), ``W * z``, autograd.
  naive_compiled   torch.compile of ``naive`` (the cases in ``compile_cases``; one compilation per case function,
                   dynamic shapes after the first recompile).
  torch_bsr        eval case only: the merged weight as torch's block-sparse BSR tensor (64 x 64 blocks).
  <backend>        fastmask.ops.masked_linear on that backend ("triton", "cuda", "cpu", "reference"), each
                   checked against the reference backend on the same noise before it is timed: noise bit-identical,
                   and the relative errors of y, dx and d(logits) within CHECK_TOL of the dtype.

Cases: "weight" (per-weight gates), "unit_out" / "unit_in" (one gate per output / input unit), "head" (one gate
per ``head_dim`` input units of an n_embd x n_embd attention output projection), "sparse90" (a converged
per-weight mask: gates exactly 0 on 90% of the ``sparse_block`` x ``sparse_block`` blocks, exactly 1 elsewhere)
and "eval_sparse90" (that mask in eval mode, forward only: the subnetwork deployed).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from .timing import measure

CASES = ("weight", "unit_out", "unit_in", "head", "sparse90", "eval_sparse90")
EVAL_CASES = ("eval_sparse90",)
SPARSE_ZERO_FRACTION = 0.9
SATURATED_LOGIT = 30.0  # |logit| at which hard-concrete training gates are exactly 0 or 1 whatever the noise
INIT_LOGIT = 1.0  # dense cases: P(z != 0) ~ 0.93, so most gates are stochastic (the costly regime)
# Relative error (max |a - b| / max |b|) a fused backend may show against the reference backend, per dtype.
CHECK_TOL = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 5e-3, torch.float64: 1e-9}


@dataclass(frozen=True)
class Grid:
    """Which layers to time: tokens x (in_features, out_features), the head size and sparse block size."""

    tokens: tuple
    shapes: tuple
    dtype: torch.dtype
    head_dim: int = 64
    sparse_block: int = 64
    cpu_rounds: Optional[int] = None  # timed calls per method on CPUs (None: adaptive, see timing.measure)


# The grid (GPT-2 small and XL MLP up-projections), the CPU comparison and the smoke check.
GPU_GRID = Grid(tokens=(512, 4096, 16384), shapes=((768, 3072), (1600, 6400)), dtype=torch.bfloat16)
CPU_GRID = Grid(tokens=(128,), shapes=((768, 3072),), dtype=torch.float32)
SMOKE_GRID = Grid(tokens=(16,), shapes=((64, 96),), dtype=torch.float32, head_dim=16, sparse_block=16,
                  cpu_rounds=3)


def default_grid(device_type: str, smoke: bool) -> Grid:
    return SMOKE_GRID if smoke else (GPU_GRID if device_type == "cuda" else CPU_GRID)


def default_backends(device_type: str) -> tuple:
    """The fused backends timed by default: the two that compete on GPUs; the extension and the oracle on CPUs."""
    return ("triton", "cuda") if device_type == "cuda" else ("cpu", "reference")


@dataclass
class Problem:
    """The tensors of one timed layer: x (tokens, in), weight (out, in), logits (the gate grid), grad_out."""

    case: str
    tokens: int
    in_features: int
    out_features: int
    dtype: torch.dtype
    device: str
    block: tuple  # the gate block of the logits grid (masked_linear's ``block``)
    pattern_block: Optional[int] = None  # sparse cases: the size of the zero blocks
    x: torch.Tensor = field(default=None, repr=False)
    weight: torch.Tensor = field(default=None, repr=False)
    logits: torch.Tensor = field(default=None, repr=False)
    grad_out: torch.Tensor = field(default=None, repr=False)

    @property
    def training(self) -> bool:
        return self.case not in EVAL_CASES

    @property
    def op(self) -> str:
        return "masked_linear_fwd_bwd" if self.training else "masked_linear_eval_fwd"


def sparse_logits(rows: int, cols: int, block: int, zero_fraction: float, seed: int = 0) -> torch.Tensor:
    """Per-weight logits of a converged block mask: -SATURATED_LOGIT on ``zero_fraction`` of the block x block
    tiles (chosen at random, a fixed count), +SATURATED_LOGIT elsewhere."""
    from ..ref import expand_gates

    grid = (math.ceil(rows / block), math.ceil(cols / block))
    n_blocks = grid[0] * grid[1]
    n_kept = max(1, round(n_blocks * (1 - zero_fraction)))
    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed))
    blocks = torch.full((n_blocks,), -SATURATED_LOGIT)
    blocks[order[:n_kept]] = SATURATED_LOGIT
    return expand_gates(blocks.reshape(grid), (block, block), (rows, cols)).contiguous()


def make_problem(case: str, tokens: int, in_features: int, out_features: int, dtype: torch.dtype, device: str,
                 head_dim: int = 64, sparse_block: int = 64, seed: int = 0) -> Problem:
    """The inputs of one case; "head" replaces the shape by the attention output projection (in, in)."""
    if case not in CASES:
        raise ValueError(f"fastmask bench: case must be one of {CASES}, got {case!r}")
    if case == "head":
        out_features = in_features
        if in_features % head_dim:
            raise ValueError(f"fastmask bench: head_dim={head_dim} must divide in_features={in_features}")
    rows, cols = out_features, in_features
    pattern = None
    if case in ("weight", "sparse90", "eval_sparse90"):
        grid, block = (rows, cols), (1, 1)
    elif case == "unit_out":
        grid, block = (rows, 1), (1, cols)
    elif case == "unit_in":
        grid, block = (1, cols), (rows, 1)
    else:  # head: gates over groups of head_dim input units (the columns of the (out, in) weight)
        grid, block = (1, cols // head_dim), (rows, head_dim)
    gen = torch.Generator().manual_seed(seed)
    if case in ("sparse90", "eval_sparse90"):
        pattern = sparse_block
        logits = sparse_logits(rows, cols, sparse_block, SPARSE_ZERO_FRACTION, seed)
    else:
        logits = torch.full(grid, INIT_LOGIT) + 0.5 * torch.randn(grid, generator=gen)
    x = torch.randn(tokens, in_features, generator=gen)
    weight = torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5
    grad_out = torch.randn(tokens, out_features, generator=gen)
    training = case not in EVAL_CASES
    return Problem(case, tokens, in_features, out_features, dtype, device, block, pattern,
                   x=x.to(device, dtype).requires_grad_(training), weight=weight.to(device, dtype),
                   logits=logits.to(device).requires_grad_(training), grad_out=grad_out.to(device, dtype))


# ------------------------------------------------------------------------------------------------ methods --

def naive_mask(z: torch.Tensor, block: tuple, weight_shape: tuple) -> torch.Tensor:
    """A gate grid as users apply it: broadcast along axes with one gate, repeat_interleave along grouped ones."""
    for axis, (size, b) in enumerate(zip(weight_shape, block)):
        if z.shape[axis] > 1 and b > 1:
            z = z.repeat_interleave(b, dim=axis).narrow(axis, 0, size)
    return z


def naive_masked_linear(x, weight, logits, block, training=True, noise=None):
    """The hand-written masked linear: hard concrete with torch ops, ``F.linear(x, W * z)``, autograd."""
    from .. import ref

    z = ref.hard_concrete_naive(logits, noise=noise) if training else ref.gate_ref(logits, training=False)
    return F.linear(x, weight * naive_mask(z, block, weight.shape).to(weight.dtype))


def _backward(y: torch.Tensor, grad_out: torch.Tensor) -> None:
    y.backward(grad_out)


def method_fn(p: Problem, method: str, compiled: Optional[Callable] = None) -> tuple[Callable, list]:
    """(fn, tensors whose .grad is reset between calls) of one method on a problem."""
    import fastmask as fm

    if method == "dense":
        if not p.training:
            return (lambda: F.linear(p.x, p.weight)), []
        w = p.weight.clone().requires_grad_()
        return (lambda: _backward(F.linear(p.x, w), p.grad_out)), [p.x, w]
    if method in ("naive", "naive_compiled"):
        step = compiled if method == "naive_compiled" else naive_masked_linear
        if step is None:
            raise ValueError("method_fn: naive_compiled needs the compiled function")
        if not p.training:
            return (lambda: step(p.x, p.weight, p.logits, p.block, False)), []
        return (lambda: _backward(step(p.x, p.weight, p.logits, p.block), p.grad_out)), [p.x, p.logits]
    if method == "torch_bsr":
        if p.training:
            raise ValueError("method_fn: torch_bsr is an eval-forward method")
        merged = merged_weight(p)
        bsr = merged.to_sparse_bsr((p.pattern_block, p.pattern_block))
        return (lambda: F.linear(p.x, bsr)), []
    from ..ops import BACKENDS

    if method not in BACKENDS:
        raise ValueError(f"method_fn: method must be dense, naive, naive_compiled, torch_bsr or a backend "
                         f"{BACKENDS}, got {method!r}")
    counter = itertools.count(1)

    def fused():
        # A fresh noise position every call, as in training (eval gates ignore it). Runs inside
        # method_backend(method): switching backends per call would add Python overhead to the timing.
        y = fm.ops.masked_linear(p.x, p.weight, p.logits, block=p.block, seed=0,
                                 offset=next(counter) * p.logits.numel(), training=p.training)
        if p.training:
            y.backward(p.grad_out)
        return y

    return fused, ([p.x, p.logits] if p.training else [])


def method_backend(method: str):
    """The context a method runs in: fastmask.use_backend(method) for a fused backend, else nothing."""
    import contextlib

    import fastmask as fm
    from ..ops import BACKENDS

    return fm.use_backend(method) if method in BACKENDS else contextlib.nullcontext()


def merged_weight(p: Problem) -> torch.Tensor:
    """W * m with the eval-mode gates (what fastmask.merge writes into a deployed model)."""
    from .. import ref

    return ref.masked_weight_ref(p.weight, p.logits.detach(), p.block, training=False)


def _rel_err(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> float:
    if a is None or b is None:
        return float("nan")
    scale = b.double().abs().max().item()
    return (a.double() - b.double()).abs().max().item() / max(scale, 1e-30)


def check_backend(p: Problem, backend: str) -> dict:
    """Compare one fused backend with the reference backend on the same noise: the noise bits, y, dx, dlogits."""
    import fastmask as fm

    seed, offset = 1234, 7 * p.logits.numel()

    def run(name):
        x = p.x.detach().clone().requires_grad_(p.training)
        logits = p.logits.detach().clone().requires_grad_(p.training)
        with fm.use_backend(name):
            noise = fm.ops.uniform(tuple(p.logits.shape), seed=seed, offset=offset, device=p.device)
            y = fm.ops.masked_linear(x, p.weight, logits, block=p.block, seed=seed, offset=offset,
                                     training=p.training)
            if p.training:
                y.backward(p.grad_out)
        return noise, y.detach(), x.grad, logits.grad

    got, want = run(backend), run("reference")
    errors = {"y_rel_err": _rel_err(got[1], want[1]), "dx_rel_err": _rel_err(got[2], want[2]),
              "dlogits_rel_err": _rel_err(got[3], want[3])}
    tol = CHECK_TOL.get(p.dtype, 3e-2)
    identical = bool(torch.equal(got[0], want[0]))
    ok = identical and all(not (err > tol) for err in errors.values())  # nan (no gradient) passes
    return {"noise_identical": int(identical), **{k: f"{v:.2e}" for k, v in errors.items()},
            "check": "ok" if ok else f"FAIL (tol {tol:g})"}


# -------------------------------------------------------------------------------------------------- runner --

def methods_for(p: Problem, backends: Iterable[str], compile_cases: Iterable[str]) -> list[str]:
    """The methods timed on a problem, dense first (the others' ratios divide by it)."""
    methods = ["dense", "naive"]
    if p.case in compile_cases:
        methods.append("naive_compiled")
    if not p.training and p.device == "cuda":
        methods.append("torch_bsr")  # CPU BSR matmul is not what anyone deploys on
    return methods + list(backends)


def available_backends(backends: Iterable[str], device_type: str) -> tuple[list, dict]:
    """(usable backends, {unusable backend: why})."""
    from ..ops import _backend

    usable, skipped = [], {}
    for name in backends:
        ok, why = _backend.availability(name, device_type)
        if ok:
            usable.append(name)
        else:
            skipped[name] = why
    return usable, skipped


@dataclass
class Outcome:
    """What timing one method gave: its Timing (None when it failed), a status, and check columns."""

    timing: Optional[object] = None
    status: str = "ok"
    extra: dict = field(default_factory=dict)


def problem_rows(env: dict, p: Problem, outcomes: dict) -> list[dict]:
    """CSV rows of one problem from {method: Outcome}; ratios divide by the dense / naive medians."""

    def median(method):
        outcome = outcomes.get(method)
        return outcome.timing.median_ms if outcome and outcome.timing else None

    dense_ms, naive_ms = median("dense"), median("naive")
    rows = []
    for method, outcome in outcomes.items():
        t, ms = outcome.timing, median(method)
        rows.append({**env, "op": p.op, "case": p.case, "estimator": "hard_concrete",
                     "dtype": str(p.dtype).replace("torch.", ""), "logits_dtype": "float32", "tokens": p.tokens,
                     "in_features": p.in_features, "out_features": p.out_features,
                     "gates": "x".join(str(s) for s in p.logits.shape), "pattern_block": p.pattern_block or "",
                     "method": method, "median_ms": _fmt(ms), "q25_ms": _fmt(t.q25_ms if t else None),
                     "q75_ms": _fmt(t.q75_ms if t else None), "timer": t.timer if t else "",
                     "ratio_to_dense": _fmt(ms / dense_ms if ms and dense_ms else None, 3),
                     "speedup_vs_naive": _fmt(naive_ms / ms if ms and naive_ms else None, 3),
                     "status": outcome.status, **outcome.extra})
    return rows


def _fmt(value: Optional[float], digits: int = 4):
    return "" if value is None else round(value, digits)


def run_problem(p: Problem, env: dict, backends: list, compile_cases: Iterable[str], compiled: dict,
                cpu_rounds: Optional[int] = None, log: Callable[[str], None] = print) -> list[dict]:
    """Time every method on one problem; a method that fails gets a row with its error instead of a time."""
    outcomes: dict[str, Outcome] = {}
    for method in methods_for(p, backends, compile_cases):
        outcome = outcomes[method] = Outcome()
        try:
            if method in backends:
                outcome.extra = check_backend(p, method)
            fn, grads = method_fn(p, method, compiled.get(p.case) if method == "naive_compiled" else None)
            with method_backend(method):
                fn()  # compile / autotune / allocate outside the timing
                if p.device == "cuda":
                    torch.cuda.synchronize()
                outcome.timing = measure(fn, "cuda" if p.device == "cuda" else "cpu", grads, cpu_rounds)
        except Exception as exc:  # noqa: BLE001 - one failing method must not lose the others' rows
            outcome.status = "oom" if "out of memory" in str(exc).lower() else \
                f"error: {type(exc).__name__}: {exc}"[:300]
        row = problem_rows(env, p, outcomes)[-1]
        shown = f"{row['median_ms']:>9} ms  x{row['ratio_to_dense'] or '?':<6} of dense" if outcome.timing \
            else outcome.status
        check = f"  [{outcome.extra['check']}]" if outcome.extra else ""
        log(f"{p.case:<13} {p.in_features}x{p.out_features} tokens={p.tokens:<6} {method:<15} {shown}{check}")
    return problem_rows(env, p, outcomes)


def problems(grid: Grid, cases: Iterable[str]) -> Iterable[tuple]:
    """(case, tokens, in, out) in run order: per shape and token count, every case."""
    for in_features, out_features in grid.shapes:
        for tokens in grid.tokens:
            for case in cases:
                yield case, tokens, in_features, out_features


def run_grid(grid: Grid, device: str, env: dict, backends: Iterable[str], cases: Iterable[str] = CASES,
             compile_cases: Iterable[str] = ("weight",), on_rows: Optional[Callable[[list], None]] = None,
             deadline: Optional[float] = None, progress: bool = True,
             log: Callable[[str], None] = print) -> tuple[list, list]:
    """Run the grid; ``on_rows`` receives each problem's rows as soon as they exist (incremental CSV writes).
    Returns (rows, skipped descriptions). Problems not started before ``deadline`` (time.monotonic) are skipped."""
    from tqdm.auto import tqdm

    cases, compile_cases = list(cases), list(compile_cases)
    unknown = sorted(set(cases + compile_cases) - set(CASES))
    if unknown:
        raise ValueError(f"fastmask bench: unknown case(s) {unknown}; known: {CASES}")
    backends, unusable = available_backends(backends, "cuda" if device == "cuda" else "cpu")
    for name, why in unusable.items():
        log(f"backend {name!r} not timed: {why}")
    compiled = {case: torch.compile(naive_masked_linear) for case in compile_cases}
    todo = list(problems(grid, cases))
    rows, skipped = [], []
    bar = tqdm(todo, desc="layer grid", disable=not progress, leave=False)
    for case, tokens, in_features, out_features in bar:
        if deadline is not None and time.monotonic() > deadline:
            skipped.append(f"layer {case} {in_features}x{out_features} tokens={tokens}")
            continue
        p = make_problem(case, tokens, in_features, out_features, grid.dtype, device, grid.head_dim,
                         grid.sparse_block)
        new = run_problem(p, env, backends, compile_cases, compiled, grid.cpu_rounds, log=log)
        rows += new
        if on_rows:
            on_rows(new)
        del p
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows, skipped

