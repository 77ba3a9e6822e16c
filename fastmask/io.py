"""Masks on disk and back into plain models: save_masks / load_masks, merge, export_pruned.

Format (a directory, or a ``<stem>.safetensors`` path whose metadata goes to ``<stem>.json``)::

    masks.safetensors    the logits (float32), keyed by qualified module name; never a pickle
    mask_config.json     {"format": "fastmask.masks", "format_version": 1, "fastmask_version", "mask_config",
                          "layers": {name: MaskedLinear.describe()}, "fingerprint": {...}, "masks_sha256"}

The fingerprint identifies the base model: its class, model_type, every parameter's name and shape (the logits
left out) and the sha256 over the raw bytes of the masked layers' weights (read in chunks, in name order).
load_masks refuses another base model, other shapes, a newer format version or a masks file that does not
belong to its metadata, naming what differs. Both files are written to temporary files and moved into place
with os.replace (the masks file first), so an interrupted save never leaves a half-written file.
"""

from __future__ import annotations

import copy as copy_module
import hashlib
import json
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ._version import __version__
from .assets import atomic_write_bytes
from .config import MaskConfig
from .hf import apply, head_dim, layer_role, model_family
from .nn.masked_linear import MaskedLinear, _is_conv1d, masked_layers
from .ops._common import is_dtensor

FORMAT = "fastmask.masks"
FORMAT_VERSION = 1
MASKS_FILE, META_FILE = "masks.safetensors", "mask_config.json"
_HASH_CHUNK_BYTES = 64 * 2**20

PathLike = Union[str, os.PathLike]


def _fastmask_version() -> str:
    return __version__


def _paths(path: PathLike) -> tuple[Path, Path]:
    """(masks file, metadata file) of a directory or a ``<stem>.safetensors`` path."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    return path / MASKS_FILE, path / META_FILE


# --- fingerprint --------------------------------------------------------------------------------------------
def _parameter_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Every parameter's name and shape, the mask logits left out (so a patched model and its base agree)."""
    logits = {id(layer.logits) for layer in masked_layers(model).values()}
    return {name: list(p.shape) for name, p in model.named_parameters() if id(p) not in logits}


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter that FSDP2 shards (a DTensor: all-gathered, so every rank must call this in
    the same order); any other tensor as it is."""
    return t.full_tensor() if is_dtensor(t) else t


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


def architecture_name(model: nn.Module) -> str:
    """The model's class name; for a module FSDP2 sharded, the class it was (fully_shard swaps in FSDP<Name>)."""
    cls = type(model)
    fsdp = sys.modules.get("torch.distributed.fsdp")  # an FSDPModule exists only once this was imported
    if fsdp is not None and isinstance(model, fsdp.FSDPModule):
        cls = next(base for base in cls.__mro__[1:] if not issubclass(base, fsdp.FSDPModule))
    return cls.__name__


def fingerprint(model: nn.Module, names) -> dict:
    """The base-model fingerprint stored with saved masks (``names``: the masked layers)."""
    return {"architecture": architecture_name(model),
            "model_type": getattr(getattr(model, "config", None), "model_type", None),
            "parameters": _parameter_shapes(model),
            "weights_sha256": weights_sha256(model, names)}


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


# --- save / load --------------------------------------------------------------------------------------------
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
            "mask_config": None if config is None else config.to_dict(),
            "layers": {name: layer.describe() for name, layer in layers.items()},
            "fingerprint": fingerprint(model, layers)}
    return tensors, meta


def write_masks(payload: tuple[dict, dict], path: PathLike) -> Path:
    """Write a ``mask_payload`` atomically: the safetensors file (temporary file, fsync, os.replace), then the JSON
    with the file's sha256. Returns the masks file's path."""
    from safetensors.torch import save_file

    tensors, meta = payload
    masks_path, meta_path = _paths(path)
    masks_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{masks_path.name}.", suffix=".tmp", dir=masks_path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
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
    for key, kind in (("layers", dict), ("fingerprint", dict), ("masks_sha256", str)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"fastmask.load_masks: {meta_path} lacks a valid {key!r} entry (expected a "
                             f"{kind.__name__}, got {type(meta.get(key)).__name__}): a corrupted or hand-edited file?")
    return meta


