"""The estimator parameters every backend receives (one place, so the kernels and the op layer agree)."""

from __future__ import annotations

from dataclasses import dataclass

from .ref import ESTIMATORS


@dataclass(frozen=True)
class GateParams:
    """How logits become gates. ``estimator`` is the integer code (index into ``fastmask.ref.ESTIMATORS``)."""

    estimator: int
    seed: int
    offset: int
    beta: float
    gamma: float
    zeta: float
    tau: float
    training: bool
    inverse: bool

    @property
    def estimator_name(self) -> str:
        return ESTIMATORS[self.estimator]

    def ref_kwargs(self) -> dict:
        """Keyword arguments of the fastmask.ref functions."""
        return dict(estimator=self.estimator_name, seed=self.seed, offset=self.offset, beta=self.beta,
                    gamma=self.gamma, zeta=self.zeta, tau=self.tau, training=self.training, inverse=self.inverse)

    def cpp_args(self) -> tuple:
        """Positional (estimator, seed, offset, beta, gamma, zeta, tau, training, inverse) of the C++ ops."""
        return (self.estimator, self.seed, self.offset, self.beta, self.gamma, self.zeta, self.tau,
                self.training, self.inverse)
