"""Masks inside unmodified Hugging Face models (BERT, GPT-2, Llama): apply, penalties, statistics, modes.

    model = fm.apply(AutoModel.from_pretrained(...), fm.MaskConfig(granularity="head"))
    opt = torch.optim.Adam(fm.mask_parameters(model), lr=0.1)
    loss = task_loss(model(**batch)) + lam * fm.l0_penalty(model, normalize=True)
    model.eval(); fm.sparsity(model)["overall"]          # deterministic gates
    with fm.inverse(model): ...                            # the model with the subnetwork removed
    with fm.bypass(model): ...                             # the original model, same weights

K masks in one forward pass (one per factor in disentanglement, or K samples of one mask):

    model = fm.apply(model, fm.MaskConfig(n_masks=3))     # every masked layer: logits (3, GR, GC)
    with fm.mask_index(model, idx):                        # idx: LongTensor (batch,), row b uses mask idx[b]
        loss = task_loss(model(**batch))                   # one grouped product per layer, not 3 passes
    fm.l0_penalty(model, mask=k); fm.sparsity(model)["per_mask"][k]; fm.merge(model, mask=k)

``fm.mask_index(model, "grouped")`` says the batch is K equal contiguous groups (no gather), ``fm.mask_index(model,
k)`` runs every row through mask k. Mask k sees exactly the noise a one-mask model would see at the same step with
its offset shifted by k x (gates per mask), so K-mask training equals K separate single-mask runs.

``apply`` swaps the targeted nn.Linear / Conv1D layers for fastmask.nn.MaskedLinear in place (the weight tensors
are shared, not copied) and freezes every other parameter. Default targets come from ``model.config.model_type``
(``ARCHITECTURES`` below): the attention projections and MLP layers of every transformer block; embeddings, norms,
poolers and the LM head stay untouched unless targeted explicitly.

Heads. transformers 5 has no ``head_mask``; a head is a group of ``head_dim`` consecutive input units of the
attention output projection (BERT ``attention.output.dense``, GPT-2 ``attn.c_proj``, Llama ``o_proj``), so
``granularity="head"`` masks those columns: logits (1, n_heads) with block (out, head_dim) over an (out, in)
weight, (n_heads, 1) with block (head_dim, out) over GPT-2's (in, out) Conv1D. This works with every attention
implementation (eager, SDPA, flash). With granularity="head" only the output projections are targeted by default;
targeting q/k/v projections (or GPT-2's fused ``c_attn``) groups their OUTPUT units per head instead: ``c_attn``
gets 3 * n_heads gates (q heads, then k heads, then v heads; grid (1, 3 n_heads), block (in, head_dim)). Masks
gate weights, never biases: a masked q/k/v head keeps its bias.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import operator
import re
from typing import Iterator, Optional, Union

import torch
from torch import nn

from .config import MaskConfig
from .nn.masked_linear import MaskedLinear, mask_index, masked_layers, set_mask_index, set_step
from .nn.nm import NMMaskedLinear
from .nn.surgery import CONFIG_ATTR, block_index, block_key, layer_seed, linear_layers, mask_layers
from .ops import l0_norm
from .ops._common import is_dtensor

# Per architecture family: (regex over the qualified module name, role). Roles: attn_q / attn_k / attn_v (output
# units grouped per head), attn_qkv (GPT-2's fused q|k|v), attn_out (input units grouped per head), mlp_in,
# mlp_gate, mlp_up (rows are MLP units), mlp_out (columns are MLP units).
_BLOCK = r"(?:^|\.)"
ARCHITECTURES: dict[str, tuple[tuple[str, str], ...]] = {
    "bert": (
        (_BLOCK + r"encoder\.layer\.\d+\.attention\.self\.query$", "attn_q"),
        (_BLOCK + r"encoder\.layer\.\d+\.attention\.self\.key$", "attn_k"),
        (_BLOCK + r"encoder\.layer\.\d+\.attention\.self\.value$", "attn_v"),
        (_BLOCK + r"encoder\.layer\.\d+\.attention\.output\.dense$", "attn_out"),
        (_BLOCK + r"encoder\.layer\.\d+\.intermediate\.dense$", "mlp_in"),
        (_BLOCK + r"encoder\.layer\.\d+\.output\.dense$", "mlp_out"),
    ),
    "gpt2": (
        (_BLOCK + r"h\.\d+\.attn\.c_attn$", "attn_qkv"),
        (_BLOCK + r"h\.\d+\.attn\.c_proj$", "attn_out"),
        (_BLOCK + r"h\.\d+\.mlp\.c_fc$", "mlp_in"),
        (_BLOCK + r"h\.\d+\.mlp\.c_proj$", "mlp_out"),
    ),
    "llama": (
        (_BLOCK + r"layers\.\d+\.self_attn\.q_proj$", "attn_q"),
        (_BLOCK + r"layers\.\d+\.self_attn\.k_proj$", "attn_k"),
        (_BLOCK + r"layers\.\d+\.self_attn\.v_proj$", "attn_v"),
        (_BLOCK + r"layers\.\d+\.self_attn\.o_proj$", "attn_out"),
        (_BLOCK + r"layers\.\d+\.mlp\.gate_proj$", "mlp_gate"),
        (_BLOCK + r"layers\.\d+\.mlp\.up_proj$", "mlp_up"),
        (_BLOCK + r"layers\.\d+\.mlp\.down_proj$", "mlp_out"),
    ),
}
# model_type -> family, for architectures that share a family's module names and head layout.
MODEL_TYPES = {"bert": "bert", "roberta": "bert", "gpt2": "gpt2", "llama": "llama", "mistral": "llama",
               "qwen2": "llama"}
HEAD_SIDE = {"attn_q": "out", "attn_k": "out", "attn_v": "out", "attn_qkv": "out", "attn_out": "in"}


# --- architecture -------------------------------------------------------------------------------------------
def model_family(model_or_type: Union[nn.Module, str, None]) -> Optional[str]:
    """"bert" / "gpt2" / "llama" for a model (from ``model.config.model_type``) or a model_type string."""
    if isinstance(model_or_type, nn.Module):
        model_or_type = getattr(getattr(model_or_type, "config", None), "model_type", None)
    return MODEL_TYPES.get(model_or_type) if isinstance(model_or_type, str) else None


def layer_role(family: Optional[str], name: str) -> Optional[str]:
    """The role of a layer (attn_q, attn_out, mlp_in, ...) from its qualified name, or None."""
    for pattern, role in ARCHITECTURES.get(family, ()):
        if re.search(pattern, name):
            return role
    return None


def default_targets(model_or_type: Union[nn.Module, str], granularity: str = "weight") -> list[str]:
    """The regexes ``apply`` uses when ``MaskConfig.targets`` is None: every attention projection and MLP layer
    of the transformer blocks; only the attention output projections for granularity="head"."""
    family = model_family(model_or_type)
    if family is None:
        kind = model_or_type if isinstance(model_or_type, str) else \
            getattr(getattr(model_or_type, "config", None), "model_type", type(model_or_type).__name__)
        raise ValueError(f"fastmask: no default targets for model type {kind!r} (known: {sorted(MODEL_TYPES)}); "
                         f"pass MaskConfig(targets=[...regexes over module names...])")
    return [pattern for pattern, role in ARCHITECTURES[family] if granularity != "head" or role == "attn_out"]


def head_dim(model: nn.Module) -> int:
    """Size of one attention head, from the model config (``head_dim``, else hidden_size / num_attention_heads)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("fastmask: granularity='head' needs model.config (head_dim / num_attention_heads)")
    explicit = getattr(config, "head_dim", None)
    if isinstance(explicit, int) and explicit > 0:
        return explicit
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if not hidden or not heads or hidden % heads:
        raise ValueError(f"fastmask: cannot infer head_dim from the config (hidden_size={hidden}, "
                         f"num_attention_heads={heads})")
    return hidden // heads


