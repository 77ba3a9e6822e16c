"""Mask files: save_masks / load_masks and the pieces fastmask.distributed builds its save from (mask_payload,
write_masks); read_mask_metadata for tools that only want the metadata.

Format (a directory, or a ``<stem>.safetensors`` path whose metadata goes to ``<stem>.json``)::

    masks.safetensors    the logits (float32), keyed by qualified module name; never a pickle
    mask_config.json     {"format": "fastmask.masks", "format_version": 2, "fastmask_version", "noise",
                          "mask_config", "layers": {name: MaskedLinear.describe()}, "fingerprint": {...},
                          "masks_sha256"}

``noise`` names the noise definition the masks were trained with (``fastmask.ref.NOISES``); format 1 files (fastmask
< 0.2) have none and were trained with ``ref.NOISE_FIRST_WORD``. Their logits load and mean the same; continued
training draws today's noise (a warning says so).

load_masks refuses another base model (fingerprints.py), other shapes, a newer format version or a masks file that
does not belong to its metadata, naming what differs. Both files are written to temporary files and moved into place
with os.replace (the masks file first), so an interrupted save never leaves a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .._version import __version__
from ..assets import atomic_write_bytes
from ..config import MaskConfig
from ..ref import NOISE, NOISE_FIRST_WORD, NOISES
from ..hf import apply
from ..nn.masked_linear import masked_layers
from .dtensor import full_tensor
from .fingerprints import _HASH_CHUNK_BYTES, _fingerprint_differences, fingerprint

FORMAT = "fastmask.masks"
FORMAT_VERSION = 2  # 2: "noise" recorded (fastmask 0.2 changed the noise definition); 1: no "noise"
MASKS_FILE, META_FILE = "masks.safetensors", "mask_config.json"

PathLike = Union[str, os.PathLike]


def _fastmask_version() -> str:
    return __version__


def _paths(path: PathLike) -> tuple[Path, Path]:
    """(masks file, metadata file) of a directory or a ``<stem>.safetensors`` path."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    return path / MASKS_FILE, path / META_FILE


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_masks(model: nn.Module, path: PathLike) -> Path:
    """Write the logits of a patched model (safetensors) and their metadata (JSON) to ``path`` (a directory,
    created if needed, or ``<stem>.safetensors``). Returns the masks file's path. (A model sharded by FSDP2:
    fastmask.distributed.save_masks, which every rank calls.)"""
    return write_masks(mask_payload(model), path)


def mask_payload(model: nn.Module) -> tuple[dict, dict]:
    """(tensors, metadata) of a mask file: the full float32 CPU logits per masked layer and the JSON metadata
    without the file checksum. Gathers FSDP2-sharded logits and weights (then every rank must call it)."""
    layers = masked_layers(model)
    if not layers:
        raise ValueError("fastmask.save_masks: the model has no MaskedLinear layers (call fastmask.apply first)")
    config = getattr(model, "fastmask_config", None)
    tensors = {name: full_tensor(layer.logits.detach()).to("cpu", torch.float32).contiguous()
               for name, layer in layers.items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "fastmask_version": _fastmask_version(),
            "noise": NOISE, "mask_config": None if config is None else config.to_dict(),
            "layers": {name: layer.describe() for name, layer in layers.items()},
            "fingerprint": fingerprint(model, layers)}
    return tensors, meta


