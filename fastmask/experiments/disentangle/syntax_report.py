"""The results of setting 3 (``--data syntax``) for reading: the loss plot and the report of one seed, and the
multi-seed summary (mean and 95% t-interval over the seeds of every figure, ``fastmask.experiments.stats``) with its
report, as seeds.py / seed_report.py do for the two-factor settings."""

from __future__ import annotations

import json

from ..runner import Run, markdown_table
from ..runner.report import _json_safe
from ..stats import ci_above, format_mean_ci, summarize
from .config import DisentangleConfig

SEMANTIC = (("auc", "paraphrase AUC"), ("f1", "paraphrase F1"))
SYNTACTIC = (("nn_accuracy", "NN same template"), ("nn_edit_distance", "NN template edit distance"),
             ("root_probe", "root UPOS probe"))
OWN = {"mask_0": "semantics (AUC)", "mask_1": "syntax (NN same template)", "finetuned_0": "semantics (AUC)",
       "finetuned_1": "syntax (NN same template)"}
NAMES = {"mask_0": "mask_0 (semantics)", "mask_1": "mask_1 (syntax)", "finetuned_0": "finetuned_0 (semantics)",
         "finetuned_1": "finetuned_1 (syntax)"}


def syntax_plots(run: Run, history, metrics) -> None:
    run.plot_history(history, ["loss", "triplet_0", "triplet_1"], "loss.png", title="training loss (triplets)")


def _fmt(value, signed=False) -> str:
    if isinstance(value, dict):  # a summary over seeds
        return format_mean_ci(value, signed=signed)
    return f"{value:{'+' if signed else ''}.3f}"


def _tables(metrics: dict) -> str:
    """The scores table (each representation x semantic and syntactic scores) and own - other per mask."""
    trivial = metrics["trivial"]
    rows = [[NAMES.get(rep, rep)] + [_fmt(metrics["semantic"][rep][k]) for k, _ in SEMANTIC]
            + [_fmt(metrics["syntactic"][rep][k]) for k, _ in SYNTACTIC] for rep in metrics["semantic"]]
    rows.append(["trivial baseline", _fmt(trivial["auc"]), _fmt(trivial["f1_all_paraphrase"]) + " (all paraphrase)",
                 _fmt(trivial["nn_chance"]) + " (random neighbour)", _fmt(trivial["random_edit_distance"])
                 + " (random pair)", _fmt(trivial["root_majority"]) + " (majority)"])
    scores = markdown_table(["representation"] + [name for _, name in SEMANTIC] + [name for _, name in SYNTACTIC],
                            rows)
    gaps = markdown_table(["representation", "own factor", "own - other representation", "own - unmasked"],
                          [[NAMES[rep], OWN[rep], _fmt(g["other"], True), _fmt(g["unmasked"], True)]
                           for rep, g in metrics["own_minus_other"].items()])
    return f"{scores}\n\nOwn factor: the score of a representation on its own factor minus the score of the other " \
           f"factor's representation of the same kind on it (mask_0 vs mask_1, finetuned_0 vs finetuned_1), and " \
           f"minus the unmasked encoder's:\n\n{gaps}"


def _data(metrics: dict) -> str:
    d = metrics["data"]
    s = d["splits"]
    mrpc = ", ".join(f"{k} {v['removed']} of {v['examples']} pairs" for k, v in d["mrpc"].items())
    ewt = ", ".join(f"{k} {v['removed']} of {v['examples']} sentences (+{v['dropped_as_in_other_split']} also in a "
                    f"later split)" for k, v in d["ewt"].items())
    return (f"MRPC (semantics): {s['train_pairs']} training paraphrase pairs, {s['dev_pairs']} dev pairs (F1 "
            f"threshold), {s['test_pairs']} test pairs. UD English-EWT (syntax, 5-40 words): {s['train_ewt_sentences']}"
            f" training sentences (anchors and their same-template partners), {s['ewt_dev']} dev sentences (root UPOS"
            f" probe training set), {s['ewt_test']} test sentences (nearest neighbours, probe test set). Removed as "
            f"duplicates of a normalised text before splitting: {mrpc}; {ewt}. No normalised sentence is in two "
            f"splits.")


def _method(config: DisentangleConfig, metrics: dict) -> str:
    blocks = f"the top {config.top_blocks} transformer blocks" if config.top_blocks else "every transformer block"
    return (f"Setting 3 of Zhang, van de Meent, Wallace (EMNLP 2021), semantics vs syntax, on `{config.model}` "
            f"(`{metrics['model_source']}`): mask 0 (semantics) learned with triplets of MRPC paraphrase pairs "
            f"(anchor sentence 1, positive its paraphrase, negative one of the 5 training sentences of other pairs, "
            f"paraphrase or non-paraphrase pairs, with the most word overlap), mask 1 (syntax) with "
            f"triplets of UD English-EWT sentences (positive: another sentence of the same top-level dependency "
            f"template, the root's UPOS and the UPOS of its non-punctuation dependents in order; negative: another "
            f"template); both in one grouped forward per step over the linear layers of {blocks} ({config.estimator},"
            f" granularity {config.granularity}); {config.steps} steps of {config.batch_size} anchors per mask, "
            f"margin {config.margin}, triplet losses only (CE weight {config.ce_weight}), init keep "
            f"{config.init_keep}, lr {config.lr}. `finetuned_k`: {blocks} fine-tuned with factor k's triplet loss "
            f"({config.finetune_steps} steps). The paper's data (ParaNMT) are not reachable offline.")


