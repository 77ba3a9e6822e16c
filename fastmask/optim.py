"""Optimizers for mask learning with little state: the optimizer step taken inside the backward.

``OptimizerInBackward(params, torch.optim.Adafactor, lr=...)`` gives every parameter its own optimizer and steps it
from the parameter's post-accumulate-grad hook (PyTorch's "optimizer step in backward" pattern), then drops the
gradient: no parameter's gradient outlives its own part of the backward, so a step holds one layer's gradient at
a time instead of all of them. With ``torch.optim.Adafactor`` (factored second moment, no first moment) the state
of a mask is its logits plus O(rows + columns) numbers per logit matrix: e.g. 2:4 N:M logits (out, in / 4, 6) in
fp32 are 6 bytes per weight and Adafactor's row factor (out, in / 4, 1) 1 byte, where Adam keeps 24 (logits,
gradient, two moments).

Use it like an optimizer whose ``step`` happened already: call ``loss.backward()`` and nothing else (``step`` and
``zero_grad`` are no-ops, kept so that training loops written for ``torch.optim`` run unchanged);
``state_dict`` / ``load_state_dict`` checkpoint every per-parameter optimizer. Gradient clipping and accumulation
over several backwards are not possible (each gradient is consumed when it is complete).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch


class OptimizerInBackward:
    """One ``optimizer_class([p], **kwargs)`` per parameter, stepped as soon as ``p``'s gradient is accumulated."""

    def __init__(self, params: Iterable[torch.nn.Parameter], optimizer_class: Callable[..., torch.optim.Optimizer],
                 **kwargs):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("OptimizerInBackward: params holds no parameter that requires grad")
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("OptimizerInBackward: params lists a parameter twice")
        self.optimizers = [optimizer_class([p], **kwargs) for p in self.params]
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(opt))
                         for p, opt in zip(self.params, self.optimizers)]

    @staticmethod
    def _hook(optimizer: torch.optim.Optimizer):
        def step_and_free(param: torch.Tensor) -> None:
            optimizer.step()
            param.grad = None  # freed now, not at the next zero_grad

        return step_and_free

    def step(self) -> None:
        """No-op: each parameter was stepped during the backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op: the gradients were dropped during the backward."""

    def state_dict(self) -> dict:
        return {"per_parameter": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("per_parameter") if isinstance(state, dict) else None
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            raise ValueError(f"OptimizerInBackward.load_state_dict: expected the states of {len(self.optimizers)} "
                             f"per-parameter optimizers, got {type(saved).__name__ if saved is None else len(saved)}")
        for opt, opt_state in zip(self.optimizers, saved):
            opt.load_state_dict(opt_state)

    def remove(self) -> None:
        """Detach the hooks (the parameters then train with no optimizer attached)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def state_bytes(self) -> int:
        """Bytes of optimizer state held now (every tensor in every per-parameter state)."""
        return sum(state_bytes(opt) for opt in self.optimizers)


def state_bytes(optimizer) -> int:
    """Bytes of the tensors an optimizer (a torch.optim.Optimizer or an OptimizerInBackward) holds as its state."""
    if isinstance(optimizer, OptimizerInBackward):
        return optimizer.state_bytes()
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))
