"""The experiments' machine-wide cache: what a run computes from a model and its data that every later run with the
same model and data would compute again (the template perplexities of a model, the input of its first masked block
for given tokens, WordNet's hypernym edges), kept under ``$FASTMASK_CACHE/<kind>/<key>.json`` or
``.safetensors``.

One convention for every entry: the key names everything the value depends on (a model by ``weights_key``: its
weights, not its name; tokens by their bytes through ``content_key``); an entry is written atomically, so a killed
run leaves the whole entry or none; an entry that cannot be read (a foreign edit) is computed again and replaced.
Results of one run (metrics, checkpoints, data.json, topoprobe's finished units) live in its results folder instead.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save

from ... import assets


def weights_key(model, name: str) -> str:
    """A short identity of the model's weights (every parameter's name, shape, sum and first 256 KiB), keying the
    caches of what a model computes: a fine-tuned variant of the same base gets another key."""
    digest = hashlib.sha256(f"{name}|{type(model).__name__}".encode())
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            digest.update(f"{param_name}|{list(param.shape)}|{param.dtype}|{flat.double().sum().item()!r}".encode())
            digest.update(flat[: 1 << 16].to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


def content_key(*parts, tensors=()) -> str:
    """The key of a value computed from ``parts`` (joined as text with "|") and the exact contents of ``tensors``
    (CPU tensors; their bytes, in order)."""
    digest = hashlib.sha256("|".join(str(part) for part in parts).encode())
    for tensor in tensors:
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:24]


def cache_file(kind: str, key: str, suffix: str) -> Path:
    """``$FASTMASK_CACHE/<kind>/<key><suffix>`` (the folder is created)."""
    return assets.cache_dir(kind) / f"{key}{suffix}"


def read_json(kind: str, key: str) -> Optional[Any]:
    """The JSON entry ``kind/key``, or None when there is none or it cannot be read."""
    path = cache_file(kind, key, ".json")
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # an unreadable entry is computed again
        return None


def write_json(kind: str, key: str, value) -> Path:
    return assets.atomic_write_text(cache_file(kind, key, ".json"), json.dumps(value))


def read_tensors(kind: str, key: str) -> Optional[dict]:
    """The safetensors entry ``kind/key`` ({name: CPU tensor}), or None when there is none or it cannot be read."""
    path = cache_file(kind, key, ".safetensors")
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception:  # noqa: BLE001 - an unreadable entry is computed again
        return None


def write_tensors(kind: str, key: str, tensors: dict) -> Path:
    return assets.atomic_write_bytes(cache_file(kind, key, ".safetensors"),
                                     save({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}))


__all__ = ["weights_key", "content_key", "cache_file", "read_json", "write_json", "read_tensors", "write_tensors"]
