"""Report of the topoprobe experiment: probes.png (depth probes and structural metrics per layer), finetuning.png
(dev MCCs of the fine-tuning sweep) and report.md."""

from __future__ import annotations

import math

from ..runner import Run, markdown_table, pyplot, save_figure
from ..stats import format_mean_ci
from .config import PAPER_SP, RELEASED_PSEUDO_EPOCHS, RELEASED_SP_EPOCHS, TopoprobeConfig


# --- plots and report ---------------------------------------------------------------------------------------
def _plots(run: Run, metrics: dict) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    styles = {"full": "-", "masked": "--"}
    for variant, rows in metrics["probes"].items():
        layers = [r["layer"] for r in rows]
        for i, kind in enumerate(("sp", "ssp", "essp")):
            left.plot(layers, [r[kind]["val_mse"] for r in rows], styles[variant], marker="o", color=f"C{i}",
                      label=f"X_{kind}" + (" (subnetwork)" if variant == "masked" else ""))
        metric_rows = [("depth Spearman", lambda r: r["sp"].get("spearman")),
                       ("root accuracy", lambda r: r["sp"].get("root_accuracy"))]
        if "distance" in rows[0]:
            metric_rows += [("UUAS", lambda r: r["distance"]["uuas"]),
                            ("distance Spearman", lambda r: r["distance"]["spearman"])]
        for i, (name, get) in enumerate(metric_rows):
            right.plot(layers, [get(r) for r in rows], styles[variant], marker="o", color=f"C{i + 3}",
                       label=name + (" (subnetwork)" if variant == "masked" else ""))
    left.set_yscale("log")
    left.set_xlabel("layer (0 = embeddings)")
    left.set_ylabel("validation MSE")
    left.set_title(f"{metrics['model']}: depth probes per layer")
    right.set_xlabel("layer (0 = embeddings)")
    right.set_title("structural-probe metrics (H&M)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, run.path("probes.png"))
    summary = metrics["finetuning"]["summary"]
    if summary:
        fig, ax = plt.subplots(figsize=(7, 4))
        base = next((row for row in summary if row["layer"] == "baseline"), None)
        rows = [row for row in summary if row["layer"] != "baseline"]
        for offset, (key, label) in enumerate((("mcc", "corpus MCC"), ("mcc_per_batch", "per-batch MCC (released)"))):
            # error bars: the 95% t-interval over seeds (none with one seed)
            ax.errorbar([row["layer"] + 0.08 * offset for row in rows], [row[f"{key}_mean"] for row in rows],
                        yerr=[_half_width(row, key) for row in rows], fmt="o", capsize=3, color=f"C{offset}",
                        label=f"{label}, probe-regularised")
            if base:
                ax.axhline(base[f"{key}_mean"], color=f"C{offset}", ls="--", lw=1, label=f"{label}, plain fine-tuning")
        ax.set_xlabel("layer of the probe loss")
        ax.set_ylabel("CoLA in-domain dev MCC")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save_figure(fig, run.path("finetuning.png"))


def _half_width(row: dict, key: str) -> float:
    summary = row.get(key)  # units written before the intervals existed have only mean and std
    return (summary.get("half_width") or 0.0) if isinstance(summary, dict) else 0.0


def _ci(summary, digits: int = 3, signed: bool = False) -> str:
    return "n/a" if summary is None else format_mean_ci(summary, digits, signed)


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else \
        f"{value:.{digits}f}"


def _finetune_cells(row: dict) -> list:
    paired = row.get("paired")
    per_seed = "" if not paired or paired["mcc"] is None else " / ".join(
        f"{v:+.3f}" for v in paired["mcc"]["values"])
    cells = [row["layer"], row["runs"], _ci(row.get("mcc")), _ci(row.get("mcc_per_batch"))]
    if paired:
        cells += [_ci(paired["mcc"], signed=True), per_seed, _ci(paired["mcc_per_batch"], signed=True)]
    else:
        cells += ["", "", ""]
    return cells + [f"{row['predicted_acceptable']:.0%}"]


def _protocol_line(effective: TopoprobeConfig, metrics: dict) -> str:
    if effective.protocol != "released":
        return (f"- protocol: default (X_sp {effective.epochs('sp')} epochs, X_ssp / X_essp {effective.epochs('ssp')} "
                f"epochs, Adam lr {effective.probe_lr}, seed {effective.seed})")
    pool = metrics["data"].get("pseudo_pool_size")
    reduced = [f"X_sp {effective.epochs('sp')} epochs instead of {RELEASED_SP_EPOCHS}"] \
        if effective.epochs("sp") != RELEASED_SP_EPOCHS else []
    if effective.epochs("ssp") != RELEASED_PSEUDO_EPOCHS:
        reduced.append(f"X_ssp / X_essp {effective.epochs('ssp')} epochs instead of {RELEASED_PSEUDO_EPOCHS}")
    if pool and metrics["data"]["pseudo_sentences"] < pool:
        reduced.append(f"{metrics['data']['pseudo_sentences']} pool sentences (a random subset) instead of {pool}")
    return ("- protocol: **released** (AdamW lr 2e-5 with linear decay, grad clip 1.0, seed 42; every sentence padded "
            "to its corpus' maximum with [CLS], [SEP] and padding in the losses, target 2.0; X_sp on the released EWT "
            "subset, train+dev for training and test for validation; X_ssp / X_essp on the released GLUE sentence "
            "pool, 90/10)" + (f"; **reduced budget**: {'; '.join(reduced)}" if reduced else
                              "; the released budget (X_sp 300 epochs, X_ssp / X_essp 10)"))


def _comparison_lines(metrics: dict, effective: TopoprobeConfig) -> list[str]:
    """This run's per-layer X_* beside the --compare-with run's and the released bert-large values."""
    found = metrics.get("comparison")
    if not found or not (found.get("other") or found.get("bert_large")):
        return []
    other, large = found.get("other"), found.get("bert_large")
    kinds = ("sp", "ssp", "essp")
    header = ["layer"] + [f"X_{k} (this run)" for k in kinds]
    if other:
        header += [f"X_{k} ({other['protocol']} protocol)" for k in kinds]
    if large:
        header += ["bert-large layer"] + [f"X_{k} (bert-large, released)" for k in kinds]
    body = []
    for row in metrics["probes"]["full"]:
        layer = row["layer"]
        cells = [layer] + [_fmt(row[k]["val_mse"]) for k in kinds]
        if other:
            theirs = other["rows"].get(layer) or other["rows"].get(str(layer))
            cells += [_fmt(theirs[k]) if theirs else "" for k in kinds]
        if large:
            mapped = large["layer_map"].get(layer, large["layer_map"].get(str(layer)))
            cells += [mapped] + [_fmt(large["probes"][k].get(mapped, large["probes"][k].get(str(mapped))))
                                 for k in kinds]
        body.append(cells)
    lines = ["### Beside " + " and ".join(
        (["the `--compare-with` run (" + f"`{other['folder']}`, {other['protocol']} protocol" +
          (", padding included" if other.get("include_padding") else ", word pieces only") + ")"] if other else []) +
        (["the released bert-large-uncased values"] if large else [])), "",
        markdown_table(header, body), "",
        "The bert-large columns are the last epoch's validation loss of the released logs (effective-metrics/"
        "released-results/measuring), at the same relative depth (layer x 24 / layers). Values of different protocols "
        "are not on one scale: with padding in the loss the mean also runs over [CLS], [SEP] and padding positions "
        "(target 2.0), which lowers X_sp; the released logs are of a 24-layer, 1024-wide model.", ""]
    return lines


def report_markdown(config: TopoprobeConfig, effective: TopoprobeConfig, metrics: dict) -> str:
    timing, data = metrics["timing"], metrics["data"]
    lines = [f"# fastmask topoprobe: {metrics['model']}", "",
             f"- model `{metrics['model_source']}` ({metrics['model_type']}, {metrics['n_layers']} layers + embeddings,"
             f" hidden {metrics['hidden_size']}); probe rank {metrics['probe_rank']}",
             f"- UD English-EWT{' (the released subset)' if data.get('treebank') == 'ewt-subset' else ''}: "
             f"{data['treebank_train']} training sentences, {data['treebank_val']} validation "
             f"sentences ({data['val_split']} split); X_ssp / X_essp on {data['pseudo_sentences']} "
             f"{data['pseudo_corpus']} sentences",
             _protocol_line(effective, metrics),
             f"- probes: X_sp {effective.epochs('sp')} / X_ssp, X_essp {effective.epochs('ssp')} epochs, Adam lr "
             f"{effective.probe_lr} (linear decay), "
             + ("padding and special tokens INCLUDED in the losses (the released code)" if effective.include_padding
                else "word pieces only in the losses (padding and special tokens excluded)"),
             f"- hardware: {timing['cpu']} ({timing['cpu_count']} cores), device {timing['device']}, "
             f"{timing['torch_threads']} torch thread(s) ({timing['threads_reason']}); setup "
             f"{timing['setup_seconds']:.0f} s, probes {timing['probe_seconds']:.0f} s, fine-tuning "
             f"{timing['finetune_seconds']:.0f} s in this invocation; summed over the finished units when they were "
             f"computed: probe training {timing['probe_training_unit_seconds']:.0f} s (hidden-state extraction not "
             f"included), fine-tuning runs {timing['finetune_unit_seconds']:.0f} s", "",
             "## Depth probes per layer (validation MSE; lower is better)", "",
             "![probes](probes.png)", ""]
    for variant, rows in metrics["probes"].items():
        if len(metrics["probes"]) > 1:
            title = "full model" if variant == "full" else \
                f"subnetwork of `{config.masks}` (sparsity {_fmt(metrics['masked_sparsity'])})"
            lines += [f"### {title}", ""]
        header = ["layer", "X_sp", "X_ssp", "X_essp", "depth Spearman", "root acc"]
        if "distance" in rows[0]:
            header += ["UUAS", "dist. Spearman"]
        body = []
        for row in rows:
            cells = [row["layer"], _fmt(row["sp"]["val_mse"]), _fmt(row["ssp"]["val_mse"]),
                     _fmt(row["essp"]["val_mse"]), _fmt(row["sp"].get("spearman")),
                     _fmt(row["sp"].get("root_accuracy"))]
            if "distance" in row:
                cells += [_fmt(row["distance"]["uuas"]), _fmt(row["distance"]["spearman"])]
            body.append(cells)
        lines += [markdown_table(header, body), ""]
        floors = rows[0].get("baselines")  # the same for every layer (they ignore the hidden states)
        if floors is not None:
            lines += ["Trivial predictors on the same validation tokens (they ignore the hidden states; a learned "
                      "probe must beat them to mean anything):", "",
                      markdown_table(["predictor", "X_sp", "X_ssp", "X_essp"],
                                     [[f"every token at the mean training depth ({_fmt(floors['mean_depth'])})",
                                       _fmt(floors["sp_mean_depth"]), "", ""],
                                      ["every token at depth 2", "", _fmt(floors["ssp_constant"]),
                                       _fmt(floors["essp_constant"])],
                                      ["a star: the first token at 1, the others at 2", "", _fmt(floors["ssp_star"]),
                                       _fmt(floors["essp_star"])]]), ""]
            not_fitted = metrics.get("x_sp_not_fitted", {}).get(variant, [])
            if not_fitted:
                lines += [f"**The X_sp probe did not fit at layer(s) {', '.join(map(str, not_fitted))}**: its "
                          f"validation MSE is no better than predicting the mean depth for every token "
                          f"({_fmt(floors['sp_mean_depth'])}), so those layers' X_sp says nothing about how much "
                          f"syntax they hold; see `val_history` in metrics.json for how its training went.", ""]
    lines += _comparison_lines(metrics, effective)
    curve, best = metrics["x_sp_curve"], metrics["x_sp_min_layer"]
    first, last = min(curve), max(curve)
    lines += [f"X_sp is lowest at layer {best} ({_fmt(curve[best])}), against {_fmt(curve[first])} at layer {first} "
              f"and {_fmt(curve[last])} at layer {last}: "
              f"{'a U-shaped curve' if metrics['u_shaped'] else 'NOT a U-shaped curve'} over the layers. The paper's "
              f"BERT-large (released logs): " + ", ".join(f"{v} at layer {k}" for k, v in PAPER_SP.items()) +
              " (padding included there).", ""]
    rows = {r["layer"]: r for r in metrics["probes"]["full"]}
    lines += [f"### Diagnostics at layer {best}: n - label per depth level (validation tokens)", "",
              markdown_table(["probe", "level", "count", "mean", "std"],
                             [[kind, d["level"], d["count"], _fmt(d["mean"]), _fmt(d["std"])]
                              for kind in ("sp", "ssp") for d in rows[best][kind]["diagnostics"]]), ""]
    summary = metrics["finetuning"]["summary"]
    if summary:
        lines += ["## Probe-regularised fine-tuning on CoLA (in-domain dev, 527 sentences)", "",
                  f"{'Class-weighted CE' if effective.class_weighted else 'CE'} + {effective.probe_weight} x "
                  f"tree-topological probe loss at the layer (acceptable sentences only; probe initialised from that "
                  f"layer's X_ssp probe; loss over "
                  f"{'every position, padding included, as released' if effective.include_padding else 'word pieces'}"
                  f"), {effective.steps} AdamW steps of "
                  f"{effective.batch_size} at lr {effective.finetune_lr} (10% warm-up, linear decay; word embeddings "
                  f"{'frozen' if effective.freeze_word_embeddings else 'trained'}; at most {effective.max_length} "
                  f"pieces a sentence) on {effective.finetune_train_sentences or 'all'} training sentences; seeds "
                  f"{metrics['finetuning']['seeds']}. Mean +- the half-width of the 95% Student-t interval over "
                  f"seeds. 'per-batch' is the mean of the MCCs of batches of {effective.batch_size} (what the released "
                  "code reports); 'corpus' is the MCC of the whole dev set. The paired columns are the per-seed "
                  "differences from plain fine-tuning with the same seed (same head initialisation and data order): "
                  "their mean +- 95% interval, and each seed's difference; an interval that contains 0 shows no "
                  "effect at this number of seeds.", "", "![fine-tuning](finetuning.png)", "",
                  markdown_table(["probe layer", "runs", "corpus MCC", "per-batch MCC", "paired diff. corpus MCC",
                                  "per seed", "paired diff. per-batch MCC", "predicted acceptable"],
                                 [_finetune_cells(row) for row in summary]), ""]
        large = (metrics.get("comparison") or {}).get("bert_large")
        if large and large.get("finetuning"):
            lines += ["The released bert-large-uncased CoLA runs (effective-metrics/released-results/fine-tuning, last "
                      "of 3 epochs, lr 2e-5, probe loss over every position; per-batch MCC only), at the layers of "
                      "the same relative depth:", "",
                      markdown_table(["bert-large probe layer", "runs", "per-batch MCC", "paired diff. per-batch MCC"],
                                     [[row["layer"], row["runs"], _ci(row["mcc_per_batch"]),
                                       _ci(row["paired"]["mcc_per_batch"], signed=True) if "paired" in row else ""]
                                      for row in large["finetuning"]]), ""]
        single = [(row["layer"], seed) for row in summary for seed in row.get("single_class_seeds", [])]
        if single:
            every = len(single) == len(metrics["finetuning"]["runs"])
            lines += [f"**{'Every run predicts' if every else f'{len(single)} of the runs predict'} a single class for "
                      f"the whole dev set** (MCC 0 by definition): " + ", ".join(
                          f"{'baseline' if layer == 'baseline' else f'layer {layer}'} seed {seed}"
                          for layer, seed in single) +
                      ". Such a run has learnt no more than a class prior, and a comparison that contains it "
                      "compares little. Measured on MiniLM at 400 steps: with plain CE the probe-regularised runs "
                      "stay at the prior, with `--class-weighted` (the default) they leave it; or train longer.", ""]
    speed = metrics["pseudo_label_speed"]
    lines += ["## Pseudo-label construction", "",
              f"Vectorised (one sort + one cumulative minimum, exact) vs the direct per-token transcription on a "
              f"32 x 128 batch: {speed['vectorised_ms']:.3f} ms vs {speed['direct_ms']:.1f} ms, "
              f"**{speed['speedup']:.0f}x** (best of several, this machine).", "",
              "Files: `metrics.json` (every number, per-level diagnostics, each fine-tuning run), `units/` (finished "
              "units, read back by --resume), `probes.png`, `finetuning.png`, `config.json` (`--config` reruns it)."]
    return "\n".join(lines) + "\n"