def write_masks(payload: tuple[dict, dict], path: PathLike) -> Path:
    """Write a ``mask_payload`` atomically: the safetensors file (temporary file, fsync, os.replace), then the JSON
    with the file's sha256. Returns the masks file's path."""
    tensors, meta = payload
    masks_path, meta_path = _paths(path)
    masks_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{masks_path.name}.", suffix=".tmp", dir=masks_path.parent)
    os.close(fd)
    try:
        # One header key: safetensors writes its metadata map in a random order per process, so two keys would make
        # the bytes (and masks_sha256) of the same masks differ from run to run. The version is in the JSON file.
        save_file(tensors, tmp, metadata={"format": FORMAT})
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        meta = {**meta, "masks_sha256": _file_sha256(Path(tmp))}
        os.replace(tmp, masks_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    atomic_write_bytes(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
    return masks_path


_STRUCTURE_FIELDS = ("weight_shape", "weight_layout", "n_masks", "estimator", "granularity", "block", "logits_shape",
                     "head_dim", "head_side", "beta", "gamma", "zeta", "tau")
_STRUCTURE_DEFAULTS = {"n_masks": 1}  # fields that metadata written before they existed leaves out


def read_mask_metadata(path: PathLike) -> dict:
    """The JSON metadata of saved masks, checked for format and version."""
    masks_path, meta_path = _paths(path)
    for needed in (masks_path, meta_path):
        if not needed.is_file():
            raise FileNotFoundError(f"fastmask.load_masks: {needed} does not exist (expected {MASKS_FILE} and "
                                    f"{META_FILE} in a directory, or <stem>.safetensors and <stem>.json)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"fastmask.load_masks: {meta_path} is not valid JSON ({exc}): a truncated or corrupted "
                         f"file?") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"fastmask.load_masks: {meta_path} is not fastmask mask metadata (format "
                         f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"fastmask.load_masks: {meta_path} has format version {version!r}, written by fastmask "
                         f"{meta.get('fastmask_version')}; this fastmask ({_fastmask_version()}) reads versions <= "
                         f"{FORMAT_VERSION}: upgrade fastmask")
    if version == 1:  # written before the noise was recorded, i.e. with the first-word definition
        meta.setdefault("noise", NOISE_FIRST_WORD)
    if meta.get("noise") not in NOISES:
        raise ValueError(f"fastmask.load_masks: {meta_path} names noise {meta.get('noise')!r}, expected one of "
                         f"{NOISES}: a corrupted or hand-edited file?")
    for key, kind in (("layers", dict), ("fingerprint", dict), ("masks_sha256", str)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"fastmask.load_masks: {meta_path} lacks a valid {key!r} entry (expected a "
                             f"{kind.__name__}, got {type(meta.get(key)).__name__}): a corrupted or hand-edited file?")
    return meta


def _read_logits(masks_path: Path) -> dict[str, torch.Tensor]:
    """The logits of a masks file: safetensors only (no pickle, no code runs), float tensors without NaN."""
    try:
        tensors = load_file(str(masks_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"fastmask.load_masks: {masks_path} is not a readable safetensors file ({exc}): a "
                         f"truncated or corrupted file?") from None
    for name, tensor in tensors.items():
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"fastmask.load_masks: {masks_path}: logits of {name} are {tensor.dtype}, expected a "
                             f"float dtype")
        if bool(torch.isnan(tensor).any()):
            raise ValueError(f"fastmask.load_masks: {masks_path}: logits of {name} contain NaN (a diverged run?)")
    return tensors


def load_masks(model: nn.Module, path: PathLike, *, strict: bool = True) -> nn.Module:
    """Load masks saved by save_masks into ``model`` and return it.

    An unpatched model is patched first with the saved MaskConfig (``fastmask.apply``); a patched one must have
    the same masked layers with the same mask structure. The base model must match the saved fingerprint
    (class, parameter names and shapes, masked weights' sha256); ``strict=False`` turns a mismatch of the class
    or of the weights into a warning (shapes must still match). Noise seeds and steps are restored too.
    """
    meta = read_mask_metadata(path)
    masks_path, meta_path = _paths(path)
    if meta.get("masks_sha256") != _file_sha256(masks_path):
        raise ValueError(f"fastmask.load_masks: {masks_path} is not the file {meta_path} describes (sha256 "
                         f"differs): an interrupted or mixed-up save")
    saved_layers: dict = meta["layers"]
    problems = _fingerprint_differences(meta["fingerprint"], model, saved_layers)
    fatal = [message for kind, message in problems if strict or kind == "parameters"]
    if fatal:
        hint = "" if any(kind == "parameters" for kind, _ in problems) else \
            "\n(load_masks(..., strict=False) accepts another class or other weights of the same shapes)"
        raise ValueError("fastmask.load_masks: these masks were saved for a different base model:\n  - "
                         + "\n  - ".join(fatal) + hint)
    for _, message in problems:
        warnings.warn(f"fastmask.load_masks (strict=False): {message}", stacklevel=2)

    layers = masked_layers(model)
    if not layers:
        if meta.get("mask_config") is None:
            raise ValueError("fastmask.load_masks: the masks were saved without a MaskConfig (layers patched by "
                             "hand); patch the model the same way before loading")
        apply(model, MaskConfig.from_dict(meta["mask_config"]))
        layers = masked_layers(model)
    if set(layers) != set(saved_layers):
        only_saved = sorted(set(saved_layers) - set(layers))
        only_here = sorted(set(layers) - set(saved_layers))
        raise ValueError(f"fastmask.load_masks: the masked layers differ: saved only {only_saved[:3]} "
                         f"({len(only_saved)}), patched here only {only_here[:3]} ({len(only_here)})")
    for name, layer in layers.items():
        here, saved = layer.describe(), saved_layers[name]
        for key in _STRUCTURE_FIELDS:
            saved_value = saved.get(key, _STRUCTURE_DEFAULTS.get(key))
            if here[key] != saved_value:
                raise ValueError(f"fastmask.load_masks: layer {name}: {key} is {here[key]!r} here but "
                                 f"{saved_value!r} in the saved masks")
    tensors = _read_logits(masks_path)
    if set(tensors) != set(saved_layers):
        raise ValueError(f"fastmask.load_masks: {masks_path} holds other tensors than its metadata lists")
    with torch.no_grad():
        for name, layer in layers.items():
            tensor = tensors[name]
            if list(tensor.shape) != list(layer.logits.shape):
                raise ValueError(f"fastmask.load_masks: logits of {name} have shape {list(tensor.shape)}, the "
                                 f"layer expects {list(layer.logits.shape)}")
            layer.logits.copy_(tensor.to(layer.logits.device, layer.logits.dtype))
            layer.seed = int(saved_layers[name]["seed"])
            layer.step = int(saved_layers[name].get("step", 0))
    if meta["noise"] != NOISE:
        warnings.warn(f"fastmask.load_masks: {meta_path} was trained with the noise {meta['noise']!r} (fastmask "
                      f"{meta.get('fastmask_version')}); the masks load unchanged, but training continued from them "
                      f"draws this fastmask's noise {NOISE!r}, not the rest of the old stream", stacklevel=2)
    if meta.get("mask_config") is not None and getattr(model, "fastmask_config", None) is None:
        model.fastmask_config = MaskConfig.from_dict(meta["mask_config"])
    return model
