"""Argument checks shared by the public ops, fastmask.nn.MaskedLinear and fastmask.MaskConfig: one function per
kind of value, so that the three agree on what is valid and on how a refusal reads. The tensor checks read metadata
only (shapes, dtypes, devices), so they also run on fake tensors under torch.compile, before any kernel starts.

Every message names the argument and what was expected. ``where`` is the caller as the message names it: a
``where`` ending in "." names a field (``"MaskConfig."`` -> "MaskConfig.seed must be ..."), any other an argument
(``"MaskedLinear"`` -> "MaskedLinear: seed must be ...")."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

from .._params import ESTIMATORS

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
WEIGHT_LAYOUTS = ("out_in", "in_out")
GRANULARITIES = ("weight", "block", "unit_in", "unit_out", "head", "layer")  # of MaskConfig and MaskedLinear
_INT64_MAX = 2**63 - 1


def subject(name: str, where: str) -> str:
    """How a message names argument ``name`` of ``where`` (see the module docstring)."""
    return f"{where}{name}" if where.endswith(".") else f"{where}: {name}"


def _bound(value: int) -> str:
    return "2**63 - 1" if value == _INT64_MAX else str(value)


def check_choice(value: Any, choices: Sequence[str], name: str, where: str) -> str:
    """One of ``choices`` (estimator, granularity, weight_layout, head_side)."""
    if value not in choices:
        raise ValueError(f"{subject(name, where)} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_int(value: Any, name: str, where: str, low: int = 0, high: Optional[int] = _INT64_MAX, *,
              type_error: bool = False) -> int:
    """An int (never a bool) in [low, high] (high None: no upper bound). ``type_error`` (the ops): a value that is
    not an int raises TypeError and one out of range its own ValueError; otherwise one ValueError says both."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if high is None:
        span = "positive" if low == 1 else f">= {low}"
        if not is_int or value < low:
            raise ValueError(f"{subject(name, where)} must be a {span} int, got {value!r}")
        return int(value)
    span = f"[{_bound(low)}, {_bound(high)}]"
    if type_error and not is_int:
        raise TypeError(f"{subject(name, where)} must be an int, got {type(value).__name__}")
    if type_error and not low <= value <= high:
        raise ValueError(f"{subject(name, where)} must be in {span}, got {value}")
    if not is_int or not low <= value <= high:
        raise ValueError(f"{subject(name, where)} must be an int in {span}, got {value!r}")
    return int(value)


def check_seed(seed: Any, where: str, name: str = "seed", *, type_error: bool = False) -> int:
    """A Philox seed or offset: an int in [0, 2**63 - 1]."""
    return check_int(seed, name, where, 0, _INT64_MAX, type_error=type_error)


