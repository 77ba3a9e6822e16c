"""Argument checks shared by the public ops: metadata only (shapes, dtypes, devices), so they also run on fake
tensors under torch.compile, before any kernel starts. Every message names the argument and what was expected."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..ref import ESTIMATORS

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
WEIGHT_LAYOUTS = ("out_in", "in_out")
_INT64_MAX = 2**63 - 1


def estimator_code(estimator: str, where: str) -> int:
    if estimator not in ESTIMATORS:
        raise ValueError(f"{where}: estimator must be one of {ESTIMATORS}, got {estimator!r}")
    return ESTIMATORS.index(estimator)


def check_seed_offset(seed: int, offset: int, where: str) -> None:
    for name, value in (("seed", seed), ("offset", offset)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__}")
        if not 0 <= value <= _INT64_MAX:
            raise ValueError(f"{where}: {name} must be in [0, 2**63 - 1], got {value}")


def check_gate_params(beta: float, gamma: float, zeta: float, where: str, tau: float = 0.0) -> None:
    for name, value in (("beta", beta), ("gamma", gamma), ("zeta", zeta), ("tau", tau)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: {name} must be a finite number, got {value!r}")
    if not beta > 0:
        raise ValueError(f"{where}: beta (the temperature) must be > 0, got {beta}")
    if not (gamma < 0 and zeta > 1):
        raise ValueError(f"{where}: the stretch interval must satisfy gamma < 0 < 1 < zeta, got gamma={gamma}, "
                         f"zeta={zeta}")


def check_flag(value: bool, name: str, where: str) -> None:
    """A bool argument (training, inverse): a string or a tensor would be silently truthy."""
    if not isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be a bool (True or False), got {value!r}")


def check_float_tensor(t: torch.Tensor, name: str, where: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where}: {name} must be a floating tensor (float32, float64, float16 or bfloat16), "
                        f"got {t.dtype}")


def check_same_device(where: str, **tensors: Optional[torch.Tensor]) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {name: t.device for name, t in present.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"{where}: all tensors must be on one device, got {listing}")


def resolve_block(logits_shape: Sequence[int], weight_shape: Sequence[int], block: Optional[Sequence[int]],
                  where: str) -> tuple[int, int]:
    """The (bh, bw) block that maps the logits grid onto the weight; inferred when the grid divides the weight."""
    rows, cols = weight_shape
    if len(logits_shape) != 2:
        raise ValueError(f"{where}: logits must be a 2-D gate grid over the weight {list(weight_shape)}, "
                         f"got shape {list(logits_shape)}")
    grid_rows, grid_cols = logits_shape
    if block is None:
        if grid_rows < 1 or grid_cols < 1 or rows % grid_rows or cols % grid_cols:
            raise ValueError(
                f"{where}: cannot infer the block size of logits {list(logits_shape)} over weight "
                f"{list(weight_shape)}: pass block=(bh, bw) (logits then have shape "
                f"[ceil({rows}/bh), ceil({cols}/bw)])")
        return rows // grid_rows, cols // grid_cols
    if len(block) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in block):
        raise ValueError(f"{where}: block must be two positive ints (bh, bw), got {block!r}")
    bh, bw = block
    expected = [math.ceil(rows / bh), math.ceil(cols / bw)]
    if list(logits_shape) != expected:
        raise ValueError(f"{where}: logits must have shape {expected} for weight {list(weight_shape)} with block "
                         f"({bh}, {bw}), got {list(logits_shape)}")
    # A block larger than the weight covers all of it: the same gates as a block of the weight's size, without
    # the kernels' index arithmetic (or the reference's repeat_interleave) ever seeing a huge block.
    return min(bh, max(rows, 1)), min(bw, max(cols, 1))


def check_masked_linear(x, weight, logits, bias, weight_layout, block, where="fastmask.ops.masked_linear"):
    """Validate masked_linear's tensors; returns (in_features, out_features, (bh, bw))."""
    for name, t in (("x", x), ("weight", weight), ("logits", logits)):
        check_float_tensor(t, name, where)
    if bias is not None:
        check_float_tensor(bias, "bias", where)
    check_same_device(where, x=x, weight=weight, logits=logits, bias=bias)
    if weight_layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"{where}: weight_layout must be one of {WEIGHT_LAYOUTS}, got {weight_layout!r}")
    if weight.dim() != 2:
        raise ValueError(f"{where}: weight must be 2-D, got shape {list(weight.shape)}")
    if weight_layout == "out_in":
        out_features, in_features = weight.shape
    else:
        in_features, out_features = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{where}: x must have last dimension in_features={in_features} (weight "
                         f"{list(weight.shape)}, layout {weight_layout}), got shape {list(x.shape)}")
    if x.dtype != weight.dtype:
        raise TypeError(f"{where}: x and weight must have the same dtype, got x {x.dtype} and weight {weight.dtype}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_features):
        raise ValueError(f"{where}: bias must have shape [{out_features}], got {list(bias.shape)}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"{where}: bias must have the dtype of x ({x.dtype}), got {bias.dtype}")
    resolved = resolve_block(tuple(logits.shape), tuple(weight.shape), block, where)
    return in_features, out_features, resolved


def check_grouped_masked_linear(x, weight, logits, bias, index, weight_layout, block,
                                where="fastmask.ops.grouped_masked_linear"):
    """Validate grouped_masked_linear's tensors (metadata only: the index VALUES are checked where the op runs);
    returns (in_features, out_features, (bh, bw), n_masks)."""
    check_float_tensor(logits, "logits", where)
    if logits.dim() != 3 or logits.shape[0] < 1:
        raise ValueError(f"{where}: logits must be a stack (n_masks, grid_rows, grid_cols) of K >= 1 gate grids, "
                         f"got shape {list(logits.shape)}")
    n_masks = logits.shape[0]
    in_features, out_features, resolved = check_masked_linear(x, weight, logits[0], bias, weight_layout, block,
                                                              where)
    if x.dim() < 2:
        raise ValueError(f"{where}: x must be (batch, ..., in_features) with a leading batch dimension whose rows "
                         f"pick the masks, got shape {list(x.shape)}")
    batch = x.shape[0]
    if index is None:
        if batch % n_masks:
            raise ValueError(f"{where}: with index=None the batch is {n_masks} equal contiguous groups (one per "
                             f"mask), so x.shape[0] must be a multiple of n_masks={n_masks}, got {batch}")
    else:
        if not isinstance(index, torch.Tensor):
            raise TypeError(f"{where}: index must be a LongTensor of shape (batch,) or None, got "
                            f"{type(index).__name__}")
        if index.dtype != torch.int64:
            raise TypeError(f"{where}: index must be an int64 (Long) tensor of mask numbers, got {index.dtype}")
        if index.dim() != 1 or index.shape[0] != batch:
            raise ValueError(f"{where}: index must have shape [{batch}] (one mask number per row of x's leading "
                             f"dimension), got {list(index.shape)}")
        check_same_device(where, x=x, index=index)
    return in_features, out_features, resolved, n_masks


def check_index_values(index: Optional[torch.Tensor], n_masks: int, where: str) -> None:
    """Mask numbers must lie in [0, n_masks). Reads the values (a device sync): call it where the op runs."""
    if index is None or index.numel() == 0:
        return
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= n_masks:
        raise ValueError(f"{where}: index values must be mask numbers in [0, {n_masks}), got values in "
                         f"[{low}, {high}]")
