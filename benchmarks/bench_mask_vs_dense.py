"""Mask learning against fine-tuning, per layer: every granularity's forward+backward over the dense train step
(3 GEMMs: y, dx, dW), timed INTERLEAVED in one process (round r times every method once, in turn), medians.

    python benchmarks/bench_mask_vs_dense.py                 # CPU grid of issue 13 (fp32; 128 and 512 tokens)
    python benchmarks/bench_mask_vs_dense.py --rounds 9 --cases unit_in,head

Methods per case:
  dense      F.linear with a trainable weight, forward+backward: fine-tuning the layer (the ratios' denominator)
  naive      hand-written masks: torch-op gates on torch.rand noise, W * z, autograd
  naive_compiled  torch.compile of naive (with --compile; one compilation per problem)
  weight_op  the masked-weight route: torch.ops.fastmask.masked_linear (masked weight + dWm GEMM + mask-gradient
             kernel; what fm.ops.masked_linear ran for every grid before the unit path existed)
  recompute  fm.ops.masked_linear with memory="recompute" (per-weight cases): the backward regenerates the gates
  custom_op  fm.ops.masked_linear through its torch.library custom ops (the eager autograd.Function twins off:
             what every call ran before the twins existed; torch.compile still runs this route)
  fastmask   fm.ops.masked_linear (unit, head and layer grids take the two-GEMM unit path; per-weight grids the
             default memory policy, "keep" on CPU: one gate evaluation per step; eager calls run the ops'
             autograd.Function twins, fastmask/ops/_common.py)

Rows go to $FASTMASK_BENCH_OUT or benchmarks/results/<device>_mask_vs_dense.csv with hardware, thread count,
versions and git sha; ``ratio_to_dense`` is each method's median over the dense median of the same rounds.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F

import fastmask as fm
from fastmask import ref
from fastmask.bench import results
from fastmask.bench.layer import naive_mask
from fastmask.bench.timing import interleaved_medians

# (case, tokens, in, out, grid in out_in terms, block): issue 13's target grid.
SHAPES = [(128, 768, 3072), (128, 3072, 768), (512, 768, 3072), (512, 3072, 768)]
HEAD_SHAPES = [(128, 384, 384, 12), (512, 384, 384, 12), (128, 768, 768, 12), (512, 768, 768, 12)]
CASES = ("unit_in", "unit_out", "head", "layer", "weight", "weight_gumbel")


def problems(cases):
    for case in cases:
        if case == "head":
            for tokens, i, o, heads in HEAD_SHAPES:
                yield case, tokens, i, o, (1, heads), (o, i // heads)
            continue
        for tokens, i, o in SHAPES:
            grid, block = {"unit_in": ((1, i), (o, 1)), "unit_out": ((o, 1), (1, i)), "layer": ((1, 1), (o, i)),
                           "weight": ((o, i), (1, 1)), "weight_gumbel": ((o, i), (1, 1))}[case]
            yield case, tokens, i, o, grid, block


def naive_masked_linear(x, weight, logits, block, estimator):
    """Masks as users write them: gates from torch ops on torch.rand noise (Gumbel-sigmoid hard in forward with the
    sigmoid's gradient), broadcast to the weight, ``F.linear(x, W * m)``, autograd through every intermediate."""
    if estimator == "hard_concrete":
        z = ref.hard_concrete_naive(logits)
    else:
        u = torch.rand(logits.shape).clamp(ref.UNIFORM_EPS, 1 - ref.UNIFORM_EPS)
        s = torch.sigmoid(logits + torch.log(u) - torch.log1p(-u))
        z = (s > 0.5).to(s.dtype) + s - s.detach()
    return F.linear(x, weight * naive_mask(z, block, weight.shape))


def make_methods(case, tokens, in_features, out_features, grid, block, dtype, compiled=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_features, generator=gen, dtype=dtype).requires_grad_()
    weight = torch.randn(out_features, in_features, generator=gen, dtype=dtype) / in_features**0.5
    logits = (1.0 + 0.5 * torch.randn(grid, generator=gen)).requires_grad_()
    grad_out = torch.randn(tokens, out_features, generator=gen, dtype=dtype)
    estimator = "gumbel_sigmoid_st" if case == "weight_gumbel" else "hard_concrete"
    beta = fm.ops._common.default_beta(estimator, None)
    dense_weight = weight.clone().requires_grad_()
    step = [0]

    def offset():
        step[0] += 1
        return step[0] * logits.numel()

    def dense():
        F.linear(x, dense_weight).backward(grad_out)

    def naive():
        naive_masked_linear(x, weight, logits, block, estimator).backward(grad_out)

    def naive_compiled():
        compiled(x, weight, logits, block, estimator).backward(grad_out)

    def weight_op():
        torch.ops.fastmask.masked_linear(x, weight, logits, None, estimator, 1, offset(), True, False, "out_in",
                                         list(block), beta, -0.1, 1.1, 0.0).backward(grad_out)

    def recompute():
        fm.ops.masked_linear(x, weight, logits, estimator=estimator, seed=1, offset=offset(), block=block,
                             memory="recompute").backward(grad_out)

    def fastmask():
        fm.ops.masked_linear(x, weight, logits, estimator=estimator, seed=1, offset=offset(),
                             block=block).backward(grad_out)

    def custom_op():
        fm.ops._common.EAGER_FUNCTIONS = False
        try:
            fastmask()
        finally:
            fm.ops._common.EAGER_FUNCTIONS = True

    methods = {"dense": dense, "naive": naive, "naive_compiled": naive_compiled, "weight_op": weight_op,
               "recompute": recompute, "custom_op": custom_op, "fastmask": fastmask}
    if compiled is None:
        del methods["naive_compiled"]
    if ref.unit_axis(grid, "out_in") is not None:  # unit / head / layer grids: no memory policy, no masked weight
        del methods["recompute"]
    else:  # per-weight: weight_op is the recompute route through the raw op
        del methods["weight_op"]
    return methods, [x, logits, dense_weight]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {CASES}")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per problem (default 15)")
    parser.add_argument("--backend", default="auto", help="fastmask backend (default auto: cpu extension on CPU)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the naive code")
    parser.add_argument("--out", default=None, help="results folder (default $FASTMASK_BENCH_OUT or "
                                                    "benchmarks/results)")
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"--cases: unknown {unknown}; known: {CASES}")
    fm.set_backend(args.backend)
    env = results.environment("cpu")  # its hardware column names the CPU and the thread count
    out = Path(args.out or os.environ.get(results.OUT_ENV) or Path(__file__).resolve().parent / "results")
    backend = fm.ops._backend.resolve_name(torch.device("cpu"))
    rows = []
    for case, tokens, i, o, grid, block in problems(cases):
        compiled = torch.compile(naive_masked_linear, dynamic=False) if args.compile else None
        methods, grads = make_methods(case, tokens, i, o, grid, block, torch.float32, compiled)
        medians = interleaved_medians(methods, grads, args.rounds)
        dense = medians["dense"]
        shown = "  ".join(f"{m} {ms:7.2f} ms x{ms / dense:.2f}" for m, ms in medians.items())
        print(f"{case:<13} {tokens:>4} x {i}->{o} grid {grid[0]}x{grid[1]}:\n    {shown}", flush=True)
        for method, ms in medians.items():
            rows.append({**env, "op": "masked_linear_fwd_bwd", "case": case, "dtype": "float32", "tokens": tokens,
                         "in_features": i, "out_features": o, "gates": f"{grid[0]}x{grid[1]}", "backend": backend,
                         "method": method, "median_ms": round(ms, 4), "rounds": args.rounds,
                         "timer": "interleaved perf_counter", "ratio_to_dense": round(ms / dense, 3)})
    path = results.append_rows(out / results.file_name("cpu", "mask_vs_dense", smoke=False), rows)
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()
