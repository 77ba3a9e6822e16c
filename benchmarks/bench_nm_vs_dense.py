"""Learned N:M (2:4) masks against fine-tuning, per layer: forward+backward of one masked linear layer over the dense
train step (3 GEMMs: y, dx, dW), timed INTERLEAVED in one process (round r times every method once), medians.

    python benchmarks/bench_nm_vs_dense.py [--rounds 7]

Methods per shape (tokens x 768 -> 3072 and 3072 -> 768, fp32, hard Gumbel-softmax over the 6 patterns of 2:4):
  dense      F.linear with a trainable weight (the ratios' denominator)
  reference  fastmask.ops.nm.nm_masked_linear on the reference backend (torch ops: what a user writes by hand)
  fastmask   fastmask.ops.nm.nm_masked_linear on the default backend (the fused C++ kernels on CPU)

Rows go to $FASTMASK_BENCH_OUT or benchmarks/results/cpu_nm_vs_dense.csv (hardware, threads, versions, git sha).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F

import fastmask as fm
from fastmask.ops.nm import nm_masked_linear
from fastmask.bench import results
from fastmask.bench.timing import interleaved_medians

SHAPES = [(128, 768, 3072), (128, 3072, 768), (512, 768, 3072), (512, 3072, 768)]


def make_methods(tokens: int, in_features: int, out_features: int, n: int = 2, m: int = 4):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, in_features, generator=gen).requires_grad_()
    weight = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    logits = torch.randn(out_features, in_features // m, 6, generator=gen).requires_grad_()
    grad_out = torch.randn(tokens, out_features, generator=gen)
    dense_weight = weight.clone().requires_grad_()
    step = [0]

    def masked():
        step[0] += 1
        nm_masked_linear(x, weight, logits, n=n, m=m, seed=1, offset=step[0] * logits.numel(),
                                temperature=0.5).backward(grad_out)

    def reference():
        with fm.use_backend("reference"):
            masked()

    methods = {"dense": lambda: F.linear(x, dense_weight).backward(grad_out), "reference": reference,
               "fastmask": masked}
    return methods, [x, logits, dense_weight]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per shape (default 7)")
    parser.add_argument("--out", default=None, help="results folder (default $FASTMASK_BENCH_OUT or "
                                                    "benchmarks/results)")
    args = parser.parse_args(argv)
    env = results.environment("cpu")  # its hardware column names the CPU and the thread count
    out = Path(args.out or os.environ.get(results.OUT_ENV) or Path(__file__).resolve().parent / "results")
    rows = []
    for tokens, i, o in SHAPES:
        methods, grads = make_methods(tokens, i, o)
        medians = interleaved_medians(methods, grads, args.rounds)
        dense = medians["dense"]
        print(f"2:4 {tokens:>4} x {i}->{o}: " + "  ".join(f"{k} {v:7.2f} ms x{v / dense:.2f}"
                                                           for k, v in medians.items()), flush=True)
        for method, ms in medians.items():
            rows.append({**env, "op": "nm_masked_linear_fwd_bwd", "case": "nm_2_4", "dtype": "float32",
                         "tokens": tokens, "in_features": i, "out_features": o, "method": method,
                         "median_ms": round(ms, 4), "rounds": args.rounds, "timer": "interleaved perf_counter",
                         "ratio_to_dense": round(ms / dense, 3)})
    path = results.append_rows(out / results.file_name("cpu", "nm_vs_dense", smoke=False), rows)
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()
