"""The base-model fingerprint stored with saved masks, and what differs between a saved one and a model.

A fingerprint is the model's class, its ``config.model_type``, every parameter's name and shape (the mask logits
left out, so a patched model and its base agree) and the sha256 over the raw bytes of the masked layers' weights
(read in 64 MiB chunks, in name order)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..nn.masked_linear import masked_layers
from .dtensor import architecture_name, full_tensor

_HASH_CHUNK_BYTES = 64 * 2**20


def _parameter_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Every parameter's name and shape, the mask logits left out (so a patched model and its base agree)."""
    logits = {id(layer.logits) for layer in masked_layers(model).values()}
    return {name: list(p.shape) for name, p in model.named_parameters() if id(p) not in logits}


def weights_sha256(model: nn.Module, names) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of the weights of the layers ``names``, in sorted order, read
    in 64 MiB chunks (a GPU tensor is copied to the host one chunk at a time)."""
    digest = hashlib.sha256()
    for name in sorted(names):
        weight = full_tensor(model.get_submodule(name).weight.detach())
        if weight.device.type == "meta":
            raise ValueError(f"fastmask: cannot fingerprint {name}: its weight is on the meta device")
        digest.update(f"{name}|{weight.dtype}|{list(weight.shape)}|".encode())
        flat = weight.contiguous().reshape(-1).view(torch.uint8)
        for start in range(0, flat.numel(), _HASH_CHUNK_BYTES):
            digest.update(flat[start:start + _HASH_CHUNK_BYTES].cpu().numpy())
    return digest.hexdigest()


def fingerprint(model: nn.Module, names) -> dict:
    """The base-model fingerprint stored with saved masks (``names``: the masked layers)."""
    return {"architecture": architecture_name(model),
            "model_type": getattr(getattr(model, "config", None), "model_type", None),
            "parameters": _parameter_shapes(model),
            "weights_sha256": weights_sha256(model, names)}


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _fingerprint_differences(saved: dict, model: nn.Module, names) -> list[tuple[str, str]]:
    """[(kind, message)] of what differs between a saved fingerprint and ``model``; kind is "architecture",
    "parameters" or "weights" (the weights are hashed only when names and shapes agree)."""
    problems = []
    architecture = architecture_name(model)
    if saved.get("architecture") != architecture:
        problems.append(("architecture", f"architecture: saved for {saved.get('architecture')}, this model is "
                                         f"{architecture}"))
    missing_layers = [n for n in names if not _has_module(model, n)]
    if missing_layers:
        problems.append(("parameters", f"{len(missing_layers)} masked layer(s) of the saved masks do not exist "
                                       f"here, e.g. {missing_layers[:3]}"))
    current = _parameter_shapes(model)
    stored = saved.get("parameters", {})
    missing = [n for n in stored if n not in current]
    extra = [n for n in current if n not in stored]
    masked_weights = {f"{n}.weight" for n in names}  # named first: the most telling differences
    reshaped = [f"{n} {stored[n]} -> {current[n]}"
                for n in sorted(stored, key=lambda n: n not in masked_weights)
                if n in current and stored[n] != current[n]]
    if missing:
        problems.append(("parameters", f"{len(missing)} parameter(s) of the saved base model are missing here, "
                                       f"e.g. {missing[:3]}"))
    if extra:
        problems.append(("parameters", f"{len(extra)} parameter(s) here were not in the saved base model, "
                                       f"e.g. {extra[:3]}"))
    if reshaped:
        problems.append(("parameters", f"{len(reshaped)} parameter shape(s) differ (saved -> here), "
                                       f"e.g. {reshaped[:3]}"))
    if not any(kind == "parameters" for kind, _ in problems):
        digest = weights_sha256(model, names)
        if digest != saved.get("weights_sha256"):
            problems.append(("weights", f"the masked layers' weights differ (sha256 "
                                        f"{str(saved.get('weights_sha256'))[:12]}... saved, {digest[:12]}... here): "
                                        f"another checkpoint of the same shapes"))
    return problems
