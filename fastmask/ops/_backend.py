"""Backend choice: which implementation runs each op, per device.

Four backends implement the same kernel-level interface, ``MaskBackend`` (ops/_interface.py); the public custom
ops in this package call ``resolve(device)`` at run time, so ``fm.set_backend`` takes effect even inside a compiled
graph (the op bodies are opaque to torch.compile).

  reference  fastmask/ref.py: pure PyTorch, every device; the oracle.
  cpu        the C++ extension fastmask._C on CPU tensors (fused sampling / masking / mask gradient, at::matmul).
  cuda       the C++/CUDA extension on CUDA tensors (fused kernels around cuBLAS).
  triton     fastmask.kernels: fully fused Triton GEMMs; on CPU only under TRITON_INTERPRET=1 (for tests).

Where a backend has no fused kernel for a step it runs the torch composition of its own primitives in
fastmask/ops/_composed.py: the mask gradient from dWm (reference, triton) and the grouped op's backward (all).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F

from .. import ref
from ._composed import composed_grouped_backward, composed_mask_grad, composed_masked_weight_and_slope, matmul_acc
from ._interface import MaskBackend
from ._modes import is_deterministic

BACKENDS = ("reference", "cpu", "cuda", "triton")
_CHOICES = ("auto",) + BACKENDS

# What "auto" tries, in order, per device type. On CUDA the fused Triton GEMMs come first; the benchmark suite
# (benchmarks/bench_masked_linear.py) is where this order is justified per shape.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}

_selected = os.environ.get("FASTMASK_BACKEND", "auto")

class ReferenceBackend(MaskBackend):
    """fastmask.ref behind the backend interface."""

    name = "reference"

    def uniform(self, shape, seed, offset, device):
        return ref.uniform_ref(shape, seed, offset, device=device)

    def gate_forward(self, logits, p):
        return ref.gate_ref(logits, **p.ref_kwargs())

    def gate_backward(self, grad_gates, logits, p):
        return ref.gate_backward_ref(grad_gates, logits, **p.ref_kwargs())

    def masked_linear_forward(self, x, weight, logits, bias, block, in_out, p):
        return ref.masked_linear_ref(x, weight, logits, bias, weight_layout=_layout(in_out), block=block,
                                     **p.ref_kwargs())

    def masked_weight_and_slope(self, weight, logits, block, p):
        return ref.masked_weight_and_slope_ref(weight, logits, block, p)

    def masked_linear_backward(self, grad_out, x, weight, logits, has_bias, block, in_out, p, needs_input_grad,
                               needs_weight_grad):
        gx, gw, gl, gb = ref.masked_linear_backward_ref(grad_out, x, weight, logits, p, has_bias=has_bias,
                                                        weight_layout=_layout(in_out), block=block,
                                                        needs_weight_grad=needs_weight_grad)
        return (gx if needs_input_grad else None), gw, gl, gb

    def grouped_masked_weight(self, weight, logits, block, p):
        return ref.grouped_masked_weight_ref(weight, logits, block, p)

    def mask_grad(self, grad_wm, weight, logits, block, p, needs_weight_grad, needs_masked_weight):
        return composed_mask_grad(self, grad_wm, weight, logits, block, p, needs_weight_grad, needs_masked_weight)

    def grouped_masked_linear_backward(self, grad_out, x, weight, logits, has_bias, token_mask, block, in_out, p,
                                       needs_input_grad, needs_weight_grad):
        return composed_grouped_backward(self, grad_out, x, weight, logits, has_bias, token_mask, block, in_out, p,
                                         needs_input_grad, needs_weight_grad)


def _layout(in_out: bool) -> str:
    return "in_out" if in_out else "out_in"


class ExtensionBackend(MaskBackend):
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

    def gate_forward(self, logits, p):
        return torch.ops.fastmask._gate_fwd(logits, *p.cpp_args())

    def gate_backward(self, grad_gates, logits, p):
        return torch.ops.fastmask._gate_bwd(grad_gates, logits, *p.cpp_args())

    def _masked_weight(self, weight, logits, block, p):
        return torch.ops.fastmask._masked_weight(weight.contiguous(), logits, block[0], block[1], *p.cpp_args())

    def grouped_masked_weight(self, weight, logits, block, p):
        # One fused _masked_weight call per mask (each O(weight), none writes an fp32 mask), mask k at its own
        # offset in the stack's noise stream; the K products that follow are one bmm.
        weight = weight.contiguous()
        out = torch.empty((logits.shape[0],) + tuple(weight.shape), dtype=weight.dtype, device=weight.device)
        n_gates = logits[0].numel()
        for k in range(logits.shape[0]):
            out[k] = self._masked_weight(weight, logits[k], block, ref.mask_params(p, k, n_gates))
        return out

    def masked_linear_forward(self, x, weight, logits, bias, block, in_out, p):
        wm = self._masked_weight(weight, logits, block, p)
        return F.linear(x, wm.t() if in_out else wm, bias)

    def masked_weight_and_slope(self, weight, logits, block, p):
        if self.name == "cpu":  # one pass, each gate evaluated once; the CUDA kernels have no such op yet
            return torch.ops.fastmask._masked_weight_slope(weight.contiguous(), logits, block[0], block[1],
                                                           *p.cpp_args())
        return composed_masked_weight_and_slope(self, weight, logits, block, p)

    def masked_linear_backward(self, grad_out, x, weight, logits, has_bias, block, in_out, p, needs_input_grad,
                               needs_weight_grad):
        # dWm in the weight's layout first, written in float32 by the GEMM itself for half dtypes (no round trip
        # through bf16 / fp16: the fused kernel sums it per gate).
        grad_wm = matmul_acc(x.t(), grad_out) if in_out else matmul_acc(grad_out.t(), x)
        grad_logits, grad_weight, wm = self.mask_grad(grad_wm, weight, logits, block, p, needs_weight_grad,
                                                      needs_input_grad)
        grad_x = (grad_out @ (wm.t() if in_out else wm)) if needs_input_grad else None
        grad_bias = grad_out.sum(0) if has_bias else None
        return grad_x, grad_weight, grad_logits, grad_bias

    def mask_grad(self, grad_wm, weight, logits, block, p, needs_weight_grad, needs_masked_weight):
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

    def grouped_masked_linear_backward(self, grad_out, x, weight, logits, has_bias, token_mask, block, in_out, p,
                                       needs_input_grad, needs_weight_grad):
        # The extension has no grouped kernel: K calls of its fused mask gradient (see _composed).
        return composed_grouped_backward(self, grad_out, x, weight, logits, has_bias, token_mask, block, in_out, p,
                                         needs_input_grad, needs_weight_grad)


def _triton_kernels():
    """fastmask.kernels. Imported at first use, not with this module: it imports triton (about a second at
    ``import fastmask``), which may be missing or older than MIN_TRITON (``availability`` says why; the package runs
    without it)."""
    from .. import kernels

    return kernels


class TritonBackend(MaskBackend):
    """fastmask.kernels (fully fused Triton GEMMs and elementwise kernels)."""

    name = "triton"

    def uniform(self, shape, seed, offset, device):
        return _triton_kernels().uniform(shape, seed, offset, device)

    def gate_forward(self, logits, p):
        return _triton_kernels().gate_forward(logits, p)

    def gate_backward(self, grad_gates, logits, p):
        return _triton_kernels().gate_backward(grad_gates, logits, p)

    def masked_linear_forward(self, x, weight, logits, bias, block, in_out, p):
        return _triton_kernels().masked_linear_forward(x, weight, logits, bias, block, in_out, p)

    def masked_weight_and_slope(self, weight, logits, block, p):
        return composed_masked_weight_and_slope(self, weight, logits, block, p)

    def masked_linear_backward(self, grad_out, x, weight, logits, has_bias, block, in_out, p, needs_input_grad,
                               needs_weight_grad):
        # Deterministic mode: where the fused mask-gradient kernel would sum d(logits) with atomic adds, the kernels
        # call this backend's mask_grad instead (fixed-order torch sums; fastmask/ops/_modes.py).
        fixed_order = self.mask_grad if is_deterministic() else None
        return _triton_kernels().masked_linear_backward(grad_out, x, weight, logits, has_bias, block, in_out, p,
                                                        needs_input_grad, needs_weight_grad,
                                                        fixed_order_mask_grad=fixed_order)

    def grouped_masked_weight(self, weight, logits, block, p):
        return _triton_kernels().grouped_masked_weight(weight, logits, block, p)

    def mask_grad(self, grad_wm, weight, logits, block, p, needs_weight_grad, needs_masked_weight):
        # The fused kernels write d(logits) from the dWm GEMM's epilogue; given a dWm, their gate kernels and torch
        # ops do it (the grouped op's per-mask backward, deterministic mode's fallback).
        return composed_mask_grad(self, grad_wm, weight, logits, block, p, needs_weight_grad, needs_masked_weight)

    def grouped_masked_linear_backward(self, grad_out, x, weight, logits, has_bias, token_mask, block, in_out, p,
                                       needs_input_grad, needs_weight_grad):
        return composed_grouped_backward(self, grad_out, x, weight, logits, has_bias, token_mask, block, in_out, p,
                                         needs_input_grad, needs_weight_grad)


@functools.lru_cache(maxsize=None)
def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401

        from .. import kernels  # noqa: F401
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


_INSTANCES: dict[str, MaskBackend] = {"reference": ReferenceBackend(), "cpu": ExtensionBackend("cpu"),
                                      "cuda": ExtensionBackend("cuda"), "triton": TritonBackend()}


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


def resolve(device: torch.device) -> MaskBackend:
    """The backend object for tensors on ``device``."""
    return _INSTANCES[resolve_name(device)]
