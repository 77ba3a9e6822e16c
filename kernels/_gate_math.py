"""Shared gate math of the Triton kernels: Philox noise and the (gate, slope) pair of every estimator.

Design: the noise of gate j (row-major flat index in the gate grid) is ``stream_uniform(seed, offset + j)``: word
``p % 4`` of ``tl.randint4x(seed, p // 4)`` at the int64 stream position p, exactly fastmask.ref.uniform_ref, so no
kernel stores noise or masks: each one regenerates what it needs. Kernels that walk positions in order
(``uniform.py``) draw a quad per Philox call; the 2-D tiles of the fused kernels draw per position.
The estimator, training/eval and inverse are constexprs (one compiled variant each); the float parameters travel
as the int64 bit patterns of their float64 values, so float64 gradchecks see beta/gamma/zeta/tau unrounded.
Limits: math runs in the dtype of ``l`` (float32, or float64); on GPUs log/exp/div are Triton's fast forms, so
continuous gates can differ from the reference by a few ulp (the noise bits are exact).
"""

from __future__ import annotations

import contextlib
import struct

import torch
import triton
import triton.language as tl

# Noise is clamped to [UNIFORM_EPS, 1 - UNIFORM_EPS] before logit(u); keep in sync with fastmask/ref.py.
UNIFORM_EPS: tl.constexpr = tl.constexpr(1e-6)

# Integer codes of the estimators (index into fastmask._params.ESTIMATORS).
HARD_CONCRETE: tl.constexpr = tl.constexpr(0)
GUMBEL_SIGMOID_ST: tl.constexpr = tl.constexpr(1)
THRESHOLD_ST: tl.constexpr = tl.constexpr(2)
BERNOULLI_ST: tl.constexpr = tl.constexpr(3)

# Kernel arguments that change every step (seed, offset) or carry float bits: never specialise on their values,
# or each new value divisible by 16 (or equal to 1) would compile a new variant.
NO_SPECIALIZE = ["seed", "offset", "beta_bits", "gamma_bits", "zg_bits", "tau_bits"]


# ----------------------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------------------

