"""fastmask::nm_masked_linear: y = x (W * mask)^T + b with a learned N:M mask (MaskLLM-style Gumbel-softmax).

The logits (out, in / M, C(M, N)) hold one categorical choice per group of M consecutive weights along the input
dimension among the C(M, N) patterns with N ones (fastmask/ref.py, "learned N:M masks", has the rules). Forward and
backward are two custom ops; the autograd formula saves only x, W and the logits: the backward op regenerates the
Gumbel noise from (seed, offset), as the gate ops do. Noise comes from the backend's ``uniform`` (the same Philox bits
on every backend), so the reference and a fused kernel sample the same patterns.

Backends: the C++ CPU kernels (csrc/cpu/nm_kernels.cpp: the masked weight and the logits gradient in one pass over
the weight, no (rows, cols, C) tensor) run where the "cpu" backend is chosen and the extension has them, with the
Gumbel noise of every logit from ``_gumbel_fill`` (one vectorised pass, within about 1 ulp of the reference's noise,
so hard masks match the reference's except at float-level ties); everything else runs the reference composition
below (torch ops; noise from the backend's uniform). No CUDA / Triton kernels.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import ref
from ._backend import resolve, resolve_name
from ._modes import refuse_nan
from ._common import register_backward_op
from ._validate import (check_finite, check_flag, check_float_tensor, check_int, check_linear_operands,
                        check_seed_offset, subject)

_WHERE = "fastmask.ops.nm_masked_linear"
NM_ESTIMATOR = "nm_gumbel"
MAX_M = 8  # C(8, 4) = 70 patterns per group: beyond that the logits outgrow the weight many times over


# --- validation ---------------------------------------------------------------------------------------------
def check_nm(n, m, where: str) -> tuple[int, int]:
    """N and M of an N:M mask: ints with 1 <= n < m <= MAX_M."""
    m = check_int(m, "m", where, 2, MAX_M)
    n = check_int(n, "n", where, 1, m - 1)
    return n, m


def check_nm_params(temperature, scale, hard, where: str, names=("temperature", "scale", "hard")
                    ) -> tuple[float, float, bool]:
    """The Gumbel-softmax temperature (> 0), the logit scale (> 0) and the hard / soft switch; ``names``: how the
    caller calls them (MaskConfig: beta, nm_scale, nm_hard)."""
    t_name, s_name, h_name = names
    temperature = check_finite(temperature, t_name, where)
    scale = check_finite(scale, s_name, where)
    if not temperature > 0:
        raise ValueError(f"{subject(t_name, where)} (the Gumbel-softmax temperature) must be > 0, got {temperature}")
    if not scale > 0:
        raise ValueError(f"{subject(s_name, where)} (the logit scale factor) must be > 0, got {scale}")
    check_flag(hard, h_name, where)
    return temperature, scale, hard


def n_patterns(n: int, m: int) -> int:
    return math.comb(m, n)


def check_nm_linear(x, weight, logits, bias, n, m, weight_layout, where=_WHERE) -> tuple[int, int]:
    """Validate the tensors of nm_masked_linear (metadata only, so it runs on fake tensors); returns (in, out)."""
    in_features, out_features = check_linear_operands(x, weight, logits, bias, weight_layout, where)
    if in_features % m:
        raise ValueError(f"{where}: in_features={in_features} of weight {list(weight.shape)} ({weight_layout}) must be "
                         f"a multiple of m={m}: groups of m consecutive input weights")
    expected = [out_features, in_features // m, n_patterns(n, m)]
    if list(logits.shape) != expected:
        raise ValueError(f"{where}: logits must have shape {expected} (out, in / m, C(m, n)) for weight "
                         f"{list(weight.shape)} ({weight_layout}) with n={n}, m={m}, got {list(logits.shape)}")
    return in_features, out_features


# --- backends -----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _extension_has_nm_kernels() -> bool:
    """Whether the loaded extension has the N:M kernels that take the Gumbel noise (an extension built before
    csrc/cpu/nm_kernels.cpp existed has none; one built before they took ``gumbel`` took the uniform noise)."""
    if not (hasattr(torch.ops.fastmask, "_nm_masked_weight") and hasattr(torch.ops.fastmask, "_gumbel_fill")):
        return False
    return torch.ops.fastmask._nm_masked_weight.default._schema.arguments[2].name == "gumbel"


def _fused_cpu(device: torch.device) -> bool:
    """Whether the C++ N:M kernels run tensors of ``device``: the "cpu" backend is chosen and the extension has
    them."""
    return resolve_name(device) == "cpu" and _extension_has_nm_kernels()


def _gumbel(logits: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """The Gumbel noise of every logit from the backend's uniform (the same bits as ref.uniform_ref)."""
    u = resolve(logits.device).uniform(tuple(logits.shape), seed, offset, logits.device)
    return ref.gumbel_from_uniform(u, ref.compute_dtype(logits))


