"""Report of the topoprobe experiment: probes.png (depth probes and structural metrics per layer), finetuning.png
(dev MCCs of the fine-tuning sweep) and report.md."""

from __future__ import annotations

import math

from ..runner import Run, markdown_table, pyplot, save_figure
from .config import PAPER_SP, TopoprobeConfig


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
            ax.errorbar([row["layer"] + 0.08 * offset for row in rows], [row[f"{key}_mean"] for row in rows],
                        yerr=[row[f"{key}_std"] for row in rows], fmt="o", capsize=3, color=f"C{offset}",
                        label=f"{label}, probe-regularised")
            if base:
                ax.axhline(base[f"{key}_mean"], color=f"C{offset}", ls="--", lw=1, label=f"{label}, plain fine-tuning")
        ax.set_xlabel("layer of the probe loss")
        ax.set_ylabel("CoLA in-domain dev MCC")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save_figure(fig, run.path("finetuning.png"))


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else \
        f"{value:.{digits}f}"


def report_markdown(config: TopoprobeConfig, effective: TopoprobeConfig, metrics: dict) -> str:
    timing, data = metrics["timing"], metrics["data"]
    lines = [f"# fastmask topoprobe: {metrics['model']}", "",
             f"- model `{metrics['model_source']}` ({metrics['model_type']}, {metrics['n_layers']} layers + embeddings,"
             f" hidden {metrics['hidden_size']}); probe rank {metrics['probe_rank']}",
             f"- UD English-EWT: {data['treebank_train']} training sentences, {data['treebank_val']} validation "
             f"sentences ({data['val_split']} split); X_ssp / X_essp on {data['pseudo_sentences']} "
             f"{data['pseudo_corpus']} sentences",
             f"- probes: {effective.probe_epochs} epochs, Adam lr {effective.probe_lr} (linear decay), "
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
                  f"layer's X_ssp probe), {effective.steps} AdamW steps of "
                  f"{effective.batch_size} at lr {effective.finetune_lr} (word embeddings "
                  f"{'frozen' if effective.freeze_word_embeddings else 'trained'}) on "
                  f"{effective.finetune_train_sentences or 'all'} training sentences; seeds "
                  f"{metrics['finetuning']['seeds']}. Mean +- std over seeds. 'per-batch' is the mean of the MCCs of "
                  f"batches of {effective.batch_size} (what the released code reports); 'corpus' is the MCC of the "
                  "whole dev set.", "", "![fine-tuning](finetuning.png)", "",
                  markdown_table(["probe layer", "runs", "corpus MCC", "per-batch MCC", "predicted acceptable"],
                                 [[row["layer"], row["runs"], f"{row['mcc_mean']:.3f} +- {row['mcc_std']:.3f}",
                                   f"{row['mcc_per_batch_mean']:.3f} +- {row['mcc_per_batch_std']:.3f}",
                                   f"{row['predicted_acceptable']:.0%}"] for row in summary]), ""]
        if all(min(r["predicted_acceptable"], 1 - r["predicted_acceptable"]) < 0.05
               for r in metrics["finetuning"]["runs"]):
            lines += ["**Every run predicts (almost) a single class** (95% or more of the dev set; MCC about 0), so "
                      "this sweep compares nothing: within this budget the model has learnt little more than a class "
                      "prior. A few hundred `--steps` (with `--class-weighted`) or `--full`'s 3 epochs are needed.", ""]
    speed = metrics["pseudo_label_speed"]
    lines += ["## Pseudo-label construction", "",
              f"Vectorised (one sort + one cumulative minimum, exact) vs the direct per-token transcription on a "
              f"32 x 128 batch: {speed['vectorised_ms']:.3f} ms vs {speed['direct_ms']:.1f} ms, "
              f"**{speed['speedup']:.0f}x** (best of several, this machine).", "",
              "Files: `metrics.json` (every number, per-level diagnostics, each fine-tuning run), `units/` (finished "
              "units, read back by --resume), `probes.png`, `finetuning.png`, `config.json` (`--config` reruns it)."]
    return "\n".join(lines) + "\n"
