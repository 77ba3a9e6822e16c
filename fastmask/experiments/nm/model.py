"""The model side of the nm experiment: the causal LM, its 2:4 targets, the learned-mask model and the loss."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

import fastmask as fm

from ... import nm_priors
from ..pretrained import load_model
from .config import NMConfig


def load_lm(name: str, device):
    """(causal LM in float32, eval mode, no KV cache; tokenizer; where it came from)."""
    model, tokenizer, source = load_model(name, "AutoModelForCausalLM", device, dtype=torch.float32)
    model.config.use_cache = False
    return model, tokenizer, source


def target_names(model) -> list[str]:
    """fastmask's default targets: every attention and MLP projection of the transformer blocks."""
    return [name for name, _ in fm.hf.find_targets(model, fm.MaskConfig())]


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of the blocks ``ids`` (batch, length), in float32."""
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def apply_nm(model, config: NMConfig, names: list[str], prior_masks: dict):
    """``model`` with a learned N:M mask on ``names`` (fm.apply, granularity="nm"), logits from the prior."""
    mask_config = fm.MaskConfig(granularity="nm", n=config.n, m=config.m, beta=config.temperature,
                                nm_scale=config.scale, nm_hard=config.hard, seed=config.seed,
                                targets=[re.escape(name) + "$" for name in names])
    fm.apply(model, mask_config)
    nm_priors.init_logits(model, prior_masks, strength=config.prior_strength)
    return model


def set_temperature(model, temperature: float) -> None:
    for layer in fm.masked_modules(model).values():
        layer.temperature = temperature


@torch.no_grad()
def changed_from_prior(model, prior_masks: dict) -> float:
    """Fraction of the groups whose eval-mode pattern differs from the prior's."""
    changed = total = 0
    for name, layer in fm.masked_modules(model).items():
        prior = nm_priors.pattern_index(prior_masks[name].to(layer.logits.device), layer.n, layer.m)
        changed += int((layer.pattern_index() != prior).sum())
        total += prior.numel()
    return changed / total


__all__ = ["load_lm", "target_names", "lm_loss", "apply_nm", "set_temperature", "changed_from_prior"]
