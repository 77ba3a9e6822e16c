"""masked_linear forward+backward on the CPU under pytest-benchmark: the problem and methods of
`fastmask bench layer` on a CPU (fastmask/bench/layer.py), timed by pytest-benchmark instead of the suite's own
timer. The foundation issue's target: the `cpu` backend >= 2x faster than naive at x 128x768, W 3072x768, fp32.

    python -m pytest benchmarks/bench_masked_linear.py -q     # rows -> $FASTMASK_BENCH_OUT or benchmarks/results

The GPU grid, the model-level steps, the plot and the README table: `fastmask bench` (benchmarks/README.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastmask.bench import layer, results
from fastmask.bench.timing import Timing

GRID = layer.CPU_GRID
METHODS = ["dense", "naive", "cpu", "reference"]
_outcomes: dict = {}


@pytest.fixture(scope="module")
def problem():
    in_features, out_features = GRID.shapes[0]
    return layer.make_problem("weight", GRID.tokens[0], in_features, out_features, GRID.dtype, "cpu")


@pytest.fixture(scope="module", autouse=True)
def _write_rows(problem):
    yield
    if "dense" in _outcomes:
        ordered = {m: _outcomes[m] for m in METHODS if m in _outcomes}
        out = Path(os.environ.get(results.OUT_ENV) or Path(__file__).resolve().parent / "results")
        path = results.append_rows(out / results.file_name("cpu", "masked_linear", smoke=False),
                                   layer.problem_rows(results.environment("cpu"), problem, ordered))
        print(f"\nrows appended to {path}")


@pytest.mark.parametrize("method", METHODS)
def test_cpu_masked_linear_fwd_bwd(benchmark, problem, method):
    outcome = layer.Outcome()
    if method not in ("dense", "naive"):
        usable, why = layer.available_backends([method], "cpu")
        if not usable:
            pytest.skip(f"backend {method!r} unavailable: {why[method]}")
        outcome.extra = layer.check_backend(problem, method)
        assert outcome.extra["check"] == "ok", outcome.extra
    fn, grads = layer.method_fn(problem, method)
    rounds = 3 if method == "reference" else 15

    def clear_grads():
        for t in grads:
            t.grad = None

    with layer.method_backend(method):
        benchmark.pedantic(fn, setup=clear_grads, rounds=rounds, warmup_rounds=1)
    stats = benchmark.stats.stats
    outcome.timing = Timing(stats.median * 1e3, stats.q1 * 1e3, stats.q3 * 1e3, f"pytest-benchmark(n={rounds})")
    _outcomes[method] = outcome