def check_finite(value: Any, name: str, where: str) -> float:
    """A finite int or float (never a bool), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{subject(name, where)} must be a finite number, got {value!r}")
    return float(value)


def check_block(block: Any, where: str, name: str = "block") -> tuple[int, int]:
    """Two positive ints (bh, bw)."""
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in block)):
        raise ValueError(f"{subject(name, where)} must be two positive ints (bh, bw), got {block!r}")
    return int(block[0]), int(block[1])


def estimator_code(estimator: str, where: str) -> int:
    return ESTIMATORS.index(check_choice(estimator, ESTIMATORS, "estimator", where))


def check_seed_offset(seed: int, offset: int, where: str) -> None:
    check_seed(seed, where, type_error=True)
    check_seed(offset, where, "offset", type_error=True)


def check_gate_params(beta: Optional[float], gamma: float, zeta: float, where: str, tau: float = 0.0
                      ) -> tuple[Optional[float], float, float, float]:
    """The estimator's parameters as floats: beta > 0 (None: the estimator's default, left to the caller), the
    hard-concrete stretch gamma < 0 < 1 < zeta, and the threshold tau, all finite."""
    for name, value in (("beta", beta), ("gamma", gamma), ("zeta", zeta), ("tau", tau)):
        if value is not None or name != "beta":
            check_finite(value, name, where)
    if beta is not None and not beta > 0:
        raise ValueError(f"{subject('beta', where)} (the temperature) must be > 0, got {beta}")
    stretch = "the hard-concrete stretch: gamma < 0 < 1 < zeta"
    if not gamma < 0:
        raise ValueError(f"{subject('gamma', where)} must be < 0 ({stretch}), got gamma={gamma}, zeta={zeta}")
    if not zeta > 1:
        raise ValueError(f"{subject('zeta', where)} must be > 1 ({stretch}), got gamma={gamma}, zeta={zeta}")
    return None if beta is None else float(beta), float(gamma), float(zeta), float(tau)


def check_init(init_keep: Optional[float], init_logit: Optional[float], where: str
               ) -> tuple[Optional[float], Optional[float]]:
    """The initial gates: a keep probability in (0, 1) and/or a finite logit (the logit wins), not both None."""
    if init_logit is not None:
        init_logit = check_finite(init_logit, "init_logit", where)
    if init_keep is not None:
        if isinstance(init_keep, bool) or not isinstance(init_keep, (int, float)) or not 0 < init_keep < 1:
            raise ValueError(f"{subject('init_keep', where)} must be in (0, 1), got {init_keep!r}")
        init_keep = float(init_keep)
    if init_keep is None and init_logit is None:
        raise ValueError(f"{subject('init_keep', where)} (a probability in (0, 1)) or init_logit must be given, "
                         f"got None for both")
    return init_keep, init_logit


def check_mask_fields(where: str, *, estimator: str, granularity: str, block: Any, init_keep: Optional[float],
                      init_logit: Optional[float], beta: Optional[float], gamma: float, zeta: float, tau: float,
                      n_masks: int, seed: int) -> dict:
    """The mask hyper-parameters that MaskConfig and MaskedLinear share, checked in one order and normalised
    (floats, a (bh, bw) tuple); returns them by name."""
    check_choice(estimator, ESTIMATORS, "estimator", where)
    check_choice(granularity, GRANULARITIES, "granularity", where)
    block = check_block(block, where)
    init_keep, init_logit = check_init(init_keep, init_logit, where)
    beta, gamma, zeta, tau = check_gate_params(beta, gamma, zeta, where, tau)
    n_masks = check_int(n_masks, "n_masks", where, 1, None)
    seed = check_seed(seed, where)
    return dict(estimator=estimator, granularity=granularity, block=block, init_keep=init_keep,
                init_logit=init_logit, beta=beta, gamma=gamma, zeta=zeta, tau=tau, n_masks=n_masks, seed=seed)


def check_flag(value: bool, name: str, where: str) -> None:
    """A bool argument (training, inverse): a string or a tensor would be silently truthy."""
    if not isinstance(value, bool):
        raise TypeError(f"{subject(name, where)} must be a bool (True or False), got {value!r}")


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
    bh, bw = check_block(block, where)
    expected = [math.ceil(rows / bh), math.ceil(cols / bw)]
    if list(logits_shape) != expected:
        raise ValueError(f"{where}: logits must have shape {expected} for weight {list(weight_shape)} with block "
                         f"({bh}, {bw}), got {list(logits_shape)}")
    # A block larger than the weight covers all of it: the same gates as a block of the weight's size, without
    # the kernels' index arithmetic (or the reference's repeat_interleave) ever seeing a huge block.
    return min(bh, max(rows, 1)), min(bw, max(cols, 1))


def check_linear_operands(x, weight, logits, bias, weight_layout, where: str) -> tuple[int, int]:
    """The tensors of a masked linear op (masked_linear, nm_masked_linear) apart from the logits' shape: float
    tensors on one device, a 2-D weight in a known layout, x and bias that fit it; returns (in_features,
    out_features)."""
    for name, t in (("x", x), ("weight", weight), ("logits", logits)):
        check_float_tensor(t, name, where)
    if bias is not None:
        check_float_tensor(bias, "bias", where)
    check_same_device(where, x=x, weight=weight, logits=logits, bias=bias)
    check_choice(weight_layout, WEIGHT_LAYOUTS, "weight_layout", where)
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
    return in_features, out_features


def check_masked_linear(x, weight, logits, bias, weight_layout, block, where="fastmask.ops.masked_linear"):
    """Validate masked_linear's tensors; returns (in_features, out_features, (bh, bw))."""
    in_features, out_features = check_linear_operands(x, weight, logits, bias, weight_layout, where)
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
