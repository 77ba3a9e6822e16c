"""The results of the knowledge experiment for a reader: the plots (loss terms, subnetwork size per block,
perplexities) and report.md (``report_markdown``)."""

from __future__ import annotations

from pathlib import Path

from ..runner import Run, markdown_table, pyplot, save_figure
from .config import KnowledgeConfig
from .data import Prepared


# --- plots and report -------------------------------------------------------------------------------------------
def _plots(run: Run, history, summary, sparsity) -> None:
    run.plot_history(history, ["target_kl_uniform", "control_kl", "lm_kl", "density"], "loss_terms.png",
                     title="loss terms (remaining model) and mask density", secondary=["sparsity"])
    plt = pyplot()  # matplotlib is optional (and slow to import): imported here, None when missing
    if plt is None:
        return
    blocks = list(sparsity["per_block"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(blocks, [1 - sparsity["per_block"][b] for b in blocks], color="C0")
    ax.set_xlabel("block")
    ax.set_ylabel("fraction of weights in the subnetwork")
    ax.set_title(f"subnetwork size per block (overall {1 - sparsity['overall']:.2%} kept)")
    save_figure(fig, run.path("sparsity_per_block.png"))
    names = [n for n in ("targetkg", "targetkg_paraphrase", "controlkg", "lm") if n in summary]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.27
    for i, (key, label) in enumerate((("ppl_full", "full model"), ("ppl_remaining", "remaining (learned removed)"),
                                      ("ppl_random", "remaining (random removed)"))):
        ax.bar([j + (i - 1) * width for j in range(len(names))], [summary[n].get(key, float("nan")) for n in names],
               width, label=label)
    ax.set_xticks(range(len(names)), [{"targetkg": "TargetKG", "targetkg_paraphrase": "TargetKG\nparaphrases",
                                       "controlkg": "ControlKG", "lm": "WikiText-2"}[n] for n in names])
    ax.set_yscale("log")
    ax.set_ylabel("perplexity")
    ax.legend(fontsize=8)
    ax.set_title("perplexity: full vs remaining model vs random subnetwork removed")
    save_figure(fig, run.path("ppl.png"))


def report_markdown(config: KnowledgeConfig, metrics: dict, prepared: Prepared) -> str:
    s, sp, data, timing = metrics["summary"], metrics["sparsity"], metrics["data"], metrics["timing"]
    label = {"targetkg": "TargetKG", "targetkg_paraphrase": "TargetKG, other templates (paraphrases)",
             "controlkg": "ControlKG (held out)", "controlkg_train": "ControlKG (training triplets)",
             "lm": "WikiText-2 (held out)"}
    shown = [n for n in ("targetkg", "targetkg_paraphrase", "controlkg", "controlkg_train", "lm") if n in s]
    # dPPL = remaining - full is the paper's metric; the ratios read across sets of very different perplexity
    rows = [(label[n], s[n]["ppl_full"], s[n]["ppl_remaining"], s[n].get("ppl_random", float("nan")),
             s[n]["delta_ppl"], s[n].get("delta_ppl_random", float("nan")),
             s[n]["ppl_ratio"], s[n].get("ppl_ratio_random", float("nan"))) for n in shown]
    ranks = [(label[n], s[n]["mean_rank_full"], s[n]["mean_rank_remaining"], s[n].get("mean_rank_random",
             float("nan")), s[n]["delta_logprob"], s[n].get("delta_logprob_random", float("nan")))
             for n in ("targetkg", "targetkg_paraphrase", "controlkg") if n in s]
    first, last = metrics["masked_blocks"]
    examples = "\n".join(f"  - `{e.triplet.head} IsA {e.triplet.tail}`: \"{e.sentence.strip()}\""
                         for e in prepared.target[:8])
    ppl_table = markdown_table(["set", "PPL full", "PPL remaining", "PPL random removed", "dPPL remaining",
                                "dPPL random", "ratio remaining/full", "ratio random/full"], rows)
    rank_table = markdown_table(["set", "rank full", "rank remaining", "rank random", "delta log-prob",
                                 "delta log-prob random"], ranks)
    scored_tokens = ("The released code scores only the last tail token; here every token of the tail word is scored."
                     if config.tail_tokens == "all" else "Only the last tail token is scored, as in the released code.")
    position = ("Deviation from the released code: it reads the KL terms at the tail token's own position (the "
                "distribution of the token after the tail); here each tail token is predicted from the position "
                "before it, as a causal LM predicts it (`--objective-position shifted`, the default)."
                if config.objective_position == "shifted" else
                "As in the released code (`--objective-position released`), the KL terms are read at the tail "
                "token's own position, i.e. from the distribution of the token after the tail; the evaluation still "
                "scores each tail token from the position before it.")
    paraphrase = ""
    if "targetkg_paraphrase" in s:
        para, target = s["targetkg_paraphrase"], s["targetkg"]
        paraphrase = (f"\n\nParaphrase test: the {data.get('targetkg_paraphrase', 0)} other-template sentences of the "
                      f"TargetKG triplets (never trained on) change x{para['ppl_ratio']:.2f} in perplexity with the "
                      f"subnetwork removed (the trained sentences: x{target['ppl_ratio']:.2f}; a random subnetwork "
                      f"removed: x{para.get('ppl_ratio_random', float('nan')):.2f}).")
    draws = ""
    if s["targetkg"].get("random_draws", 1) > 1:
        spans = ", ".join(f"{label[n].split(' (')[0] if n != 'targetkg_paraphrase' else 'paraphrases'} "
                          f"x{s[n]['ppl_ratio_random_min']:.2f}-{s[n]['ppl_ratio_random_max']:.2f}" for n in shown)
        draws = (f" ({s['targetkg']['random_draws']} draws; the random columns are their means, the ratios' ranges: "
                 f"{spans})")
    return f"""# Knowledge-critical subnetwork: {metrics['target']} in {metrics['model']}

Reimplementation of Bayazit et al., "Discovering Knowledge-Critical Subnetworks in Pretrained Language Models"
(EMNLP 2024) with fastmask's fused masks. The subnetwork is a learned binary mask over the weights of the attention
and MLP projections of blocks {first}-{last} (of {metrics['n_blocks']}) of `{metrics['model_type']}` model
`{metrics['model']}`; the *remaining model* is the model with the subnetwork removed (weights multiplied by 1 - m).

## Result

Removing the subnetwork ({sp['kept_weights']:,} of {sp['total_weights']:,} masked weights, i.e. **{sp['overall']:.2%}
of the masked weights are not in it**) changes the perplexity of the tail tokens as follows. "random" removes a random
subnetwork with the same number of weights in every layer{draws}.

{ppl_table}{paraphrase}

Gold tail token (first token of the tail word): mean rank among the vocabulary (1 = top) and the mean change of the
tail's log-probability (remaining - full, nats):

{rank_table}

Sparsity (fraction of masked weights NOT in the subnetwork): overall {sp['overall']:.4f}; attention
{sp['attention_vs_mlp'].get('attention', float('nan')):.4f}, MLP {sp['attention_vs_mlp'].get('mlp', float('nan')):.4f};
per block: {', '.join(f"{b}: {v:.4f}" for b, v in sp['per_block'].items())}.

![perplexities](ppl.png) ![loss terms](loss_terms.png) ![per block](sparsity_per_block.png)

## Data

- TargetKG ({data['targetkg']} triplets): {prepared.sources.get('targetkg')}. Examples:
{examples}
- TargetKG paraphrases: {data.get('targetkg_paraphrase', 0)} sentences, every other template of the TargetKG
  triplets (evaluation only).
- ControlKG: training {data['controlkg_train']} triplets ({prepared.sources.get('controlkg_train')}); evaluation
  {data['controlkg_eval']} held-out triplets ({prepared.sources.get('controlkg_eval')}).
- Sentences: {prepared.sources.get('template')}. Scored tokens: {config.tail_tokens} tokens of the tail word.
- LM text: training {data['lm_train_tokens']:,} tokens ({prepared.sources.get('lm_train')}); evaluation
  {data['lm_eval_tokens']:,} tokens ({prepared.sources.get('lm_eval')}), blocks of {config.lm_block_size} tokens.

## Method

Mask {config.estimator} (temperature {config.temperature}, eval gate sigmoid(l) > 0.5), granularity
{config.granularity}, logits initialised to logit({config.init_keep}); weights frozen, dropout off. Loss on the
remaining model:
{config.lambda_target} KL(uniform || p) at the TargetKG tail tokens + {config.lambda_control} KL(p_full || p) at
the ControlKG tail tokens + {config.lambda_lm} KL(p_full || p) at every WikiText-2 position + lambda(t) mean
sigmoid(l), lambda = {config.lambda_reg_init} for the first half of the steps then linear to {config.lambda_reg_final}.
Adam, lr {config.lr} with {config.warmup_frac:.0%} linear warm-up, {config.steps} steps; per step
{config.targetkg_batch or "all"} TargetKG sentences, {config.controlkg_batch} ControlKG sentences and
{config.lm_batch} LM blocks, one mask sample shared by the three terms; seed {config.seed}.

{position}
{scored_tokens}
The paper trains for 40,000 steps with batches of 250 sentences from logits at logit(0.45); this run's budget is
{config.steps} steps from logit({config.init_keep}) (at a few hundred steps, logit(0.45) leaves the per-weight logits
random-walking around the threshold: a third of the weights end up in the "subnetwork").

## Reproduce

```
fastmask run knowledge --config {Path(config.out) / 'config.json'} --out NEW_FOLDER
```

Backend `{metrics['backend']}` on {timing['device']} ({timing['machine']}, {timing['torch_threads']} threads); setup
{timing['setup_seconds']:.0f} s, training {timing['train_seconds']:.0f} s
({timing['train_steps_this_process']} steps in this process), evaluation {timing['eval_seconds']:.0f} s. Files:
`metrics.json`,
`history.csv`, `masks/` (fastmask.load_masks),
`data.json` (the exact sentences), `config.json`.
"""


__all__ = ["report_markdown"]
