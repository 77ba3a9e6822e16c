"""Backend choice: which implementation runs each op, per device.

Four backends implement the same kernel-level functions (the interface below); the public custom ops in
this package call ``resolve(device)`` at run time, so ``fm.set_backend`` takes effect even inside a compiled
graph (the op bodies are opaque to torch.compile).

  reference  fastmask/ref.py: pure PyTorch, every device; the oracle.
  cpu        the C++ extension fastmask._C on CPU tensors (fused sampling / masking / mask gradient, at::matmul).
  cuda       the C++/CUDA extension on CUDA tensors (fused kernels around cuBLAS).
  triton     fastmask.kernels: fully fused Triton GEMMs; on CPU only under TRITON_INTERPRET=1 (for tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os

import torch
import torch.nn.functional as F

from .. import ref
from .._params import GateParams

BACKENDS = ("reference", "cpu", "cuda", "triton")
_CHOICES = ("auto",) + BACKENDS

# What "auto" tries, in order, per device type. On CUDA the fused Triton GEMMs come first; the benchmark suite
# (benchmarks/bench_masked_linear.py) is where this order is justified per shape.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}

_selected = os.environ.get("FASTMASK_BACKEND", "auto")


def matmul_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result for half dtypes (float32 / float64 operands: their own dtype), for GEMMs whose
    output feeds a mask gradient (a sum over tokens or weights that must not start from 8-11-bit values). CUDA:
    cuBLAS writes float32 directly (torch.mm's out_dtype, torch >= 2.8); CPUs have no such kernel and multiply the
    operands in float32."""
    if a.dtype in (torch.float32, torch.float64):
        return a @ b
    if a.is_cuda and hasattr(torch.ops.aten.mm, "dtype"):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def composed_mask_grad(backend, grad_wm, weight, logits, block, p: GateParams, needs_weight_grad: bool,
                       needs_masked_weight: bool):
    """(grad_logits, grad_weight or None, W * m or None) from dWm (float32 / float64, the weight's layout) with the
    backend's gate kernels and torch ops: the block sums of dWm * W times the gates' slope; dWm * m; W * m."""
    gates = backend.gate_forward(logits, p)
    mask = ref.expand_gates(gates, block, weight.shape).to(grad_wm.dtype)
    weight_up = weight.to(grad_wm.dtype)
    grad_gates = ref.reduce_to_grid(grad_wm * weight_up, block, logits.shape).to(gates.dtype)
    grad_logits = backend.gate_backward(grad_gates, logits, p)
    grad_weight = (grad_wm * mask).to(weight.dtype) if needs_weight_grad else None
    masked = (weight_up * mask).to(weight.dtype) if needs_masked_weight else None
    return grad_logits, grad_weight, masked


class ReferenceBackend:
    """fastmask.ref behind the backend interface."""

    name = "reference"

    def uniform(self, shape, seed, offset, device):
        return ref.uniform_ref(shape, seed, offset, device=device)

    def gate_forward(self, logits, p: GateParams):
        return ref.gate_ref(logits, **p.ref_kwargs())

    def gate_backward(self, grad_gates, logits, p: GateParams):
        return ref.gate_backward_ref(grad_gates, logits, **p.ref_kwargs())

    def masked_linear_forward(self, x, weight, logits, bias, block, in_out, p: GateParams):
        layout = "in_out" if in_out else "out_in"
        return ref.masked_linear_ref(x, weight, logits, bias, weight_layout=layout, block=block, **p.ref_kwargs())

    def grouped_masked_weight(self, weight, logits, block, p: GateParams):
        return ref.grouped_masked_weight_ref(weight, logits, block, **p.ref_kwargs())

    def mask_grad(self, grad_wm, weight, logits, block, p: GateParams, needs_weight_grad, needs_masked_weight):
        return composed_mask_grad(self, grad_wm, weight, logits, block, p, needs_weight_grad, needs_masked_weight)

    def masked_linear_backward(self, grad_out, x, weight, logits, has_bias, block, in_out, p: GateParams,
                               needs_input_grad, needs_weight_grad):
        layout = "in_out" if in_out else "out_in"
        bias_stub = grad_out.new_empty(grad_out.shape[-1]) if has_bias else None
        gx, gw, gl, gb = ref.masked_linear_backward_ref(grad_out, x, weight, logits, bias_stub, weight_layout=layout,
                                                        block=block, needs_weight_grad=needs_weight_grad,
                                                        **p.ref_kwargs())
        return (gx if needs_input_grad else None), gw, gl, gb


