"""The public fastmask ops (torch.library namespace ``fastmask``) and the backend switch."""

from ._backend import BACKENDS, get_backend, set_backend, use_backend
from ._modes import (MEMORY_POLICIES, get_check_finite, get_memory_policy, is_deterministic, set_check_finite,
                     set_deterministic, set_memory_policy)
from .gate import gate, hard_concrete
from .gated_units import gated_units
from .grouped_masked_linear import grouped_masked_linear
from .l0_norm import l0_norm
from .masked_linear import masked_linear
from .uniform import uniform

__all__ = ["uniform", "gate", "hard_concrete", "masked_linear", "grouped_masked_linear", "gated_units", "l0_norm",
           "set_backend", "get_backend", "use_backend", "BACKENDS"]
__all__ += ["set_deterministic", "is_deterministic", "set_check_finite", "get_check_finite", "set_memory_policy",
            "get_memory_policy", "MEMORY_POLICIES"]
