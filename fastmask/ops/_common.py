"""Helpers shared by the op modules: default estimator parameters and the GateParams they become."""

from __future__ import annotations

import sys
from typing import Optional

import torch

from .._params import GateParams
from ._validate import check_flag, check_gate_params, check_seed_offset, estimator_code

# Temperature defaults: hard concrete as in Louizos et al. (2018); Gumbel-sigmoid at temperature 1 as in the
# knowledge-critical-subnetwork recipe (Bayazit et al. 2024). Other estimators ignore beta.
DEFAULT_BETA = {"hard_concrete": 2 / 3, "gumbel_sigmoid_st": 1.0, "threshold_st": 1.0, "bernoulli_st": 1.0}
DEFAULT_GAMMA, DEFAULT_ZETA, DEFAULT_TAU = -0.1, 1.1, 0.0


def default_beta(estimator: str, beta: Optional[float]) -> float:
    return DEFAULT_BETA.get(estimator, 1.0) if beta is None else float(beta)


def make_params(estimator: str, seed: int, offset: int, beta: float, gamma: float, zeta: float, tau: float,
                training: bool, inverse: bool, where: str) -> GateParams:
    """Validate the scalar arguments of an op and pack them for the backends."""
    code = estimator_code(estimator, where)
    check_seed_offset(seed, offset, where)
    check_gate_params(beta, gamma, zeta, where, tau)
    check_flag(training, "training", where)
    check_flag(inverse, "inverse", where)
    return GateParams(code, int(seed), int(offset), float(beta), float(gamma), float(zeta), float(tau),
                      bool(training), bool(inverse))


def is_dtensor(tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter that FSDP2 shards), without importing torch.distributed.tensor:
    a DTensor exists only once that module was imported (importing it costs about half a second)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


def allow_dtensor(tensor: torch.Tensor) -> None:
    """Register the DTensor sharding rules of the ops (ops/_sharding.py) once a DTensor reaches one: the mask
    logits between steps of an FSDP2 run."""
    if is_dtensor(tensor):
        from . import _sharding  # imports torch.distributed.tensor: loaded only here, see above

        _sharding.register()
