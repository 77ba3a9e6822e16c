"""Evaluation of the knowledge experiment: perplexity, gold rank and log-probability of the scored tail tokens and of
LM text under the full model, the remaining model and the remaining model of a random subnetwork of equal size
(``evaluate``), their summary (``summarize``) and the sparsity of the learned subnetwork (``sparsity_report``)."""

from __future__ import annotations

import math

import torch

import fastmask as fm

from ..blocks import TopBlocks, block_index
from .data import ScoredSentences
from .model import random_subnetwork


# --- evaluation ---------------------------------------------------------------------------------------------
def score_sentences(top: TopBlocks, data: ScoredSentences, batch_size: int) -> dict:
    """NLL of every scored token, gold rank (1 = top) and log-prob sum per sentence, under the model's current
    mode (no grad)."""
    nll, ranks, logprob = [], [], torch.zeros(len(data))
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            index = list(range(start, min(start + batch_size, len(data))))
            ids, mask, h0, rows, cols, gold, first, _ = data.batch(index)
            device = h0.device
            hidden = top.hidden(ids.to(device), mask.to(device), h0)
            logits = top.head(hidden[rows.to(device), cols.to(device)]).float()
            logp = torch.log_softmax(logits, dim=-1)
            gold_logp = logp.gather(-1, gold.to(device)[:, None])[:, 0]
            nll.append(-gold_logp.cpu())
            logprob.index_add_(0, rows + start, gold_logp.cpu())
            rank = 1 + (logits > logits.gather(-1, gold.to(device)[:, None])).sum(-1)
            ranks.append(rank[first.to(device)].cpu())
    nll = torch.cat(nll)
    ranks = torch.cat(ranks).double()
    return {"ppl": math.exp(nll.mean().item()), "nll": nll.mean().item(), "tokens": int(nll.numel()),
            "mean_rank": ranks.mean().item(), "median_rank": ranks.median().item(),
            "top1": (ranks == 1).double().mean().item(), "logprob": logprob.tolist()}


def score_lm(top: TopBlocks, blocks, h0, batch_size: int) -> dict:
    """Perplexity of LM text blocks (next-token NLL at every position but the last)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, blocks.shape[0], batch_size):
            ids = blocks[start:start + batch_size].to(h0.device)
            hidden = top.hidden(ids, torch.ones_like(ids), h0[start:start + batch_size])
            logp = torch.log_softmax(top.head(hidden[:, :-1]).float(), dim=-1)
            total += -logp.gather(-1, ids[:, 1:, None]).sum().item()
            count += ids[:, 1:].numel()
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count}


def _layer_groups(model) -> dict[str, str]:
    """{masked layer name: "attention" | "mlp"}."""
    family = fm.hf.model_family(model)
    return {name: "attention" if (fm.hf.layer_role(family, name) or "").startswith("attn") else "mlp"
            for name in fm.masked_modules(model)}


def sparsity_report(model) -> dict:
    """Overall / per layer / per block / attention vs MLP fractions of masked weights OFF in the subnetwork."""
    stats = fm.sparsity(model)
    groups = _layer_groups(model)
    layers = fm.masked_modules(model)
    by_group, by_block = {}, {}
    for name, value in stats["per_layer"].items():
        numel = layers[name].weight.numel()
        for table, key in ((by_group, groups[name]), (by_block, str(block_index(name)[1]))):
            zeros, total = table.get(key, (0.0, 0))
            table[key] = (zeros + value * numel, total + numel)
    return {"overall": stats["overall"], "zero_weights": stats["zero_weights"], "total_weights": stats["total_weights"],
            "kept_weights": stats["total_weights"] - stats["zero_weights"], "per_layer": stats["per_layer"],
            "per_type": stats["per_type"], "attention_vs_mlp": {k: z / t for k, (z, t) in by_group.items()},
            "per_block": {k: z / t for k, (z, t) in sorted(by_block.items(), key=lambda kv: int(kv[0]))}}


def evaluate(model, top: TopBlocks, sets: dict, lm_eval, lm_eval_h0, batch_size: int, seed: int,
             which=("full", "remaining", "random"), random_draws: int = 1) -> dict:
    """Scores of the full model, the remaining model (subnetwork removed) and the remaining model of random
    subnetworks of equal per-layer size (``random_draws`` of them: modes "random", "random-1", ..., draw i with
    seed ``seed + i``), on every sentence set and the LM text."""
    if "random" in which:
        which = tuple(m for m in which if m != "random") + ("random",) + tuple(f"random-{i}"
                                                                             for i in range(1, random_draws))
    layers = fm.masked_modules(model).values()
    modes = {layer: layer.training for layer in layers}
    for layer in layers:
        layer.eval()
    results = {}
    try:
        for mode in which:
            context = {"full": lambda: fm.bypass(model), "remaining": lambda: fm.inverse(model)}.get(mode)
            if mode.startswith("random"):
                draw = int(mode.partition("-")[2] or 0)
                with random_subnetwork(model, seed + draw), fm.inverse(model):
                    results[mode] = _score_all(top, sets, lm_eval, lm_eval_h0, batch_size)
            else:
                with context():
                    results[mode] = _score_all(top, sets, lm_eval, lm_eval_h0, batch_size)
    finally:
        for layer, was_training in modes.items():
            layer.train(was_training)
    return results


def _score_all(top, sets, lm_eval, lm_eval_h0, batch_size):
    out = {name: score_sentences(top, data, batch_size) for name, data in sets.items()}
    if lm_eval is not None:
        out["lm"] = score_lm(top, lm_eval, lm_eval_h0, batch_size)
    return out


def summarize(results: dict) -> dict:
    """Per set: PPL full / remaining / random, their ratios and deltas, rank and log-prob deltas. With several
    random draws the random figures are their means (``ppl_ratio_random_min`` / ``_max``: their range)."""
    summary = {}
    draws = [mode for mode in results if mode.startswith("random")]
    for name in results["full"]:
        full, rem = results["full"][name], results["remaining"][name]
        row = {"ppl_full": full["ppl"], "ppl_remaining": rem["ppl"], "ppl_ratio": rem["ppl"] / full["ppl"],
               "delta_ppl": rem["ppl"] - full["ppl"]}
        if draws:
            ppls = [results[mode][name]["ppl"] for mode in draws]
            mean_ppl = sum(ppls) / len(ppls)
            row.update(ppl_random=mean_ppl, ppl_ratio_random=mean_ppl / full["ppl"],
                       delta_ppl_random=mean_ppl - full["ppl"], random_draws=len(draws),
                       ppl_ratio_random_min=min(ppls) / full["ppl"], ppl_ratio_random_max=max(ppls) / full["ppl"])
        if "mean_rank" in full:
            deltas = [r - f for r, f in zip(rem["logprob"], full["logprob"])]
            row.update(mean_rank_full=full["mean_rank"], mean_rank_remaining=rem["mean_rank"],
                       median_rank_full=full["median_rank"], median_rank_remaining=rem["median_rank"],
                       top1_full=full["top1"], top1_remaining=rem["top1"],
                       delta_logprob=sum(deltas) / len(deltas))
            if draws:  # means over the draws
                rdeltas = [r - f for mode in draws for r, f in zip(results[mode][name]["logprob"], full["logprob"])]
                row.update(mean_rank_random=sum(results[mode][name]["mean_rank"] for mode in draws) / len(draws),
                           delta_logprob_random=sum(rdeltas) / len(rdeltas))
        summary[name] = row
    return summary


__all__ = ["score_sentences", "score_lm", "sparsity_report", "evaluate", "summarize"]
