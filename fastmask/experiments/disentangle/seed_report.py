"""The results of a multi-seed `fastmask run disentangle --seeds ...` for reading: the leakage and sweep plots with
95% t-interval error bars, and the report markdown (every figure as mean ± half-width over the seeds), both from the
aggregated metrics (``seeds.aggregate``)."""

from __future__ import annotations

from pathlib import Path

from ..runner import markdown_table, pyplot, save_figure
from ..stats import format_mean_ci
from .config import DisentangleConfig

PROBE_NAMES = {"": "linear (logistic regression)", "_mlp": "MLP (one hidden layer, early stopping on a dev split)"}


def _err(summary) -> float:
    return summary["half_width"] or 0.0


def seed_plots(out, summary: dict) -> None:
    """leakage.png (each representation probed for every factor, linear and MLP probes) and sweep.png
    (disentanglement vs zero weights per pruning sparsity), means with 95% t-interval error bars."""
    plt = pyplot()  # matplotlib is optional
    if plt is None:
        return
    out, factors = Path(out), summary["factors"]
    reps = list(summary["leakage"])
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 2.2 * len(reps)), 4), sharey=True)
    width = 0.8 / len(factors)
    for ax, suffix in zip(axes, PROBE_NAMES):
        table = summary[f"leakage{suffix}"]
        for j, name in enumerate(factors):
            ax.bar([i + j * width for i in range(len(reps))], [table[r][j]["mean"] for r in reps], width,
                   yerr=[_err(table[r][j]) for r in reps], capsize=3, label=f"probe for {name}")
        ax.axhline(summary["chance"], color="gray", ls="--", lw=1, label="chance")
        ax.set_xticks([i + width * (len(factors) - 1) / 2 for i in range(len(reps))], reps, rotation=25, fontsize=8)
        ax.set_ylim(0.3, 1.0)
        ax.set_title(f"{PROBE_NAMES[suffix].split(' (')[0]} probes", fontsize=10)
    axes[0].set_ylabel(f"probe accuracy (balanced test), mean ± 95% CI over {summary['n_seeds']} seeds")
    axes[0].legend(fontsize=8)
    save_figure(fig, out / "leakage.png")
    sweep = summary["sweep"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = [r["mean_zero_fraction"]["mean"] for r in sweep]
    for suffix, marker in (("", "o-"), ("_mlp", "s--")):
        ys = [r[f"disentanglement{suffix}"] for r in sweep]
        ax.errorbar(x, [y["mean"] for y in ys], yerr=[_err(y) for y in ys], xerr=[_err(r["mean_zero_fraction"])
                    for r in sweep], fmt=marker, capsize=4, label=f"{PROBE_NAMES[suffix].split(' (')[0]} probes")
    for xi, r in zip(x, sweep):
        ax.annotate(f"pruned {r['prune_sparsity']:g}", (xi, r["disentanglement"]["mean"]), fontsize=8,
                    textcoords="offset points", xytext=(4, 4))
    ax.axhline(0.0, color="gray", lw=1)
    ax.set_xlabel("zero weights of the masked layers under a mask (pruned or closed; mean over masks)")
    ax.set_ylabel("own - other probe accuracy (mean over masks)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"sparsity vs disentanglement, mean ± 95% CI over {summary['n_seeds']} seeds", fontsize=10)
    save_figure(fig, out / "sweep.png")


def _leakage_table(summary: dict, suffix: str) -> str:
    factors = summary["factors"]
    gaps = summary[f"own_minus_other{suffix}"]
    rows = [[rep] + [format_mean_ci(a) for a in row] + [format_mean_ci(gaps.get(rep), signed=True)]
            for rep, row in summary[f"leakage{suffix}"].items()]
    return markdown_table(["representation"] + [f"probe: {f}" for f in factors] + ["own - other"], rows)


def _verdict(summary: dict) -> str:
    lines = []
    for rep, by_probe in summary["own_minus_other_ci_above_0"].items():
        for probe, suffix, name in (("linear", "", "linear"), ("mlp", "_mlp", "MLP")):
            s = summary[f"own_minus_other{suffix}"][rep]
            if by_probe[probe] is None:
                state = "one seed: no interval"
            else:
                state = "**above 0**" if by_probe[probe] else "**not above 0**"
            interval = "" if s["low"] is None else f" [{s['low']:+.3f}, {s['high']:+.3f}]"
            lines.append(f"- {rep}, {name} probe: own - other {s['mean']:+.3f}{interval}: {state}")
    return "\n".join(lines)


def seeds_report_markdown(config: DisentangleConfig, summary: dict) -> str:
    factors, n = summary["factors"], summary["n_seeds"]
    per_seed = markdown_table(
        ["seed", "disentanglement (linear)", "disentanglement (MLP)"]
        + [f"mask_{k} own - other (linear / MLP)" for k in range(len(factors))] + ["wall time (s)"],
        [[p["seed"], f"{p['disentanglement']:+.3f}", f"{p['disentanglement_mlp']:+.3f}"]
         + [f"{p['own_minus_other'][f'mask_{k}']:+.3f} / {p['own_minus_other_mlp'][f'mask_{k}']:+.3f}"
            for k in range(len(factors))] + [f"{p['total_seconds']:.0f}"] for p in summary["per_seed"]], digits=3)
    robust_rows = []
    for rep in summary["leakage"]:
        ks = [int(rep.rsplit("_", 1)[1])] if rep.startswith(("mask_", "adversarial_", "finetuned_")) \
            else range(len(factors))
        robust_rows += [[rep, factors[k], format_mean_ci(summary["in_distribution_correlated_probe"][rep][k]),
                         format_mean_ci(summary["robustness_shifted"][rep][k])] for k in ks]
    robust = markdown_table(["representation", "factor", "balanced test", "shifted test"], robust_rows)
    sweep = markdown_table(
        ["pruning sparsity", "steps", "zero weights (mean over masks)", "disentanglement (linear)",
         "disentanglement (MLP)"] + [f"mask_{k}: own / other (linear)" for k in range(len(factors))],
        [[r["prune_sparsity"], r["steps"], format_mean_ci(r["mean_zero_fraction"]),
          format_mean_ci(r["disentanglement"], signed=True), format_mean_ci(r["disentanglement_mlp"], signed=True)]
         + [f"{format_mean_ci(r['own'][k])} / {format_mean_ci(r['other'][k])}" for k in range(len(factors))]
         for r in summary["sweep"]])
    blocks = f"the top {config.top_blocks} transformer blocks" if config.top_blocks else "every transformer block"
    sec = summary["seconds"]
    return f"""# fastmask run disentangle over {n} seeds

Disentangling representations by masking (Zhang, van de Meent, Wallace, EMNLP 2021) on `{config.model}`
(`{summary['model_source']}`), data `{config.data}`: {len(factors)} masks ({config.estimator}, granularity
{config.granularity}) over the linear layers of {blocks}; {config.steps} steps of {config.batch_size} anchors (init
keep {config.init_keep}, lr {config.lr}), triplet weight {config.triplet_weight}, overlap weight
{config.overlap_weight}, L0 weight {config.l0_weight}, pruning {config.prune_sparsity:g} before masking.

Seeds {', '.join(str(s) for s in summary['seeds'])} of {', '.join(str(s) for s in config.seeds)} done; each seed
is a whole run of its own (`seed-<s>/`: data split, mask noise, data order, baselines, probes, pruning sweep; its
own report). Every figure: **mean ± half-width of the 95% t-interval over the seeds** ({summary['interval']}; one
seed: the value alone). Chance is {summary['chance']}.

## Does each mask keep its own factor better than the other? (own - other, 95% CI)

{_verdict(summary)}

## Leakage, linear probes (trained on the balanced probe split, scored on the balanced test split)

{_leakage_table(summary, '')}

## Leakage, MLP probes (one hidden layer of 128; early stopping on a stratified 20% dev split of the probe split)

{_leakage_table(summary, '_mlp')}

Disentanglement (mean over masks of own - best other): linear {format_mean_ci(summary['disentanglement'],
signed=True)}, MLP {format_mean_ci(summary['disentanglement_mlp'], signed=True)}. `adversarial_k`: gradient reversal
over frozen features; `finetuned_k`: {blocks} fine-tuned for factor k.

![leakage](leakage.png)

## Per seed

{per_seed}

## Robustness to a shifted correlation (linear probes trained on the correlated training split)

{robust}

## Sparsity vs disentanglement (pruning sweep, pruning sparsities done in every seed)

{sweep}

![sweep](sweep.png)

## Cost

{sec['total']:.0f} s in all ({', '.join(f'{s:.0f}' for s in sec['per_seed'])} s per seed) on
{summary['hardware']['device']} ({summary['hardware']['torch_threads']} torch threads).

Files: `metrics.json` (every summary with its per-seed values), `leakage.png`, `sweep.png`, `config.json`,
`seed-<s>/` (each seed's full results).
"""


__all__ = ["seed_plots", "seeds_report_markdown"]
