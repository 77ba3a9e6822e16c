"""The estimator parameters every backend receives (one place, so the kernels and the op layer agree)."""

from __future__ import annotations

from dataclasses import dataclass

# The estimators by integer code (GateParams.estimator): the order is the C++ / CUDA / Triton kernels' contract.
ESTIMATORS = ("hard_concrete", "gumbel_sigmoid_st", "threshold_st", "bernoulli_st")


@dataclass(frozen=True)
class GateParams:
    """How logits become gates. ``estimator`` is the integer code (index into ``ESTIMATORS``)."""

    estimator: int
    seed: int
    offset: int
    beta: float
    gamma: float
    zeta: float
    tau: float
    training: bool
    inverse: bool

    @classmethod
    def of(cls, estimator: str, seed: int, offset: int, beta: float, gamma: float, zeta: float, tau: float,
           training: bool, inverse: bool) -> "GateParams":
        """From the estimator's name, values as given (no checks, no casts: a symbolic ``offset`` under torch.compile
        stays symbolic). fastmask.ops._common.make_params is the checked constructor of the ops."""
        return cls(ESTIMATORS.index(estimator), seed, offset, beta, gamma, zeta, tau, training, inverse)

    @property
    def estimator_name(self) -> str:
        return ESTIMATORS[self.estimator]

    def estimator_kwargs(self) -> dict:
        """The estimator and its parameters (no noise position, no modes): the keywords of fastmask.ops.l0_norm."""
        return dict(estimator=self.estimator_name, beta=self.beta, gamma=self.gamma, zeta=self.zeta, tau=self.tau)

    def ref_kwargs(self) -> dict:
        """Keyword arguments of the fastmask.ref functions and of the public ops (fastmask.ops.gate, masked_linear,
        grouped_masked_linear, gated_units): the estimator's, the noise position and the modes."""
        return dict(self.estimator_kwargs(), seed=self.seed, offset=self.offset, training=self.training,
                    inverse=self.inverse)

    op_kwargs = ref_kwargs

    def cpp_args(self) -> tuple:
        """Positional (estimator, seed, offset, beta, gamma, zeta, tau, training, inverse) of the C++ ops."""
        return (self.estimator, self.seed, self.offset, self.beta, self.gamma, self.zeta, self.tau,
                self.training, self.inverse)
