"""merge (bake the eval-mode masks into the weights) and unapply (drop the masks): both swap every MaskedLinear back
to the nn.Linear / Conv1D it replaced, so the result is a plain transformers model again."""

from __future__ import annotations

import copy as copy_module
import warnings
from typing import Optional

from torch import nn

from ..nn.masked_linear import masked_layers
from ..nn.surgery import restore_layers


def _swap_back(model: nn.Module, bake: bool, inverse: bool = False, mask: Optional[int] = None) -> nn.Module:
    layers = masked_layers(model)
    if not layers:
        raise ValueError("fastmask.merge: the model has no MaskedLinear layers (call fastmask.apply first)")
    if bake:  # every layer checked before any is swapped: a bad mask number leaves the model untouched
        for layer in layers.values():
            layer.check_mask(mask, "fastmask.merge", required=True)
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    plain = {}
    for name, layer in layers.items():
        weight = layer.weight
        if bake:
            shared = [n for n in owners.get(id(weight), []) if n != f"{name}.weight"]
            weight = nn.Parameter(layer.merged_weight(inverse, mask), requires_grad=False)
            if shared:
                # A tied weight (e.g. the LM head and the input embeddings): the mask applies to this layer only.
                warnings.warn(f"fastmask.merge: {name}.weight is shared with {shared}; the merged layer gets its "
                              f"own weight and the others keep the unmasked one", stacklevel=3)
                is_output_embeddings = output_embeddings is not None and \
                    output_embeddings in (layer, layer._base_module)
                if is_output_embeddings and getattr(model.config, "tie_word_embeddings", False):
                    model.config.tie_word_embeddings = False  # else from_pretrained would re-tie them
        plain[name] = layer.to_module(weight)
    return restore_layers(model, plain)


def merge(model: nn.Module, *, inverse: bool = False, copy: bool = False, mask: Optional[int] = None
          ) -> nn.Module:
    """Bake the eval-mode masks into the weights (``W * m`` in the weight dtype; ``W * (1 - m)`` with
    ``inverse=True``) and swap every MaskedLinear back to its original nn.Linear / Conv1D module, holding a new
    weight tensor. Returns a plain transformers model (save_pretrained / from_pretrained round-trip) whose
    parameters have their pre-``apply`` requires_grad. In place, unless ``copy=True`` (the masked model is then
    left as it is). A K-mask model (n_masks=K) needs ``mask=k``: the subnetwork of mask k (merge one copy per
    mask with ``copy=True``)."""
    if copy:
        model = copy_module.deepcopy(model)
    return _swap_back(model, bake=True, inverse=inverse, mask=mask)


def unapply(model: nn.Module) -> nn.Module:
    """Swap every MaskedLinear back to its original layer with the UNMASKED weight (undo fastmask.apply)."""
    return _swap_back(model, bake=False)