def _read_logits(masks_path: Path) -> dict[str, torch.Tensor]:
    """The logits of a masks file: safetensors only (no pickle, no code runs), float tensors without NaN."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

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
    if meta.get("mask_config") is not None and getattr(model, "fastmask_config", None) is None:
        model.fastmask_config = MaskConfig.from_dict(meta["mask_config"])
    return model


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


# --- merge --------------------------------------------------------------------------------------------------
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
    requires_grad = getattr(model, "_fastmask_requires_grad", {})
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
        plain = layer.to_module(weight)
        plain.train(layer.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, plain)
    for name, p in model.named_parameters():
        p.requires_grad_(requires_grad.get(name, p.requires_grad))
    for attr in ("fastmask_config", "_fastmask_requires_grad"):
        model.__dict__.pop(attr, None)
    return model


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


# --- export -------------------------------------------------------------------------------------------------
# Config attribute holding the MLP width, per family (transformers has one value for all layers in each).
_INTERMEDIATE_ATTR = {"bert": "intermediate_size", "gpt2": "n_inner", "llama": "intermediate_size"}
_ACT_ATTRS = ("intermediate_act_fn", "act", "act_fn")


def _rows(module: nn.Module) -> torch.Tensor:
    """Weight as (out, in), a view."""
    return module.weight.t() if _is_conv1d(module) else module.weight


def _block_key(name: str) -> str:
    return re.match(r"(.*?\.\d+)\.", name).group(1)


def _activation(model: nn.Module, in_layer_name: str):
    parent = model.get_submodule(in_layer_name.rpartition(".")[0])
    for attr in _ACT_ATTRS:
        fn = getattr(parent, attr, None)
        if callable(fn):
            return fn
    raise NotImplementedError(f"fastmask.export_pruned: no activation found beside {in_layer_name}")


def _mlp_groups(model: nn.Module, family: str) -> dict[str, dict[str, tuple[str, nn.Module]]]:
    groups: dict[str, dict[str, tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        if not name or not (isinstance(module, nn.Linear) or _is_conv1d(module)):
            continue
        role = layer_role(family, name)
        if role in ("mlp_in", "mlp_gate", "mlp_up", "mlp_out"):
            groups.setdefault(_block_key(name), {})[role] = (name, module)
    return groups


@torch.no_grad()
def _unit_constants(model, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Per MLP unit: (removable without changing the output?, the constant it then contributes, or 0)."""
    out_name, out_layer = group["mlp_out"]
    w_out = _rows(out_layer).float()  # (hidden, units)
    dead_out = (w_out == 0).all(dim=0)
    const = torch.zeros(w_out.shape[1], dtype=torch.float32, device=w_out.device)
    if "mlp_in" in group:  # y = act(W x + b): a zero row makes the unit the constant act(b)
        in_name, in_layer = group["mlp_in"]
        zero_row = (_rows(in_layer) == 0).all(dim=1)
        bias = in_layer.bias.float() if in_layer.bias is not None else torch.zeros_like(const)
        act = _activation(model, in_name)
        constant_in = zero_row
        const = torch.where(zero_row, act(bias).float(), const)
    else:  # gated: act(G x + bg) * (U x + bu)
        gate_name, gate_layer = group["mlp_gate"]
        _, up_layer = group["mlp_up"]
        zero_gate = (_rows(gate_layer) == 0).all(dim=1)
        zero_up = (_rows(up_layer) == 0).all(dim=1)
        act = _activation(model, gate_name)
        bg = gate_layer.bias.float() if gate_layer.bias is not None else torch.zeros_like(const)
        bu = up_layer.bias.float() if up_layer.bias is not None else torch.zeros_like(const)
        act_bg = act(bg).float()
        constant_in = (zero_gate & zero_up) | (zero_gate & (act_bg == 0)) | (zero_up & (bu == 0))
        const = torch.where(zero_gate & zero_up, act_bg * bu, const)
    # A constant unit folds into the output bias: impossible without one, unless the constant is 0.
    foldable = constant_in & ((const == 0) | torch.tensor(out_layer.bias is not None, device=const.device))
    return dead_out | foldable, torch.where(dead_out, torch.zeros_like(const), const)


