"""fastmask: fused, kernel-backed binary masks over pretrained transformers.

    import fastmask as fm
    y = fm.ops.masked_linear(x, weight, logits, estimator="hard_concrete", seed=step)
    fm.set_backend("auto")   # "reference" | "cpu" | "cuda" | "triton"
    print(fm.info())
"""

from . import ops, ref
from ._info import info
from .ops import get_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = ["ops", "ref", "info", "set_backend", "get_backend", "use_backend", "__version__"]
