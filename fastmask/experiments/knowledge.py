"""`fastmask run knowledge`: knowledge-critical subnetworks of a causal LM (Bayazit et al., EMNLP 2024), on fused masks.

Find a sparse subnetwork whose REMOVAL makes the model forget one piece of relational knowledge (a TargetKG: the
WordNet hypernym triplets under a synset, e.g. building.n.01) while it keeps other knowledge (ControlKG) and its
language modelling (WikiText-2):

* Mask: one logit per weight of the attention and MLP projections of the top ``top_k_layers`` blocks (GPT-2 c_attn,
  c_proj, c_fc; Llama q/k/v/o, gate/up/down), weights frozen, dropout off; Gumbel-sigmoid straight-through
  (temperature 1, hard threshold 0.5), logits initialised to logit(init_keep) (the paper: 0.45; the CPU-budget
  default: 0.05, see ``KnowledgeConfig.init_keep``); eval gate sigmoid(l) > 0.5. The subnetwork is the mask m; the
  remaining model uses 1 - m (``fastmask.inverse``).
* Loss, on the remaining model: 1.5 KL(uniform || p) at the TargetKG tail tokens (suppression) + KL(p_full ||
  p_remaining) at the ControlKG tail tokens + the same KL at every position of WikiText-2 blocks + lambda(t) * mean
  sigmoid(l) (lambda = 2 for the first half of the steps, then linear to 3). Adam (lr 0.2 in the paper) with a
  linear warm-up over the first 10% of steps. One mask sample per step, shared by the three terms.
* Deviation from the released code (documented in every report): that code reads the KL terms at the tail token's
  own position, i.e. from the distribution that predicts the token AFTER the tail; fastmask reads the distribution
  that predicts each tail token, from the position before it (a causal LM's prediction of the tail). The released
  code scores only the last tail token; ``tail_tokens="all"`` (default) scores every token of the tail word,
  ``"last"`` only the last one.
* Evaluation: perplexity of the tail tokens (TargetKG, held-out ControlKG) and of held-out WikiText-2 blocks under the
  full model, the remaining model and the remaining model of a RANDOM subnetwork with the same number of weights per
  layer; gold-token rank and log-probability deltas; sparsity overall, per layer and attention vs MLP.

Speed: the blocks below the masked ones are frozen and unmasked, so their output on the fixed data sets is computed
once; each step then runs only the top blocks (``TopBlocks``), and the LM head only at the scored positions (all
positions for LM text). On a GPU the masked layers run the fused kernels of the active fastmask backend.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

from torch import nn

from .. import distributed as fmd
from .blocks import block_index, block_list, run_from_block
from .runner import (BatchStream, ConfigError, Run, RunConfig, TrainState, add_config_arguments, check, help_metadata,
                     markdown_table, open_run, pyplot, resolve_device, save_figure, run_cli, seed_everything)

EXPERIMENT = "knowledge"


# --- configuration ------------------------------------------------------------------------------------------
@dataclass
class KnowledgeConfig(RunConfig):
    """Defaults: the paper's method with a CPU-sized budget on the packaged SmolLM2-135M
    (docs/experiments/knowledge.md)."""

    steps: int = field(default=300, metadata=help_metadata("optimisation steps"))
    checkpoint_every: int = field(default=50, metadata=help_metadata("steps between checkpoints (0: only at the end)"))
    model: str = field(default="smollm2-135m", metadata=help_metadata(
        "causal LM: a fastmask asset name (smollm2-135m), a local folder or a hub id (gpt2, gpt2-xl, ...)"))
    target: str = field(default="building.n.01", metadata=help_metadata("WordNet synset whose TargetKG is suppressed"))
    targetkg_source: Literal["auto", "paper", "wordnet"] = field(default="auto", metadata=help_metadata(
        "paper: the released set of the synset; wordnet: built from WordNet 3.0; auto: paper when released"))
    targetkg_size: Optional[int] = field(default=20, metadata=help_metadata(
        "wordnet TargetKG: triplets sampled from the synset's graph (none: all)"))
    targetkg_depth: int = field(default=2, metadata=help_metadata("wordnet TargetKG: depth of the hyponym tree"))
    targetkg_ancestors: int = field(default=2, metadata=help_metadata(
        "wordnet TargetKG: hypernym edges above the synset"))
    controlkg_source: Literal["auto", "wordnet", "paper"] = field(default="auto", metadata=help_metadata(
        "training ControlKG: wordnet (sampled from WordNet 3.0) or paper (the released validation set minus the "
        "evaluation part; the paper's training set was not released); auto: wordnet when reachable"))
    controlkg_size: int = field(default=64, metadata=help_metadata("training ControlKG triplets"))
    controlkg_eval_size: int = field(default=50, metadata=help_metadata(
        "held-out ControlKG triplets for evaluation (the first of the released validation set, as the paper)"))
    template: Literal["auto", "lowest-ppl", "released", "fixed"] = field(default="auto", metadata=help_metadata(
        "sentence per triplet: lowest-ppl under the model (the paper's rule), released (the paper's choice, GPT-2 "
        "models), fixed (the first template); auto: released for gpt2* models, else lowest-ppl"))
    tail_tokens: Literal["all", "last"] = field(default="all", metadata=help_metadata(
        "scored tokens of the tail word: all of them or only the last (the released code)"))
    lm_source: Literal["auto", "local", "hub"] = field(default="auto", metadata=help_metadata(
        "WikiText-2: local shared data folder or the hub (wikitext-2-raw-v1); auto: local when present"))
    lm_block_size: int = field(default=64, metadata=help_metadata("tokens per WikiText-2 block"))
    lm_train_blocks: int = field(default=64, metadata=help_metadata("WikiText-2 blocks for the LM-maintenance loss"))
    lm_eval_blocks: int = field(default=16, metadata=help_metadata("held-out WikiText-2 blocks for LM perplexity"))
    lm_batch: int = field(default=2, metadata=help_metadata("WikiText-2 blocks per step"))
    controlkg_batch: int = field(default=16, metadata=help_metadata("ControlKG sentences per step"))
    targetkg_batch: Optional[int] = field(default=None, metadata=help_metadata(
        "TargetKG sentences per step (none: all)"))
    top_k_layers: int = field(default=6, metadata=help_metadata(
        "mask the attention+MLP projections of the top k blocks"))
    estimator: Literal["gumbel_sigmoid_st", "hard_concrete"] = field(
        default="gumbel_sigmoid_st", metadata=help_metadata(
        "mask estimator"))
    granularity: Literal["weight", "unit_in", "unit_out", "block"] = field(default="weight", metadata=help_metadata(
        "one gate per weight (the paper), per unit, or per block"))
    temperature: float = field(default=1.0, metadata=help_metadata("estimator temperature"))
    init_keep: float = field(default=0.05, metadata=help_metadata(
        "initial probability of a weight being in the subnetwork: logits = logit(init_keep). The paper uses 0.45 "
        "with 40,000 steps; with a few hundred steps that start leaves the logits random-walking around the "
        "threshold (docs/experiments/knowledge.md), so the CPU-budget default starts at 0.05"))
    lr: float = field(default=0.2, metadata=help_metadata("Adam learning rate of the mask logits"))
    warmup_frac: float = field(default=0.1, metadata=help_metadata(
        "linear learning-rate warm-up, fraction of the steps"))
    lambda_target: float = field(default=1.5, metadata=help_metadata("weight of the TargetKG suppression KL"))
    lambda_control: float = field(default=1.0, metadata=help_metadata("weight of the ControlKG maintenance KL"))
    lambda_lm: float = field(default=1.0, metadata=help_metadata("weight of the LM maintenance KL"))
    lambda_reg_init: float = field(default=2.0, metadata=help_metadata(
        "sparsity weight for the first half of the steps"))
    lambda_reg_final: float = field(default=3.0, metadata=help_metadata(
        "sparsity weight reached linearly at the last step"))
    eval_every: int = field(default=0, metadata=help_metadata(
        "steps between TargetKG/ControlKG evaluations (0: at the end)"))
    eval_batch: int = field(default=32, metadata=help_metadata("sentences / blocks per evaluation batch"))
    data_parallel: Literal["fsdp", "ddp"] = field(default="fsdp", metadata=help_metadata(
        "under torchrun: fsdp shards the masked blocks (logits, frozen weights, Adam state) over the processes "
        "with FSDP2; ddp keeps a whole copy on every process and all-reduces the logits' gradients"))

    def validate(self) -> "KnowledgeConfig":
        super().validate()
        for name in ("controlkg_size", "controlkg_eval_size", "lm_block_size", "lm_train_blocks", "lm_eval_blocks",
                     "lm_batch", "controlkg_batch", "top_k_layers", "eval_batch"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, name, "an int >= 1", value)
        for name in ("targetkg_size", "targetkg_batch"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, int) and value >= 1), name, "an int >= 1 or none", value)
        check(self.targetkg_depth >= 1, "targetkg_depth", "an int >= 1", self.targetkg_depth)
        check(self.targetkg_ancestors >= 0, "targetkg_ancestors", "an int >= 0", self.targetkg_ancestors)
        check(self.eval_every >= 0, "eval_every", "an int >= 0", self.eval_every)
        check(re.fullmatch(r"[A-Za-z0-9_'.-]+\.n\.\d\d", self.target) is not None, "target",
              "a WordNet noun synset name like building.n.01", self.target)
        for name in ("temperature", "lr"):
            value = getattr(self, name)
            check(math.isfinite(value) and value > 0, name, "a finite number > 0", value)
        check(0 < self.init_keep < 1, "init_keep", "a probability in (0, 1)", self.init_keep)
        check(0 <= self.warmup_frac < 1, "warmup_frac", "a fraction in [0, 1)", self.warmup_frac)
        for name in ("lambda_target", "lambda_control", "lambda_lm", "lambda_reg_init", "lambda_reg_final"):
            value = getattr(self, name)
            check(math.isfinite(value) and value >= 0, name, "a finite number >= 0", value)
        return self


def reg_lambda(step: int, total: int, init: float = 2.0, final: float = 3.0) -> float:
    """Weight of the sparsity term at 0-based ``step`` of ``total``: ``init`` while step + 1 <= total // 2 (the
    first half), then linear to ``final`` at the last step (the released code's piecewise-linear schedule)."""
    t, half = step + 1, total // 2
    if t <= half or total == half:
        return float(init)
    return float(init + (final - init) * (t - half) / (total - half))


def lr_factor(step: int, total: int, warmup_frac: float) -> float:
    """Linear warm-up of the learning rate over the first ``warmup_frac`` of the steps, then 1."""
    warm = int(total * warmup_frac)
    return 1.0 if warm <= 0 or step >= warm else (step + 1) / (warm + 1)


# --- the loss terms (each a mean over scored positions) -----------------------------------------------------
def kl_uniform_to(logits):
    """Mean over rows of KL(uniform || softmax(logits)) = -log V - mean_v log p_v (suppression)."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    return (-math.log(logits.shape[-1]) - logp.mean(dim=-1)).mean()


def kl_full_to(full_logits, logits):
    """Mean over rows of KL(p_full || p) = sum_v p_full (log p_full - log p) (maintenance); p_full is a constant."""
    import torch

    logp_full = torch.log_softmax(full_logits.float(), dim=-1)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return (logp_full.exp() * (logp_full - logp)).sum(dim=-1).mean()


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
        import torch

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
    import torch
    from safetensors.torch import load_file, save

    from .. import assets

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


# --- tokenised data ---------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """Right-padded sentences with their scored tail tokens. Token ``gold[i]`` sits at position ``cols[i] + 1`` of
    sentence ``rows[i]`` and is predicted by the logits at position ``cols[i]``."""

    input_ids: object
    attention_mask: object
    rows: object
    cols: object
    gold: object
    first_token: object  # True for the first scored token of each sentence (gold rank is taken there)
    h0: object = None  # input of the first masked block, (N, T, H)
    full_hidden: object = None  # final hidden states of the unmasked model, (N, T, H): the maintenance reference

    def __len__(self):
        return self.input_ids.shape[0]

    def batch(self, indices: Sequence[int]):
        """(input_ids, attention_mask, h0, rows, cols, gold, first_token, full_hidden) of the sentences
        ``indices``, trimmed to their longest sentence; rows renumbered within the batch."""
        import torch

        index = torch.as_tensor(list(indices), dtype=torch.long)
        length = int(self.attention_mask[index].sum(dim=1).max())
        position = torch.full((len(self),), -1, dtype=torch.long)
        position[index] = torch.arange(len(index))
        keep = position[self.rows] >= 0
        return (self.input_ids[index, :length], self.attention_mask[index, :length],
                None if self.h0 is None else self.h0[index, :length], position[self.rows[keep]], self.cols[keep],
                self.gold[keep], self.first_token[keep],
                None if self.full_hidden is None else self.full_hidden[index, :length])


def tail_positions(tokenizer, sentence: str, tail_text: str, scope: str) -> tuple[list[int], list[int]]:
    """(token ids of the sentence, positions of its scored tail tokens)."""
    if not sentence.endswith(tail_text):
        raise ValueError(f"sentence {sentence!r} does not end with its tail {tail_text!r}")
    ids = _ids(tokenizer, sentence)
    prefix_ids = _ids(tokenizer, sentence[:len(sentence) - len(tail_text)].rstrip(" "))
    if scope == "all" and 0 < len(prefix_ids) < len(ids) and ids[:len(prefix_ids)] == prefix_ids:
        return ids, list(range(len(prefix_ids), len(ids)))
    return ids, [len(ids) - 1]  # the tail's last token (also when the tokenizer merges across the boundary)


def _ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's leading special tokens (BOS) but no trailing EOS."""
    ids = list(tokenizer(text)["input_ids"])
    eos = tokenizer.eos_token_id
    if len(ids) > 1 and eos is not None and ids[-1] == eos and ids[0] != eos:
        ids = ids[:-1]
    return ids


def encode(tokenizer, sentences: Sequence[str], tail_texts: Sequence[str], scope: str, pad_id: int) -> Encoded:
    import torch

    encoded = [tail_positions(tokenizer, s, t, scope) for s, t in zip(sentences, tail_texts)]
    length = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), length), dtype=torch.long)
    rows, cols, gold, first = [], [], [], []
    for i, (ids, positions) in enumerate(encoded):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        for j, p in enumerate(positions):
            rows.append(i), cols.append(p - 1), gold.append(ids[p]), first.append(j == 0)
    return Encoded(input_ids, attention, torch.tensor(rows), torch.tensor(cols), torch.tensor(gold),
                   torch.tensor(first))


