"""The results of `fastmask run disentangle` for reading: the plots (training loss, leakage per representation,
sparsity vs disentanglement) and the report markdown, both from the run's metrics."""

from __future__ import annotations

from ..runner import Run, markdown_table, pyplot, save_figure
from .config import DisentangleConfig
from .data import ASPECT_LEXICON, NEUTRAL_WORD
from .evaluate import best_other


def _plots(run: Run, history, metrics) -> None:
    factors = metrics["factors"]
    run.plot_history(history, ["loss"] + [f"ce_{k}" for k in range(len(factors))]
                     + [f"triplet_{k}" for k in range(len(factors))], "loss.png", title="training loss")
    plt = pyplot()  # matplotlib is optional and slow to import: loaded by the runner's helper on first use only
    if plt is None:
        return
    reps = list(metrics["leakage"])
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(reps)), 4))
    width = 0.8 / len(factors)
    for j, name in enumerate(factors):
        ax.bar([i + j * width for i in range(len(reps))], [metrics["leakage"][r][j] for r in reps], width,
               label=f"probe for {name}")
    ax.axhline(metrics["chance"], color="gray", ls="--", lw=1, label="chance")
    ax.set_xticks([i + width * (len(factors) - 1) / 2 for i in range(len(reps))], reps, rotation=20)
    ax.set_ylabel("probe accuracy (balanced test)")
    ax.set_ylim(0.3, 1.0)
    ax.legend(fontsize=8)
    ax.set_title("leakage: each representation probed for every factor")
    save_figure(fig, run.path("leakage.png"))
    sweep = metrics["sweep"]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [sum(r["zero_fraction"]) / len(r["zero_fraction"]) for r in sweep]
    ax.plot(x, [r["disentanglement"] for r in sweep], "o-")
    for xi, r in zip(x, sweep):
        ax.annotate(f"pruned {r['prune_sparsity']:g}", (xi, r["disentanglement"]), fontsize=8,
                    textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("zero weights of the masked layers under a mask (pruned or closed; mean over masks)")
    ax.set_ylabel("own - other probe accuracy (mean over masks)")
    ax.grid(alpha=0.3)
    ax.set_title("sparsity vs disentanglement")
    save_figure(fig, run.path("sweep.png"))


def _setting_note(config: DisentangleConfig) -> str:
    if config.data == "reviews":
        return ("Genre is replaced by a keyword-built aspect label (see Data): the paper's sentiment x genre data are "
                "not reachable offline; setting 3 (syntax vs semantics) is `--data syntax`")
    return ("Only the toxicity x dialect setting here (`--data reviews`: a stand-in for sentiment x genre; "
            "`--data syntax`: semantics vs syntax)")


def _data_paragraph(config: DisentangleConfig, metrics: dict) -> str:
    """What the data are and how the labels were made, for the report."""
    factors, values, raw = metrics["factors"], metrics["values"], metrics["data"]["raw_examples"]
    dup = metrics["data"]["deduplication"]
    dedup = (f" Before splitting, {dup['removed']} were removed as duplicates of a normalised text (lower case, URLs, "
             f"@-mentions and punctuation stripped: {dup['duplicate_groups']} groups, each kept once;"
             f" {dup['conflicting_groups_dropped']} groups whose labels disagree dropped whole), leaving "
             f"{dup['kept']}, so no text sits in two splits.")
    if config.data == "reviews":
        lexicon = "; ".join(f"{name}: {', '.join(words)}" for name, words in ASPECT_LEXICON.items())
        keywords = ("the keywords stay in the text (the aspect is decodable from word identity)."
                    if config.review_keywords == "keep" else
                    f"every keyword is then replaced by the neutral word '{NEUTRAL_WORD}' (`--review-keywords "
                    f"neutralise`), so the aspect must be inferred from the context.")
        return f"""A STAND-IN for the paper's setting 1 (sentiment x genre of movie reviews: no genre-labelled
reviews are reachable offline), built from what is: the Pang & Lee (2005) sentence polarity data (Rotten Tomatoes
snippets), **{factors[0]}** ({' / '.join(values[0])}) from the file a sentence is in, x **{factors[1]}**
({' / '.join(values[1])}), a genre-like attribute built from the text itself: the aspect the sentence talks about,
by keyword lexicon ({lexicon}). A sentence is kept when its words hit exactly one of the two lexicons (sentences
naming both or neither are dropped); {keywords} {raw} labelled sentences.{dedup}"""
    return f"""The paper's setting 2 built from what is reachable offline: Davidson et al. (2017) tweets,
**{factors[0]}** ({' / '.join(values[0])}) x **{factors[1]}** ({' / '.join(values[1])}) inferred with the TwitterAAE
demographic model (AAE share of AAE + White proportions >= {config.dialect_confidence}; tweets in between dropped;
re-implemented predictor, whitespace tokens). {raw} labelled tweets.{dedup}"""


def report_markdown(config: DisentangleConfig, metrics: dict) -> str:
    factors = metrics["factors"]
    header = ["representation"] + [f"probe: {f}" for f in factors] + ["own - other"]
    def leakage(table):
        rows = []
        for r, row in table.items():
            k = int(r.rsplit("_", 1)[1]) if r.startswith(("mask_", "adversarial_", "finetuned_")) else None
            gap = "" if k is None else f"{row[k] - best_other(row, k):+.3f}"
            rows.append([r] + row + [gap])
        return markdown_table(header, rows, digits=3)

    leak, leak_mlp = leakage(metrics["leakage"]), leakage(metrics["leakage_mlp"])
    own_rows = []
    for r in metrics["leakage"]:
        if r.startswith(("mask_", "adversarial_", "finetuned_")):
            k = int(r.rsplit("_", 1)[1])
            own_rows.append([r, factors[k], metrics["in_distribution_correlated_probe"][r][k],
                             metrics["robustness_shifted"][r][k]])
        else:
            for k, f in enumerate(factors):
                own_rows.append([r, f, metrics["in_distribution_correlated_probe"][r][k],
                                 metrics["robustness_shifted"][r][k]])
    robust = markdown_table(["representation", "factor", "balanced test", "shifted test"], own_rows, digits=3)
    sweep = markdown_table(["pruning sparsity", "steps", "disentanglement (linear)", "disentanglement (MLP)",
                            "closed gates (per mask)", "zero weights: pruned or closed (per mask)"]
                           + [f"mask_{k}: own / other (linear)" for k in range(len(factors))],
                           [[r["prune_sparsity"], r["steps"], r["disentanglement"], r["disentanglement_mlp"],
                             ", ".join(f"{s:.3f}" for s in r["mask_sparsity"]),
                             ", ".join(f"{s:.3f}" for s in r["zero_fraction"])]
                            + [f"{r['leakage'][k][k]:.3f} / {best_other(r['leakage'][k], k):.3f}"
                               for k in range(len(factors))] for r in metrics["sweep"]], digits=3)
    data = metrics["data"]
    sec = metrics["seconds"]
    blocks = f"the top {config.top_blocks} transformer blocks" if config.top_blocks else "every transformer block"
    return f"""# fastmask run disentangle

Disentangling representations by masking (Zhang, van de Meent, Wallace, EMNLP 2021) on `{config.model}`
(`{metrics['model_source']}`): {len(factors)} masks ({config.estimator}, granularity {config.granularity}) learned in
one forward pass per batch with fastmask's K-mask layers over the linear layers of {blocks}; {config.steps} steps
of {config.batch_size} anchors (init keep {config.init_keep}, lr {config.lr}); triplet weight {config.triplet_weight}
({config.triplet_sampling} triplets), margin {config.margin}, overlap weight {config.overlap_weight}, L0 weight
{config.l0_weight}; magnitude pruning {config.prune_sparsity:g} ({config.prune_scope}) before masking.

## Data (offline setting)

{_data_paragraph(config, metrics)} Splits {data['splits']} (max {config.max_length} tokens per text); fraction of
examples whose two labels agree: {', '.join(f'{s} {a:.2f}' for s, a in data['agreement'].items())}.

## Leakage (probes trained on the balanced probe split, scored on the balanced test split; chance 0.5)

Each mask should predict its own factor well and the other near chance. Linear (logistic-regression) probes:

{leak}

MLP probes (one hidden layer of 128, early stopping on a stratified 20% dev split of the probe split: information a
linear probe misses may still be recoverable):

{leak_mlp}

`mask_k`: the encoder under mask k (factor k = {', '.join(f'{k}: {f}' for k, f in enumerate(factors))});
`unmasked`: the original encoder; `adversarial_k`: gradient-reversal removal of the other factors over the frozen
unmasked features, trained for factor k on the training split; `finetuned_k`: {blocks} fine-tuned for factor k
({config.finetune_steps} steps, cross-entropy only). Disentanglement (mean over masks of own - best other
accuracy): **{metrics['disentanglement']:.3f}** with linear probes, {metrics['disentanglement_mlp']:.3f} with MLP
probes. Mask sparsity (closed eval gates, as a fraction of the masked
layers' weights): {', '.join(f'{s:.3f}' for s in metrics['mask_sparsity'])}.

![leakage](leakage.png)

## Robustness to a shifted correlation

Probes for the factor trained on the correlated training split (agreement {data['agreement']['train']:.2f}), scored on
the balanced test split and on the shifted split (agreement {data['agreement']['shifted']:.2f}).

{robust}

## Sparsity vs disentanglement (pruning sweep)

{sweep}

{len(metrics['sweep'])} of {len({config.prune_sparsity, *config.sweep_sparsities})} pruning sparsities done (the
main run, then each sweep point; the results are rewritten after each).

![sweep](sweep.png)

## Cost

setup {sec['setup']:.0f} s, mask training {sec['train']:.0f} s, evaluation {sec['evaluate']:.0f} s, sweep
{sec['sweep']:.0f} s on {metrics['hardware']['device']} ({metrics['hardware']['torch_threads']} torch threads).

## Deviations and what is not done

- The adversarial baseline trains an MLP over frozen mean-pooled features (not a fine-tuned encoder).
- The fine-tuned baseline trains the masked blocks only (the blocks below are frozen, as for the masks); pruning
  happens before masking only (no gradual pruning with masking).
- One seed (`--seeds 0,1,2` runs several and reports mean and 95% CI).
- {_setting_note(config)}; the sweep points train for `sweep_steps` ({config.sweep_steps}) steps and are
  not checkpointed (a `--resume` repeats them).

Files: `metrics.json`, `history.csv`, `masks/`, `loss.png`, `leakage.png`, `sweep.png`, `config.json`.
"""


__all__ = ["report_markdown"]
