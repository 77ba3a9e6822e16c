"""Transformer-block helpers shared by the experiments that mask only the top blocks of a model and run them from a
cache of the lower blocks' output (knowledge, disentangle).

The lower blocks are frozen and unmasked, so their output, the input ``h0`` of the first masked block, is the same
at every step: it is computed once per text (``TopBlocks.inputs``: a forward pre-hook on that block takes its input
and stops the forward, so the blocks above never run), in batches and cached on disk by ``block_inputs``
($FASTMASK_CACHE/block-inputs/, the runner's cache convention), kept with the texts' token ids in ``EncodedTexts``,
and every later forward starts from it (``TopBlocks.hidden``, ``run_from_block``: the lower blocks swapped for
pass-throughs). ``top_blocks`` says which blocks are the top ones and which layers in them are masked."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..hf import block_index, block_list
from .runner import ConfigError, cache, content_key


def top_blocks(model, k: int, flag: str) -> tuple[str, int, int, list[str]]:
    """(qualified name of the model's list of transformer blocks, its length, index of the first of its top ``k``
    blocks, the names of the default mask targets in blocks first ..). ``k`` 0: every block (first 0). ConfigError
    naming ``flag``, the config field that gave ``k``, when the model has fewer than ``k`` blocks."""
    path, n_blocks, names = block_list(model)
    if k > n_blocks:
        raise ConfigError(f"{flag} must be <= the model's {n_blocks} blocks, got {k}")
    first = n_blocks - k if k else 0
    return path, n_blocks, first, [name for name in names if block_index(name)[1] >= first]


class PassThrough(nn.Module):
    """The module standing in for a lower block whose output comes from the cache: returns its input."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextmanager
def run_from_block(blocks, first: int, h0):
    """Inside: a forward of the model that holds ``blocks`` (its list of transformer blocks) skips blocks 0 ..
    first - 1 (pass-throughs) and feeds ``h0``, their cached output, to block ``first``. The embeddings still run:
    they are cheap and keep the model's attention-mask plumbing unchanged. No-op for ``first`` 0."""
    if not first:
        yield
        return
    saved = [blocks[i] for i in range(first)]

    def feed(module, args, kwargs):
        return ((h0, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h0})

    handle = blocks[first].register_forward_pre_hook(feed, with_kwargs=True)
    stub = PassThrough()
    try:
        for i in range(first):
            blocks[i] = stub
        yield
    finally:
        handle.remove()
        for i, block in enumerate(saved):
            blocks[i] = block


class _Stop(Exception):
    """Raised by the pre-hook of ``TopBlocks.inputs`` once it holds the block's input: the forward ends there."""


class TopBlocks:
    """Runs a transformer from the input of its first masked block ``first``. ``inputs(ids, mask)`` runs the
    (unmasked, frozen) lower blocks once and returns that input (no grad); ``hidden(ids, mask, h0)`` runs only the
    blocks from ``first`` on, starting at ``h0`` (None: the whole model), and returns the final (normed) hidden
    states; ``head(h)`` applies the model's output embeddings (a causal LM's head). Equal to the whole model's
    forward up to float rounding. ``model``: a base model or one with a head; ``blocks_path``: its list of blocks
    (``top_blocks``)."""

    def __init__(self, model, first: int, blocks_path: str):
        self.model, self.first = model, first
        self.blocks = model.get_submodule(blocks_path)
        self.base = model.base_model
        self.lm_head = model.get_output_embeddings()

    def inputs(self, input_ids, attention_mask):
        """The input of block ``first`` (no grad), computing only the embeddings and the blocks below it."""
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

    def hidden(self, input_ids, attention_mask, h0=None):
        with run_from_block(self.blocks, self.first if h0 is not None else 0, h0):
            return self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def head(self, hidden):
        if self.lm_head is None:
            raise ValueError(f"{type(self.model).__name__} has no output embeddings (LM head): not a causal LM")
        return self.lm_head(hidden)


def block_inputs(top: TopBlocks, input_ids, attention_mask, batch_size: int, device, weights_key=None,
                 trim: bool = False):
    """``top.inputs`` of every row, in batches of ``batch_size`` rows, as one (rows, tokens, hidden) tensor on
    ``device``. ``trim``: each batch runs at the width of its longest text (zeros after it) instead of the full
    width; the two agree up to float rounding, and each experiment keeps the one its results were made with
    (disentangle trims, knowledge does not). With ``weights_key`` (``runner.weights_key`` of the model) the result is
    cached in $FASTMASK_CACHE/block-inputs/ under the model, the first masked block and the exact tokens
    (safetensors; a few MB), so that repeated runs skip the lower blocks entirely."""
    key = None
    if weights_key is not None:
        # A trimmed batch's width depends on which rows share it: the batch size is part of that key.
        batching = ("trim", batch_size) if trim else ()
        key = content_key(weights_key, top.first, tuple(input_ids.shape), *batching,
                          tensors=(input_ids, attention_mask))
        entry = cache.read_tensors("block-inputs", key)
        if entry is not None and "h0" in entry:
            return entry["h0"].to(device)
    pieces = []
    with torch.no_grad():
        for start in range(0, len(input_ids), batch_size):
            ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
            if trim:
                width = max(int(mask.sum(1).max()), 1)
                ids, mask = ids[:, :width], mask[:, :width]
            h0 = top.inputs(ids.to(device), mask.to(device))
            pieces.append(F.pad(h0, (0, 0, 0, input_ids.shape[1] - h0.shape[1])))
    h0 = torch.cat(pieces)
    if key is not None:
        cache.write_tensors("block-inputs", key, {"h0": h0})
    return h0


@dataclass
class EncodedTexts:
    """Texts as right-padded token ids (a row each) and, once computed, ``h0``: the input of the first masked block
    for every row ((rows, tokens, hidden), from ``block_inputs``; None: not cached, a forward runs the whole model).
    Knowledge's ``ScoredSentences`` add the tail tokens they score."""

    input_ids: object
    attention_mask: object
    h0: object = None

    @classmethod
    def from_texts(cls, tokenizer, texts: Sequence[str], max_length: int) -> "EncodedTexts":
        """``texts`` tokenised, padded to the longest and cut at ``max_length`` tokens."""
        batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return cls(batch["input_ids"], batch["attention_mask"])

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, indices: Sequence[int], device=None) -> tuple:
        """(input_ids, attention_mask, h0 or None) of the rows ``indices``, trimmed to their longest text; moved to
        ``device`` when given (else where they are kept)."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        mask = self.attention_mask[index]
        width = max(int(mask.sum(1).max()), 1)
        parts = (self.input_ids[index, :width], mask[:, :width], None if self.h0 is None else self.h0[index, :width])
        return parts if device is None else tuple(None if t is None else t.to(device) for t in parts)


__all__ = ["block_index", "block_list", "top_blocks", "run_from_block", "TopBlocks", "block_inputs", "EncodedTexts"]
