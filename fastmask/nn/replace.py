"""Swap nn.Linear / Conv1D layers of a model for MaskedLinear in place (the weights are shared, not copied)."""

from __future__ import annotations

import re
from typing import Callable, Optional

from torch import nn

from .masked_linear import MaskedLinear, _is_conv1d


def _is_linear_like(module: nn.Module) -> bool:
    """nn.Linear (and subclasses) or transformers' Conv1D; never a MaskedLinear (so nothing is wrapped twice)."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def replace_linear_layers(model: nn.Module, include: str = r".*", exclude: Optional[str] = None,
                          make: Optional[Callable[[str, nn.Module], MaskedLinear]] = None, **mask_kwargs
                          ) -> dict[str, MaskedLinear]:
    """Replace every nn.Linear / Conv1D whose qualified name matches ``include`` (and not ``exclude``) with a
    MaskedLinear; returns {name: masked module}. Each layer gets its own noise seed (its index)."""
    chosen = [(name, module) for name, module in model.named_modules()
              if _is_linear_like(module) and re.search(include, name) and not (exclude and re.search(exclude, name))]
    replaced = {}
    for index, (name, module) in enumerate(chosen):
        masked = make(name, module) if make else MaskedLinear.from_module(
            module, **{"seed": mask_kwargs.get("seed", 0) * 100_003 + index, **{k: v for k, v in mask_kwargs.items()
                                                                                 if k != "seed"}})
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, masked)
        replaced[name] = masked
    return replaced
