"""The model side of the knowledge experiment: loading the causal LM (it runs only its top, masked blocks from a cache
of the lower blocks' output: ``..blocks.TopBlocks``), the loss terms of one step (KL suppression and maintenance terms,
``loss_terms``, ``StepLoss``) and the random subnetwork of equal size (the evaluation baseline)."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

import fastmask as fm

from ..blocks import TopBlocks
from ..pretrained import load_model, pad_token_id
from .config import KnowledgeConfig


# --- the model ----------------------------------------------------------------------------------------------
def _load_model(config: KnowledgeConfig, device):
    """(causal LM in eval mode on ``device``, tokenizer, padding id, where the model came from). Eval: dropout off
    (the paper's use_dropout=False); the masks train."""
    model, tokenizer, source = load_model(config.model, "AutoModelForCausalLM", device, dtype=torch.float32)
    model.config.use_cache = False
    return model, tokenizer, pad_token_id(tokenizer), source


# --- the loss terms (each a mean over scored positions) -----------------------------------------------------
def kl_uniform_to(logits):
    """Mean over rows of KL(uniform || softmax(logits)) = -log V - mean_v log p_v (suppression)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return (-math.log(logits.shape[-1]) - logp.mean(dim=-1)).mean()


def kl_full_to(full_logits, logits):
    """Mean over rows of KL(p_full || p) = sum_v p_full (log p_full - log p) (maintenance); p_full is a constant."""
    logp_full = torch.log_softmax(full_logits.float(), dim=-1)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return (logp_full.exp() * (logp_full - logp)).sum(dim=-1).mean()


# --- one step's loss terms -----------------------------------------------------------------------------------
def final_hidden(top: TopBlocks, input_ids, attention_mask, h0, batch_size: int):
    """The unmasked model's final hidden states from ``h0`` (no grad), in batches; call it before fastmask.apply.
    Computed once, they are the reference p_full = softmax(head(.)) of the maintenance terms at every step (the
    model is frozen)."""
    with torch.no_grad():
        return torch.cat([top.hidden(input_ids[i:i + batch_size].to(h0.device),
                                     attention_mask[i:i + batch_size].to(h0.device), h0[i:i + batch_size])
                          for i in range(0, len(input_ids), batch_size)])


def _tail_logits(top: TopBlocks, batch, full: bool):
    """Logits predicting each scored tail token (from the position before it) for a batch of
    ScoredSentences.batch: of the current (masked) model, or of the unmasked one (``full``, from the batch's cached
    final hidden states)."""
    ids, mask, h0, rows, cols, _, _, full_hidden = batch
    device = h0.device
    if full:
        with torch.no_grad():
            return top.head(full_hidden[rows.to(device), cols.to(device)])
    hidden = top.hidden(ids.to(device), mask.to(device), h0)
    return top.head(hidden[rows.to(device), cols.to(device)])


def _tail_logits_joint(top: TopBlocks, first_batch, second_batch):
    """``_tail_logits(top, b, full=False)`` of two batches of ScoredSentences.batch from one forward (right-padded to
    the longer one; padding is masked out, so each sentence's logits are those of its own batch)."""
    length = max(first_batch[0].shape[1], second_batch[0].shape[1])

    def pad(t):  # (B, T, ...) -> (B, length, ...), zeros after the sentence
        return F.pad(t, (0, 0) * (t.dim() - 2) + (0, length - t.shape[1]))

    (ids_a, mask_a, h0_a, rows_a, cols_a, *_), (ids_b, mask_b, h0_b, rows_b, cols_b, *_) = first_batch, second_batch
    device = h0_a.device
    hidden = top.hidden(torch.cat([pad(ids_a), pad(ids_b)]).to(device),
                        torch.cat([pad(mask_a), pad(mask_b)]).to(device), torch.cat([pad(h0_a), pad(h0_b)]))
    rows = torch.cat([rows_a, rows_b + ids_a.shape[0]]).to(device)
    logits = top.head(hidden[rows, torch.cat([cols_a, cols_b]).to(device)])
    return logits[:len(rows_a)], logits[len(rows_a):]


def loss_terms(model, top: TopBlocks, target_batch, control_batch, lm_ids, lm_h0, lm_full_hidden) -> dict:
    """The four terms of one step, on the remaining model (every MaskedLinear in inverse mode): suppression
    KL(uniform || p) at the TargetKG tail tokens, maintenance KL(p_full || p) at the ControlKG tail tokens and at
    every position of the LM blocks (p_full from the unmasked model's cached final hidden states), and the
    density mean sigmoid(l)."""
    with fm.inverse(model):
        # TargetKG and ControlKG sentences in one forward: each masked weight is built once for both.
        target_logits, control_logits = _tail_logits_joint(top, target_batch, control_batch)
        suppression = kl_uniform_to(target_logits)
        control_kl = kl_full_to(_tail_logits(top, control_batch, full=True), control_logits)
        with torch.no_grad():
            lm_full = top.head(lm_full_hidden)
        lm_kl = kl_full_to(lm_full.flatten(0, 1),
                           top.head(top.hidden(lm_ids, torch.ones_like(lm_ids), lm_h0)).flatten(0, 1))
    return {"suppression": suppression, "control_kl": control_kl, "lm_kl": lm_kl,
            "density": fm.l0_penalty(model, normalize=True)}  # mean sigmoid(l) over all masked weights


class StepLoss(nn.Module):
    """``loss_terms`` as a module: DDP hooks a module's forward, and a data-parallel run averages the logits'
    gradients through it (the top-blocks forward bypasses the model's own forward)."""

    def __init__(self, model, top: TopBlocks):
        super().__init__()
        self.model, self.top = model, top

    def forward(self, target_batch, control_batch, lm_ids, lm_h0, lm_full_hidden) -> dict:
        return loss_terms(self.model, self.top, target_batch, control_batch, lm_ids, lm_h0, lm_full_hidden)


# --- the baseline: a random subnetwork of the same size ------------------------------------------------------
@contextmanager
def random_subnetwork(model, seed: int):
    """Inside: every masked layer's eval mask is a random one with the same number of kept gates as its learned
    mask (the equal-sparsity baseline); the learned logits come back on exit."""
    layers = fm.masked_modules(model)
    saved = {name: layer.logits.detach().clone() for name, layer in layers.items()}
    generator = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            for name, layer in layers.items():
                kept = int((layer.gates() > 0).sum())
                order = torch.randperm(layer.logits.numel(), generator=generator)
                random_logits = torch.full((layer.logits.numel(),), -10.0)
                random_logits[order[:kept]] = 10.0
                layer.logits.copy_(random_logits.view_as(layer.logits).to(layer.logits.device))
        yield
    finally:
        with torch.no_grad():
            for name, layer in layers.items():
                layer.logits.copy_(saved[name])


__all__ = ["kl_uniform_to", "kl_full_to", "final_hidden", "loss_terms", "StepLoss", "random_subnetwork"]
