"""The benchmark suite (fastmask.bench) on the CPU: `fastmask bench` end to end at smoke shapes (layer rows, one
process per model configuration, the loss-trajectory check), the CSV files, and the plot / README table."""

from __future__ import annotations

import contextlib
import csv
import io
import os

import pytest

from fastmask.bench import model, report, results
from fastmask.cli import main as cli_main

LAYER_COLUMNS = {"op", "case", "dtype", "logits_dtype", "tokens", "in_features", "out_features", "gates", "method",
                 "median_ms", "q25_ms", "q75_ms", "timer", "ratio_to_dense", "status"}
MODEL_COLUMNS = {"model", "config", "dtype", "backend", "batch", "seq_len", "median_step_ms", "peak_mem_gib",
                 "mem_kind", "ratio_to_dense", "trajectory_equal", "losses", "densities", "pid", "status"}


def _read(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """`fastmask bench --smoke` on the CPU (in this process; each model configuration in a child process): two
    layer cases, the two mask configurations. Returns (exit status, stdout, output folder)."""
    out = tmp_path_factory.mktemp("bench")
    saved = os.environ.get("FASTMASK_GIT_SHA")
    os.environ["FASTMASK_GIT_SHA"] = "abc1234"
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            rc = cli_main(["bench", "--smoke", "--out", str(out), "--backends", "cpu", "--cases",
                           "weight,eval_sparse90", "--configs", "naive_mask,fastmask_mask", "--no-progress"])
    finally:
        if saved is None:
            os.environ.pop("FASTMASK_GIT_SHA")
        else:
            os.environ["FASTMASK_GIT_SHA"] = saved
    return rc, stdout.getvalue(), out


def test_bench_on_cpu_says_gpu_rows_need_a_gpu_and_writes_layer_rows(smoke_run):
    rc, stdout, out = smoke_run
    assert rc == 0, stdout[-3000:]
    assert "GPU rows" in stdout and "need a GPU" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["smoke_cpu_masked_linear.csv", "smoke_cpu_model_step.csv"]
    rows = _read(out / "smoke_cpu_masked_linear.csv")
    assert set(results.ENV_COLUMNS) | LAYER_COLUMNS <= set(rows[0])
    assert list(rows[0])[:len(results.ENV_COLUMNS)] == list(results.ENV_COLUMNS)
    assert {(r["case"], r["method"]) for r in rows} == {(c, m) for c in ("weight", "eval_sparse90")
                                                       for m in ("dense", "naive", "cpu")}
    for r in rows:
        assert r["device"] == "cpu" and r["smoke"] == "1" and r["git_sha"] == "abc1234" and r["torch"]
        assert r["status"] == "ok"
        assert 0 < float(r["q25_ms"]) <= float(r["median_ms"]) <= float(r["q75_ms"])
        assert r["timer"] == "perf_counter(n=3)"
    dense = [r for r in rows if r["method"] == "dense"]
    assert all(float(r["ratio_to_dense"]) == 1.0 for r in dense)
    assert {r["op"] for r in dense} == {"masked_linear_fwd_bwd", "masked_linear_eval_fwd"}
    fused = [r for r in rows if r["method"] == "cpu"]
    assert all(r["check"] == "ok" and r["noise_identical"] == "1" for r in fused)
    sparse = next(r for r in rows if r["case"] == "eval_sparse90")
    assert sparse["pattern_block"] == "16" and sparse["gates"] == "96x64"


def test_bench_runs_each_model_configuration_in_its_own_process(smoke_run):
    _, stdout, out = smoke_run
    rows = _read(out / "smoke_cpu_model_step.csv")
    assert MODEL_COLUMNS <= set(rows[0])
    assert [r["config"] for r in rows] == ["naive_mask", "fastmask_mask"]
    pids = {int(r["pid"]) for r in rows}
    assert len(pids) == 2 and os.getpid() not in pids
    assert all(r["status"] == "ok" and r["model"] == "gpt2-tiny" and r["smoke"] == "1" for r in rows)
    naive, fused = rows
    assert fused["backend"] == "cpu" and naive["backend"] == ""
    assert int(fused["n_trainable"]) == int(naive["n_trainable"]) > 0  # the same logits: every Conv1D weight
    # The same noise through fastmask.ops.uniform: the trajectories match (fp32 on CPU: to rounding).
    assert fused["trajectory_equal"] == "1", fused
    assert "trajectory == naive" in stdout
    assert len(fused["losses"].split(";")) == 3 and len(fused["densities"].split(";")) == 3
    for key, column in model.TRAJECTORY_KEYS.items():
        assert float(fused[column]) <= model.TRAJECTORY_TOL["float32"][key]


def test_trajectory_check_fails_on_different_noise():
    """The check has teeth: fastmask on another noise seed does not match the naive run."""
    common = dict(size="tiny", device="cpu", dtype="float32", backend="cpu", steps=1, trajectory_steps=2)
    naive = model.run_step_spec(model.StepSpec(config="naive_mask", **common))
    other = model.run_step_spec(model.StepSpec(config="fastmask_mask", mask_seed=1, **common))
    rows = model.result_rows([naive, other], results.environment("cpu", smoke=True))
    assert [r["trajectory_equal"] for r in rows] == ["", 0]  # (same seed: equal, in the smoke run above)
    # The gradient sketches tell the noise seeds apart by far more than their tolerance (bf16's is 1e-2).
    assert model.trajectory_diff(other, naive, "grad_sketches") > 0.1
    assert model.trajectory_diff(other, naive, "losses") > 2 * model.TRAJECTORY_TOL["float32"]["losses"]
    assert model.trajectory_check(naive, naive)["trajectory_equal"] == 1


def test_append_rows_keeps_old_rows_and_unions_columns(tmp_path):
    path = tmp_path / "cpu_masked_linear.csv"
    results.append_rows(path, [{"date": "d0", "hardware": "h", "method": "dense", "median_ms": 2.0}])
    results.append_rows(path, [{"date": "d1", "hardware": "h", "method": "cpu", "median_ms": 1.0, "check": "ok"}])
    rows = _read(path)
    assert list(rows[0]) == ["date", "hardware", "method", "median_ms", "check"]
    assert [(r["date"], r["check"]) for r in rows] == [("d0", ""), ("d1", "ok")]
    assert [p.name for p in tmp_path.iterdir()] == ["cpu_masked_linear.csv"]  # no temporary file left behind
    # add_results: a run's folder appended twice counts once; smoke files are never added.
    run = tmp_path / "run"
    results.append_rows(run / "gpu_masked_linear.csv", [{"date": "d2", "hardware": "GPU", "median_ms": 0.5}])
    results.append_rows(run / "smoke_cpu_model_step.csv", [{"date": "d2", "hardware": "h"}])
    store = tmp_path / "store"
    assert results.add_results(run, store) == {"gpu_masked_linear.csv": 1}
    assert results.add_results(run, store) == {"gpu_masked_linear.csv": 0}
    assert [p.name for p in store.iterdir()] == ["gpu_masked_linear.csv"]


def _layer_rows(date, hardware, scale=1.0):
    rows = []
    for n_in, n_out in ((768, 3072), (1600, 6400)):
        for tokens in (512, 4096, 16384):
            dense = tokens / 1000
            for method, ratio in (("dense", 1.0), ("naive", 2.5), ("naive_compiled", 2.4), ("triton", 1.05 * scale),
                                  ("cuda", 1.3)):
                rows.append({"date": date, "hardware": hardware, "device": "cuda", "torch": "2.11.0", "cuda": "13.0",
                             "triton": "3.6.0", "git_sha": "abc1234", "smoke": 0, "op": "masked_linear_fwd_bwd",
                             "case": "weight", "dtype": "bfloat16", "tokens": tokens, "in_features": n_in,
                             "out_features": n_out, "method": method, "median_ms": dense * ratio,
                             "timer": "do_bench(rep=100ms)"})
    return rows


def test_report_draws_the_plot_and_writes_the_readme_table(tmp_path):
    store = tmp_path / "results"
    results.append_rows(store / "gpu_masked_linear.csv",
                        _layer_rows("2026-01-01T00:00:00Z", "NVIDIA H200", scale=9.0)  # an older run: not shown
                        + _layer_rows("2026-02-01T00:00:00Z", "NVIDIA H200"))
    model_rows = [{"date": "2026-02-01T00:00:00Z", "hardware": "NVIDIA H200", "device": "cuda", "torch": "2.11.0",
                   "git_sha": "abc1234", "model": "gpt2-xl-1.56B", "batch": 4, "seq_len": 512, "config": config,
                   "dtype": "bfloat16", "backend": backend, "median_step_ms": ms, "peak_mem_gib": mem,
                   "mem_kind": "cuda_max_allocated", "ratio_to_dense": ms / 93, "mem_ratio_to_dense_amp": mem / 35.2,
                   "trajectory_equal": equal, "loss_rel_diff": diff, "density_rel_diff": diff,
                   "grad_cos_gap": diff, "status": "ok"}
                  for config, backend, ms, mem, equal, diff in (("dense", "", 93, 19.4, "", ""),
                                                                ("dense_amp", "", 139, 35.2, "", ""),
                                                                ("naive_mask", "", 188, 44.3, "", ""),
                                                                ("fastmask_mask", "triton", 99, 30.1, 1, "1.2e-03"))]
    results.append_rows(store / "gpu_model_step.csv", model_rows)
    results.append_rows(store / "smoke_cpu_model_step.csv", [{**model_rows[0], "hardware": "SMOKE HW"}])
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Performance\n\nintro\n\nRESULTS_TABLE\n\n## Layout\n\nrest\n")

    assert cli_main(["bench", "report", "--results", str(store), "--readme", str(readme)]) == 0
    png = store / report.PLOT_NAME
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    text = readme.read_text()
    assert text.startswith("# x\n\n## Performance\n\nintro\n\n") and text.endswith("\n\n## Layout\n\nrest\n")
    section = text.split(report.MARKERS[0])[1].split(report.MARKERS[1])[0]
    assert "RESULTS_TABLE" not in text and "**NVIDIA H200**" in section and "triton 3.6.0" in section
    assert "![masked_linear time / dense time per shape](results/ratio_to_dense.png)" in section
    # Ratios come from the latest run's medians: triton 1.05x dense (the older run's 9.45x is not shown).
    assert "| weight | 1600x6400 | 16384 | 16.384 | x2.50 | x2.40 | x1.05 | x1.30 | x1.05 (triton) | <= 1.10 met |" \
        in section
    assert "| weight | 768x3072 | 512 | 0.512 |" in section and "<= 1.50 met" in section and "x9.45" not in section
    assert "| gpt2-xl-1.56B | 4x512 | fastmask_mask | bfloat16 | triton | 99 | x1.06 | 30.1 | x0.86 | " \
           "equal (loss 1.2e-03, density 1.2e-03, gradient 1-cos 1.2e-03) |" in section
    assert "SMOKE HW" not in section
    # Idempotent: a second report changes nothing.
    assert report.generate(store, readme, png)["readme_changed"] is False


def test_bench_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit, match="--cases must be among"):
        cli_main(["bench", "--cases", "weight,bogus"])
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        cli_main(["bench", "model", "--steps", "0"])
    with pytest.raises(FileNotFoundError, match="results folder"):
        report.load("/nonexistent/results")


def test_interleaved_medians_runs_methods_in_turn_and_clears_grads():
    import torch

    from fastmask.bench.timing import interleaved_medians

    calls, leaf = [], torch.zeros(2, requires_grad=True)

    def method(name):
        def run():
            assert leaf.grad is None  # cleared before every call
            calls.append(name)
            (leaf * 2).sum().backward()
        return run

    medians = interleaved_medians({"a": method("a"), "b": method("b")}, [leaf], rounds=3)
    assert calls == ["a", "b"] * 4  # one warm-up each, then a, b in turn every round
    assert set(medians) == {"a", "b"} and all(v >= 0 for v in medians.values())
