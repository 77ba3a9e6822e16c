"""Transformer-block helpers shared by the experiments that mask only the top blocks of a model and run them from a
cache of the lower blocks' output (knowledge, disentangle)."""

from __future__ import annotations

from contextlib import contextmanager

from ..hf import block_index, block_list  # noqa: F401  (the experiments' names for them)

_PASS_THROUGH = None


def _pass_through_class():
    """The module standing in for a lower block whose output comes from the cache: returns its input. (Made on
    first use so that importing this module does not import torch.)"""
    global _PASS_THROUGH
    if _PASS_THROUGH is None:
        from torch import nn

        class PassThrough(nn.Module):
            def forward(self, hidden_states, *args, **kwargs):
                return hidden_states

        _PASS_THROUGH = PassThrough
    return _PASS_THROUGH


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
    stub = _pass_through_class()()
    try:
        for i in range(first):
            blocks[i] = stub
        yield
    finally:
        handle.remove()
        for i, block in enumerate(saved):
            blocks[i] = block


__all__ = ["block_index", "block_list", "run_from_block"]
