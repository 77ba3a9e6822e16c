"""How the suite times a function: triton.testing.do_bench on GPUs, wall-clock rounds on CPUs.

Both report the median and the interquartile range (25% / 75% quantiles) in milliseconds. Gradients named in
``grad_to_none`` are reset before every call so that backward passes write fresh gradients (no accumulation).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

# do_bench budget per measurement (ms): long enough for a stable median of sub-millisecond kernels.
GPU_WARMUP_MS, GPU_REP_MS = 25, 100
# CPU rounds: at least CPU_MIN_ROUNDS, else as many as fit in CPU_BUDGET_S after one warm-up call.
CPU_MIN_ROUNDS, CPU_MAX_ROUNDS, CPU_BUDGET_S = 5, 50, 2.0


@dataclass(frozen=True)
class Timing:
    median_ms: float
    q25_ms: float
    q75_ms: float
    timer: str  # how it was measured, e.g. "do_bench(rep=100ms)" or "perf_counter(n=15)"


def summarize(times_ms: Sequence[float], timer: str) -> Timing:
    """Median and quartiles of a list of durations (one value: all three equal)."""
    values = sorted(times_ms)
    if not values:
        raise ValueError("summarize: no durations")
    if len(values) == 1:
        return Timing(values[0], values[0], values[0], timer)
    q25, median, q75 = statistics.quantiles(values, n=4, method="inclusive")
    return Timing(median, q25, q75, timer)


def _clear(grads: Sequence[torch.Tensor]) -> None:
    for t in grads:
        t.grad = None


def measure(fn: Callable[[], object], device_type: str, grad_to_none: Sequence[torch.Tensor] = (),
            cpu_rounds: int | None = None) -> Timing:
    """Time ``fn()``: do_bench quantiles on CUDA, ``cpu_rounds`` (default: adaptive) timed calls on CPU."""
    if device_type == "cuda":
        from triton.testing import do_bench

        median, q25, q75 = do_bench(fn, warmup=GPU_WARMUP_MS, rep=GPU_REP_MS, grad_to_none=list(grad_to_none),
                                    quantiles=[0.5, 0.25, 0.75])
        return Timing(median, q25, q75, f"do_bench(rep={GPU_REP_MS}ms)")
    _clear(grad_to_none)
    start = time.perf_counter()
    fn()  # warm-up (also sizes the number of rounds)
    first = time.perf_counter() - start
    rounds = cpu_rounds or max(CPU_MIN_ROUNDS, min(CPU_MAX_ROUNDS, int(CPU_BUDGET_S / max(first, 1e-6))))
    times = []
    for _ in range(rounds):
        _clear(grad_to_none)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return summarize(times, f"perf_counter(n={rounds})")


def interleaved_medians(methods: dict, grad_to_none: Sequence[torch.Tensor], rounds: int) -> dict:
    """Median ms of each CPU callable, timed interleaved: after one warm-up call each, round r runs every method
    once, in turn, so that a slow phase of a shared machine hits all of them alike (their ratios stay fair)."""
    times = {name: [] for name in methods}
    for fn in methods.values():
        _clear(grad_to_none)
        fn()
    for _ in range(rounds):
        for name, fn in methods.items():
            _clear(grad_to_none)
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}