class ExtensionBackend:
    """The C++ (CPU) or C++/CUDA extension: fused gate kernels around the library GEMM (at::matmul / cuBLAS).

    The masked weight is materialised once per call in the weight dtype; backward regenerates it from
    (seed, offset) rather than keeping it alive between forward and backward.
    """

    def __init__(self, name: str):
        self.name = name

    def uniform(self, shape, seed, offset, device):
        out = torch.empty(tuple(shape), dtype=torch.float32, device=device)
        torch.ops.fastmask._uniform_fill(out, seed, offset)
        return out

    def gate_forward(self, logits, p: GateParams):
        return torch.ops.fastmask._gate_fwd(logits, *p.cpp_args())

    def gate_backward(self, grad_gates, logits, p: GateParams):
        return torch.ops.fastmask._gate_bwd(grad_gates, logits, *p.cpp_args())

    def _masked_weight(self, weight, logits, block, p: GateParams):
        return torch.ops.fastmask._masked_weight(weight.contiguous(), logits, block[0], block[1], *p.cpp_args())

    def grouped_masked_weight(self, weight, logits, block, p: GateParams):
        # One fused _masked_weight call per mask (each O(weight), none writes an fp32 mask), mask k at its own
        # offset in the stack's noise stream; the K products that follow are one bmm.
        weight = weight.contiguous()
        out = torch.empty((logits.shape[0],) + tuple(weight.shape), dtype=weight.dtype, device=weight.device)
        n_gates = logits[0].numel()
        for k in range(logits.shape[0]):
            out[k] = self._masked_weight(weight, logits[k], block,
                                         dataclasses.replace(p, offset=ref.mask_offset(p.offset, k, n_gates)))
        return out

    def masked_linear_forward(self, x, weight, logits, bias, block, in_out, p: GateParams):
        wm = self._masked_weight(weight, logits, block, p)
        return F.linear(x, wm.t() if in_out else wm, bias)

    def masked_linear_backward(self, grad_out, x, weight, logits, has_bias, block, in_out, p: GateParams,
                               needs_input_grad, needs_weight_grad):
        # dWm in the weight's layout first, written in float32 by the GEMM itself for half dtypes (no round trip
        # through bf16 / fp16: the fused kernel sums it per gate).
        grad_wm = matmul_acc(x.t(), grad_out) if in_out else matmul_acc(grad_out.t(), x)
        grad_logits, grad_weight, wm = self.mask_grad(grad_wm, weight, logits, block, p, needs_weight_grad,
                                                      needs_input_grad)
        grad_x = (grad_out @ (wm.t() if in_out else wm)) if needs_input_grad else None
        grad_bias = grad_out.sum(0) if has_bias else None
        return grad_x, grad_weight, grad_logits, grad_bias

    def mask_grad(self, grad_wm, weight, logits, block, p: GateParams, needs_weight_grad, needs_masked_weight):
        grad_wm = grad_wm.to(ref.compute_dtype(weight)).contiguous()
        weight = weight.contiguous()
        if needs_masked_weight and self.name == "cpu":
            # One pass regenerates each gate once for both d(logits) and W * m (the step's second and last gate
            # evaluation); the CUDA kernels have no such op yet and regenerate W * m separately.
            grad_logits, grad_weight, wm = torch.ops.fastmask._mask_grad_masked_weight(
                grad_wm, weight, logits, block[0], block[1], *p.cpp_args(), needs_weight_grad)
        else:
            grad_logits, grad_weight = torch.ops.fastmask._mask_grad(
                grad_wm, weight, logits, block[0], block[1], *p.cpp_args(), needs_weight_grad)
            wm = self._masked_weight(weight, logits, block, p) if needs_masked_weight else None
        return grad_logits, (grad_weight if needs_weight_grad else None), wm


class TritonBackend:
    """fastmask.kernels (fully fused Triton GEMMs and elementwise kernels)."""

    name = "triton"

    def mask_grad(self, grad_wm, weight, logits, block, p: GateParams, needs_weight_grad, needs_masked_weight):
        # The Triton kernels write d(logits) from the dWm GEMM's epilogue; given a dWm, their gate kernels and
        # torch ops do it (the grouped op's per-mask backward).
        return composed_mask_grad(self, grad_wm, weight, logits, block, p, needs_weight_grad, needs_masked_weight)

    def __getattr__(self, attr):
        return getattr(importlib.import_module("fastmask.kernels"), attr)


