"""Plots and report.md of the nm experiment."""

from __future__ import annotations

from ..runner import markdown_table, pyplot, read_history, save_figure
from .config import NMConfig


def _rows(config: NMConfig, metrics: dict) -> list[tuple]:
    """(variant, test perplexity, density, seconds) in the order dense, one-shot, learned."""
    units = metrics["units"]
    nm = f"{config.n}:{config.m}"
    rows = [("dense", units["dense"]["ppl"], 1.0, units["dense"]["seconds"])]
    rows += [(f"{prior} {nm} (one-shot)", units[prior]["ppl"], config.n / config.m, units[prior]["seconds"])
             for prior in config.priors]
    rows += [(f"learned {nm} from {prior}", units[f"learned-{prior}"]["ppl"], config.n / config.m,
              units[f"learned-{prior}"]["seconds"]) for prior in config.learn_from]
    return rows


def plots(run, config: NMConfig, metrics: dict) -> None:
    """ppl.png (test perplexity per variant) and loss.png (training loss of each learned mask)."""
    plt = pyplot()
    if plt is None:
        return
    rows = _rows(config, metrics)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([r[0] for r in rows][::-1], [r[1] for r in rows][::-1], color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel("WikiText-2 test perplexity (log scale)")
    ax.set_title(f"{metrics['model']}: dense vs {config.n}:{config.m} masks")
    save_figure(fig, run.path("ppl.png"))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for prior in config.learn_from:
        path = run.path(f"learned-{prior}", "history.csv")
        if path.is_file():
            history = read_history(path)
            ax.plot([r["step"] for r in history], [r["loss"] for r in history], label=f"from {prior}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (WikiText-2)")
    ax.legend()
    save_figure(fig, run.path("loss.png"))


def report_markdown(config: NMConfig, metrics: dict) -> str:
    units, timing, data = metrics["units"], metrics["timing"], metrics["data"]
    table = markdown_table(["variant", "test ppl", "density", "seconds"], _rows(config, metrics))
    learned = "\n".join(
        f"- from {prior}: {units[f'learned-{prior}']['changed_from_prior']:.2%} of the groups left the prior's "
        f"pattern; training loss {units[f'learned-{prior}']['first_loss']:.3f} -> "
        f"{units[f'learned-{prior}']['final_loss']:.3f} over {config.steps} steps" for prior in config.learn_from)
    best_one_shot = min(units[p]["ppl"] for p in config.priors)
    if config.learn_from:
        best_learned = min(units[f"learned-{p}"]["ppl"] for p in config.learn_from)
        beaten = [p for p in config.learn_from if units[f"learned-{p}"]["ppl"] < units[p]["ppl"]]
        verdict = ("a learned mask beats the best one-shot mask" if best_learned < best_one_shot else
                   f"no learned mask beats the best one-shot mask in this budget ({config.steps} steps of "
                   f"{config.batch} x {config.block_size} tokens per mask)")
        verdict += (f"; learned masks that improve on their own prior: {', '.join(beaten)}" if beaten else
                    "; no learned mask improves on its own prior (see docs/experiments/nm.md for why short runs "
                    "degrade it)")
    else:
        verdict = "no mask was learned (--learn-from is empty): one-shot masks only"
    optimizer = "Adam" if config.optimizer == "adam" else "Adafactor (stepped in the backward)"
    state_parts = (f"C({config.m}, {config.n}) / {config.m} fp32 logits per weight, "
                   + ("each with its gradient and two Adam moments" if config.optimizer == "adam" else
                      "no gradient kept, Adafactor's row factor of 4 bytes per group"))
    measured = [f"{key}: {unit['mask_state_bytes_per_weight']:.2f}" for key, unit in units.items()
                if "mask_state_bytes_per_weight" in unit]
    measured_state = f"; measured at the end of training: {', '.join(measured)}" if measured else ""
    return f"""# Learned {config.n}:{config.m} masks on {metrics['model']}

{config.n}:{config.m} sparsity on every attention and MLP projection ({metrics['masked_layers']} layers,
{metrics['masked_weights']:,} weights): one-shot {' and '.join(config.priors)} masks against a mask learned from
each of: {', '.join(config.learn_from) or 'none'}
(MaskLLM-style Gumbel-softmax over the C({config.m}, {config.n}) patterns of every group of {config.m} input weights,
logits initialised from the one-shot prior, strength {config.prior_strength}; temperature {config.temperature} ->
{config.temperature_final}, scale {config.scale}, {'hard' if config.hard else 'soft'} masks,
{optimizer} lr {config.lr}).

**Data.** Training (and Wanda calibration) on {data['train']} ({data['train_tokens']:,} tokens; calibration
{data['calib_tokens']:,}); perplexity on {data['test']} ({data['eval_tokens']:,} predicted tokens, blocks of
{config.block_size} without carried context). Offline there is no WikiText-2 train split: the masks train on the
validation split and are evaluated on the test split.

{table}

{learned}

Result: {verdict}.

Mask state: {metrics['mask_state_bytes_per_weight']:.0f} bytes per weight on paper ({state_parts}){measured_state}.

Time: {timing['total_seconds']:.0f} s in all ({timing['device']}, {timing['torch_threads']} torch threads,
{timing['cpu']}, {timing['cpu_count']} cores; backend {metrics['backend']}).
"""


__all__ = ["plots", "report_markdown"]