def find_targets(model: nn.Module, config: MaskConfig) -> list[tuple[str, nn.Module]]:
    """(name, layer) of the nn.Linear / Conv1D layers ``config`` targets in ``model``, in module order."""
    targets = config.targets if config.targets is not None else default_targets(model, config.granularity)
    linear = linear_layers(model)
    compiled = [re.compile(t) for t in targets]

    def matches(pattern, name, module):
        return pattern.search(name) is not None or pattern.fullmatch(type(module).__name__) is not None

    chosen = [(name, module) for name, module in linear if any(matches(p, name, module) for p in compiled)]
    unmatched = [t for t, p in zip(targets, compiled) if not any(matches(p, n, m) for n, m in linear)]
    if not chosen or (config.targets is not None and unmatched):
        examples = ", ".join(name for name, _ in linear[:6]) or "none"
        missing = unmatched if unmatched else targets
        raise ValueError(f"fastmask.apply: the target(s) {missing} match no nn.Linear / Conv1D layer of "
                         f"{type(model).__name__} ({len(linear)} linear layers, e.g. {examples})")
    return chosen


# --- apply --------------------------------------------------------------------------------------------------
def apply(model: nn.Module, config: Optional[MaskConfig] = None, **overrides) -> nn.Module:
    """Swap the targeted layers of ``model`` for MaskedLinear in place and freeze every other parameter.

    ``config`` defaults to ``MaskConfig()``; keyword arguments override its fields
    (``fm.apply(model, granularity="head")``). Returns ``model`` (with ``model.fastmask_config`` set). The weights
    are shared with the original layers (no copy); the logits (float32) are the only trainable parameters.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastmask.apply: model must be a torch.nn.Module, got {type(model).__name__}")
    config = MaskConfig() if config is None else config
    if not isinstance(config, MaskConfig):
        raise TypeError(f"fastmask.apply: config must be a MaskConfig, got {type(config).__name__}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(MaskConfig)})
    if unknown:
        raise ValueError(f"fastmask.apply: unknown MaskConfig field(s) {unknown}; known fields: "
                         f"{sorted(f.name for f in dataclasses.fields(MaskConfig))}")
    if overrides:
        config = dataclasses.replace(config, **overrides)
    config.validate()
    if masked_layers(model):
        raise ValueError("fastmask.apply: the model already has MaskedLinear layers; fastmask.merge(model) (or a "
                         "fresh model) first")
    family = model_family(model)
    chosen = find_targets(model, config)
    kwargs = config.module_kwargs()
    dim = head_dim(model) if config.granularity == "head" else None
    plan = {}  # name -> MaskedLinear keyword arguments, all checked before the model changes
    for name, module in chosen:
        layer_kwargs = plan[name] = dict(kwargs, seed=layer_seed(config.seed, name))
        if config.granularity == "head":
            role = layer_role(family, name)
            if role not in HEAD_SIDE:
                raise ValueError(f"fastmask.apply: granularity='head' masks attention projections; {name} "
                                 f"({type(module).__name__}, role {role or 'unknown'}) is not one. Target the "
                                 f"attention output / q, k, v projections only")
            layer_kwargs.update(head_dim=dim, head_side=HEAD_SIDE[role])
    if config.granularity == "nm":  # learned N:M masks: their own layer (fastmask.nn.nm)
        plan = {name: dict(n=config.n, m=config.m, temperature=1.0 if config.beta is None else config.beta,
                           scale=config.nm_scale, hard=config.nm_hard, seed=layer_seed(config.seed, name))
                for name, _ in chosen}
        mask_layers(model, chosen, lambda name, module: NMMaskedLinear.from_module(module, **plan[name]), freeze=True)
        setattr(model, CONFIG_ATTR, config)
        return model
    mask_layers(model, chosen, lambda name, module: MaskedLinear.from_module(module, **plan[name]), freeze=True)
    setattr(model, CONFIG_ATTR, config)
    return model


def block_list(model: nn.Module) -> tuple[str, int, list[str]]:
    """(qualified name of the model's list of transformer blocks, its length, the names of the default mask
    targets in it), found from fastmask's default targets (from its masked layers once masks are applied); a model
    with several block lists is an error."""
    names = list(masked_layers(model)) or [name for name, _ in find_targets(model, MaskConfig())]
    paths = {block_index(name)[0] for name in names}
    if len(paths) != 1:
        raise ValueError(f"expected one list of transformer blocks in {type(model).__name__}, found {sorted(paths)}")
    path = paths.pop()
    return path, len(model.get_submodule(path)), names


def role_groups(model: nn.Module, roles, family: Optional[str] = None
                ) -> dict[str, dict[str, tuple[str, nn.Module]]]:
    """{block ("h.3", ``block_key``): {role: (name, layer)}} of the linear layers, masked or not, whose role (for
    ``family``, default the model's) is one of ``roles``: the layers that belong together in a transformer block
    (an MLP's in / out, a head's q and output projection)."""
    family = model_family(model) if family is None else family
    groups: dict[str, dict[str, tuple[str, nn.Module]]] = {}
    for name, module in linear_layers(model, masked=True):
        role = layer_role(family, name)
        if role in roles:
            groups.setdefault(block_key(name), {})[role] = (name, module)
    return groups


def _require_masked(model: nn.Module, where: str) -> dict[str, MaskedLinear]:
    layers = masked_layers(model)
    if not layers:
        raise ValueError(f"fastmask.{where}: the model has no MaskedLinear layers (call fastmask.apply first)")
    return layers


def masked_modules(model: nn.Module) -> dict[str, MaskedLinear]:
    """{qualified name: MaskedLinear} of a patched model."""
    return masked_layers(model)


def mask_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The logits of every masked layer (what the optimizer trains)."""
    return [layer.logits for layer in _require_masked(model, "mask_parameters").values()]


# --- penalties and statistics -------------------------------------------------------------------------------
def _layer_l0(layer: MaskedLinear, weighted: bool, mask: Optional[int]) -> torch.Tensor:
    if isinstance(layer, NMMaskedLinear):  # N:M keeps n of every m weights whatever the logits: a constant
        kept = layer.expected_kept() if weighted else layer.weight.numel() * layer.n / layer.m
        return layer.logits.new_tensor(kept)
    kwargs = layer.gate_params().estimator_kwargs()
    logits = layer._of_mask(layer.logits, layer.check_mask(mask, "fastmask.l0_penalty"))
    if not weighted:
        return l0_norm(logits, **kwargs)
    rows, cols = layer.weight.shape
    (gr, gc), (bh, bw) = layer.grid_shape, layer.block
    if rows % bh == 0 and cols % bw == 0:  # every gate covers bh * bw weights
        return l0_norm(logits, **kwargs) * float(bh * bw)
    # Partial edge blocks: at most four regions of equal block size (interior, last row, last column, corner).
    total = logits.new_zeros(())
    for row_slice, h in ((slice(0, gr - 1), bh), (slice(gr - 1, gr), rows - bh * (gr - 1))):
        for col_slice, w in ((slice(0, gc - 1), bw), (slice(gc - 1, gc), cols - bw * (gc - 1))):
            part = logits[..., row_slice, col_slice]
            if part.numel():
                total = total + l0_norm(part, **kwargs) * float(h * w)
    return total


def _masks_counted(layer: MaskedLinear, mask: Optional[int]) -> int:
    """How many masks of ``layer`` a statistic over ``mask`` (None: all) covers."""
    return layer.n_masks if mask is None else 1


def l0_penalty(model: nn.Module, *, weighted: bool = True, normalize: bool = False, mask: Optional[int] = None
               ) -> torch.Tensor:
    """Differentiable expected size of the subnetwork: the sum of ``fm.ops.l0_norm`` over the masked layers.

    weighted=True (default): each gate's expected non-zero probability counts the number of weights it covers,
    so the penalty is the expected number of kept WEIGHTS whatever the granularity (a head gate over a 768 x 64
    block counts 49152). weighted=False: the expected number of open GATES. normalize=True divides by the total
    (weights or gates), giving an expected density in [0, 1] whose weight in the loss does not depend on the
    model size. A 0-dim float32 tensor.

    K masks (n_masks=K): the sum over all K masks (normalize=True: their mean density), or mask k alone with
    ``mask=k``.
    """
    layers = _require_masked(model, "l0_penalty").values()
    terms = [_layer_l0(layer, weighted, mask) for layer in layers]
    # Logits that FSDP2 shards give this rank's part of their sum (a Partial DTensor): the parts of all layers are
    # added first, then made whole by one all-reduce, not one per layer.
    sharded = [t for t in terms if is_dtensor(t)]
    total = sum((t for t in terms if not is_dtensor(t)), torch.zeros((), device=terms[0].device))
    if sharded:
        total = total + functools.reduce(operator.add, sharded).full_tensor()
    if normalize:
        count = sum((layer.weight.numel() if weighted else math.prod(layer.grid_shape))
                    * _masks_counted(layer, mask) for layer in layers)
        total = total / float(count)
    return total


def _type_key(name: str) -> str:
    """The layer's name with its block indices replaced by '*': "h.*.attn.c_attn"."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


@torch.no_grad()
def sparsity(model: nn.Module, *, mask: Optional[int] = None) -> dict:
    """Fractions of masked weights whose EVAL-mode gate is exactly 0 (whatever the current mode):

    {"overall": float, "zero_weights": int, "total_weights": int, "zero_gates": int, "total_gates": int,
     "per_layer": {name: float}, "per_type": {"encoder.layer.*.attention.self.query": float, ...}}

    K masks (n_masks=K): ``mask=k`` gives mask k's statistics; without it the counts run over all K masks
    (total_weights = K x the masked weights) and "per_mask" holds the K per-mask dicts.
    """
    per_layer, per_type_counts = {}, {}
    zero_w = total_w = zero_g = total_g = 0
    layers = _require_masked(model, "sparsity")
    for name, layer in layers.items():
        closed = (layer.gates(mask=mask) == 0).cpu()  # (GR, GC), or (K, GR, GC) for every mask
        counts = layer.gate_weight_counts()
        zeros = int((counts * closed).sum())
        numel = layer.weight.numel() * _masks_counted(layer, mask)
        per_layer[name] = zeros / numel
        key = _type_key(name)
        z, t = per_type_counts.get(key, (0, 0))
        per_type_counts[key] = (z + zeros, t + numel)
        zero_w, total_w = zero_w + zeros, total_w + numel
        zero_g, total_g = zero_g + int(closed.sum()), total_g + closed.numel()
    stats = {"overall": zero_w / total_w, "zero_weights": zero_w, "total_weights": total_w, "zero_gates": zero_g,
             "total_gates": total_g, "per_layer": per_layer,
             "per_type": {key: z / t for key, (z, t) in per_type_counts.items()}}
    n_masks = max(layer.n_masks for layer in layers.values())
    if mask is None and n_masks > 1:
        stats["per_mask"] = [sparsity(model, mask=k) for k in range(n_masks)]
    return stats


# --- modes --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _mode(model: nn.Module, where: str, inverse: bool, bypass: bool) -> Iterator[nn.Module]:
    layers = list(_require_masked(model, where).values())
    saved = [(layer, layer.inverse, layer.bypass) for layer in layers]
    try:
        for layer in layers:
            layer.inverse, layer.bypass = inverse, bypass
        yield model
    finally:
        for layer, was_inverse, was_bypass in saved:
            layer.inverse, layer.bypass = was_inverse, was_bypass


def inverse(model: nn.Module):
    """Context manager: inside it every masked layer uses ``1 - m`` (the model with the subnetwork removed).
    No weight is copied; the previous modes come back on exit, also on exceptions."""
    return _mode(model, "inverse", inverse=True, bypass=False)


def bypass(model: nn.Module):
    """Context manager: inside it every masked layer runs ``F.linear`` with its unmasked weight (the original
    model). No weight is copied; the previous modes come back on exit, also on exceptions."""
    return _mode(model, "bypass", inverse=False, bypass=True)


__all__ = ["ARCHITECTURES", "MODEL_TYPES", "apply", "default_targets", "find_targets", "layer_role", "layer_seed",
           "head_dim", "model_family", "role_groups", "block_index", "block_key", "block_list", "masked_modules",
           "mask_parameters", "l0_penalty", "sparsity", "inverse", "bypass", "set_step", "mask_index", "set_mask_index"]
