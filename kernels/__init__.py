"""fastmask.kernels: the Triton backend of fastmask (installed as ``fastmask.kernels``).

The functions below are what the Triton backend (TritonBackend in fastmask/ops/_backend.py) calls: fused
masked-linear GEMMs (masked_linear.py) and elementwise Philox / gate kernels (uniform.py, gate.py). This package
imports nothing from fastmask (it sits below it): the gate parameters arrive as a GateParams-like object, and
deterministic mode as an argument. On CPU tensors the kernels run only under the Triton interpreter
(TRITON_INTERPRET=1), which the tests use.
"""

from .gate import gate_backward, gate_forward, grouped_masked_weight, masked_weight
from .masked_linear import GemmConfig, masked_linear_backward, masked_linear_forward
from .uniform import uniform

__all__ = ["uniform", "gate_forward", "gate_backward", "masked_linear_forward", "masked_linear_backward",
           "masked_weight", "grouped_masked_weight", "GemmConfig"]
