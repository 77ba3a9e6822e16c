"""K masks in one call: fm.ops.grouped_masked_linear against K single-mask calls, the naive hand-written K masks
and the dense limit, forward+backward (frozen weight, per-weight hard-concrete logits, or head gates with --heads), in
one run.

    python benchmarks/bench_grouped_masked_linear.py                  # CPU: fp32, 2 shapes; GPU: bf16, 3 shapes
    python benchmarks/bench_grouped_masked_linear.py --smoke          # tiny shapes, any device (a check)

Rows go to $FASTMASK_BENCH_OUT or benchmarks/results/<device>_grouped_masked_linear.csv (fastmask.bench.results:
hardware, versions, git sha). Methods:
  dense          one F.linear over all tokens (no masks): the limit
  single         ONE mask over all tokens (fm.ops.masked_linear): what K masks in one step are compared with
  naive          per mask: torch-op hard concrete on fm.ops.uniform noise, W * z, F.linear on its rows (autograd)
  k_calls        per mask: fm.ops.masked_linear on its rows (the fused single-mask op, K times)
  grouped        fm.ops.grouped_masked_linear, index=None (the batch is K equal groups: a reshape)
  grouped_index  fm.ops.grouped_masked_linear with a shuffled index (stable sort + gather/scatter)
  grouped_weight_route  (--heads) the grouped custom op's masked-weight route, which unit grids no longer take
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
from fastmask.bench.timing import measure

SHAPES = {"cpu": [(4, 512, 768, 768), (8, 512, 768, 768)], "cuda": [(4, 4096, 768, 3072), (8, 4096, 768, 3072),
                                                                     (4, 16384, 1600, 6400)]}
SMOKE_SHAPES = [(3, 48, 32, 24)]  # (K, tokens, in, out)
ROWS_PER_SEQUENCE = 64  # tokens are (batch, 64, in): the mask index picks batch rows


def make(n_masks, tokens, in_features, out_features, dtype, device, heads=0, seed=0):
    """x (batch, 64, in), weight (out, in), logits (K, out, in) per weight or (K, 1, heads) head gates, index."""
    gen = torch.Generator().manual_seed(seed)
    batch = max(n_masks, tokens // ROWS_PER_SEQUENCE) // n_masks * n_masks
    x = torch.randn(batch, tokens // batch, in_features, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(out_features, in_features, generator=gen) / in_features**0.5).to(device, dtype)
    grid = (1, heads) if heads else (out_features, in_features)
    logits = torch.randn((n_masks,) + grid, generator=gen).to(device).requires_grad_()
    index = torch.randperm(batch, generator=gen).remainder(n_masks).to(device)
    return x, weight, logits, index


def methods(x, weight, logits, index, step_seed=7):
    n_masks, n_gates = logits.shape[0], logits[0].numel()
    block = (weight.shape[0] // logits.shape[1], weight.shape[1] // logits.shape[2])
    groups = torch.arange(n_masks, device=x.device).repeat_interleave(x.shape[0] // n_masks)
    rows = [(groups == k).nonzero().flatten() for k in range(n_masks)]

    def per_mask(linear):
        def run():
            out = torch.cat([linear(x[rows[k]], k) for k in range(n_masks)])
            out.float().square().mean().backward()
        return run

    def naive(x_k, k):
        noise = fm.ops.uniform(logits[k].shape, seed=step_seed, offset=ref.mask_offset(0, k, n_gates),
                               device=x.device)
        z = ref.expand_gates(ref.hard_concrete_naive(logits[k], noise=noise), block, weight.shape)
        return F.linear(x_k, (weight.float() * z).to(weight.dtype))

    def fused(x_k, k):
        return fm.ops.masked_linear(x_k, weight, logits[k], seed=step_seed, offset=ref.mask_offset(0, k, n_gates),
                                    block=block)

    def grouped(index_or_none):
        def run():
            y = fm.ops.grouped_masked_linear(x, weight, logits, index=index_or_none, seed=step_seed, block=block)
            y.float().square().mean().backward()
        return run

    def grouped_weight_route():  # the custom op itself: masked weights + bmm, whatever the grid
        y = torch.ops.fastmask.grouped_masked_linear(x, weight, logits, None, None, "hard_concrete", step_seed, 0,
                                                     True, False, "out_in", list(block), 2 / 3, -0.1, 1.1, 0.0)
        y.float().square().mean().backward()

    def dense():
        F.linear(x, weight).float().square().mean().backward()

    def single():
        fm.ops.masked_linear(x, weight, logits[0], seed=step_seed, block=block).float().square().mean().backward()

    found = {"dense": dense, "single": single, "naive": per_mask(naive), "k_calls": per_mask(fused),
             "grouped": grouped(None), "grouped_index": grouped(index)}
    if ref.unit_axis(logits.shape[1:], "out_in") is not None:
        found["grouped_weight_route"] = grouped_weight_route
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (a check, not a measurement)")
    parser.add_argument("--heads", type=int, default=0, help="head gates (K, 1, HEADS) instead of per-weight logits")
    parser.add_argument("--out", default=None, help="results folder (default: $FASTMASK_BENCH_OUT or "
                                                    "benchmarks/results)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out = Path(args.out or os.environ.get(results.OUT_ENV) or Path(__file__).resolve().parent / "results")
    env = results.environment(device, smoke=args.smoke)
    rows = []
    for n_masks, tokens, in_features, out_features in (SMOKE_SHAPES if args.smoke else SHAPES[device]):
        x, weight, logits, index = make(n_masks, tokens, in_features, out_features, dtype, device, args.heads)
        timings = {name: measure(fn, device, grad_to_none=(x, logits), cpu_rounds=3 if args.smoke else None)
                   for name, fn in methods(x, weight, logits, index).items()}
        dense_ms = timings["dense"].median_ms
        for name, timing in timings.items():
            rows.append({**env, "op": "grouped_masked_linear", "gates": "x".join(map(str, logits.shape[1:])),
                         "method": name, "n_masks": n_masks, "tokens": tokens,
                         "in_features": in_features, "out_features": out_features, "dtype": str(dtype)[6:],
                         "backend": fm.ops._backend.resolve_name(x.device), "median_ms": f"{timing.median_ms:.4f}",
                         "q25_ms": f"{timing.q25_ms:.4f}", "q75_ms": f"{timing.q75_ms:.4f}", "timer": timing.timer,
                         "x_dense": f"{timing.median_ms / dense_ms:.3f}"})
            print(f"K={n_masks} tokens={tokens} W={out_features}x{in_features} {name:>13}: "
                  f"{timing.median_ms:9.3f} ms  ({timing.median_ms / dense_ms:5.2f}x dense)")
    path = results.append_rows(out / results.file_name(device, "grouped_masked_linear", smoke=args.smoke), rows)
    print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