# --- template choice ------------------------------------------------------------------------------------------
def _model_key(model, name: str) -> str:
    """A short identity of the model's weights (every parameter's name, shape, sum and first 256 KiB), keying the
    template-perplexity and block-input caches: a fine-tuned variant of the same base gets another key."""
    import torch

    digest = hashlib.sha256(f"{name}|{type(model).__name__}".encode())
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            digest.update(f"{param_name}|{list(param.shape)}|{param.dtype}|{flat.double().sum().item()!r}".encode())
            digest.update(flat[: 1 << 16].to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


def sentence_nll(model, tokenizer, sentences: Sequence[str], pad_id: int, batch_size: int, device,
                 cache_key: Optional[str] = None, progress: bool = False) -> dict[str, float]:
    """{sentence: mean NLL of its tokens after the first} under the (unmasked) model; results are cached in
    $FASTMASK_CACHE/template-nll/<cache_key>.json so a model's choices are computed once per machine."""
    import torch
    from tqdm.auto import tqdm

    from .. import assets

    cache_path = assets.cache_dir("template-nll") / f"{cache_key}.json" if cache_key else None
    cache = json.loads(cache_path.read_text()) if cache_path and cache_path.is_file() else {}
    todo = sorted({s for s in sentences if s not in cache}, key=len)
    for number, start in enumerate(tqdm(range(0, len(todo), batch_size), desc="template perplexity",
                                        disable=not progress or not todo, leave=False)):
        chunk = todo[start:start + batch_size]
        ids = [_ids(tokenizer, s) for s in chunk]
        length = max(len(i) for i in ids)
        batch = torch.full((len(ids), length), pad_id, dtype=torch.long)
        mask = torch.zeros_like(batch)
        for r, row in enumerate(ids):
            batch[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), 1
        with torch.no_grad():
            logits = model(input_ids=batch.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch[:, 1:, None].to(device))[..., 0]
        valid = mask[:, 1:].to(device).float()
        nll = (-(logp * valid).sum(1) / valid.sum(1).clamp(min=1)).tolist()
        cache.update(zip(chunk, nll))
        if cache_path and (number % 16 == 15 or start + batch_size >= len(todo)):  # progress survives a kill
            assets.atomic_write_text(cache_path, json.dumps(cache))
    return {s: cache[s] for s in sentences}


def choose_templates(examples, rule: str, nll_of) -> None:
    """Set each example's sentence: "lowest-ppl" picks the candidate of lowest NLL (``nll_of(sentences)``)."""
    if rule != "lowest-ppl":
        return
    scores = nll_of([c for e in examples for c in e.candidates])
    for example in examples:
        example.sentence = min(example.candidates, key=lambda s: (scores[s], example.candidates.index(s)))
        example.source = "lowest-ppl"


# --- one step's loss terms -----------------------------------------------------------------------------------
def final_hidden(top: TopBlocks, input_ids, attention_mask, h0, batch_size: int):
    """The unmasked model's final hidden states from ``h0`` (no grad), in batches; call it before fastmask.apply.
    Computed once, they are the reference p_full = softmax(head(.)) of the maintenance terms at every step (the
    model is frozen)."""
    import torch

    with torch.no_grad():
        return torch.cat([top.hidden(input_ids[i:i + batch_size].to(h0.device),
                                     attention_mask[i:i + batch_size].to(h0.device), h0[i:i + batch_size])
                          for i in range(0, len(input_ids), batch_size)])


def _tail_logits(top: TopBlocks, batch, full: bool):
    """Logits predicting each scored tail token (from the position before it) for a batch of Encoded.batch: of the
    current (masked) model, or of the unmasked one (``full``, from the batch's cached final hidden states)."""
    import torch

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
    import torch
    import torch.nn.functional as F

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
    import torch

    import fastmask as fm

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


# --- evaluation ---------------------------------------------------------------------------------------------
def score_sentences(top: TopBlocks, data: Encoded, batch_size: int) -> dict:
    """NLL of every scored token, gold rank (1 = top) and log-prob sum per sentence, under the model's current
    mode (no grad)."""
    import torch

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
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, blocks.shape[0], batch_size):
            ids = blocks[start:start + batch_size].to(h0.device)
            hidden = top.hidden(ids, torch.ones_like(ids), h0[start:start + batch_size])
            logp = torch.log_softmax(top.head(hidden[:, :-1]).float(), dim=-1)
            total += -logp.gather(-1, ids[:, 1:, None]).sum().item()
            count += ids[:, 1:].numel()
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count}


