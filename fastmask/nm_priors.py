"""One-shot N:M masks and the prior of learned N:M logits.

    norms = nm_priors.input_norms(model, batches, names)       # Wanda's ||X_j||_2 per input feature, one pass
    masks = nm_priors.one_shot_masks(model, "wanda", norms=norms)   # {layer name: (out, in) 0/1}, exactly N:M
    nm_priors.prune_(model, masks)                              # the one-shot baseline (in place)
    fm.apply(model, granularity="nm"); nm_priors.init_logits(model, masks, strength=3.0)   # MaskLLM's prior

* magnitude: score |W_ij|; Wanda (Sun et al. 2024): |W_ij| * ||X_j||_2, the L2 norm of input feature j over the
  calibration tokens. In every group of m consecutive input weights of an output row the n highest scores are kept
  (ties: the lower index first). The norms come from ONE pass of the unpruned model (Wanda's released code prunes
  block by block, feeding each block the output of the pruned blocks below: a small difference at 2:4).
* Prior (MaskLLM, Fang et al. 2024, "transfer learning with prior masks"): the logit of pattern c of a group is
  ``strength * overlap(c, prior) / n`` where overlap counts the weights both keep, so the prior pattern has the
  largest logit and patterns that differ in more positions are less likely.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from .nn.masked_linear import _is_conv1d
from .nn.nm import NMMaskedLinear
from .nn.surgery import linear_layers
from .ops._validate import check_choice, check_finite
from .ops.nm import check_nm
from .ref import nm_patterns

PRIORS = ("magnitude", "wanda")


def _out_in(module: nn.Module) -> torch.Tensor:
    """The weight of an nn.Linear / Conv1D / (NM)MaskedLinear as an (out, in) view."""
    layout = getattr(module, "weight_layout", "in_out" if _is_conv1d(module) else "out_in")
    return module.weight if layout == "out_in" else module.weight.t()


def scores(weight_out_in: torch.Tensor, kind: str, norms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Importance of every weight of an (out, in) weight, float32: |W| (magnitude) or |W| * norms[j] (wanda)."""
    check_choice(kind, PRIORS, "kind", "fastmask.nm_priors.scores")
    s = weight_out_in.detach().float().abs()
    if kind == "wanda":
        if norms is None or norms.shape != (s.shape[1],):
            found = None if norms is None else list(norms.shape)
            raise ValueError(f"fastmask.nm_priors.scores: kind='wanda' needs norms of shape [{s.shape[1]}] (one per "
                             f"input feature), got {found}")
        s = s * norms.to(s.device, torch.float32)[None, :]
    return s


