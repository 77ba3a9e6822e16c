"""The model side of the knowledge experiment: loading the causal LM, running only its top (masked) blocks from a
cache of the lower blocks' output (``TopBlocks``), the loss terms of one step (KL suppression and maintenance terms,
``loss_terms``, ``StepLoss``) and the random subnetwork of equal size (the evaluation baseline)."""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

import fastmask as fm

from ... import assets
from ..blocks import block_index, block_list, run_from_block
from ..runner import ConfigError
from .config import KnowledgeConfig


# --- running only the top blocks ----------------------------------------------------------------------------
class _Stop(Exception):
    pass


class TopBlocks:
    """Runs a causal LM from the input of its first masked block. ``inputs(ids, mask)`` runs the (unmasked, frozen)
    lower blocks once and returns that input; ``hidden(ids, mask, h0)`` runs only the blocks from ``first`` on,
    starting at ``h0``, and returns the final (normed) hidden states; ``head(h)`` applies the LM head. Equal to the
    whole model's forward up to float rounding."""

    def __init__(self, model, first: int, blocks_path: str):
        self.model, self.first = model, first
        self.blocks = model.get_submodule(blocks_path)
        self.base = model.base_model
        self.lm_head = model.get_output_embeddings()
        if self.lm_head is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings (LM head): not a causal LM")

    def inputs(self, input_ids, attention_mask):
        """The input of block ``first`` (no grad), computing only the blocks below it."""
        captured = []

        def grab(module, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _Stop

        handle = self.blocks[self.first].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured[0].detach()

    def hidden(self, input_ids, attention_mask, h0):
        with run_from_block(self.blocks, self.first, h0):
            return self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def head(self, hidden):
        return self.lm_head(hidden)


def top_block_targets(model, k: int) -> tuple[list[str], str, int, int]:
    """(names of the default attention/MLP layers in the top ``k`` blocks, the block list, its length, the first
    masked block)."""
    path, n_blocks, names = block_list(model)
    if k > n_blocks:
        raise ConfigError(f"top_k_layers must be <= the model's {n_blocks} blocks, got {k}")
    first = n_blocks - k
    return [n for n in names if block_index(n)[1] >= first], path, n_blocks, first


def block_inputs(top: TopBlocks, input_ids, attention_mask, batch_size: int, device,
                 weights_key: Optional[str] = None):
    """``top.inputs`` over batches, cached in $FASTMASK_CACHE/block-inputs/ under the model, the first masked block
    and the exact tokens (safetensors; a few MB), so that repeated runs skip the lower blocks entirely."""
    path = None
    if weights_key is not None:
        digest = hashlib.sha256(f"{weights_key}|{top.first}|{tuple(input_ids.shape)}".encode())
        digest.update(input_ids.numpy().tobytes())
        digest.update(attention_mask.numpy().tobytes())
        path = assets.cache_dir("block-inputs") / f"{digest.hexdigest()[:24]}.safetensors"
        if path.is_file():
            try:
                return load_file(str(path))["h0"].to(device)
            except Exception:  # noqa: BLE001 - an unreadable cache entry is recomputed
                pass
    with torch.no_grad():
        h0 = torch.cat([top.inputs(input_ids[i:i + batch_size].to(device), attention_mask[i:i + batch_size].to(device))
                        for i in range(0, len(input_ids), batch_size)])
    if path is not None:
        assets.atomic_write_bytes(path, save({"h0": h0.detach().to("cpu").contiguous()}))
    return h0


# --- the model: loading it, and the identity of its weights --------------------------------------------------
def _load_model(config: KnowledgeConfig, device):
    # transformers takes seconds to import: only when a model is loaded, not when the CLI builds its parser
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = assets.resolve_model(config.model)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        if getattr(model.config, "model_type", None) != "gpt2":
            raise
        tokenizer = AutoTokenizer.from_pretrained(assets.gpt2_tokenizer_dir())  # a GPT-2 folder without one
    model.config.use_cache = False
    model.eval().to(device)  # eval: dropout off (the paper's use_dropout=False); the masks train below
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        pad_id = 0
    return model, tokenizer, pad_id, source


def _model_key(model, name: str) -> str:
    """A short identity of the model's weights (every parameter's name, shape, sum and first 256 KiB), keying the
    template-perplexity and block-input caches: a fine-tuned variant of the same base gets another key."""
    digest = hashlib.sha256(f"{name}|{type(model).__name__}".encode())
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            digest.update(f"{param_name}|{list(param.shape)}|{param.dtype}|{flat.double().sum().item()!r}".encode())
            digest.update(flat[: 1 << 16].to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


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
    """Logits predicting each scored tail token (from the position before it) for a batch of Encoded.batch: of the
    current (masked) model, or of the unmasked one (``full``, from the batch's cached final hidden states)."""
    ids, mask, h0, rows, cols, _, _, full_hidden = batch
    device = h0.device
    if full:
        with torch.no_grad():
            return top.head(full_hidden[rows.to(device), cols.to(device)])
    hidden = top.hidden(ids.to(device), mask.to(device), h0)
    return top.head(hidden[rows.to(device), cols.to(device)])


def _tail_logits_joint(top: TopBlocks, first_batch, second_batch):
    """``_tail_logits(top, b, full=False)`` of two batches of Encoded.batch from one forward (right-padded to the
    longer one; padding is masked out, so each sentence's logits are those of its own batch)."""
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


__all__ = ["TopBlocks", "top_block_targets", "block_inputs", "kl_uniform_to", "kl_full_to", "final_hidden",
           "loss_terms", "StepLoss", "random_subnetwork"]
