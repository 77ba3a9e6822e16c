"""DTensor sharding rules of the custom ops that read mask logits outside a forward, for logits that FSDP2 shards.

FSDP2 all-gathers a block's parameters around its forward and backward, so the fused training ops only ever see
whole tensors. Between steps the logits are sharded DTensors, and two ops read them there: ``fastmask::l0_norm``
(the sparsity penalty: a sum, so a shard gives this rank's part of it, a ``Partial`` sum that one all-reduce makes
whole) and ``fastmask::gate`` in eval mode (elementwise, so a shard's gates are the gates of that shard). Training
gates are not elementwise in this sense: their noise is a function of each logit's position in the whole tensor,
so a sharded training gate would draw the wrong noise; it is registered for replicated inputs only.

Registered on first use (``register``), when a DTensor reaches one of these ops: importing torch.distributed.tensor
at ``import fastmask`` would cost about half a second for users who never shard.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

_registered = False


def register() -> None:
    """Register the rules (once per process)."""
    global _registered
    if _registered:
        return

    @register_sharding(torch.ops.fastmask.l0_norm.default)
    def _l0_norm(logits, estimator, beta, gamma, zeta, tau):
        scalars = [None] * 5
        return [([Replicate()], [Replicate(), *scalars])] + [([Partial("sum")], [Shard(dim), *scalars])
                                                             for dim in range(logits.ndim)]

    @register_sharding(torch.ops.fastmask.gate.default)
    def _gate(logits, estimator, seed, offset, beta, gamma, zeta, tau, training, inverse):
        scalars = [None] * 9
        strategies = [([Replicate()], [Replicate(), *scalars])]
        if not training:
            strategies += [([Shard(dim)], [Shard(dim), *scalars]) for dim in range(logits.ndim)]
        return strategies

    _registered = True
