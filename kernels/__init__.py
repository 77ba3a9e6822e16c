"""fastmask.kernels: the Triton backend of fastmask (installed as ``fastmask.kernels``).

The functions below are the backend interface the op layer (fastmask/ops/_backend.py) calls:
fused masked-linear GEMMs (masked_linear.py) and elementwise Philox / gate kernels (uniform.py, gate.py).
On CPU tensors they run only under the Triton interpreter (TRITON_INTERPRET=1), which the tests use.
"""

from .gate import gate_backward, gate_forward, grouped_masked_weight, masked_weight
from .masked_linear import GemmConfig, masked_linear_backward, masked_linear_forward
from .uniform import uniform

__all__ = ["uniform", "gate_forward", "gate_backward", "masked_linear_forward", "masked_linear_backward",
           "masked_weight", "grouped_masked_weight", "GemmConfig"]