def _fused_gumbel(logits: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """The C++ kernels' Gumbel noise: for float32 logits one vectorised pass (Philox and two polynomial logs per
    logit, within about 1 ulp of the reference's torch logs: five torch passes cost about as much as the rest of
    the step); for float64 logits (gradcheck) the reference's torch ops."""
    if logits.dtype != torch.float32:
        return _gumbel(logits, seed, offset)
    noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    torch.ops.fastmask._gumbel_fill(noise, seed, offset)
    return noise


def _nm_kwargs(n, m, seed, offset, training, hard, temperature, scale, logits) -> dict:
    noise = _gumbel(logits, seed, offset) if training else None
    return dict(n=n, m=m, seed=seed, offset=offset, training=training, hard=hard, temperature=temperature,
                scale=scale, noise=noise)


def _scores(logits, training, temperature, scale, seed, offset) -> torch.Tensor:
    """z = (scale * l + g) / temperature in the compute dtype (no g in eval): what ref.nm_soft_ref softmaxes."""
    z = logits.to(ref.compute_dtype(logits)) * scale
    if training:
        z = z + _gumbel(logits, seed, offset)
    return z / temperature


def _group_mask(z, logits, n, m, training, hard) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (out, in), softmax y or None) from the scores z: a hard or eval mask needs no softmax."""
    patterns = ref.nm_patterns(n, m, z.dtype, z.device)
    if hard or not training:
        pick = (z if training else logits).argmax(dim=-1)
        return patterns[pick].reshape(z.shape[0], -1), None
    y = torch.softmax(z, dim=-1)
    return (y @ patterns).reshape(z.shape[0], -1), y


def masked_weight(weight, logits, n, m, seed, offset, training, hard, temperature, scale, weight_layout):
    """W * mask in the weight's dtype and layout, on the chosen backend."""
    if _fused_cpu(weight.device):
        logits = logits.contiguous()
        gumbel = _fused_gumbel(logits, seed, offset) if training else None
        return torch.ops.fastmask._nm_masked_weight(weight.contiguous(), logits, gumbel, n, m, training, hard,
                                                    temperature, scale, weight_layout == "in_out")
    # the torch composition of ref.nm_masked_weight_ref (same operations, same order), without the softmax where
    # the mask is a hard pick
    z = _scores(logits, training, temperature, scale, seed, offset)
    mask, _ = _group_mask(z, logits, n, m, training, hard)
    up = weight.to(ref.compute_dtype(weight))
    return (up * (mask if weight_layout == "out_in" else mask.t()).to(up.dtype)).to(weight.dtype)


def _logits_grad(grad_wm, weight, logits, n, m, seed, offset, training, hard, temperature, scale, weight_layout):
    """(d(logits), mask (out, in)) from the float32 (float64) dWm (out, in)."""
    if _fused_cpu(weight.device):
        logits = logits.contiguous()
        gumbel = _fused_gumbel(logits, seed, offset) if training else None
        return torch.ops.fastmask._nm_logits_grad(grad_wm.contiguous(), weight.contiguous(), logits, gumbel, n, m,
                                                  training, hard, temperature, scale, weight_layout == "in_out")
    # ref.nm_logits_backward_ref with the noise drawn and the softmax taken once
    z = _scores(logits, training, temperature, scale, seed, offset)
    mask, y = _group_mask(z, logits, n, m, training, hard)
    if y is None:
        y = torch.softmax(z, dim=-1)
    w = weight if weight_layout == "out_in" else weight.t()
    per_weight = (grad_wm * w.to(grad_wm.dtype)).reshape(*logits.shape[:2], m).to(y.dtype)
    dy = per_weight @ ref.nm_patterns(n, m, y.dtype, y.device).t()
    dz = y * (dy - (y * dy).sum(-1, keepdim=True))
    return dz * (scale / temperature), mask


# --- the ops ------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastmask::nm_masked_linear", mutates_args=())
def _nm_masked_linear_op(x: torch.Tensor, weight: torch.Tensor, logits: torch.Tensor, bias: Optional[torch.Tensor],
                         n: int, m: int, seed: int, offset: int, training: bool, hard: bool, temperature: float,
                         scale: float, weight_layout: str) -> torch.Tensor:
    _, out_features = check_nm_linear(x, weight, logits, bias, n, m, weight_layout)
    refuse_nan(logits, "logits", _WHERE)
    wm = masked_weight(weight, logits, n, m, seed, offset, training, hard, temperature, scale, weight_layout)
    y = F.linear(ref.flatten_tokens(x), wm if weight_layout == "out_in" else wm.t(), bias)
    return y.reshape(*x.shape[:-1], out_features)