def _take_units(module: nn.Module, keep: torch.Tensor, side: str) -> nn.Module:
    """A new layer with only the MLP units ``keep`` (rows of the (out, in) weight for side="out", columns for
    side="in"), same class, dtype and device."""
    conv = _is_conv1d(module)
    w = module.weight.detach()
    if side == "out":
        weight = w[:, keep] if conv else w[keep]
        bias = None if module.bias is None else module.bias.detach()[keep]
    else:
        weight = w[keep] if conv else w[:, keep]
        bias = None if module.bias is None else module.bias.detach()
    with torch.device("meta"):
        if conv:
            new = type(module)(weight.shape[1], weight.shape[0])
        else:
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    new.weight = nn.Parameter(weight.clone(), requires_grad=module.weight.requires_grad)
    new.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=module.bias.requires_grad)
    new.train(module.training)
    return new


def _role_groups(model: nn.Module, family: str, roles) -> dict[str, dict[str, tuple[str, nn.Module]]]:
    """{transformer block: {role: (name, layer)}} of the linear (or masked) layers with one of ``roles``."""
    groups: dict[str, dict[str, tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        if not name or not (isinstance(module, (nn.Linear, MaskedLinear)) or _is_conv1d(module)):
            continue
        role = layer_role(family, name)
        if role in roles:
            groups.setdefault(_block_key(name), {})[role] = (name, module)
    return groups


def _head_weight_rows(module: nn.Module, mask: Optional[int]) -> torch.Tensor:
    """The (out, in) weight the exported model will hold: merged (eval mask ``mask``) for a MaskedLinear."""
    if isinstance(module, MaskedLinear):
        weight = module.merged_weight(mask=mask)
        return weight.t() if module.weight_layout == "in_out" else weight
    return _rows(module).detach()


@torch.no_grad()
def _dead_heads(model: nn.Module, family: str, mask: Optional[int]) -> dict[str, list[int]]:
    """{transformer block: heads whose columns of the (merged) attention output projection are all zero}: such a
    head adds nothing to the output whatever its q, k, v (any granularity or mask can produce it)."""
    config = model.config
    n_heads, dim = config.num_attention_heads, head_dim(model)
    dead = {}
    for key, group in _role_groups(model, family, ("attn_out",)).items():
        columns = _head_weight_rows(group["attn_out"][1], mask)  # (hidden, n_heads * head_dim)
        zero = (columns.reshape(columns.shape[0], n_heads, dim) == 0).all(dim=2).all(dim=0)
        if bool(zero.any()):
            dead[key] = zero.nonzero().flatten().tolist()
    return dead


def _heads_to_keep(model: nn.Module, dead: dict[str, list[int]], non_uniform: str) -> tuple[dict[str, list[int]],
                                                                                              int]:
    """Llama family: {block: query heads kept} and the kept heads per key/value group, the same in every group of
    every layer (one num_attention_heads for the model; query head h reads key/value head h // n_rep, so each
    group keeps as many as the fullest one, re-keeping dead heads: exact, they add zero)."""
    config = model.config
    n_heads, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or \
        config.num_attention_heads
    n_rep = n_heads // n_kv
    alive = {}
    for key in _role_groups(model, model_family(model), ("attn_out",)):
        off = set(dead.get(key, ()))
        alive[key] = [[h for h in range(g * n_rep, (g + 1) * n_rep) if h not in off] for g in range(n_kv)]
    counts = sorted({len(heads) for groups in alive.values() for heads in groups})
    width = max(counts[-1], 1)  # a layer keeps at least one head per group (a config needs one)
    if len(counts) > 1:
        message = (f"key/value groups keep different numbers of query heads ({counts}) but {type(config).__name__} "
                   f"has one num_attention_heads for every layer")
        if non_uniform == "error":
            raise NotImplementedError(f"fastmask.export_pruned: {message}. non_uniform='pad' keeps {width} per "
                                      f"group everywhere")
        warnings.warn(f"fastmask.export_pruned: {message}, so every group keeps {width} (off heads re-kept: "
                      f"exact, loadable)", stacklevel=3)
    keep = {}
    for key, groups in alive.items():
        kept = []
        for g, heads in enumerate(groups):
            fill = [h for h in range(g * n_rep, (g + 1) * n_rep) if h not in heads][:width - len(heads)]
            kept.extend(sorted(heads + fill))
        keep[key] = kept
    return keep, width


def _take_heads(model: nn.Module, group: dict, heads: list[int], dim: int) -> None:
    """Keep only query heads ``heads`` of one attention block: rows of q_proj, columns of o_proj."""
    index = torch.tensor([h * dim + i for h in heads for i in range(dim)], dtype=torch.long)
    for role, side in (("attn_q", "out"), ("attn_out", "in")):
        name, layer = group[role]
        _replace(model, name, _take_units(layer, index.to(layer.weight.device), side=side))


def _export_heads(model: nn.Module, family: str, keep: dict[str, list[int]], width: int) -> None:
    """Keep only the query heads ``keep`` (from _heads_to_keep) of a merged Llama-family model."""
    config, dim = model.config, head_dim(model)
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if width * n_kv == config.num_attention_heads:
        return
    groups = _role_groups(model, family, ("attn_q", "attn_out"))
    for key, heads in keep.items():
        _take_heads(model, groups[key], heads, dim)
        attention = model.get_submodule(groups[key]["attn_out"][0].rpartition(".")[0])
        if hasattr(attention, "num_key_value_groups"):
            attention.num_key_value_groups = width  # repeat_kv's factor; the rest reshapes with -1 heads
    config.head_dim = dim  # explicit: hidden_size / num_attention_heads no longer is the head size
    config.num_attention_heads = width * n_kv


# Families whose transformers config can hold fewer attention heads than hidden_size / head_dim: Llama-like configs
# carry head_dim explicitly. BertConfig and GPT2Config derive the head size from hidden_size / num_attention_heads
# (and GPT-2 splits c_attn at hidden_size), so a model with fewer heads cannot be described to from_pretrained.
_HEAD_EXPORT_FAMILIES = ("llama",)


def export_pruned(model: nn.Module, *, non_uniform: str = "pad", heads: str = "remove",
                  mask: Optional[int] = None) -> nn.Module:
    """Merge the masks (``merge``) and physically remove the MLP units and attention heads that are off.

    MLP units (BERT intermediate/output, GPT-2 c_fc/c_proj, Llama gate/up/down): unit j goes when its column of
    the merged output layer is all zero, or when its rows of the merged input layer(s) are all zero (it is then a
    constant: act(b_j) for BERT/GPT-2, which is folded into the output bias; 0 for Llama). The outputs do not
    change. transformers' BertConfig / GPT2Config / LlamaConfig hold ONE intermediate size for every layer, so
    when layers keep different numbers of units, ``non_uniform="pad"`` (default) keeps the largest count in
    every layer (re-keeping removable units: still exact, still loadable by from_pretrained) and says so in a
    UserWarning; ``non_uniform="error"`` raises NotImplementedError instead.

    Heads: a head is off when its columns of the merged attention output projection are all zero (what
    granularity="head" produces; any granularity that zeroes those columns counts). ``heads="remove"`` (default)
    removes them where a transformers config can describe the result: Llama-family models (Llama, Mistral,
    Qwen2) lose those query heads (rows of q_proj, columns of o_proj; key/value heads stay), and the config gets
    ``num_attention_heads`` = kept heads per key/value group x num_key_value_heads with an explicit ``head_dim``;
    query head h reads key/value head h // n_rep, so every group of every layer keeps as many heads as the fullest
    one (``non_uniform="pad"``, re-keeping off heads: exact, warned) or NotImplementedError (``"error"``).
    BERT and GPT-2 configs derive the head size from hidden_size / num_attention_heads, so transformers cannot
    load them with fewer heads: ``heads="remove"`` raises NotImplementedError there when a head is off (before
    anything changes); ``heads="keep"`` keeps off heads as zero weights everywhere. (transformers 4's BERT /
    GPT-2 ``prune_heads`` is used where it exists.)

    A K-mask model (n_masks=K) needs ``mask=k`` (the subnetwork of mask k). In place; returns the model.
    """
    if non_uniform not in ("pad", "error"):
        raise ValueError(f"fastmask.export_pruned: non_uniform must be 'pad' or 'error', got {non_uniform!r}")
    if heads not in ("remove", "keep"):
        raise ValueError(f"fastmask.export_pruned: heads must be 'remove' or 'keep', got {heads!r}")
    family = model_family(model)
    if family not in _INTERMEDIATE_ATTR:
        raise NotImplementedError(f"fastmask.export_pruned supports {sorted(_INTERMEDIATE_ATTR)} families, not "
                                  f"{getattr(getattr(model, 'config', None), 'model_type', type(model).__name__)!r}")
    for layer in masked_layers(model).values():  # before anything changes
        layer.check_mask(mask, "fastmask.export_pruned", required=True)
    dead = _dead_heads(model, family, mask) if heads == "remove" else {}
    legacy_prune = hasattr(model, "prune_heads") and family not in _HEAD_EXPORT_FAMILIES
    if dead and family not in _HEAD_EXPORT_FAMILIES and not legacy_prune:
        example = {k: v for k, v in list(dead.items())[:2]}
        raise NotImplementedError(
            f"fastmask.export_pruned: heads are off ({example} ...) but {type(model.config).__name__} derives the "
            f"head size from hidden_size / num_attention_heads, so transformers cannot load {type(model).__name__} "
            f"with fewer heads (and transformers 5 has no prune_heads). Pass heads='keep' to keep them as zero "
            f"weights (as fastmask.merge does); Llama-family models can remove them")
    head_plan = _heads_to_keep(model, dead, non_uniform) if dead and family in _HEAD_EXPORT_FAMILIES else None
    if masked_layers(model):
        merge(model, mask=mask)
    groups = _mlp_groups(model, family)
    plans = {}
    for key, group in groups.items():
        if "mlp_out" not in group or not ({"mlp_in"} <= set(group) or {"mlp_gate", "mlp_up"} <= set(group)):
            raise NotImplementedError(f"fastmask.export_pruned: unexpected MLP layout in {key}: {sorted(group)}")
        plans[key] = _unit_constants(model, group)
    kept = {key: int((~removable).sum()) for key, (removable, _) in plans.items()}
    if kept and len(set(kept.values())) > 1:
        if non_uniform == "error":
            raise NotImplementedError(
                f"fastmask.export_pruned: the layers keep different numbers of MLP units ({list(kept.values())}); "
                f"{type(model.config).__name__} has a single {_INTERMEDIATE_ATTR[family]}, so transformers cannot "
                f"load a non-uniform model. non_uniform='pad' keeps {max(kept.values())} units in every layer")
        warnings.warn(f"fastmask.export_pruned: the layers keep different numbers of MLP units "
                      f"({list(kept.values())}); {type(model.config).__name__} has one "
                      f"{_INTERMEDIATE_ATTR[family]}, so every layer keeps {max(kept.values())} (removable units "
                      f"re-kept: exact, loadable)", stacklevel=2)
    width = max(kept.values()) if kept else None
    for key, group in groups.items():
        removable, const = plans[key]
        keep = ~removable
        extra = width - int(keep.sum())
        if extra:  # pad: re-keep the first removable units (exact: nothing gets folded for them)
            keep[removable.nonzero().flatten()[:extra]] = True
        keep_idx = keep.nonzero().flatten()
        out_name, out_layer = group["mlp_out"]
        new_out = _take_units(out_layer, keep_idx, side="in")
        folded = const * (~keep).float()
        if new_out.bias is not None and bool((folded != 0).any()):
            with torch.no_grad():
                extra_bias = _rows(out_layer).float() @ folded
                new_out.bias.copy_((new_out.bias.float() + extra_bias).to(new_out.bias.dtype))
        for role in ("mlp_in", "mlp_gate", "mlp_up"):
            if role in group:
                name, layer = group[role]
                _replace(model, name, _take_units(layer, keep_idx, side="out"))
        _replace(model, out_name, new_out)
    if width is not None:
        setattr(model.config, _INTERMEDIATE_ATTR[family], width)
    if head_plan is not None:
        _export_heads(model, family, *head_plan)
    elif dead and legacy_prune:
        blocks = {key: int(re.search(r"\.(\d+)$", key).group(1)) for key in dead}
        model.prune_heads({blocks[key]: heads_off for key, heads_off in dead.items()})
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


__all__ = ["save_masks", "load_masks", "read_mask_metadata", "merge", "unapply", "export_pruned", "fingerprint",
           "weights_sha256", "FORMAT_VERSION"]
