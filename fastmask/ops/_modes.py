"""Process-wide switches of the ops: deterministic mode, the NaN-logits check and the memory policy.

    fm.set_deterministic(True)      # or torch.use_deterministic_algorithms(True), or FASTMASK_DETERMINISTIC=1
    fm.set_check_finite(True)       # also check CUDA logits (a device sync per op call); "auto" is the default
    fm.set_memory_policy("keep")    # or FASTMASK_MEMORY_POLICY=keep; "auto" is the default

Deterministic mode: every op gives the same bits run after run on the same machine. Only one path needs it: the
Triton mask-gradient kernel sums d(logits) with atomic adds when a gate block spans several tiles (see
``nondeterminism`` below); in deterministic mode that case runs a fixed-order fallback instead.

NaN check: a NaN logit has no gate (hard concrete would give a NaN mask, the straight-through estimators a silent 0,
and backends disagree), so the ops refuse NaN logits before any kernel starts. Reading the answer of
``isnan(logits.amax())`` costs a device synchronisation on a GPU (about the time of a small kernel, per layer per
call), so "auto" checks every call on CPU tensors and, on GPUs, only when asked (``set_check_finite(True)`` or
FASTMASK_CHECK_FINITE=1). +-inf logits are valid (gates exactly 0 or 1, zero slopes).

Memory policy of a per-weight (or block) masked linear layer in training, i.e. what its forward keeps for the
backward besides x, W and the logits (which autograd keeps anyway):

  "recompute"  nothing: the backward regenerates the gates from (seed, offset), once, in the pass that also gives
               d(logits) and W * m (cpu backend; the others regenerate W * m separately). Two gate evaluations per
               step (forward, backward); 0 extra bytes per weight. The GPU default: it keeps GPT-2 XL mask learning
               within the memory of its dense fine-tune.
  "keep"       W * m (the weight's dtype) and the gates' slopes dz/dl (float32, one per gate): the backward is two
               GEMMs and one element-wise pass, with no gate evaluation. One gate evaluation per step; per gated
               weight 4 + 4 = 8 bytes in float32 (2 + 4 = 6 with bfloat16 weights; block gates: the weight's bytes
               plus 4 per block), held from the forward to the backward. The CPU default.
  "auto"       "keep" for CPU tensors, "recompute" for every other device.

The policy applies where the gates' gradient is wanted and the weight is frozen (a trainable weight needs the gates
themselves in backward: "recompute"); unit, head and layer gates never build W * m (ops/gated_units.py).
"""

from __future__ import annotations

import os
from typing import Union

import torch

def _env_check_finite() -> Union[bool, str]:
    value = os.environ.get("FASTMASK_CHECK_FINITE", "auto").strip().lower()
    return {"1": True, "true": True, "0": False, "false": False}.get(value, "auto")


_deterministic = os.environ.get("FASTMASK_DETERMINISTIC", "0").strip().lower() in ("1", "true")
_check_finite: Union[bool, str] = _env_check_finite()

MEMORY_POLICIES = ("auto", "keep", "recompute")
_memory_policy = os.environ.get("FASTMASK_MEMORY_POLICY", "auto").strip().lower()
if _memory_policy not in MEMORY_POLICIES:
    raise ValueError(f"FASTMASK_MEMORY_POLICY must be one of {MEMORY_POLICIES}, got {_memory_policy!r}")


def set_memory_policy(policy: str) -> None:
    """What a training forward of a per-weight / block masked linear layer keeps for its backward: "auto" (default:
    "keep" on CPU, "recompute" on GPUs), "keep" (W * m and the gate slopes: one gate evaluation per step, 8 bytes
    per float32 weight) or "recompute" (nothing: the backward regenerates the gates). See the module doc."""
    global _memory_policy
    if policy not in MEMORY_POLICIES:
        raise ValueError(f"fastmask.set_memory_policy: policy must be one of {MEMORY_POLICIES}, got {policy!r}")
    _memory_policy = policy


def get_memory_policy() -> str:
    """The memory-policy setting ("auto", "keep" or "recompute")."""
    return _memory_policy


def memory_policy_for(device_type: str, policy: "str | None" = None) -> str:
    """"keep" or "recompute" for tensors on ``device_type``: ``policy`` (a per-call choice) or the setting, with
    "auto" resolved per device."""
    chosen = _memory_policy if policy is None else policy
    if chosen == "auto":
        return "keep" if device_type == "cpu" else "recompute"
    return chosen


def set_deterministic(enabled: bool) -> None:
    """Deterministic mode on or off for every fastmask op (``torch.use_deterministic_algorithms(True)`` turns it on
    too). On: the Triton mask gradient never uses atomic adds (fixed-order fallback where it would)."""
    global _deterministic
    if not isinstance(enabled, bool):
        raise TypeError(f"fastmask.set_deterministic: enabled must be a bool, got {enabled!r}")
    _deterministic = enabled


def is_deterministic() -> bool:
    """Whether the ops run in deterministic mode (fm.set_deterministic or torch.use_deterministic_algorithms)."""
    return _deterministic or torch.are_deterministic_algorithms_enabled()


def set_check_finite(mode: Union[bool, str]) -> None:
    """When the ops refuse NaN logits: "auto" (default; CPU tensors every call, GPU tensors never: no device
    sync), True (every call on every device: one device sync per op call on GPUs) or False (never)."""
    global _check_finite
    if not (mode is True or mode is False or mode == "auto"):
        raise ValueError(f"fastmask.set_check_finite: mode must be True, False or 'auto', got {mode!r}")
    _check_finite = mode


def get_check_finite() -> Union[bool, str]:
    """The NaN-check setting (True, False or "auto")."""
    return _check_finite


def refuse_nan(t: torch.Tensor, name: str, where: str) -> None:
    """Raise ValueError when ``t`` holds a NaN, if the setting checks tensors on t's device (see module doc)."""
    if _check_finite is False or (_check_finite == "auto" and t.device.type != "cpu") or t.numel() == 0:
        return
    if t.device.type == "meta" or not t.dtype.is_floating_point:
        return
    # amax propagates NaN and +-inf never make it NaN: one read-only pass (isnan().any() writes a mask and reads it
    # again: 12x slower on a 3072 x 768 grid, measured on the 2-core CPU); the count only once a NaN is known.
    if bool(torch.isnan(t.amax())):
        count = int(torch.isnan(t).sum())
        raise ValueError(f"{where}: {name} contains {count} NaN value(s) of {t.numel()}: a NaN logit has no gate "
                         f"(the training diverged? lower the learning rate, or check the loaded masks); +-inf "
                         f"logits are fine")


def nondeterminism(device_type: str, backend: str) -> list[str]:
    """What makes masked_linear's results vary run to run with this backend on this device type, in the current
    mode (an empty list: nothing known). Reported by fm.info()."""
    reasons = []
    if backend == "triton" and device_type == "cuda" and not is_deterministic():
        reasons.append("masked_linear backward (Triton): d(logits) of a gate block that spans several tiles (unit, "
                       "head, layer and large or non-power-of-two block masks) is summed with atomic adds in a "
                       "varying order, so its last bits vary run to run; fm.set_deterministic(True) (or "
                       "torch.use_deterministic_algorithms(True)) runs a fixed-order fallback instead")
    if device_type == "cuda" and os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (":4096:8", ":16:8"):
        reasons.append("the GEMMs around the mask kernels are cuBLAS calls: run-to-run deterministic with several "
                       "CUDA streams only with CUBLAS_WORKSPACE_CONFIG=:4096:8 (torch's reproducibility notes)")
    return reasons