def f64_bits(value: float) -> int:
    """The IEEE float64 bit pattern of ``value`` as a signed int64 (a kernel argument that loses nothing)."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def param_bits(p) -> tuple[int, int, int, int]:
    """(beta, gamma, zeta - gamma, tau) of a GateParams as float64 bit patterns, in kernel-argument order.

    zeta - gamma is taken in Python float64, as fastmask.ref does before multiplying a float32 tensor by it."""
    return f64_bits(p.beta), f64_bits(p.gamma), f64_bits(p.zeta - p.gamma), f64_bits(p.tau)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64, every other float dtype computes in float32 (fastmask.ref.compute_dtype, which this
    package cannot import): the gate math of logits, the product W * m before rounding, the GEMM accumulators."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    """The triton.language dtype of a torch float dtype."""
    return {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16}[dtype]


def device_guard(t: torch.Tensor):
    """Launch on the tensor's own GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# device side
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _f64_param(bits, COMPUTE: tl.constexpr):
    """A float parameter from its float64 bit pattern, rounded once to the compute dtype."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(COMPUTE)


@triton.jit
def _log1p(x):
    """log(1 + x), accurate for small |x| too (Goldberg's trick: no log1p in triton.language)."""
    w = 1.0 + x
    d = w - 1.0
    return tl.where(d == 0.0, x, tl.log(w) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def stream_uniform(seed, position):
    """Uniform noise in [0, 1) at int64 stream positions (any shape): word position % 4 of Philox counter
    position // 4 (fastmask.ref's NOISE), through tl.rand's uint -> float conversion."""
    # (position >> 2) of the uint64 position: the mask undoes the sign bits an int64 position past 2**63 shifts in
    w0, w1, w2, w3 = tl.randint4x(seed, (position >> 2) & 0x3FFFFFFFFFFFFFFF)
    word = position & 3
    bits = tl.where(word == 0, w0, tl.where(word == 1, w1, tl.where(word == 2, w2, w3)))
    return tl.random.uint_to_uniform_float(bits)


@triton.jit
def _gate_slope(l, seed, position, beta, gamma, zg, tau,
                ESTIMATOR: tl.constexpr, TRAINING: tl.constexpr, INVERSE: tl.constexpr):
    """(z, dz/dl) of logits ``l`` (compute dtype, any shape) after ``inverse``.

    l: logits, already in the compute dtype; seed: Philox key; position: int64 stream positions offset + j (shaped
    like l); beta, gamma, zg = zeta - gamma, tau: scalars in the compute dtype.
    """
    if ESTIMATOR == 0:  # hard_concrete
        if TRAINING:
            u = tl.minimum(tl.maximum(stream_uniform(seed, position), UNIFORM_EPS), 1.0 - UNIFORM_EPS).to(l.dtype)
            noise = tl.log(u) - _log1p(-u)
            s = tl.sigmoid((noise + l) / beta)
            ds = s * (1.0 - s) / beta
        else:
            s = tl.sigmoid(l)
            ds = s * (1.0 - s)
        s_bar = s * zg + gamma
        z = tl.minimum(tl.maximum(s_bar, 0.0), 1.0)
        slope = tl.where((s_bar > 0.0) & (s_bar < 1.0), zg * ds, 0.0)
    elif ESTIMATOR == 1:  # gumbel_sigmoid_st
        if TRAINING:
            u = tl.minimum(tl.maximum(stream_uniform(seed, position), UNIFORM_EPS), 1.0 - UNIFORM_EPS).to(l.dtype)
            t = l + (tl.log(u) - _log1p(-u))
            s = tl.sigmoid(t / beta)
            z = (t > 0.0).to(l.dtype)
            slope = s * (1.0 - s) / beta
        else:
            s = tl.sigmoid(l)
            z = (l > 0.0).to(l.dtype)
            slope = s * (1.0 - s)
    elif ESTIMATOR == 2:  # threshold_st
        z = (l > tau).to(l.dtype)
        slope = tl.full(l.shape, 1.0, l.dtype)
    else:  # bernoulli_st
        prob = tl.sigmoid(l)
        if TRAINING:
            u = stream_uniform(seed, position).to(l.dtype)
            z = (u < prob).to(l.dtype)
        else:
            z = (l > 0.0).to(l.dtype)
        slope = prob * (1.0 - prob)
    if INVERSE:
        z = 1.0 - z
        slope = -slope
    return z, slope


@triton.jit
def _grid_gate_slope(logits_ptr, flat, mask, seed, offset, beta, gamma, zg, tau, COMPUTE: tl.constexpr,
                     ESTIMATOR: tl.constexpr, TRAINING: tl.constexpr, INVERSE: tl.constexpr):
    """(z, slope) of the gates at flat grid indices ``flat`` (any shape; masked-off entries read logit 0).

    logits_ptr: contiguous gate grid; flat: int32 flat indices; mask: which entries are real; seed/offset: the
    noise stream; beta..tau: scalars in COMPUTE."""
    l = tl.load(logits_ptr + flat, mask=mask, other=0.0).to(COMPUTE)
    return _gate_slope(l, seed, flat.to(tl.int64) + offset, beta, gamma, zg, tau, ESTIMATOR, TRAINING, INVERSE)


@triton.jit
def _cast(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """x.to(DTYPE), rounding to nearest even. The Triton interpreter truncates float32 -> bfloat16, so under it
    (INTERPRET) the rounding is done by hand on the bits; compiled kernels use the hardware conversion."""
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        out = bits.to(tl.float32, bitcast=True).to(DTYPE)
    else:
        out = x.to(DTYPE)
    return out


@triton.jit
def _mma(a, b, acc, USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b. USE_DOT=False: broadcast-multiply reduction (float64, where tl.dot is not portable).
    Under the interpreter, bfloat16 operands go in as float32 (exact; it would multiply their bit patterns)."""
    if USE_DOT:
        if INTERPRET:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=INPUT_PRECISION)
        else:
            out = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        out = acc + tl.sum(a.to(acc.dtype)[:, :, None] * b.to(acc.dtype)[None, :, :], axis=1)
    return out


def interpreted(kernel) -> bool:
    """Whether a @triton.jit kernel was created under TRITON_INTERPRET=1 (decided at decoration time)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return False
    return isinstance(kernel, InterpretedFunction)


@triton.jit
def _gates_at(gates_ptr, flat, mask, seed, offset, beta, gamma, zg, tau, COMPUTE: tl.constexpr,
              ESTIMATOR: tl.constexpr, TRAINING: tl.constexpr, INVERSE: tl.constexpr, GATE_GRID: tl.constexpr):
    """Gates z at flat grid indices ``flat``: read from a precomputed gate grid (GATE_GRID: gates_ptr holds z, one
    value per gate, written by _gate_fwd_kernel) or regenerated from the logits (gates_ptr holds the logits)."""
    if GATE_GRID:
        z = tl.load(gates_ptr + flat, mask=mask, other=0.0).to(COMPUTE)
    else:
        z, _ = _grid_gate_slope(gates_ptr, flat, mask, seed, offset, beta, gamma, zg, tau, COMPUTE, ESTIMATOR,
                                TRAINING, INVERSE)
    return z
