"""masked_linear forward+backward against dense, naive PyTorch and torch.compile(naive).

CPU (pytest-benchmark; the foundation issue's target: the `cpu` backend >= 2x faster than naive at x 128x768,
W 3072x768, fp32, per-weight hard concrete):

    python -m pytest benchmarks/bench_masked_linear.py -q          # rows -> results/cpu_masked_linear.csv

GPU (triton.testing.do_bench, median and 20/80% quantiles; bf16 frozen weight, fp32 logits):

    python benchmarks/bench_masked_linear.py --gpu                 # rows -> results/gpu_masked_linear.csv
"""

from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fastmask as fm  # noqa: E402
from fastmask import ref  # noqa: E402

from _common import append_rows, environment  # noqa: E402

CPU_SHAPE = dict(tokens=128, in_features=768, out_features=3072)
GPU_TOKENS = (512, 4096, 16384)
GPU_SHAPES = ((768, 3072), (1600, 6400))  # (in, out): GPT-2 small and XL MLP up-projections


def _inputs(tokens, in_features, out_features, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(tokens, in_features, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(out_features, in_features, generator=gen) / in_features**0.5).to(device, dtype)
    logits = torch.full((out_features, in_features), 2.0, device=device).requires_grad_()
    grad_out = torch.randn(tokens, out_features, generator=gen).to(device, dtype)
    return x, weight, logits, grad_out


def naive_step(x, weight, logits, grad_out):
    """What users write today: sample with torch ops, W * z, autograd."""
    z = ref.hard_concrete_naive(logits)
    y = F.linear(x, weight * z.to(weight.dtype))
    y.backward(grad_out)


def fused_step(x, weight, logits, grad_out, step=[0]):  # noqa: B006 - a call counter, new noise every call
    step[0] += 1
    y = fm.ops.masked_linear(x, weight, logits, seed=0, offset=step[0] * logits.numel())
    y.backward(grad_out)


def dense_step(x, weight, grad_out, weight_t_for_grad):
    """A dense linear train step: the same 3 GEMMs (y, dx, dW) a masked layer needs; the lower bound."""
    y = F.linear(x, weight_t_for_grad)
    y.backward(grad_out)


# ----------------------------------------------------------------------------------------------------- CPU --

_CPU_METHODS = ["dense", "naive", "reference", "cpu"]
_cpu_results: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _write_cpu_rows():
    yield
    if "naive" not in _cpu_results:
        return
    env = environment("cpu")
    rows = [{**env, "op": "masked_linear_fwd_bwd", "estimator": "hard_concrete", "dtype": "float32",
             **CPU_SHAPE, "method": method, "median_ms": round(ms, 3),
             "speedup_vs_naive": round(_cpu_results["naive"] / ms, 3)}
            for method, ms in _cpu_results.items()]
    append_rows("cpu_masked_linear", rows)


@pytest.mark.parametrize("method", _CPU_METHODS)
def test_cpu_masked_linear_fwd_bwd(benchmark, method):
    x, weight, logits, grad_out = _inputs(**CPU_SHAPE, dtype=torch.float32, device="cpu")
    if method == "dense":
        w = weight.clone().requires_grad_()
        fn = lambda: dense_step(x, weight, grad_out, w)  # noqa: E731
    elif method == "naive":
        fn = lambda: naive_step(x, weight, logits, grad_out)  # noqa: E731
    else:
        available, why = fm.ops._backend.availability(method, "cpu")
        if not available:
            pytest.skip(f"backend {method!r} unavailable: {why}")
        fm.set_backend(method)
        fn = lambda: fused_step(x, weight, logits, grad_out)  # noqa: E731
    try:
        benchmark.pedantic(fn, rounds=15 if method != "reference" else 3, warmup_rounds=2)
    finally:
        fm.set_backend("auto")
    _cpu_results[method] = benchmark.stats.stats.median * 1e3


# ----------------------------------------------------------------------------------------------------- GPU --

def run_gpu_grid(backends=("triton", "cuda"), dtype=torch.bfloat16) -> list[dict]:
    from triton.testing import do_bench

    env = environment("cuda")
    compiled_naive = torch.compile(naive_step)
    rows = []
    for in_features, out_features in GPU_SHAPES:
        for tokens in GPU_TOKENS:
            x, weight, logits, grad_out = _inputs(tokens, in_features, out_features, dtype, "cuda")
            w_dense = weight.clone().requires_grad_()
            methods = {"dense": lambda: dense_step(x, weight, grad_out, w_dense),
                       "naive": lambda: naive_step(x, weight, logits, grad_out),
                       "naive_compiled": lambda: compiled_naive(x, weight, logits, grad_out)}
            for backend in backends:
                if fm.ops._backend.availability(backend, "cuda")[0]:
                    methods[backend] = (lambda b=backend: (fm.set_backend(b),
                                                           fused_step(x, weight, logits, grad_out)))
            timings = {}
            for method, fn in methods.items():
                fn()  # compile / autotune outside the timing
                timings[method] = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8],
                                           grad_to_none=[x, logits, w_dense])
            fm.set_backend("auto")
            for method, (median, q20, q80) in timings.items():
                rows.append({**env, "op": "masked_linear_fwd_bwd", "estimator": "hard_concrete",
                             "dtype": str(dtype).replace("torch.", ""), "tokens": tokens, "in_features": in_features,
                             "out_features": out_features, "method": method, "median_ms": round(median, 4),
                             "p20_ms": round(q20, 4), "p80_ms": round(q80, 4),
                             "ratio_to_dense": round(median / timings["dense"][0], 3)})
                print(f"{in_features}x{out_features} tokens={tokens:>6} {method:<15} {median:8.3f} ms  "
                      f"x{median / timings['dense'][0]:.2f} of dense", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="run the GPU grid (needs CUDA)")
    args = parser.parse_args(argv)
    if args.gpu:
        if not torch.cuda.is_available():
            print("GPU rows need a CUDA GPU; none here. CPU rows: python -m pytest benchmarks/bench_masked_linear.py")
            return 1
        print(append_rows("gpu_masked_linear", run_gpu_grid()))
        return 0
    return pytest.main([__file__, "-q"])


if __name__ == "__main__":
    sys.exit(main())
