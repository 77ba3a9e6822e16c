"""`fastmask run knowledge --targets building.n.01,change.n.01 --seeds 0,1,2`: the whole experiment once per target x
seed (``runner.run_cells``: each run in ``<out>/<target>/seed-<s>/``, resumable per run), then the mean and the 95%
t-interval (``fastmask.experiments.stats``) of every figure over all runs and per target, in ``<out>/metrics.json``,
``<out>/report.md`` and ``<out>/study.png``, rewritten after each run.

The interval over all runs treats every (target, seed) as one draw of the pipeline: it describes the spread over
these targets and seeds, not a population of targets (7 released WordNet targets at most)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from ...assets import atomic_write_text
from ..runner import markdown_table, pyplot, save_figure
from ..runner.cells import read_finished, run_cells
from ..runner.report import _json_safe
from ..stats import format_mean_ci, mean_ci
from .config import KnowledgeConfig

SETS = ("targetkg", "targetkg_paraphrase", "controlkg", "controlkg_train", "lm")
LABELS = {"targetkg": "TargetKG", "targetkg_paraphrase": "TargetKG, other templates",
          "controlkg": "ControlKG (held out)", "controlkg_train": "ControlKG (training triplets)",
          "lm": "WikiText-2 (held out)"}
PER_TARGET = (("targetkg", "ppl_ratio"), ("targetkg", "ppl_ratio_random"), ("controlkg", "ppl_ratio"),
              ("controlkg", "ppl_ratio_random"), ("lm", "ppl_ratio"))
FIGURES = ("ppl_ratio", "ppl_ratio_random", "delta_ppl", "delta_ppl_random")


def cell_config(config: KnowledgeConfig, target: str, seed: int) -> KnowledgeConfig:
    """The one-run config of (target, seed) within a study: its own folder, no study lists."""
    return dataclasses.replace(config, targets=[], seeds=[], target=target, seed=seed,
                               out=str(Path(config.out) / target / f"seed-{seed}"))


def cells(config: KnowledgeConfig) -> list:
    targets = config.targets or [config.target]
    seeds = config.seeds or [config.seed]
    return [(f"{t} seed {s}", cell_config(config, t, s)) for t in targets for s in seeds]


def _finished(cell: KnowledgeConfig):
    metrics = read_finished(Path(cell.out))
    if metrics is None or metrics.get("target") != cell.target or metrics.get("seed") != cell.seed:
        return None
    return metrics


def _figures(runs: list) -> dict:
    """{set: {figure: mean_ci over the runs}} for the sets and figures every run has, plus the sparsity."""
    out = {}
    for name in SETS:
        if not all(name in m["summary"] for m in runs):
            continue
        row = {}
        for figure in FIGURES:
            values = [m["summary"][name].get(figure) for m in runs]
            if all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                row[figure] = mean_ci(values)
                if figure.startswith("ppl_ratio") and all(v > 0 for v in values):
                    # ratios spread over orders of magnitude between targets: the interval of the log ratio
                    row[f"log_{figure}"] = mean_ci([math.log(v) for v in values])
        out[name] = row
    out["sparsity"] = {"overall": mean_ci([m["sparsity"]["overall"] for m in runs])}
    return out


def aggregate(runs: list) -> dict:
    """The study's metrics: every figure over all runs and per target (mean and 95% t-interval; one run gives the
    value with no interval), and each run's own figures."""
    targets = list(dict.fromkeys(m["target"] for m in runs))
    per_run = [{"target": m["target"], "seed": m["seed"],
                **{f"{name}_{figure}": m["summary"][name].get(figure) for name in SETS if name in m["summary"]
                   for figure in ("ppl_ratio", "ppl_ratio_random")},
                "sparsity": m["sparsity"]["overall"],
                "seconds": sum(v for k, v in m["timing"].items() if k.endswith("_seconds"))} for m in runs]
    return {
        "experiment": "knowledge-study", "model": runs[0]["model"], "targets": targets,
        "seeds": sorted({m["seed"] for m in runs}), "n_runs": len(runs), "confidence": 0.95,
        "interval": "mean ± t_{0.975, n-1} * sample std / sqrt(n) over runs",
        "random_draws": runs[0]["summary"]["targetkg"].get("random_draws", 1),
        "all_runs": _figures(runs),
        "per_target": {t: _figures([m for m in runs if m["target"] == t]) for t in targets},
        "per_run": per_run, "seconds": sum(r["seconds"] for r in per_run),
        "timing": {k: runs[0]["timing"].get(k) for k in ("device", "torch_threads", "machine")},
    }


