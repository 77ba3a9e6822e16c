"""Tensors and modules that FSDP2 sharded, recognised without importing torch.distributed (``import fastmask`` stays
fast): ``full_tensor`` (the whole tensor of a DTensor) and ``architecture_name`` (the class a sharded module was)."""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..ops._common import is_dtensor


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter that FSDP2 shards (a DTensor: all-gathered, so every rank must call this in
    the same order); any other tensor as it is."""
    return t.full_tensor() if is_dtensor(t) else t


def architecture_name(model: nn.Module) -> str:
    """The model's class name; for a module FSDP2 sharded, the class it was (fully_shard swaps in FSDP<Name>)."""
    cls = type(model)
    fsdp = sys.modules.get("torch.distributed.fsdp")  # an FSDPModule exists only once this was imported
    if fsdp is not None and isinstance(model, fsdp.FSDPModule):
        cls = next(base for base in cls.__mro__[1:] if not issubclass(base, fsdp.FSDPModule))
    return cls.__name__