@contextmanager
def random_subnetwork(model, seed: int):
    """Inside: every masked layer's eval mask is a random one with the same number of kept gates as its learned
    mask (the equal-sparsity baseline); the learned logits come back on exit."""
    import torch

    import fastmask as fm

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


# --- the experiment ---------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """Everything a run computes before training (saved to data.json, so a resumed run reuses it exactly)."""

    target: list
    control_train: list
    control_eval: list
    sources: dict


def _load_model(config: KnowledgeConfig, device):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import assets

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


def _prepare_data(config: KnowledgeConfig, model, tokenizer, pad_id: int, device, log,
                  weights_key: str) -> Prepared:
    """TargetKG, training ControlKG, evaluation ControlKG with their sentences (template chosen per model)."""
    from .. import assets
    from . import knowledge_data as kd

    sources = {}
    model_key = kd.paper_model_key(config.model)
    rule = config.template
    if rule == "auto":
        rule = "released" if model_key else "lowest-ppl"
    if rule == "released" and model_key is None:
        raise ConfigError(f"template must not be 'released' for model {config.model!r}: the released choices exist "
                          f"only for {list(kd.PAPER_MODELS)}")
    released_key = model_key if rule == "released" else None

    def wordnet_or_none():
        try:
            return assets.wordnet()
        except assets.AssetUnavailable as error:
            log(f"fastmask: WordNet unavailable ({str(error).splitlines()[0]})")
            return None

    # TargetKG
    use_paper = config.targetkg_source == "paper" or (config.targetkg_source == "auto"
                                                       and config.target in kd.PAPER_TARGETS)
    if use_paper:
        try:
            target = kd.paper_targetkg(config.target, released_key, config.data_dir)
            sources["targetkg"] = f"released know-subnet set wordnet/targetkg/{config.target}"
        except assets.AssetUnavailable:
            if config.targetkg_source == "paper":
                raise
            use_paper = False
    if not use_paper:
        wn = assets.wordnet()
        graph = kd.wordnet_targetkg(config.target, config.targetkg_depth, config.targetkg_ancestors, wn=wn)
        triplets = kd.sample(graph, config.targetkg_size, config.seed)
        target = [kd.fixed_example(t) for t in triplets]
        sources["targetkg"] = (f"WordNet 3.0 graph of {config.target} (depth {config.targetkg_depth}, "
                               f"{config.targetkg_ancestors} ancestor edges: {len(graph)} triplets), "
                               f"{len(triplets)} sampled with seed {config.seed}")
    target_synsets = {s for e in target for s in (e.triplet.head, e.triplet.tail)}

    # ControlKG: evaluation = the first released validation triplets that avoid the TargetKG's synsets.
    try:
        released_val = [e for e in kd.paper_controlkg_val(released_key, config.data_dir)
                        if e.triplet.head not in target_synsets and e.triplet.tail not in target_synsets]
    except assets.AssetUnavailable:
        released_val = []
    wn = None
    if len(released_val) >= config.controlkg_eval_size:
        control_eval = released_val[:config.controlkg_eval_size]
        sources["controlkg_eval"] = "released know-subnet ControlKG validation set (first triplets)"
    else:
        wn = wn or assets.wordnet()
        triplets = kd.wordnet_controlkg(config.controlkg_eval_size, target_synsets, seed=config.seed + 1, wn=wn)
        control_eval = [kd.fixed_example(t) for t in triplets]
        sources["controlkg_eval"] = "WordNet 3.0 triplets (the released set is not reachable)"
    eval_pairs = {(e.triplet.head, e.triplet.tail) for e in control_eval}
    control_train = None
    if config.controlkg_source in ("auto", "wordnet"):
        wn = wn or (assets.wordnet() if config.controlkg_source == "wordnet" else wordnet_or_none())
        if wn is not None:
            triplets = kd.wordnet_controlkg(config.controlkg_size, target_synsets, eval_pairs, seed=config.seed,
                                            wn=wn)
            control_train = [kd.fixed_example(t) for t in triplets]
            sources["controlkg_train"] = f"WordNet 3.0 hypernym triplets sampled with seed {config.seed}"
    if control_train is None:
        rest = released_val[config.controlkg_eval_size:]
        if not rest:
            raise ConfigError("controlkg_source: neither WordNet nor the released ControlKG is reachable")
        control_train = kd.sample(rest, config.controlkg_size, config.seed)
        sources["controlkg_train"] = "released know-subnet ControlKG validation set (the triplets after the " \
                                     "evaluation ones)"
    # Sentences: the released choice, or the lowest-perplexity candidate under this model.
    every = target + control_train + control_eval
    if rule in ("lowest-ppl", "released"):
        nll_of = lambda sentences: sentence_nll(model, tokenizer, sentences, pad_id, config.eval_batch,  # noqa: E731
                                                device, weights_key, config.progress)
        needs_choice = [e for e in every if not e.source.startswith("released")]
        choose_templates(needs_choice, "lowest-ppl", nll_of)
    sources["template"] = {"released": f"the paper's released choice for {model_key} (lowest-perplexity candidate "
                                       f"where none was released)",
                           "lowest-ppl": "the candidate of lowest perplexity under the full model (the paper's rule)",
                           "fixed": "the first template ('A <head> is a <tail>')"}[rule]
    return Prepared(target, control_train, control_eval, sources)