def _plot(out: Path, summary: dict) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    shown = [("targetkg", "TargetKG"), ("controlkg", "ControlKG"), ("lm", "WikiText-2")]
    for k, (name, label) in enumerate(shown):
        for j, (suffix, marker) in enumerate((("", "o"), ("_random", "x"))):
            x = 3 * k + j
            values = [r.get(f"{name}_ppl_ratio{suffix}") for r in summary["per_run"]]
            values = [v for v in values if v is not None]
            ax.scatter([x] * len(values), values, marker=marker, color=f"C{k}", alpha=0.6,
                       label=f"{label} ({'random' if suffix else 'subnetwork'} removed)")
            ci = summary["all_runs"].get(name, {}).get(f"ppl_ratio{suffix}")
            if ci and ci.get("low") is not None:
                ax.errorbar([x + 0.25], [ci["mean"]], yerr=[[ci["mean"] - ci["low"]], [ci["high"] - ci["mean"]]],
                            color="k", capsize=3)
    ax.set_yscale("log")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([])
    ax.set_ylabel("PPL remaining / PPL full")
    ax.set_title(f"{summary['n_runs']} runs ({len(summary['targets'])} targets x seeds): points per run, "
                 f"mean +- 95% CI")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, out / "study.png")


def format_geometric(log_summary) -> str:
    """"x10.8 [x2.1, x55]": the geometric mean of a ratio and its 95% interval (from the log ratios)."""
    if log_summary is None:
        return ""
    text = f"x{math.exp(log_summary['mean']):.3g}"
    if log_summary["low"] is not None:
        text += f" [x{math.exp(log_summary['low']):.3g}, x{math.exp(log_summary['high']):.3g}]"
    return text


def report_markdown(config: KnowledgeConfig, summary: dict) -> str:
    rows = []
    for name in SETS:
        row = summary["all_runs"].get(name)
        if row:
            rows.append((LABELS[name], *(format_geometric(row.get(f"log_{f}")) for f in FIGURES[:2]),
                         *(format_mean_ci(row.get(f)) for f in FIGURES)))
    table = markdown_table(["set", "ratio remaining/full (geometric)", "ratio random/full (geometric)",
                            "ratio remaining/full", "ratio random/full", "dPPL remaining", "dPPL random"], rows)
    per_target = markdown_table(
        ["target", "runs", "TargetKG ratio", "random", "ControlKG ratio", "random", "WikiText-2 ratio", "sparsity"],
        [(t, sum(r["target"] == t for r in summary["per_run"]),
          *(format_mean_ci(f.get(n, {}).get(k)) for n, k in PER_TARGET),
          format_mean_ci(f["sparsity"]["overall"], digits=4))
         for t, f in summary["per_target"].items()])
    timing = summary["timing"]
    return f"""# Knowledge-critical subnetworks: a study over {len(summary['targets'])} targets and seeds

`{summary['model']}`, targets {', '.join(summary['targets'])}; seeds {', '.join(map(str, summary['seeds']))};
{summary['n_runs']} runs, each the whole experiment (`fastmask run knowledge --target T --seed S`, the other flags
as in config.json) in `<target>/seed-<s>/`. Mean ± 95% t-interval half-width over the runs (one run: its value);
the geometric columns: exp of the mean log ratio [and of its 95% interval's ends];
the random baseline is the mean of {summary['random_draws']} random subnetworks of the learned one's per-layer size
in each run. dPPL = PPL remaining - PPL full is the paper's metric.

{table}

Per target (over its seeds):

{per_target}

Time: {summary['seconds']:.0f} s over the runs ({timing.get('device')}, {timing.get('torch_threads')} torch threads,
{timing.get('machine')}). Plot: study.png.
"""


def run_study(config: KnowledgeConfig, run_one, *, resume: bool = False, overwrite: bool = False, log=None) -> dict:
    """Every (target, seed) of the study through ``run_one``, the summary written after each run."""
    out = Path(config.out)

    def summarise(done: list) -> dict:
        summary = aggregate(done)
        atomic_write_text(out / "metrics.json", json.dumps(_json_safe(summary), indent=2) + "\n")
        atomic_write_text(out / "report.md", report_markdown(config, summary))
        _plot(out, summary)
        return summary

    return run_cells(config, cells(config), run_one, finished=_finished, summarise=summarise, resume=resume,
                     overwrite=overwrite, log=log)


__all__ = ["run_study", "aggregate", "cell_config", "cells"]