@functools.lru_cache(maxsize=None)
def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401

        importlib.import_module("fastmask.kernels")
    except Exception as exc:  # ImportError, or a broken triton install
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    if _version_tuple(triton.__version__) < MIN_TRITON:
        return False, (f"triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}: its tl.rand "
                       f"with 64-bit offsets draws other noise than the other backends (pip install 'triton>=3.4')")
    return True, f"triton {triton.__version__}"


# The first Triton whose tl.rand(seed, int64 offset) is the 32-bit Philox on (lo32, hi32) of the offset (PR #6832).
MIN_TRITON = (3, 4)


def _version_tuple(version: str) -> tuple[int, ...]:
    """(3, 4) for "3.4.0+git1234"; the leading numeric fields only."""
    fields = []
    for part in version.split("+")[0].split("."):
        if not part.isdigit():
            break
        fields.append(int(part))
    return tuple(fields)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def availability(backend: str, device_type: str) -> tuple[bool, str]:
    """(usable, why) of a backend for tensors on a device type."""
    from .. import _ext

    if backend == "reference":
        return True, "pure PyTorch"
    if backend == "cpu":
        if device_type != "cpu":
            return False, "the 'cpu' backend runs on CPU tensors only"
        status = _ext.load()
        return status.cpu, ("fastmask._C (C++)" if status.cpu else status.reason)
    if backend == "cuda":
        if device_type != "cuda":
            return False, "the 'cuda' backend runs on CUDA tensors only"
        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible to torch"
        status = _ext.load()
        return status.cuda, ("fastmask._C (CUDA)" if status.cuda else status.reason)
    if backend == "triton":
        ok, why = _triton_status()
        if ok and device_type == "cpu" and not _interpreting():
            return False, "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (tests)"
        if ok and device_type not in ("cpu", "cuda"):
            return False, f"Triton does not run on {device_type} tensors"
        return ok, why
    raise ValueError(f"backend must be one of {_CHOICES}, got {backend!r}")


_INSTANCES = {"reference": ReferenceBackend(), "cpu": ExtensionBackend("cpu"), "cuda": ExtensionBackend("cuda"),
              "triton": TritonBackend()}


def set_backend(name: str) -> None:
    """Choose the backend of every fastmask op: "auto" (fastest available per device), "reference", "cpu",
    "cuda" or "triton". An explicit choice that cannot run here raises at once, with the reason."""
    global _selected
    if name not in _CHOICES:
        raise ValueError(f"fastmask.set_backend: name must be one of {_CHOICES}, got {name!r}")
    if name in ("cpu", "cuda", "triton"):
        device_type = "cuda" if name == "cuda" else ("cuda" if name == "triton" and torch.cuda.is_available()
                                                     else "cpu")
        ok, why = availability(name, device_type)
        if not ok:
            raise RuntimeError(f"fastmask.set_backend({name!r}): not available: {why}")
    _selected = name
    _resolved.clear()


def get_backend() -> str:
    """The backend name set by set_backend ("auto" unless changed)."""
    return _selected


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager form of set_backend."""
    previous = _selected
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


# resolve_name's answers per (setting, device type, interpreter mode): availability reads the extension status and
# the environment (tens of microseconds), and every op call asks, so it is asked once. set_backend clears it.
_resolved: dict = {}


def resolve_name(device: torch.device) -> str:
    """The backend that runs ops on tensors of this device under the current setting."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    key = (_selected, device_type, _interpreting())
    name = _resolved.get(key)
    if name is None:
        name = _resolved[key] = _resolve_uncached(device_type)
    return name


def _resolve_uncached(device_type: str) -> str:
    if _selected == "auto":
        for candidate in AUTO_ORDER.get(device_type, ("reference",)):
            if availability(candidate, device_type)[0]:
                return candidate
        return "reference"
    ok, why = availability(_selected, device_type)
    if not ok:
        raise RuntimeError(f"fastmask backend {_selected!r} cannot run on {device_type} tensors: {why}. "
                           f"Use fastmask.set_backend('auto') or move the tensors.")
    return _selected


def resolve(device: torch.device):
    """The backend object (implementing the interface) for tensors on ``device``."""
    return _INSTANCES[resolve_name(device)]
