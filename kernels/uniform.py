"""Triton kernel of fastmask.ops.uniform: counter-based Philox noise.

Design: one elementwise kernel over the stream positions [offset, offset + n); position p is word p % 4 of
tl.randint4x(seed, p // 4), the definition in fastmask/ref.py (uniform_ref), so the bits equal the reference, the
C++/CUDA backends and every fused kernel that regenerates the same noise. Each program runs QUADS Philox calls on
aligned quads of positions (the first quad starts at offset rounded down to a multiple of 4) and uses all four
words of each call; the positions before offset or past the end are masked off.
Limits: float32 output only; offset + n must stay below 2**63.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._gate_math import device_guard

_QUADS = 256


@triton.jit(do_not_specialize=["seed", "offset"])
def _uniform_kernel(
    out_ptr,  # float32 output, contiguous, n elements
    n,  # number of elements
    seed,  # Philox key (int, < 2**63)
    offset,  # stream position of element 0 (int, < 2**63)
    QUADS: tl.constexpr,  # Philox calls (quads of positions) per program
):
    counters = (offset >> 2) + tl.program_id(0).to(tl.int64) * QUADS + tl.arange(0, QUADS)
    w0, w1, w2, w3 = tl.randint4x(seed, counters)
    # interleave(interleave(w0, w2), interleave(w1, w3)) = w0[0], w1[0], w2[0], w3[0], w0[1], ...: positions in order
    words = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))
    u = tl.random.uint_to_uniform_float(words)
    j = (offset >> 2) * 4 + tl.program_id(0).to(tl.int64) * (4 * QUADS) + tl.arange(0, 4 * QUADS) - offset
    tl.store(out_ptr + j, u, mask=(j >= 0) & (j < n))


def uniform(shape: tuple[int, ...], seed: int, offset: int, device) -> torch.Tensor:
    """float32 noise of ``shape``: element i (row-major) is stream position offset + i; bit-exact with
    fastmask.ref.uniform_ref."""
    shape = tuple(int(s) for s in shape)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    n = math.prod(shape)
    if n == 0:
        return out
    quads = _QUADS if out.device.type == "cuda" else 64
    positions = (int(offset) & 3) + n  # from the quad that holds position `offset`
    with device_guard(out):
        _uniform_kernel[(triton.cdiv(positions, 4 * quads),)](out, n, int(seed), int(offset), QUADS=quads)
    return out