def _data_file(run: Run):
    return run.path("data.json")


def _save_prepared(run: Run, prepared: Prepared) -> None:
    from ..assets import atomic_write_text
    from . import knowledge_data as kd

    atomic_write_text(_data_file(run), json.dumps({
        "sources": prepared.sources, "targetkg": kd.examples_to_json(prepared.target),
        "controlkg_train": kd.examples_to_json(prepared.control_train),
        "controlkg_eval": kd.examples_to_json(prepared.control_eval)}, indent=1))


def _load_prepared(run: Run) -> Optional[Prepared]:
    from . import knowledge_data as kd

    path = _data_file(run)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return Prepared(kd.examples_from_json(data["targetkg"]), kd.examples_from_json(data["controlkg_train"]),
                    kd.examples_from_json(data["controlkg_eval"]), data["sources"])


def _layer_groups(model) -> dict[str, str]:
    """{masked layer name: "attention" | "mlp"}."""
    import fastmask as fm

    family = fm.hf.model_family(model)
    return {name: "attention" if (fm.hf.layer_role(family, name) or "").startswith("attn") else "mlp"
            for name in fm.masked_modules(model)}


def sparsity_report(model) -> dict:
    """Overall / per layer / per block / attention vs MLP fractions of masked weights OFF in the subnetwork."""
    import fastmask as fm

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
             which=("full", "remaining", "random")) -> dict:
    """Scores of the full model, the remaining model (subnetwork removed) and the remaining model of a random
    subnetwork of equal per-layer size, on every sentence set and the LM text."""
    import fastmask as fm

    layers = fm.masked_modules(model).values()
    modes = {layer: layer.training for layer in layers}
    for layer in layers:
        layer.eval()
    results = {}
    try:
        for mode in which:
            context = {"full": lambda: fm.bypass(model), "remaining": lambda: fm.inverse(model)}.get(mode)
            if mode == "random":
                with random_subnetwork(model, seed), fm.inverse(model):
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
    """Per set: PPL full / remaining / random, their ratios and deltas, rank and log-prob deltas."""
    summary = {}
    for name in results["full"]:
        full, rem = results["full"][name], results["remaining"][name]
        rand = results.get("random", {}).get(name)
        row = {"ppl_full": full["ppl"], "ppl_remaining": rem["ppl"], "ppl_ratio": rem["ppl"] / full["ppl"],
               "delta_ppl": rem["ppl"] - full["ppl"]}
        if rand is not None:
            row.update(ppl_random=rand["ppl"], ppl_ratio_random=rand["ppl"] / full["ppl"],
                       delta_ppl_random=rand["ppl"] - full["ppl"])
        if "mean_rank" in full:
            deltas = [r - f for r, f in zip(rem["logprob"], full["logprob"])]
            row.update(mean_rank_full=full["mean_rank"], mean_rank_remaining=rem["mean_rank"],
                       median_rank_full=full["median_rank"], median_rank_remaining=rem["median_rank"],
                       top1_full=full["top1"], top1_remaining=rem["top1"],
                       delta_logprob=sum(deltas) / len(deltas))
            if rand is not None:
                rdeltas = [r - f for r, f in zip(rand["logprob"], full["logprob"])]
                row.update(mean_rank_random=rand["mean_rank"], delta_logprob_random=sum(rdeltas) / len(rdeltas))
        summary[name] = row
    return summary


