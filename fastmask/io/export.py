"""export_pruned: merge the masks, then physically remove the MLP units and attention heads that are off, leaving a
smaller model that transformers' from_pretrained loads (the config gets the new sizes)."""

from __future__ import annotations

import re
import warnings
from typing import Optional

import torch
from torch import nn

from ..hf import head_dim, model_family, role_groups
from ..nn.masked_linear import MaskedLinear, _is_conv1d, masked_layers
from ..nn.surgery import replace_module
from .merging import merge

# Config attribute holding the MLP width, per family (transformers has one value for all layers in each).
_INTERMEDIATE_ATTR = {"bert": "intermediate_size", "gpt2": "n_inner", "llama": "intermediate_size"}
_ACT_ATTRS = ("intermediate_act_fn", "act", "act_fn")


def _rows(module: nn.Module) -> torch.Tensor:
    """Weight as (out, in), a view."""
    return module.weight.t() if _is_conv1d(module) else module.weight


def _activation(model: nn.Module, in_layer_name: str):
    parent = model.get_submodule(in_layer_name.rpartition(".")[0])
    for attr in _ACT_ATTRS:
        fn = getattr(parent, attr, None)
        if callable(fn):
            return fn
    raise NotImplementedError(f"fastmask.export_pruned: no activation found beside {in_layer_name}")


_MLP_ROLES = ("mlp_in", "mlp_gate", "mlp_up", "mlp_out")


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
    for key, group in role_groups(model, ("attn_out",), family).items():
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
    for key in role_groups(model, ("attn_out",), model_family(model)):
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
        replace_module(model, name, _take_units(layer, index.to(layer.weight.device), side=side))


def _export_heads(model: nn.Module, family: str, keep: dict[str, list[int]], width: int) -> None:
    """Keep only the query heads ``keep`` (from _heads_to_keep) of a merged Llama-family model."""
    config, dim = model.config, head_dim(model)
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if width * n_kv == config.num_attention_heads:
        return
    groups = role_groups(model, ("attn_q", "attn_out"), family)
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
    groups = role_groups(model, _MLP_ROLES, family)
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
                replace_module(model, name, _take_units(layer, keep_idx, side="out"))
        replace_module(model, out_name, new_out)
    if width is not None:
        setattr(model.config, _INTERMEDIATE_ATTR[family], width)
    if head_plan is not None:
        _export_heads(model, family, *head_plan)
    elif dead and legacy_prune:
        blocks = {key: int(re.search(r"\.(\d+)$", key).group(1)) for key in dead}
        model.prune_heads({blocks[key]: heads_off for key, heads_off in dead.items()})
    return model
