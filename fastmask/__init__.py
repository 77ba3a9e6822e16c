"""fastmask: fused, kernel-backed binary masks over pretrained transformers.

    import fastmask as fm
    y = fm.ops.masked_linear(x, weight, logits, estimator="hard_concrete", seed=step)
    fm.set_backend("auto")   # "reference" | "cpu" | "cuda" | "triton"
    print(fm.info())
"""

from . import ops, ref  # noqa: E402
from ._version import __version__  # noqa: F401
from ._info import info  # noqa: E402
from .config import MaskConfig  # noqa: E402
from .hf import apply, bypass, inverse, l0_penalty, mask_parameters, masked_modules, sparsity  # noqa: E402
from .io import export_pruned, load_masks, merge, save_masks, unapply  # noqa: E402
from .nn import MaskedLinear, mask_index, set_mask_index, set_step  # noqa: E402
from .ops import get_backend, set_backend, use_backend  # noqa: E402
from .ops import get_check_finite, is_deterministic, set_check_finite, set_deterministic  # noqa: E402
from .ops import get_memory_policy, set_memory_policy  # noqa: E402

__all__ = ["ops", "ref", "distributed", "info", "set_deterministic", "is_deterministic", "set_check_finite",
           "get_check_finite", "set_memory_policy", "get_memory_policy", "set_backend", "get_backend", "use_backend",
           "__version__", "MaskConfig", "apply",
           "mask_parameters", "masked_modules", "l0_penalty", "sparsity", "inverse", "bypass", "set_step",
           "save_masks", "load_masks", "merge", "unapply", "export_pruned", "MaskedLinear", "mask_index",
           "set_mask_index"]


def __getattr__(name: str):
    # fastmask.distributed imports torch.distributed.checkpoint and FSDP (about 0.5 s): loaded on first use only.
    if name == "distributed":
        import importlib

        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
