"""Scores of the nm experiment: perplexity of a model on token blocks, and the one-shot baselines."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from ... import nm_priors


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch: int) -> dict:
    """exp(mean next-token NLL) over every position of the blocks (each block on its own, no context carried over):
    {"ppl", "nll", "tokens"}."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, blocks.shape[0], batch):
            ids = blocks[start:start + batch]
            logits = model(input_ids=ids).logits[:, :-1].float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                           reduction="sum"))
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count}


def prior_masks(model, kind: str, names, norms, n: int, m: int) -> dict:
    """{layer name: (out, in) N:M mask} of the one-shot criterion ``kind`` (magnitude or wanda)."""
    return nm_priors.one_shot_masks(model, kind, names, norms if kind == "wanda" else None, n, m)


def one_shot_perplexity(model, masks: dict, blocks: torch.Tensor, batch: int) -> dict:
    """Perplexity of a copy of ``model`` with every layer of ``masks`` pruned to its mask."""
    pruned = nm_priors.prune_(copy.deepcopy(model), masks)
    try:
        return perplexity(pruned, blocks, batch)
    finally:
        del pruned


__all__ = ["perplexity", "prior_masks", "one_shot_perplexity"]
