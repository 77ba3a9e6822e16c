"""Model surgery: find the linear layers of a model, swap MaskedLinear layers in and plain layers back, and the
state fastmask keeps on a model while masks are in it. fastmask.apply, fastmask.nn.replace_linear_layers and
fastmask.merge / unapply all go through here, so every way into a model seeds, freezes and records alike:

    mask_layers     build every MaskedLinear first (a bad layer leaves the model untouched), record each parameter's
                    requires_grad on the model, swap the layers in (in the model's train mode), optionally freeze
                    everything but the logits
    restore_layers  swap plain layers back, give every parameter its recorded requires_grad, forget the state
    layer_seed      the noise seed of a layer: a hash of its qualified name, so (un)targeting another layer
                    changes nothing

Layer names are qualified module names ("encoder.layer.3.attention.self.query"); a transformer block is the part up
to the first numeric component ("encoder.layer.3", ``block_key``).
"""

from __future__ import annotations

import hashlib
import re
from typing import Callable, Iterable, Mapping, Optional

from torch import nn

from ..ops._validate import check_seed
from .masked_linear import MaskedLinear, _is_conv1d

SEED_MASK = 2**63 - 1
REQUIRES_GRAD_ATTR = "_fastmask_requires_grad"  # {parameter name: requires_grad before the first mask_layers}
CONFIG_ATTR = "fastmask_config"  # the MaskConfig of fastmask.apply


# --- find ---------------------------------------------------------------------------------------------------
def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear (and subclasses) or transformers' Conv1D; never a MaskedLinear (so nothing is wrapped twice)."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def linear_layers(model: nn.Module, *, masked: bool = False) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of the nn.Linear / Conv1D layers below ``model`` (the model itself excluded), in
    module order; ``masked=True`` lists the MaskedLinear layers among them too."""
    return [(name, module) for name, module in model.named_modules()
            if name and (is_linear_like(module) or (masked and isinstance(module, MaskedLinear)))]


def layer_seed(seed: int, name: str) -> int:
    """Noise seed of layer ``name``: the first 63 bits of sha256(f"{seed}:{name}"). Depends on the name only, so
    the noise of a layer does not change when other layers are (un)targeted."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & SEED_MASK


def block_index(name: str) -> tuple[str, int]:
    """("model.layers", 25) for "model.layers.25.self_attn.q_proj": the block list and the block of a layer."""
    match = re.search(r"^(.*?)\.(\d+)\.", name)
    if match is None:
        raise ValueError(f"cannot find a block index in layer name {name!r}")
    return match.group(1), int(match.group(2))


def block_key(name: str) -> str:
    """"model.layers.25" for "model.layers.25.self_attn.q_proj": the qualified name of a layer's block."""
    path, index = block_index(name)
    return f"{path}.{index}"


# --- replace ------------------------------------------------------------------------------------------------
def replace_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at qualified name ``name`` of ``model`` (a child of its parent); returns the module it
    replaces."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


def _set_requires_grad(model: nn.Module, flags: Mapping[str, bool]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(flags.get(name, p.requires_grad))


def mask_layers(model: nn.Module, chosen: Iterable[tuple[str, nn.Module]],
                make: Callable[[str, nn.Module], MaskedLinear], *, freeze: bool) -> dict[str, MaskedLinear]:
    """Swap ``make(name, layer)`` in for each (name, layer) of ``chosen``; returns {name: MaskedLinear}.

    Every layer is built before any is swapped, so a failing one leaves the model as it was (requires_grad
    included: building a MaskedLinear freezes the weight it wraps). Each parameter's requires_grad before the
    first call is recorded on the model (``restore_layers`` gives it back); the new layers take the model's train
    mode. ``freeze``: every parameter but the new logits stops requiring grad (what fastmask.apply does).
    """
    recorded = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        masked = {name: make(name, module) for name, module in chosen}
    except BaseException:
        _set_requires_grad(model, recorded)
        raise
    for name, layer in masked.items():
        replace_module(model, name, layer)
        layer.train(model.training)
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in masked.values():
            layer.logits.requires_grad_(True)
    # A second call (replace_linear_layers on more layers) keeps the first record: that is the state to restore.
    setattr(model, REQUIRES_GRAD_ATTR, {**recorded, **getattr(model, REQUIRES_GRAD_ATTR, {})})
    return masked


def restore_layers(model: nn.Module, plain: Mapping[str, nn.Module]) -> nn.Module:
    """Undo ``mask_layers``: put each module of ``plain`` ({name: plain layer}) back in place of the MaskedLinear
    there, in that layer's train mode, give every parameter its recorded requires_grad and forget fastmask's state
    on the model (the recorded flags and the MaskConfig). Returns ``model``."""
    for name, module in plain.items():
        module.train(replace_module(model, name, module).training)
    _set_requires_grad(model, getattr(model, REQUIRES_GRAD_ATTR, {}))
    for attr in (CONFIG_ATTR, REQUIRES_GRAD_ATTR):
        model.__dict__.pop(attr, None)
    return model


def replace_linear_layers(model: nn.Module, include: str = r".*", exclude: Optional[str] = None,
                          make: Optional[Callable[[str, nn.Module], MaskedLinear]] = None, **mask_kwargs
                          ) -> dict[str, MaskedLinear]:
    """Replace every nn.Linear / Conv1D whose qualified name matches ``include`` (and not ``exclude``) with a
    MaskedLinear (``make(name, layer)``, default ``MaskedLinear.from_module(layer, **mask_kwargs)``); returns
    {name: masked module}. The same path as fastmask.apply (``mask_layers``): layer ``name`` draws its noise from
    seed ``layer_seed(seed, name)`` (``seed`` from mask_kwargs, default 0), the requires_grad flags are recorded
    (fastmask.merge / unapply restore them), but the other parameters are left as they are (not frozen)."""
    chosen = [(name, module) for name, module in linear_layers(model)
              if re.search(include, name) and not (exclude and re.search(exclude, name))]
    if make is None:
        seed = check_seed(mask_kwargs.pop("seed", 0), "fastmask.nn.replace_linear_layers")

        def make(name: str, module: nn.Module) -> MaskedLinear:
            return MaskedLinear.from_module(module, seed=layer_seed(seed, name), **mask_kwargs)

    return mask_layers(model, chosen, make, freeze=False)


__all__ = ["is_linear_like", "linear_layers", "layer_seed", "block_index", "block_key", "replace_module",
           "mask_layers", "restore_layers", "replace_linear_layers"]