def run_experiment(config: KnowledgeConfig, *, resume: bool = False, overwrite: bool = False, log=None) -> dict:
    """Train the mask, evaluate, write the results folder; returns metrics.json's content."""
    import torch

    import fastmask as fm
    from . import knowledge_data as kd

    # Data parallel under torchrun: every rank draws the same global batches and the same gates and trains on its
    # share of each batch. FSDP2 (default) shards the masked blocks over the ranks, DDP keeps a copy on each; either
    # way the logits' gradients are averaged. Rank 0 owns the results folder (data.json, checkpoints, history,
    # report) and evaluates; the others stop after training.
    run, rank, world = open_run(config, resume=resume, overwrite=overwrite, experiment=EXPERIMENT, log=log)
    main = rank == 0
    log = run.log
    seed_everything(config.seed)
    device = resolve_device(config.device)
    started = time.perf_counter()
    model, tokenizer, pad_id, source = _load_model(config, device)
    names, blocks_path, n_blocks, first = top_block_targets(model, config.top_k_layers)
    weights_key = _model_key(model, config.model)  # keys the template-NLL and block-input caches
    prepared = _load_prepared(run) if resume else None
    if prepared is None and main:
        prepared = _prepare_data(config, model, tokenizer, pad_id, device, log, weights_key)
        _save_prepared(run, prepared)
    fmd.barrier()
    if prepared is None:  # another rank: the data rank 0 prepared
        prepared = _load_prepared(run)
    lm_train_text, lm_train_source = kd.wikitext_text("train", config.lm_source, config.data_dir)
    lm_eval_text, lm_eval_source = kd.wikitext_text("eval", config.lm_source, config.data_dir)
    prepared.sources.update(lm_train=lm_train_source, lm_eval=lm_eval_source)
    lm_train = kd.lm_blocks(tokenizer, lm_train_text, config.lm_block_size, config.lm_train_blocks)
    lm_eval = kd.lm_blocks(tokenizer, lm_eval_text, config.lm_block_size, config.lm_eval_blocks)

    top = TopBlocks(model, first, blocks_path)
    sets = {}
    for key, examples in (("targetkg", prepared.target), ("controlkg_train", prepared.control_train),
                          ("controlkg", prepared.control_eval)):
        sets[key] = encode(tokenizer, [e.sentence for e in examples], [e.tail_text for e in examples],
                           config.tail_tokens, pad_id)
    # Inputs of the first masked block: the lower blocks never change, so they run once (and are cached on disk).
    for data in sets.values():
        data.h0 = block_inputs(top, data.input_ids, data.attention_mask, config.eval_batch, device, weights_key)
    lm_train_h0, lm_eval_h0 = (block_inputs(top, b, torch.ones_like(b), config.eval_batch, device, weights_key)
                               for b in (lm_train, lm_eval))
    lm_train, lm_eval = lm_train.to(device), lm_eval.to(device)
    # The unmasked model's outputs on the maintenance data, once (before the masks exist; also on --resume).
    control_train = sets["controlkg_train"]
    control_train.full_hidden = final_hidden(top, control_train.input_ids, control_train.attention_mask,
                                             control_train.h0, config.eval_batch)
    lm_train_full_hidden = final_hidden(top, lm_train, torch.ones_like(lm_train), lm_train_h0, config.eval_batch)
    setup_seconds = time.perf_counter() - started

    mask_config = fm.MaskConfig(estimator=config.estimator, granularity=config.granularity, beta=config.temperature,
                                init_keep=config.init_keep,  # gumbel_sigmoid_st: logits = logit(init_keep)
                                targets=[re.escape(n) + "$" for n in names], seed=config.seed)
    fm.apply(model, mask_config)
    layers = fm.masked_modules(model)
    for layer in layers.values():
        layer.train()
    step_loss = StepLoss(model, top)
    sharded = world > 1 and config.data_parallel == "fsdp"
    if sharded:
        fmd.shard_masked_blocks(model, root=step_loss)
    elif world > 1:
        step_loss = fmd.replicate(step_loss)
    optimizer = torch.optim.Adam(fm.mask_parameters(model), lr=config.lr)  # after sharding: its logits are DTensors
    target_data, control_data = sets["targetkg"], sets["controlkg_train"]
    streams = {"targetkg": BatchStream(len(target_data), config.targetkg_batch or len(target_data), config.seed),
               "controlkg": BatchStream(len(control_data), config.controlkg_batch, config.seed + 1),
               "lm": BatchStream(lm_train.shape[0], config.lm_batch, config.seed + 2)}
    for name, stream in streams.items():
        if stream.batch_size < world:
            raise ConfigError(f"{name} batches of {stream.batch_size} cannot be shared by {world} processes: every "
                              f"process needs at least one row (use larger batches or fewer processes)")
    state = TrainState(params={name: layer.logits for name, layer in layers.items()}, optimizer=optimizer,
                       model=model, streams=streams)
    run.restore(state)
    eval_sets = {"targetkg": sets["targetkg"], "controlkg": sets["controlkg"]}

    def step_fn(step: int) -> dict:
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, config.steps, config.warmup_frac)
        fm.set_step(model, step)  # one sampled subnetwork per step, shared by the three terms
        # The global batches (the same on every rank), then this rank's share of each.
        target_batch = target_data.batch(streams["targetkg"].next()[rank::world])
        control_batch = control_data.batch(streams["controlkg"].next()[rank::world])
        lm_index = torch.as_tensor(streams["lm"].next()[rank::world], device=device)
        terms = step_loss(target_batch, control_batch, lm_train[lm_index], lm_train_h0[lm_index],
                          lm_train_full_hidden[lm_index])
        # Each KL term is a mean over this rank's scored rows; weighted by rows here / rows of all ranks (x world, as
        # DDP averages) the ranks' gradients average to the gradient of the global mean. One process: weights 1.0.
        rows = [len(target_batch[3]), len(control_batch[3]), lm_index.numel() * lm_train.shape[1]]
        weights = fmd.share_weights(rows)
        suppression, control_kl, lm_kl = (terms[k] * w for k, w in zip(("suppression", "control_kl", "lm_kl"),
                                                                         weights))
        density = terms["density"]
        lam = reg_lambda(step, config.steps, config.lambda_reg_init, config.lambda_reg_final)
        loss = (config.lambda_target * suppression + config.lambda_control * control_kl + config.lambda_lm * lm_kl
                + lam * density)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # The logged values are the global ones: the ranks' weighted terms averaged.
        loss, suppression, control_kl, lm_kl = fmd.mean_over_ranks(
            torch.stack([loss.detach(), suppression.detach(), control_kl.detach(), lm_kl.detach()]))
        with torch.no_grad():  # (sharded logits: each rank counts its shard, then one sum over the ranks)
            closed = sum(fm.io.full_tensor((layer.gates() == 0).sum()) for layer in layers.values()).item()
        row = {"loss": loss.item(), "target_kl_uniform": suppression.item(), "control_kl": control_kl.item(),
               "lm_kl": lm_kl.item(), "density": density.item(), "lambda_reg": lam,
               "lr": optimizer.param_groups[0]["lr"],
               "sparsity": closed / sum(layer.logits.numel() for layer in layers.values())}
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
            scores = evaluate(model, top, eval_sets, None, None, config.eval_batch, config.seed,
                              which=("remaining",))["remaining"]
            row.update(targetkg_ppl_remaining=scores["targetkg"]["ppl"],
                       controlkg_ppl_remaining=scores["controlkg"]["ppl"])
        return row

    train_started = time.perf_counter()
    steps_before = state.step
    history = run.train(state, step_fn, show=("loss", "target_kl_uniform", "control_kl", "lm_kl", "sparsity"),
                        desc=f"knowledge {config.target}")
    train_seconds = time.perf_counter() - train_started
    if sharded:
        # The masks gathered into one file (every rank takes part); rank 0 evaluates a whole model that reads it,
        # exactly as a user would load the run's masks.
        fmd.save_masks(model, run.path("masks"))
        if main:
            model = _load_model(config, device)[0]
            fm.load_masks(model, run.path("masks"))
            top = TopBlocks(model, first, blocks_path)
            layers = fm.masked_modules(model)
    if not main:  # rank 0 evaluates and writes the results
        return {}

    eval_started = time.perf_counter()
    results = evaluate(model, top, eval_sets, lm_eval, lm_eval_h0, config.eval_batch, config.seed + 7)
    eval_seconds = time.perf_counter() - eval_started
    sparsity = sparsity_report(model)
    summary = summarize(results)
    metrics = {
        "experiment": EXPERIMENT, "model": config.model, "model_source": source,
        "model_type": model.config.model_type, "target": config.target, "steps": config.steps,
        "masked_layers": len(layers), "masked_blocks": [first, n_blocks - 1], "n_blocks": n_blocks,
        "masked_weights": sparsity["total_weights"], "backend": fm.ops._backend.resolve_name(device),
        "data": {"targetkg": len(prepared.target), "controlkg_train": len(prepared.control_train),
                 "controlkg_eval": len(prepared.control_eval), "lm_train_tokens": int(lm_train.numel()),
                 "lm_eval_tokens": int(lm_eval.numel()), "sources": prepared.sources},
        "summary": summary, "sparsity": sparsity,
        "scores": {mode: {k: {kk: vv for kk, vv in v.items() if kk != "logprob"} for k, v in r.items()}
                   for mode, r in results.items()},
        "final_train_row": history[-1] if history else None,
        "timing": {"setup_seconds": setup_seconds, "train_seconds": train_seconds,
                   "train_steps_this_process": state.step - steps_before, "eval_seconds": eval_seconds,
                   "device": str(device), "torch_threads": torch.get_num_threads(),
                   "machine": f"{platform.machine()} {platform.processor() or ''}".strip()},
    }
    if not sharded:
        run.save_masks(model)
    run.write_metrics(metrics)
    _plots(run, history, summary, sparsity)
    run.write_report(report_markdown(config, metrics, prepared))
    log(run.finished_message())
    return metrics


