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
import tempfile
import warnings
from pathlib import Path
from typing import Union

import torch
from torch import nn

from .config import MaskConfig
from .hf import apply, layer_role, model_family
from .nn.masked_linear import _is_conv1d, masked_layers

FORMAT = "fastmask.masks"
FORMAT_VERSION = 1
MASKS_FILE, META_FILE = "masks.safetensors", "mask_config.json"
_HASH_CHUNK_BYTES = 64 * 2**20

PathLike = Union[str, os.PathLike]


def _fastmask_version() -> str:
    import fastmask  # at call time: fastmask/__init__ imports this module

    return getattr(fastmask, "__version__", "unknown")


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


def weights_sha256(model: nn.Module, names) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of the weights of the layers ``names``, in sorted order, read
    in 64 MiB chunks (a GPU tensor is copied to the host one chunk at a time)."""
    digest = hashlib.sha256()
    for name in sorted(names):
        weight = model.get_submodule(name).weight.detach()
        if weight.device.type == "meta":
            raise ValueError(f"fastmask: cannot fingerprint {name}: its weight is on the meta device")
        digest.update(f"{name}|{weight.dtype}|{list(weight.shape)}|".encode())
        flat = weight.contiguous().reshape(-1).view(torch.uint8)
        for start in range(0, flat.numel(), _HASH_CHUNK_BYTES):
            digest.update(flat[start:start + _HASH_CHUNK_BYTES].cpu().numpy())
    return digest.hexdigest()


def fingerprint(model: nn.Module, names) -> dict:
    """The base-model fingerprint stored with saved masks (``names``: the masked layers)."""
    return {"architecture": type(model).__name__,
            "model_type": getattr(getattr(model, "config", None), "model_type", None),
            "parameters": _parameter_shapes(model),
            "weights_sha256": weights_sha256(model, names)}


def _fingerprint_differences(saved: dict, model: nn.Module, names) -> list[tuple[str, str]]:
    """[(kind, message)] of what differs between a saved fingerprint and ``model``; kind is "architecture",
    "parameters" or "weights" (the weights are hashed only when names and shapes agree)."""
    problems = []
    architecture = type(model).__name__
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
def _atomic_write_bytes(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_masks(model: nn.Module, path: PathLike) -> Path:
    """Write the logits of a patched model (safetensors) and their metadata (JSON) to ``path`` (a directory,
    created if needed, or ``<stem>.safetensors``). Returns the masks file's path."""
    from safetensors.torch import save_file

    layers = masked_layers(model)
    if not layers:
        raise ValueError("fastmask.save_masks: the model has no MaskedLinear layers (call fastmask.apply first)")
    masks_path, meta_path = _paths(path)
    masks_path.parent.mkdir(parents=True, exist_ok=True)
    config = getattr(model, "fastmask_config", None)
    tensors = {name: layer.logits.detach().to("cpu", torch.float32).contiguous() for name, layer in layers.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{masks_path.name}.", suffix=".tmp", dir=masks_path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "fastmask_version": _fastmask_version(),
                "mask_config": None if config is None else config.to_dict(),
                "layers": {name: layer.describe() for name, layer in layers.items()},
                "fingerprint": fingerprint(model, layers), "masks_sha256": _file_sha256(Path(tmp))}
        os.replace(tmp, masks_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _atomic_write_bytes(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
    return masks_path


_STRUCTURE_FIELDS = ("weight_shape", "weight_layout", "estimator", "granularity", "block", "logits_shape",
                     "head_dim", "head_side", "beta", "gamma", "zeta", "tau")


def read_mask_metadata(path: PathLike) -> dict:
    """The JSON metadata of saved masks, checked for format and version."""
    masks_path, meta_path = _paths(path)
    for needed in (masks_path, meta_path):
        if not needed.is_file():
            raise FileNotFoundError(f"fastmask.load_masks: {needed} does not exist (expected {MASKS_FILE} and "
                                    f"{META_FILE} in a directory, or <stem>.safetensors and <stem>.json)")
    meta = json.loads(meta_path.read_text())
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"fastmask.load_masks: {meta_path} is not fastmask mask metadata (format "
                         f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"fastmask.load_masks: {meta_path} has format version {version!r}, written by fastmask "
                         f"{meta.get('fastmask_version')}; this fastmask ({_fastmask_version()}) reads versions <= "
                         f"{FORMAT_VERSION}: upgrade fastmask")
    return meta


def load_masks(model: nn.Module, path: PathLike, *, strict: bool = True) -> nn.Module:
    """Load masks saved by save_masks into ``model`` and return it.

    An unpatched model is patched first with the saved MaskConfig (``fastmask.apply``); a patched one must have
    the same masked layers with the same mask structure. The base model must match the saved fingerprint
    (class, parameter names and shapes, masked weights' sha256); ``strict=False`` turns a mismatch of the class
    or of the weights into a warning (shapes must still match). Noise seeds and steps are restored too.
    """
    from safetensors.torch import load_file

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
            if here[key] != saved[key]:
                raise ValueError(f"fastmask.load_masks: layer {name}: {key} is {here[key]!r} here but "
                                 f"{saved[key]!r} in the saved masks")
    tensors = load_file(str(masks_path), device="cpu")
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
def _swap_back(model: nn.Module, bake: bool, inverse: bool = False) -> nn.Module:
    layers = masked_layers(model)
    if not layers:
        raise ValueError("fastmask.merge: the model has no MaskedLinear layers (call fastmask.apply first)")
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    requires_grad = getattr(model, "_fastmask_requires_grad", {})
    for name, layer in layers.items():
        weight = layer.weight
        if bake:
            shared = [n for n in owners.get(id(weight), []) if n != f"{name}.weight"]
            weight = nn.Parameter(layer.merged_weight(inverse), requires_grad=False)
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


def merge(model: nn.Module, *, inverse: bool = False, copy: bool = False) -> nn.Module:
    """Bake the eval-mode masks into the weights (``W * m`` in the weight dtype; ``W * (1 - m)`` with
    ``inverse=True``) and swap every MaskedLinear back to its original nn.Linear / Conv1D module, holding a new
    weight tensor. Returns a plain transformers model (save_pretrained / from_pretrained round-trip) whose
    parameters have their pre-``apply`` requires_grad. In place, unless ``copy=True`` (the masked model is then
    left as it is)."""
    if copy:
        model = copy_module.deepcopy(model)
    return _swap_back(model, bake=True, inverse=inverse)


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


def _head_plan(model: nn.Module) -> dict[int, list[int]]:
    """{layer index: heads whose output-projection gates are all 0} of a patched model."""
    plan: dict[int, list[int]] = {}
    for name, layer in masked_layers(model).items():
        if layer.granularity == "head" and layer.head_side == "in":
            off = (layer.head_gates() == 0).nonzero().flatten().tolist()
            if off:
                plan[int(re.search(r"\.(\d+)\.", name).group(1))] = off
    return plan


def export_pruned(model: nn.Module, *, non_uniform: str = "pad", heads: str = "error") -> nn.Module:
    """Merge the masks (``merge``) and physically remove the MLP units and heads that are off.

    MLP units (BERT intermediate/output, GPT-2 c_fc/c_proj, Llama gate/up/down): unit j goes when its column of
    the merged output layer is all zero, or when its rows of the merged input layer(s) are all zero (it is then a
    constant: act(b_j) for BERT/GPT-2, which is folded into the output bias; 0 for Llama). The outputs do not
    change. transformers' BertConfig / GPT2Config / LlamaConfig hold ONE intermediate size for every layer, so
    when layers keep different numbers of units, ``non_uniform="pad"`` (default) keeps the largest count in
    every layer (re-keeping removable units, still exact, still loadable by from_pretrained) and
    ``non_uniform="error"`` raises NotImplementedError.

    Heads (granularity="head" on the attention output projections): removed with the model's ``prune_heads``
    where transformers has it (v4 BERT); transformers 5 removed ``prune_heads`` and has no per-layer head count,
    so ``heads="error"`` (default) raises NotImplementedError when a head is off, and ``heads="keep"`` keeps
    them as zero weights. In place; returns the model.
    """
    if non_uniform not in ("pad", "error"):
        raise ValueError(f"fastmask.export_pruned: non_uniform must be 'pad' or 'error', got {non_uniform!r}")
    if heads not in ("error", "keep"):
        raise ValueError(f"fastmask.export_pruned: heads must be 'error' or 'keep', got {heads!r}")
    family = model_family(model)
    if family not in _INTERMEDIATE_ATTR:
        raise NotImplementedError(f"fastmask.export_pruned supports {sorted(_INTERMEDIATE_ATTR)} families, not "
                                  f"{getattr(getattr(model, 'config', None), 'model_type', type(model).__name__)!r}")
    head_plan = _head_plan(model)
    if head_plan and not hasattr(model, "prune_heads") and heads == "error":
        raise NotImplementedError(
            f"fastmask.export_pruned: heads are off ({ {k: v for k, v in list(head_plan.items())[:3]} } ...) but "
            f"{type(model).__name__} has no prune_heads (removed in transformers 5, which also has no per-layer "
            f"head count in its configs); pass heads='keep' to keep them as zero weights (fastmask.merge)")
    if masked_layers(model):
        merge(model)
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
    if head_plan and hasattr(model, "prune_heads"):
        model.prune_heads(head_plan)
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


__all__ = ["save_masks", "load_masks", "read_mask_metadata", "merge", "unapply", "export_pruned", "fingerprint",
           "weights_sha256", "FORMAT_VERSION"]
