"""Masked modules (drop-in replacements for nn.Linear and GPT-2's Conv1D), helpers over models holding them, and
the model surgery that puts them in and takes them out (fastmask.nn.surgery)."""

from .masked_linear import MaskedLinear, mask_index, masked_layers, set_mask_index, set_step
from .surgery import replace_linear_layers

__all__ = ["MaskedLinear", "masked_layers", "set_step", "mask_index", "set_mask_index", "replace_linear_layers"]