def nm_mask_from_scores(score: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """The N:M mask (float32 0/1, (out, in)) keeping the n highest scores of every group of m consecutive columns."""
    n, m = check_nm(n, m, "fastmask.nm_priors.nm_mask_from_scores")
    out_features, in_features = score.shape
    if in_features % m:
        raise ValueError(f"fastmask.nm_priors.nm_mask_from_scores: in_features={in_features} must be a multiple of "
                         f"m={m}")
    groups = score.reshape(out_features, in_features // m, m)
    # stable sort of -score: equal scores keep their order, so ties go to the lower index (reproducible)
    order = torch.sort(-groups, dim=-1, stable=True).indices[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.float32).scatter_(-1, order, 1.0)
    return mask.reshape(out_features, in_features)


def pattern_index(mask: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """(out, in / m) int64: the row of ``nm_patterns(n, m)`` each group of an exactly-N:M mask (out, in) equals."""
    patterns = nm_patterns(n, m, torch.float32, mask.device)
    groups = mask.float().reshape(mask.shape[0], -1, m)
    match = (groups[..., None, :] == patterns).all(-1)  # (out, G, C)
    if not bool(match.any(-1).all()):
        raise ValueError(f"fastmask.nm_priors.pattern_index: the mask is not exactly {n}:{m} in every group")
    return match.float().argmax(-1)


def prior_logits(mask: torch.Tensor, n: int = 2, m: int = 4, strength: float = 3.0) -> torch.Tensor:
    """Logits (out, in / m, C(m, n)) float32 whose argmax is the prior ``mask`` (out, in): ``strength`` times the
    fraction of the prior's kept weights each pattern keeps."""
    strength = check_finite(strength, "strength", "fastmask.nm_priors.prior_logits")
    patterns = nm_patterns(n, m, torch.float32, mask.device)
    groups = mask.float().reshape(mask.shape[0], -1, m)
    return strength * (groups @ patterns.t()) / n


@torch.no_grad()
def input_norms(model: nn.Module, batches: Iterable[Mapping], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """{layer name: ||X_j||_2 over every calibration token (float32, (in,))} of the named linear layers, from one
    forward of ``model(**batch)`` per batch (forward pre-hooks; the model runs as it is, in eval mode)."""
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise ValueError(f"fastmask.nm_priors.input_norms: no modules named {missing[:3]} in {type(model).__name__}")
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(module, args, name=name):
            x = args[0].detach().float()
            sq = x.reshape(-1, x.shape[-1]).pow(2).sum(0)
            sums[name] = sq if name not in sums else sums[name] + sq
        handles.append(modules[name].register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if len(sums) != len(names):
        raise ValueError("fastmask.nm_priors.input_norms: no calibration batch reached "
                         f"{sorted(set(names) - set(sums))[:3]}")
    return {name: sums[name].sqrt() for name in names}


def one_shot_masks(model: nn.Module, kind: str, names: Optional[Sequence[str]] = None,
                   norms: Optional[Mapping[str, torch.Tensor]] = None, n: int = 2, m: int = 4
                   ) -> dict[str, torch.Tensor]:
    """{name: (out, in) N:M mask} of the linear (or masked) layers ``names`` (default: every nn.Linear / Conv1D
    below the model) by ``kind`` ("magnitude", or "wanda" with ``norms`` from ``input_norms``)."""
    check_choice(kind, PRIORS, "kind", "fastmask.nm_priors.one_shot_masks")
    modules = dict(linear_layers(model, masked=True))
    names = list(modules) if names is None else list(names)
    if kind == "wanda" and (norms is None or set(names) - set(norms)):
        raise ValueError("fastmask.nm_priors.one_shot_masks: kind='wanda' needs input norms of every layer "
                         "(fastmask.nm_priors.input_norms)")
    return {name: nm_mask_from_scores(scores(_out_in(modules[name]), kind, None if norms is None else norms[name]),
                                      n, m) for name in names}


@torch.no_grad()
def prune_(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Multiply the weight of each plain linear layer ``name`` by ``masks[name]`` (out, in) in place."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        weight = _out_in(modules[name])
        weight.mul_(mask.to(weight.device, weight.dtype))
    return model


@torch.no_grad()
def init_logits(model: nn.Module, masks: Mapping[str, torch.Tensor], strength: float = 3.0) -> nn.Module:
    """Set the logits of every NMMaskedLinear of ``model`` to ``prior_logits(masks[name])``."""
    layers = {name: layer for name, layer in model.named_modules() if isinstance(layer, NMMaskedLinear)}
    if not layers:
        raise ValueError("fastmask.nm_priors.init_logits: the model has no NMMaskedLinear layers (fastmask.apply "
                         "with granularity='nm' first)")
    missing = sorted(set(layers) - set(masks))
    if missing:
        raise ValueError(f"fastmask.nm_priors.init_logits: no prior mask for {missing[:3]} ({len(missing)} layers)")
    for name, layer in layers.items():
        layer.logits.copy_(prior_logits(masks[name].to(layer.logits.device), layer.n, layer.m, strength))
    return model


__all__ = ["PRIORS", "scores", "nm_mask_from_scores", "pattern_index", "prior_logits", "input_norms",
           "one_shot_masks", "prune_", "init_logits"]
