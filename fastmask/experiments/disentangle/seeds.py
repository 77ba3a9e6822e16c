"""`fastmask run disentangle --seeds 0,1,2`: the whole experiment once per seed (data split, masks, baselines,
probes, pruning sweep; seed s in ``<out>/seed-<s>/``, a complete run folder of its own with its checkpoints), then the
mean and the 95% t-interval over the seeds of every figure (``fastmask.experiments.stats``) in ``<out>/metrics.json``
and ``<out>/report.md``, rewritten after each seed. ``--resume`` skips the seeds whose folder holds finished results
and resumes the others from their newest checkpoint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

from ...assets import atomic_write_text
from ..runner import ConfigError
from ..runner.cells import read_finished, run_cells
from ..runner.report import _json_safe
from ..stats import ci_above, summarize
from .config import DisentangleConfig
from .evaluate import best_other
from .seed_report import seed_plots, seeds_report_markdown
from .syntax_report import syntax_aggregate, syntax_seeds_report_markdown

# The per-seed figures summarised over the seeds (keys of a single run's metrics.json).
SUMMARISED = ("leakage", "leakage_mlp", "own_minus_other", "own_minus_other_mlp", "disentanglement",
              "disentanglement_mlp", "robustness_shifted", "in_distribution_correlated_probe", "mask_sparsity")


def seed_folder(out, seed: int) -> Path:
    return Path(out) / f"seed-{seed}"


def seed_config(config: DisentangleConfig, seed: int) -> DisentangleConfig:
    """The one-seed config of ``seed`` within a multi-seed run: its own folder, no ``seeds``."""
    return dataclasses.replace(config, seeds=[], seed=seed, out=str(seed_folder(config.out, seed)))


def _finished(config: DisentangleConfig, folder: Path):
    """The metrics of a seed folder whose run finished (main evaluation and every sweep point), else None."""
    metrics = read_finished(folder)
    if metrics is None:
        return None
    points = 0 if config.data == "syntax" else len({config.prune_sparsity, *config.sweep_sparsities})
    if metrics.get("seed") != config.seed or len(metrics.get("sweep", [])) != points:
        return None
    return metrics


def _sweep_summary(per_seed: list) -> list:
    """Per pruning sparsity done in every seed: the summaries of its disentanglement (linear and MLP probes), zero
    fraction, closed gates and each mask's own / best-other accuracy."""
    common = set.intersection(*({r["prune_sparsity"] for r in m["sweep"]} for m in per_seed))
    rows = []
    for s in sorted(common):
        points = [next(r for r in m["sweep"] if r["prune_sparsity"] == s) for m in per_seed]
        figures = []
        for r in points:
            n = len(r["zero_fraction"])
            fig = {"disentanglement": r["disentanglement"], "disentanglement_mlp": r["disentanglement_mlp"],
                   "zero_fraction": r["zero_fraction"], "mean_zero_fraction": sum(r["zero_fraction"]) / n,
                   "mask_sparsity": r["mask_sparsity"]}
            for probe in ("", "_mlp"):
                rows_k = [r[f"leakage{probe}"][str(k)] for k in range(n)]
                fig[f"own{probe}"] = [row[k] for k, row in enumerate(rows_k)]
                fig[f"other{probe}"] = [best_other(row, k) for k, row in enumerate(rows_k)]
            figures.append(fig)
        rows.append({"prune_sparsity": s, "steps": points[0]["steps"], **summarize(figures)})
    return rows


def aggregate(per_seed: list, seeds: list) -> dict:
    """The multi-seed metrics: each figure of ``SUMMARISED`` and of the sweep as a ``stats.mean_ci`` summary over
    the seeds, the verdict per mask (is the whole 95% interval of own - other above 0?), and the per-seed values."""
    per_seed = [json.loads(json.dumps(_json_safe(m))) for m in per_seed]  # one form: JSON keys (strings)
    first = per_seed[0]
    summary = {key: summarize([m[key] for m in per_seed], path=key) for key in SUMMARISED}
    masks = [rep for rep in first["own_minus_other"] if rep.startswith("mask_")]
    verdict = {rep: {probe: ci_above(summary[f"own_minus_other{suffix}"][rep])
                     for probe, suffix in (("linear", ""), ("mlp", "_mlp"))} for rep in masks}
    seconds = [sum(m["seconds"].values()) for m in per_seed]
    return {
        "experiment": first["experiment"], "seeds": list(seeds), "n_seeds": len(per_seed), "confidence": 0.95,
        "interval": "mean ± t_{0.975, n-1} * sample std / sqrt(n) over seeds", "model": first["model"],
        "model_source": first["model_source"], "factors": first["factors"], "values": first["values"],
        "data": {"per_seed_splits": [m["data"]["splits"] for m in per_seed],
                 "deduplication": first["data"]["deduplication"], "raw_examples": first["data"]["raw_examples"]},
        "chance": first["chance"], **summary, "sweep": _sweep_summary(per_seed),
        "own_minus_other_ci_above_0": verdict,
        "per_seed": [{"seed": m["seed"], "disentanglement": m["disentanglement"],
                      "disentanglement_mlp": m["disentanglement_mlp"], "own_minus_other": m["own_minus_other"],
                      "own_minus_other_mlp": m["own_minus_other_mlp"], "seconds": m["seconds"],
                      "total_seconds": t} for m, t in zip(per_seed, seconds)],
        "seconds": {"total": sum(seconds), "per_seed": seconds}, "hardware": first["hardware"],
    }


def run_seeds(config: DisentangleConfig, run_one: Callable, *, resume: bool = False, overwrite: bool = False,
              log=None) -> dict:
    """Run ``run_one(seed_config(config, s), resume=, overwrite=, log=)`` for each of ``config.seeds`` (finished
    seeds skipped under ``resume``; ``runner.run_cells``) and write the summary over the seeds done so far after
    each. Returns the aggregated metrics ({} in the non-main processes of a data-parallel run)."""
    if not config.seeds:
        raise ConfigError("seeds must hold at least one seed for a multi-seed run, got []")
    out = Path(config.out)

    def summarise(done: list) -> dict:
        if config.data == "syntax":  # setting 3 has its own figures (syntax_report.py)
            summary = syntax_aggregate(done, [m["seed"] for m in done])
            report = syntax_seeds_report_markdown(config, summary)
        else:
            summary = aggregate(done, [m["seed"] for m in done])
            seed_plots(out, summary)
            report = seeds_report_markdown(config, summary)
        atomic_write_text(out / "metrics.json", json.dumps(_json_safe(summary), indent=2) + "\n")
        atomic_write_text(out / "report.md", report)
        return summary

    cells = [(f"seed {s}", seed_config(config, s)) for s in config.seeds]
    return run_cells(config, cells, run_one, finished=lambda one: _finished(one, Path(one.out)),
                     summarise=summarise, resume=resume, overwrite=overwrite, log=log)


__all__ = ["run_seeds", "aggregate", "seed_config", "seed_folder", "SUMMARISED"]
