"""`fastmask bench`: run the benchmark suite, or turn its CSV files into the README's plot and table.

    fastmask bench [all|layer|model] [--out DIR]      # rows appended to DIR/{gpu,cpu}_{masked_linear,model_step}.csv
    fastmask bench --smoke --out /tmp/b               # tiny shapes on any device: a check, rows in smoke_*.csv
    fastmask bench report --add DIR                   # append DIR's CSVs to benchmarks/results, plot, README table

With a CUDA GPU, `all` runs the layer grid (tokens 512 / 4096 / 16384 x 768x3072 and 1600x6400, bf16 weight,
fp32 logits) and then the GPT-2 124M and XL steps. Without one it runs the CPU comparisons (the layer at
128 x 768 x 3072, fp32) and says that the GPU rows need a GPU; `fastmask bench model` there runs the tiny GPT-2
configurations (each in its own process, with the loss-trajectory check).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

PARTS = ("all", "layer", "model", "report")


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("part", nargs="?", default="all", choices=PARTS,
                        help="what to run (default all); report: plot + README table from result CSVs")
    run = parser.add_argument_group("running (all / layer / model)")
    run.add_argument("--out", default=None,
                     help="folder of the result CSVs (default $FASTMASK_BENCH_OUT, else ./bench-results); "
                          "--out benchmarks/results appends to the repository's results")
    run.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                     help="auto: cuda when a GPU is visible")
    run.add_argument("--smoke", action="store_true",
                     help="tiny shapes and a tiny GPT-2 (a check of the code, not a measurement; smoke_*.csv)")
    run.add_argument("--backends", type=_csv_list, default=None,
                     help="fused backends to time, comma-separated (default: triton,cuda on GPUs; cpu,reference "
                          "on CPUs)")
    run.add_argument("--cases", type=_csv_list, default=None,
                     help="layer cases (default: all on GPUs and in smoke runs, weight on CPUs): "
                          "weight,unit_out,unit_in,head,sparse90,eval_sparse90")
    run.add_argument("--compile-cases", type=_csv_list, default=None,
                     help="cases that also time torch.compile of the naive code (default weight; none in smoke)")
    run.add_argument("--models", type=_csv_list, default=None,
                     help="GPT-2 sizes: 124M,xl,tiny (default 124M,xl on GPUs, tiny otherwise)")
    run.add_argument("--configs", type=_csv_list, default=None,
                     help="model configurations (default all): dense,dense_amp,naive_mask,fastmask_mask")
    run.add_argument("--steps", type=int, default=None, help="timed model steps (default 10; smoke 2)")
    run.add_argument("--trajectory-steps", type=int, default=None,
                     help="untimed first steps whose losses are compared (default 4; smoke 3)")
    run.add_argument("--time-budget-s", type=float, default=None,
                     help="skip (and list) the work items not started within this many seconds")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    rep = parser.add_argument_group("report")
    rep.add_argument("--add", default=None, help="first append the result CSVs of this folder (a run's --out)")
    rep.add_argument("--results", default="benchmarks/results", help="the results folder (default %(default)s)")
    rep.add_argument("--readme", default="README.md", help="README to update between its markers")
    rep.add_argument("--plot", default=None, help="PNG to write (default RESULTS/ratio_to_dense.png)")
    rep.add_argument("--no-readme", action="store_true", help="print the tables instead of updating the README")
    rep.add_argument("--no-plot", action="store_true", help="do not draw the plot")


def _check_args(args) -> None:
    from .layer import CASES
    from .model import CONFIGS, SIZES

    def bad(flag, values, known):
        unknown = [v for v in values or () if v not in known]
        if unknown:
            raise SystemExit(f"fastmask bench: {flag} must be among {', '.join(known)}; got {', '.join(unknown)}")

    bad("--cases", args.cases, CASES)
    bad("--compile-cases", args.compile_cases, CASES)
    bad("--models", args.models, tuple(SIZES))
    bad("--configs", args.configs, CONFIGS)
    for flag, value in (("--steps", args.steps), ("--trajectory-steps", args.trajectory_steps)):
        if value is not None and value < 1:
            raise SystemExit(f"fastmask bench: {flag} must be >= 1, got {value}")
    if args.time_budget_s is not None and args.time_budget_s <= 0:
        raise SystemExit(f"fastmask bench: --time-budget-s must be > 0, got {args.time_budget_s}")


def _report(args) -> int:
    from . import report
    from .results import add_results

    results = Path(args.results)
    if args.add:
        added = add_results(Path(args.add), results)
        for name, count in added.items():
            print(f"{results / name}: {count} new row(s) from {args.add}")
    plot_file = None if args.no_plot else Path(args.plot or results / report.PLOT_NAME)
    written = report.generate(results, None if args.no_readme else Path(args.readme), plot_file)
    if args.no_readme:
        print(written["markdown"])
    else:
        print(f"{args.readme}: {'updated' if written['readme_changed'] else 'unchanged'}")
    if plot_file is not None:
        print(f"plot: {written['plot'] or 'nothing to draw (no layer rows)'}")
    return 0


GPU_ONLY_NOTE = ("No CUDA GPU is visible: the GPU rows (layer grid at tokens 512/4096/16384 x 768x3072 and 1600x6400 "
                 "on the triton and cuda backends; GPT-2 124M and XL model steps) need a GPU.")


def run_from_args(args) -> int:
    _check_args(args)
    if args.part == "report":
        return _report(args)
    import torch

    from . import layer, model
    from .results import environment, file_name, out_dir, append_rows

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastmask bench: --device cuda, but torch sees no CUDA GPU")
    smoke = args.smoke or (device == "cpu" and args.part == "model")
    if not torch.cuda.is_available():
        print(GPU_ONLY_NOTE, flush=True)
    if smoke:
        print("Smoke run: tiny shapes and a tiny GPT-2, a check of the code, not a measurement (smoke_*.csv).")
    elif device == "cpu":
        print("Running the CPU comparisons.", flush=True)
    out = out_dir(args.out)
    env = environment(device, smoke)
    deadline = time.monotonic() + args.time_budget_s if args.time_budget_s else None
    progress = not args.no_progress
    backends, unusable = layer.available_backends(args.backends or layer.default_backends(device), device)
    for name, why in unusable.items():
        print(f"backend {name!r} not benchmarked: {why}")
    written, skipped, failures = set(), [], []

    def writer(part):
        def on_rows(rows):
            path = out / file_name(device, part, smoke)
            append_rows(path, rows)
            written.add(path)
        return on_rows

    def run_layer(cases):
        grid = layer.default_grid(device, smoke)
        compile_cases = args.compile_cases if args.compile_cases is not None else ([] if smoke else ["weight"])
        rows, left = layer.run_grid(grid, device, env, backends, cases, compile_cases,
                                    on_rows=writer("masked_linear"), deadline=deadline, progress=progress)
        skipped.extend(left)
        failures.extend(f"layer {r['case']} {r['in_features']}x{r['out_features']} tokens={r['tokens']} "
                        f"{r['method']}: {r['check']}" for r in rows if r.get("check", "ok") != "ok")

    def run_model():
        if device == "cpu" and not smoke:
            print("Model steps skipped: they need a CUDA GPU (`fastmask bench model` runs the tiny GPT-2 on CPU).")
            return
        sizes = args.models or (["tiny"] if smoke else ["124M", "xl"])
        dtype = "bfloat16" if device == "cuda" else "float32"
        rows, left = model.run_sizes(
            sizes, device, dtype, env, backends, args.configs or model.CONFIGS,
            steps=args.steps or (2 if smoke else 10), trajectory_steps=args.trajectory_steps or (3 if smoke else 4),
            on_rows=writer("model_step"), deadline=deadline, progress=progress)
        skipped.extend(left)
        failures.extend(f"model {r['model']} {r['config']} ({r['backend']}): trajectory differs from naive "
                        f"(loss {r['loss_rel_diff']}, density {r['density_rel_diff']}, gradient 1-cos "
                        f"{r['grad_cos_gap']}; tolerances {model.TRAJECTORY_TOL.get(r['dtype'])})"
                        for r in rows if r.get("trajectory_equal") == 0)
        failures.extend(f"model {r['model']} {r['config']}: {r['status']}" for r in rows if r["status"] != "ok")

    cases = args.cases or (list(layer.CASES) if device == "cuda" or smoke else ["weight"])
    if args.part == "layer":
        run_layer(cases)
    elif args.part == "model":
        run_model()
    else:  # the issue's headline targets first (per-weight layer, then the model steps), the other cases last
        first = [c for c in cases if c == "weight"]
        if first:
            run_layer(first)
        run_model()
        if len(first) < len(cases):
            run_layer([c for c in cases if c != "weight"])
    for path in sorted(written):
        print(f"rows appended to {path}")
    for item in skipped:
        print(f"skipped (time budget): {item}")
    for failure in failures:
        print(f"CHECK FAILED: {failure}")
    return 1 if failures else 0