# --- plots and report -------------------------------------------------------------------------------------------
def _plots(run: Run, history, summary, sparsity) -> None:
    run.plot_history(history, ["target_kl_uniform", "control_kl", "lm_kl", "density"], "loss_terms.png",
                     title="loss terms (remaining model) and mask density", secondary=["sparsity"])
    plt = pyplot()
    if plt is None:
        return
    blocks = list(sparsity["per_block"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(blocks, [1 - sparsity["per_block"][b] for b in blocks], color="C0")
    ax.set_xlabel("block")
    ax.set_ylabel("fraction of weights in the subnetwork")
    ax.set_title(f"subnetwork size per block (overall {1 - sparsity['overall']:.2%} kept)")
    save_figure(fig, run.path("sparsity_per_block.png"))
    names = [n for n in ("targetkg", "controlkg", "lm") if n in summary]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.27
    for i, (key, label) in enumerate((("ppl_full", "full model"), ("ppl_remaining", "remaining (learned removed)"),
                                      ("ppl_random", "remaining (random removed)"))):
        ax.bar([j + (i - 1) * width for j in range(len(names))], [summary[n].get(key, float("nan")) for n in names],
               width, label=label)
    ax.set_xticks(range(len(names)), [{"targetkg": "TargetKG", "controlkg": "ControlKG", "lm": "WikiText-2"}[n]
                                      for n in names])
    ax.set_yscale("log")
    ax.set_ylabel("perplexity")
    ax.legend(fontsize=8)
    ax.set_title("perplexity: full vs remaining model vs random subnetwork removed")
    save_figure(fig, run.path("ppl.png"))


def report_markdown(config: KnowledgeConfig, metrics: dict, prepared: Prepared) -> str:
    s, sp, data, timing = metrics["summary"], metrics["sparsity"], metrics["data"], metrics["timing"]
    label = {"targetkg": "TargetKG", "controlkg": "ControlKG (held out)", "lm": "WikiText-2 (held out)"}
    rows = [(label[n], s[n]["ppl_full"], s[n]["ppl_remaining"], s[n].get("ppl_random", float("nan")),
             s[n]["ppl_ratio"], s[n].get("ppl_ratio_random", float("nan"))) for n in ("targetkg", "controlkg", "lm")]
    ranks = [(label[n], s[n]["mean_rank_full"], s[n]["mean_rank_remaining"], s[n].get("mean_rank_random",
             float("nan")), s[n]["delta_logprob"], s[n].get("delta_logprob_random", float("nan")))
             for n in ("targetkg", "controlkg")]
    first, last = metrics["masked_blocks"]
    examples = "\n".join(f"  - `{e.triplet.head} IsA {e.triplet.tail}`: \"{e.sentence.strip()}\""
                         for e in prepared.target[:8])
    ppl_table = markdown_table(["set", "PPL full", "PPL remaining", "PPL random removed", "ratio remaining/full",
                                "ratio random/full"], rows)
    rank_table = markdown_table(["set", "rank full", "rank remaining", "rank random", "delta log-prob",
                                 "delta log-prob random"], ranks)
    scored_tokens = ("The released code scores only the last tail token; here every token of the tail word is scored."
                     if config.tail_tokens == "all" else "Only the last tail token is scored, as in the released code.")
    return f"""# Knowledge-critical subnetwork: {metrics['target']} in {metrics['model']}

Reimplementation of Bayazit et al., "Discovering Knowledge-Critical Subnetworks in Pretrained Language Models"
(EMNLP 2024) with fastmask's fused masks. The subnetwork is a learned binary mask over the weights of the attention
and MLP projections of blocks {first}-{last} (of {metrics['n_blocks']}) of `{metrics['model_type']}` model
`{metrics['model']}`; the *remaining model* is the model with the subnetwork removed (weights multiplied by 1 - m).

## Result

Removing the subnetwork ({sp['kept_weights']:,} of {sp['total_weights']:,} masked weights, i.e. **{sp['overall']:.2%}
of the masked weights are not in it**) changes the perplexity of the tail tokens as follows. "random" removes a random
subnetwork with the same number of weights in every layer.

{ppl_table}

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

Deviation from the released code: it reads the KL terms at the tail token's own position (the distribution of the
token after the tail); here each tail token is predicted from the position before it, as a causal LM predicts it.
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


# --- command line -------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, KnowledgeConfig)


def run_from_args(args) -> int:
    from .knowledge_data import DataError

    return run_cli(KnowledgeConfig, run_experiment, args, EXPERIMENT, run_errors=(DataError,))


__all__ = ["KnowledgeConfig", "reg_lambda", "lr_factor", "kl_uniform_to", "kl_full_to", "loss_terms", "TopBlocks",
           "Encoded",
           "encode", "tail_positions", "sentence_nll", "choose_templates", "evaluate", "summarize",
           "sparsity_report", "random_subnetwork", "run_experiment", "add_arguments", "run_from_args"]
