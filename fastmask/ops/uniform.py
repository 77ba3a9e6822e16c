"""fastmask::uniform: counter-based Philox noise, the same bits on every backend (see fastmask/ref.py)."""

from __future__ import annotations

import operator
from typing import Optional, Sequence

import torch

from ._backend import resolve
from ._validate import check_seed_offset


@torch.library.custom_op("fastmask::uniform", mutates_args=())
def _uniform_op(shape: Sequence[int], seed: int, offset: int, device: torch.device) -> torch.Tensor:
    check_seed_offset(seed, offset, "fastmask.ops.uniform")
    return resolve(device).uniform(tuple(shape), seed, offset, device)


@_uniform_op.register_fake
def _(shape, seed, offset, device):
    return torch.empty(tuple(shape), dtype=torch.float32, device=device)


def uniform(shape: Sequence[int], seed: int = 0, offset: int = 0, device: Optional[torch.device] = None
            ) -> torch.Tensor:
    """Uniform noise in [0, 1) (float32): element i (row-major) is Triton's ``tl.rand(seed, offset + i)``.

    The numbers depend only on (seed, offset + i), never on the backend, device or launch configuration, so a
    backward pass regenerates exactly the noise its forward used, and consecutive calls can share one seed by
    advancing ``offset`` by the number of elements drawn.
    """
    if isinstance(shape, int):
        shape = (shape,)
    try:  # operator.index: ints (and torch.Size / numpy ints) only; int(2.5) would silently truncate
        shape = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise TypeError(f"fastmask.ops.uniform: shape must be a sequence of ints, got {shape!r}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"fastmask.ops.uniform: shape must be non-negative, got {list(shape)}")
    check_seed_offset(seed, offset, "fastmask.ops.uniform")
    device = torch.device("cpu") if device is None else torch.device(device)
    return _uniform_op(list(shape), seed, offset, device)
