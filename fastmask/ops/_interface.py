"""MaskBackend: the kernel-level interface every backend implements (reference, cpu / cuda, triton in
ops/_backend.py); the op layer and the torch compositions of ops/_composed.py call only these methods."""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from .._params import GateParams

Tensor = torch.Tensor
Grads = tuple[Optional[Tensor], Optional[Tensor], Tensor, Optional[Tensor]]


class MaskBackend(Protocol):
    """What the ops call on the backend of their tensors' device (``resolve``). Every tensor argument is on that
    device and already validated by the op (shapes, dtypes, devices); ``p`` holds the estimator and the noise
    position, gate j of a grid drawing ``uniform(p.seed, p.offset + j)`` (j the row-major flat index).

    Conventions of the masked-weight methods: x (T, in) and grad_out (T, out) are 2-D (tokens flattened), any
    strides; the weight is (out, in), or (in, out) when ``in_out`` (GPT-2 Conv1D), in x's dtype and read in place;
    logits are a contiguous gate grid (GR, GC) in the weight's layout (or a stack (K, GR, GC) of K masks, one noise
    stream, mask k at ``ref.mask_offset(p.offset, k, GR * GC)``), weight element (r, c) gated by logit
    (r // bh, c // bw) for ``block = (bh, bw)``. Gradients that were not asked for are None; the op rounds every
    returned gradient to its input's dtype, so a backend may return them in the compute dtype
    (``ref.compute_dtype``: float64 stays float64, else float32).
    """

    name: str

    def uniform(self, shape: tuple[int, ...], seed: int, offset: int, device: torch.device) -> Tensor:
        """float32 noise of ``shape`` on ``device``, contiguous: element i (row-major) is ``tl.rand(seed, offset +
        i)``, bit for bit on every backend."""

    def gate_forward(self, logits: Tensor, p: GateParams) -> Tensor:
        """Gates z in [0, 1] of contiguous ``logits`` (any shape, any float dtype): shaped like them, in their
        compute dtype (``ref.gate_ref``)."""

    def gate_backward(self, grad_gates: Tensor, logits: Tensor, p: GateParams) -> Tensor:
        """d(loss)/d(logits) from d(loss)/d(gates) (both contiguous, shaped like ``logits``), in the logits' compute
        dtype; the noise is regenerated from ``p`` (``ref.gate_backward_ref``)."""

    def masked_linear_forward(self, x: Tensor, weight: Tensor, logits: Tensor, bias: Optional[Tensor],
                              block: tuple[int, int], in_out: bool, p: GateParams) -> Tensor:
        """y = x (W * m)^T + b: (T, out) in x's dtype; bias (out,) in x's dtype, or None."""

    def masked_weight_and_slope(self, weight: Tensor, logits: Tensor, block: tuple[int, int], p: GateParams
                                ) -> tuple[Tensor, Tensor]:
        """(W * m in the weight's dtype and layout, contiguous; dz/dl of every gate in the logits' compute dtype,
        shaped like them) with each gate evaluated once: the forward of the "keep" memory policy
        (``ref.masked_weight_and_slope_ref``)."""

    def masked_linear_backward(self, grad_out: Tensor, x: Tensor, weight: Tensor, logits: Tensor, has_bias: bool,
                               block: tuple[int, int], in_out: bool, p: GateParams, needs_input_grad: bool,
                               needs_weight_grad: bool) -> Grads:
        """(grad_x (T, in), grad_weight (the weight's shape), grad_logits (GR, GC), grad_bias (out,)) of
        ``masked_linear_forward``; d(logits) sums dWm * W over each gate block, dWm = dy^T x accumulated in float32
        (float64) (``ref.masked_linear_backward_ref``)."""

    def grouped_masked_weight(self, weight: Tensor, logits: Tensor, block: tuple[int, int], p: GateParams
                              ) -> Tensor:
        """The K masked weights W * m_k of a stack of grids (K, GR, GC): (K, R, C) in the weight's dtype and layout,
        each product taken in the compute dtype and rounded once (``ref.grouped_masked_weight_ref``)."""

    def mask_grad(self, grad_wm: Tensor, weight: Tensor, logits: Tensor, block: tuple[int, int], p: GateParams,
                  needs_weight_grad: bool, needs_masked_weight: bool
                  ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """(grad_logits (GR, GC) in the compute dtype, grad_weight = dWm * m or None, W * m or None; both in the
        weight's dtype and layout) from dWm (R, C) in the weight's layout and compute dtype (float32 for half
        weights): the block sums of dWm * W times the gates' slope (``_composed.composed_mask_grad``)."""

    def grouped_masked_linear_backward(self, grad_out: Tensor, x: Tensor, weight: Tensor, logits: Tensor,
                                       has_bias: bool, token_mask: Optional[Tensor], block: tuple[int, int],
                                       in_out: bool, p: GateParams, needs_input_grad: bool, needs_weight_grad: bool
                                       ) -> Grads:
        """(grad_x (T, in), grad_weight, grad_logits (K, GR, GC), grad_bias (out,)) of K masked linear layers over
        one weight: token t uses mask ``token_mask[t]`` (int64 (T,), values in [0, K)), or, token_mask None, the T
        tokens are K equal contiguous groups (``ref.grouped_masked_linear_backward_ref``)."""