def syntax_report_markdown(config: DisentangleConfig, metrics: dict) -> str:
    sec = metrics["seconds"]
    return f"""# fastmask run disentangle --data syntax

{_method(config, metrics)}

## Data

{_data(metrics)}

## Semantic and syntactic similarity under each representation

Semantic: MRPC test paraphrase ROC-AUC of the cosine of the two sentences' mean-pooled features, and F1 at the
cosine threshold with the best F1 on the dev pairs. Syntactic, on EWT test: the fraction of sentences (with a
same-template sentence in the set) whose cosine-nearest other sentence has the same template; the mean edit distance
between the template sequences of each sentence and its nearest neighbour (lower: closer syntax); a linear probe of
the root word's UPOS trained on EWT dev.

{_tables(metrics)}

Mask sparsity (closed eval gates): {', '.join(f'{s:.3f}' for s in metrics['mask_sparsity'])}.

![loss](loss.png)

## Cost

Setup {sec['setup']:.0f} s, mask training {sec['train']:.0f} s, evaluation incl. the fine-tuned baselines
{sec['evaluate']:.0f} s on {metrics['hardware']['device']} ({metrics['hardware']['torch_threads']} torch threads).
"""


# --- several seeds --------------------------------------------------------------------------------------------
SYNTAX_SUMMARISED = ("semantic", "syntactic", "own_minus_other", "trivial", "mask_sparsity")


def _numbers(value):
    """``value`` without its non-numeric leaves (the probe's class names), for ``stats.summarize``."""
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items() if not isinstance(v, (list, str)) or k == "mask_sparsity"}
    return value


def syntax_aggregate(per_seed: list, seeds: list) -> dict:
    """Mean and 95% t-interval over the seeds of every figure of ``SYNTAX_SUMMARISED``, the verdict per mask (is
    the interval of own - other above 0?) and the per-seed values."""
    per_seed = [json.loads(json.dumps(_json_safe(m))) for m in per_seed]
    first = per_seed[0]
    summary = {key: summarize([_numbers(m[key]) if isinstance(m[key], dict) else m[key] for m in per_seed], path=key)
               for key in SYNTAX_SUMMARISED}
    seconds = [sum(m["seconds"].values()) for m in per_seed]
    return {"experiment": first["experiment"], "setting": "syntax", "seeds": list(seeds), "n_seeds": len(per_seed),
            "confidence": 0.95, "interval": "mean ± t_{0.975, n-1} * sample std / sqrt(n) over seeds",
            "model": first["model"], "model_source": first["model_source"], "factors": first["factors"],
            "data": first["data"], **summary,
            "own_minus_other_ci_above_0": {rep: ci_above(g["other"]) for rep, g in summary["own_minus_other"].items()},
            "per_seed": [{"seed": m["seed"], "own_minus_other": m["own_minus_other"], "seconds": m["seconds"],
                          "total_seconds": t} for m, t in zip(per_seed, seconds)],
            "seconds": {"total": sum(seconds), "per_seed": seconds}, "hardware": first["hardware"]}


def syntax_seeds_report_markdown(config: DisentangleConfig, summary: dict) -> str:
    verdict = []
    for rep, above in summary["own_minus_other_ci_above_0"].items():
        g = summary["own_minus_other"][rep]["other"]
        state = "one seed: no interval" if above is None else ("**above 0**" if above else "**not above 0**")
        interval = "" if g["low"] is None else f" [{g['low']:+.3f}, {g['high']:+.3f}]"
        verdict.append(f"- {NAMES[rep]}: own - other {g['mean']:+.3f}{interval}: {state}")
    per_seed = markdown_table(["seed"] + [f"{NAMES[r]}: own - other" for r in summary["own_minus_other"]]
                              + ["wall time (s)"],
                              [[p["seed"]] + [f"{p['own_minus_other'][r]['other']:+.3f}"
                                              for r in summary["own_minus_other"]] + [f"{p['total_seconds']:.0f}"]
                               for p in summary["per_seed"]])
    sec = summary["seconds"]
    return f"""# fastmask run disentangle --data syntax over {summary['n_seeds']} seeds

{_method(config, summary)}

Seeds {', '.join(str(s) for s in summary['seeds'])} of {', '.join(str(s) for s in config.seeds)} done; each seed is a
whole run of its own (`seed-<s>/`: data split, mask noise, data order, baselines, probes; its own report). Every
figure: **mean ± half-width of the 95% t-interval over the seeds** ({summary['interval']}; one seed: the value
alone).

## Is each mask better at its own factor than the other mask? (own - other, 95% CI)

{chr(10).join(verdict)}

## Data (first seed)

{_data(summary)}

## Semantic and syntactic similarity under each representation

{_tables(summary)}

## Per seed

{per_seed}

## Cost

{sec['total']:.0f} s in all ({', '.join(f'{s:.0f}' for s in sec['per_seed'])} s per seed) on
{summary['hardware']['device']} ({summary['hardware']['torch_threads']} torch threads).
"""


__all__ = ["syntax_plots", "syntax_report_markdown", "syntax_aggregate", "syntax_seeds_report_markdown",
           "SYNTAX_SUMMARISED"]