@_nm_masked_linear_op.register_fake
def _(x, weight, logits, bias, n, m, seed, offset, training, hard, temperature, scale, weight_layout):
    _, out_features = check_nm_linear(x, weight, logits, bias, n, m, weight_layout)
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("fastmask::nm_masked_linear_backward", mutates_args=())
def _nm_masked_linear_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                  logits: torch.Tensor, has_bias: bool, n: int, m: int, seed: int, offset: int,
                                  training: bool, hard: bool, temperature: float, scale: float, weight_layout: str,
                                  needs_input_grad: bool, needs_weight_grad: bool
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_logits, grad_bias); gradients not asked for are distinct empty tensors."""
    dy = ref.flatten_tokens(grad_out)
    acc = ref.compute_dtype(weight)
    # dWm = dy^T x in float32 (float64): the logits gradient sums products of it with W over each group.
    grad_wm = dy.to(acc).t() @ ref.flatten_tokens(x).to(acc)  # (out, in)
    grad_logits, mask = _logits_grad(grad_wm, weight, logits, n, m, seed, offset, training, hard, temperature, scale,
                                     weight_layout)
    empty = x.new_empty(0)
    grad_x = grad_weight = grad_bias = None
    if needs_input_grad:
        up = weight.to(acc)
        mask_w = mask if weight_layout == "out_in" else mask.t()
        wm = (up * mask_w.to(acc)).to(weight.dtype)
        grad_x = (dy @ (wm if weight_layout == "out_in" else wm.t())).reshape(x.shape).to(x.dtype)
    if needs_weight_grad:
        gw = grad_wm * mask.to(acc)
        grad_weight = (gw if weight_layout == "out_in" else gw.t()).to(weight.dtype)
    if has_bias:
        grad_bias = dy.to(acc).sum(0).to(grad_out.dtype)
    return (grad_x if needs_input_grad else empty, grad_weight if needs_weight_grad else x.new_empty(0),
            grad_logits.to(logits.dtype), grad_bias if has_bias else x.new_empty(0))


@_nm_masked_linear_backward_op.register_fake
def _(grad_out, x, weight, logits, has_bias, n, m, seed, offset, training, hard, temperature, scale, weight_layout,
      needs_input_grad, needs_weight_grad):
    return (torch.empty_like(x, memory_format=torch.contiguous_format) if needs_input_grad else x.new_empty(0),
            torch.empty_like(weight, memory_format=torch.contiguous_format) if needs_weight_grad else x.new_empty(0),
            torch.empty_like(logits, memory_format=torch.contiguous_format),
            grad_out.new_empty(grad_out.shape[-1]) if has_bias else x.new_empty(0))


register_backward_op(_nm_masked_linear_op, _nm_masked_linear_backward_op)


# --- public functions ---------------------------------------------------------------------------------------
def _checked_scalars(n, m, seed, offset, training, hard, temperature, scale, where):
    n, m = check_nm(n, m, where)
    check_seed_offset(seed, offset, where)
    check_flag(training, "training", where)
    temperature, scale, hard = check_nm_params(temperature, scale, hard, where)
    return n, m, temperature, scale


def nm_masked_linear(x: torch.Tensor, weight: torch.Tensor, logits: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     *, n: int = 2, m: int = 4, seed: int = 0, offset: int = 0, training: bool = True,
                     hard: bool = True, temperature: float = 1.0, scale: float = 1.0,
                     weight_layout: str = "out_in") -> torch.Tensor:
    """``y = x (W * mask)^T + b`` with an N:M mask sampled from ``logits`` (out, in / m, C(m, n)) inside the op.

    Groups are m consecutive weights along the input dimension (rows of GPT-2's (in, out) Conv1D weight with
    ``weight_layout="in_out"``). Training: Gumbel-softmax over the patterns of ``scale * logits`` at
    ``temperature``, the hard (straight-through, exactly N:M) or soft (convex mix) mask; eval (``training=False``):
    the argmax pattern, exactly N:M. Gradients flow to x, logits and bias; to weight only if it requires grad.
    Noise of logit j: ``uniform(seed, offset + j)``.
    """
    n, m, temperature, scale = _checked_scalars(n, m, seed, offset, training, hard, temperature, scale, _WHERE)
    check_nm_linear(x, weight, logits, bias, n, m, weight_layout)
    return _nm_masked_linear_op(x, weight, logits, bias, n, m, seed, offset, training, hard, temperature, scale,
                                weight_layout)


@torch.no_grad()
def nm_mask(logits: torch.Tensor, *, n: int = 2, m: int = 4, seed: int = 0, offset: int = 0, training: bool = False,
            hard: bool = True, temperature: float = 1.0, scale: float = 1.0) -> torch.Tensor:
    """The N:M mask of ``logits`` (out, G, C(m, n)) as an (out, G * m) tensor (nn.Linear orientation; float32, or
    float64 for float64 logits), no gradient. Default: the eval mask (argmax pattern), exactly N:M."""
    where = "fastmask.ops.nm_mask"
    n, m, temperature, scale = _checked_scalars(n, m, seed, offset, training, hard, temperature, scale, where)
    check_float_tensor(logits, "logits", where)
    if logits.dim() != 3 or logits.shape[-1] != n_patterns(n, m):
        raise ValueError(f"{where}: logits must be (out, in / m, C(m, n) = {n_patterns(n, m)}) for n={n}, m={m}, "
                         f"got shape {list(logits.shape)}")
    refuse_nan(logits, "logits", where)
    return ref.nm_mask_ref(logits, **_nm_kwargs(n, m, seed, offset, training, hard, temperature, scale, logits))


__all__ = ["nm_masked_linear", "nm_mask", "check_nm", "check_nm_params", "n_patterns", "NM_ESTIMATOR", "MAX_M"]
