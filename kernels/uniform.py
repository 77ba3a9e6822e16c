"""Triton kernel of fastmask.ops.uniform: counter-based Philox noise.

Design: one elementwise kernel; element j is tl.rand(seed, offset + j) with the counter in int64, which is the
definition in fastmask/ref.py (uniform_ref), so the bits equal the reference, the C++/CUDA backends and every
fused kernel that regenerates the same noise.
Limits: float32 output only; offset + j must stay below 2**63 (it wraps like the reference otherwise).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._gate_math import device_guard

_BLOCK = 1024


@triton.jit(do_not_specialize=["seed", "offset"])
def _uniform_kernel(
    out_ptr,  # float32 output, contiguous, n elements
    n,  # number of elements
    seed,  # Philox key (int, < 2**63)
    offset,  # counter of element 0 (int, < 2**63)
    BLOCK: tl.constexpr,  # elements per program
):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = j < n
    u = tl.rand(seed, j + offset)
    tl.store(out_ptr + j, u, mask=mask)


def uniform(shape: tuple[int, ...], seed: int, offset: int, device) -> torch.Tensor:
    """float32 noise of ``shape``: element i (row-major) is tl.rand(seed, offset + i); bit-exact with
    fastmask.ref.uniform_ref."""
    shape = tuple(int(s) for s in shape)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    n = math.prod(shape)
    if n == 0:
        return out
    block = _BLOCK if out.device.type == "cuda" else 256
    with device_guard(out):
        _uniform_kernel[(triton.cdiv(n, block),)](out, n, int(seed), int(offset), BLOCK=block)
    return out
