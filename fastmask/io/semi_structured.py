"""export_semi_structured: the exactly-2:4 linear layers of a model as ``torch.sparse.to_sparse_semi_structured``
linears (cuSPARSELt / CUTLASS on NVIDIA GPUs of compute capability 8.0 and later), the others dense.

    model = fm.merge(nm_model)                                  # plain HF model, exactly-2:4 weights
    model, report = export_semi_structured(model)               # report["sparse"]: layers converted
    dense = densify(model); dense.save_pretrained(path)         # sparse tensors do not serialise: save dense

Where semi-structured sparsity cannot run (a CPU, an older GPU, float32 weights, shapes the kernels refuse, a
weight that is not 2:4) the layer stays dense, and one warning says which layers and why (``require=True``: an
error instead). A merged 2:4 weight is exact, so reloading the dense copy and exporting again gives the same
model. GPT-2's Conv1D layers become nn.Linear when converted (the sparse tensor must be the left operand of
F.linear); ``densify`` gives them back their Conv1D form.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import nn

from ..nn.masked_linear import _is_conv1d, masked_layers
from ..nn.surgery import linear_layers, replace_module
from .merging import merge

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
_CONV1D_ATTR = "_fastmask_from_conv1d"  # on an nn.Linear that replaced a Conv1D (densify turns it back)


def is_nm(weight_out_in: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether every group of m consecutive input weights of every output row has at most n non-zeros."""
    out_features, in_features = weight_out_in.shape
    if in_features % m:
        return False
    nonzero = (weight_out_in.detach().reshape(out_features, in_features // m, m) != 0).sum(-1)
    return bool((nonzero <= n).all())


def _out_in(module: nn.Module) -> torch.Tensor:
    return module.weight.t() if _is_conv1d(module) else module.weight


def semi_structured_support(weight_out_in: torch.Tensor) -> tuple[bool, str]:
    """(True, "") where to_sparse_semi_structured can hold this (out, in) weight on its device, else (False, why)."""
    if weight_out_in.device.type != "cuda":
        return False, f"semi-structured sparse kernels need an NVIDIA GPU; the weight is on {weight_out_in.device}"
    major, minor = torch.cuda.get_device_capability(weight_out_in.device)
    if major < 8:
        return False, f"semi-structured sparsity needs compute capability >= 8.0, this GPU has {major}.{minor}"
    if weight_out_in.dtype not in SEMI_STRUCTURED_DTYPES:
        return False, f"{weight_out_in.dtype} weights are not supported (float16 / bfloat16: model.half() first)"
    return True, ""


def _to_linear(module: nn.Module) -> nn.Linear:
    """An nn.Linear computing what ``module`` (nn.Linear or Conv1D) computes, holding an (out, in) weight."""
    if isinstance(module, nn.Linear):
        return module
    weight = module.weight.detach().t().contiguous()
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device=weight.device,
                       dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias.detach())
    setattr(linear, _CONV1D_ATTR, True)
    return linear


def export_semi_structured(model: nn.Module, *, names: Optional[Sequence[str]] = None, require: bool = False
                           ) -> tuple[nn.Module, dict]:
    """Convert the 2:4 linear layers of ``model`` (merged first if it holds masks; in place) to semi-structured
    sparse weights where supported. ``names``: the layers to try (default: every nn.Linear / Conv1D whose weight is
    2:4). Returns (model, {"sparse": [names], "dense": {name: why}}); ``require=True`` raises instead of leaving a
    layer dense."""
    if masked_layers(model):
        model = merge(model)
    layers = dict(linear_layers(model))
    if names is None:
        names = [name for name, module in layers.items() if is_nm(_out_in(module))]
        if not names:
            raise ValueError("fastmask.export_semi_structured: no linear layer of the model has 2:4 weights (learn "
                             "and merge an N:M mask first, e.g. MaskConfig(granularity='nm', n=2, m=4))")
    report: dict = {"sparse": [], "dense": {}}
    for name in names:
        if name not in layers:
            raise ValueError(f"fastmask.export_semi_structured: {name!r} is not an nn.Linear / Conv1D of the model")
        module = layers[name]
        weight = _out_in(module)
        ok, why = (True, "") if is_nm(weight) else (False, "the weight is not 2:4")
        if ok:
            ok, why = semi_structured_support(weight)
        if ok:
            linear = _to_linear(module)
            try:
                sparse = torch.sparse.to_sparse_semi_structured(linear.weight.detach())
            except (RuntimeError, ValueError) as error:  # shapes or layouts the kernels refuse
                ok, why = False, f"to_sparse_semi_structured refused it: {error}"
            else:
                linear.weight = nn.Parameter(sparse, requires_grad=False)
                replace_module(model, name, linear)
                report["sparse"].append(name)
        if not ok:
            report["dense"][name] = why
    if report["dense"]:
        message = (f"fastmask.export_semi_structured: {len(report['dense'])} of {len(names)} layers kept dense "
                   f"(e.g. {next(iter(report['dense']))}: {next(iter(report['dense'].values()))})")
        if require:
            raise RuntimeError(message)
        warnings.warn(message, stacklevel=2)
    return model, report


@torch.no_grad()
def densify(model: nn.Module) -> nn.Module:
    """Give every semi-structured weight of ``model`` back as a dense tensor (in place; Conv1D layers that export
    turned into nn.Linear become Conv1D again), so that save_pretrained / state_dict work."""
    for name, module in list(model.named_modules()):
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or weight is None:
            continue
        sparse = type(weight.data) is not torch.Tensor  # a SparseSemiStructuredTensor (a Tensor subclass)
        if not sparse and not getattr(module, _CONV1D_ATTR, False):
            continue
        dense = weight.to_dense() if sparse else weight.detach()
        if getattr(module, _CONV1D_ATTR, False):
            from transformers.pytorch_utils import Conv1D  # transformers: imported on use only (seconds)

            conv = Conv1D(dense.shape[0], dense.shape[1]).to(dense.device, dense.dtype)
            conv.weight.copy_(dense.t())
            if module.bias is not None:
                conv.bias.copy_(module.bias)
            else:
                conv.bias = None
            replace_module(model, name, conv)
        else:
            module.weight = nn.Parameter(dense, requires_grad=weight.requires_grad)
    return model


__all__ = ["export_semi_structured", "densify", "is_nm", "semi_structured_support", "SEMI_STRUCTURED_DTYPES"]
