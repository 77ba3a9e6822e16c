"""Masked modules (drop-in replacements for nn.Linear and GPT-2's Conv1D)."""

from .masked_linear import MaskedLinear
from .replace import replace_linear_layers

__all__ = ["MaskedLinear", "replace_linear_layers"]
