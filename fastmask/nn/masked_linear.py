"""MaskedLinear: a linear layer whose frozen weight is gated by a learned mask, through fm.ops.masked_linear.

Noise and torch.compile. A training forward samples gates with noise ``uniform(seed, offset + j)`` where
``offset = step * n_gates``; ``step`` is a plain Python int attribute (not a tensor: reading a tensor counter
would cost a device sync per layer and a graph break). By default (``auto_step=True``) every training forward
advances ``step`` by one, so consecutive calls draw fresh noise and a run is reproducible from the seed.
``fastmask.nn.set_step(model, step)`` pins the noise to a training step instead (``auto_step=False``): every
forward until the next set_step reuses it (what gradient checkpointing's recomputation and gradient accumulation
over micro-batches want).

Under ``torch.compile`` the int ``step`` enters the graph as the op's (Sym)int ``offset``. torch._dynamo
specialises ints that live on nn.Modules, so a changing ``step`` would recompile every step; either

* set ``torch._dynamo.config.allow_unspec_int_on_nn_module = True`` (then ``step`` becomes a symbolic int after
  one recompile: 2 compilations in all, auto_step or set_step alike), or
* compile a function that takes the step as an argument and calls ``set_step`` inside it
  (``def fwd(batch, step): fm.set_step(model, step); return model(**batch)``): dynamo makes int arguments
  symbolic after the first change, again 2 compilations in all.

Eval-mode forwards read no counter and compile to one graph with ``fullgraph=True``.

K masks (``n_masks=K``). The logits are a stack (K, GR, GC), one gate grid per mask, and every forward needs to
know which mask each row of the batch uses. Hugging Face models pass no extra arguments down to their linear
layers, so the layers read it from module state that ``fastmask.mask_index`` sets:

    with fm.mask_index(model, idx):    # idx: LongTensor (batch,), row b uses mask idx[b]
        out = model(**batch)           # ONE forward: every layer runs fm.ops.grouped_masked_linear
    with fm.mask_index(model, "grouped"):   # the batch is K equal contiguous groups, group k -> mask k
    with fm.mask_index(model, 2):           # every row uses mask 2 (fm.ops.masked_linear on logits[2])

Mask k draws the noise of a single-mask layer whose offset is shifted by ``k * GR * GC`` (the stack is one noise
stream), so a K-mask forward equals K single-mask forwards exactly. ``fastmask.set_mask_index`` is the plain
function (callable inside a compiled function, like set_step). A K-mask layer called without an index raises.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._params import GateParams
from ..ops import gate, grouped_masked_linear, masked_linear
from ..ops._common import DEFAULT_GAMMA, DEFAULT_TAU, DEFAULT_ZETA, default_beta
from ..ops._validate import WEIGHT_LAYOUTS, check_choice, check_float_tensor, check_mask_fields
from ..ref import expand_gates, mask_offset

HEAD_SIDES = ("in", "out")
_WHERE = "MaskedLinear"


def _grid(granularity: str, rows: int, cols: int, in_out: bool, block: Sequence[int], head_dim: Optional[int],
          head_side: str) -> tuple[tuple, tuple]:
    """(grid shape, block) in the weight's own layout for a granularity; rows x cols is the stored weight.

    ``block`` is given in the (out, in) orientation of nn.Linear and transposed for an (in, out) weight.
    """
    if granularity == "weight":
        return (rows, cols), (1, 1)
    if granularity == "block":
        bh, bw = tuple(block)[::-1] if in_out else tuple(block)
        return (math.ceil(rows / bh), math.ceil(cols / bw)), (bh, bw)
    if granularity == "layer":
        return (1, 1), (rows, cols)
    if granularity == "head":
        # Heads group head_dim consecutive input units (attention output projection) or output units (q/k/v).
        # Input units are the columns of an (out, in) weight and the rows of an (in, out) one.
        units_are_cols = (head_side == "in") != in_out
        n_units = cols if units_are_cols else rows
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1 or n_units % head_dim:
            side = "input" if head_side == "in" else "output"
            raise ValueError(f"MaskedLinear: granularity='head' needs head_dim dividing the {n_units} {side} units, "
                             f"got head_dim={head_dim}")
        if units_are_cols:
            return (1, cols // head_dim), (rows, head_dim)
        return (rows // head_dim, 1), (head_dim, cols)
    units_are_cols = (granularity == "unit_in") != in_out
    if units_are_cols:
        return (1, cols), (rows, 1)
    return (rows, 1), (1, cols)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


class MaskedLinear(nn.Module):
    """``y = x (W * m)^T + b`` with ``m`` sampled from trainable ``logits`` by an estimator.

    The weight (and bias) are the wrapped layer's own tensors, frozen and not copied. The logits are a 2-D grid in
    the weight's own layout (see fastmask/ref.py); ``granularity`` picks it: "weight", "block" (``block`` in the
    (out, in) orientation), "unit_in", "unit_out", "head" (groups of ``head_dim`` input units, ``head_side="in"``,
    or output units, ``head_side="out"``) or "layer". ``eval()`` gives the deterministic gates; training forwards
    draw noise at position ``step`` (see the module docstring for torch.compile).

    Modes (plain attributes, used by fastmask.hf.inverse / bypass): ``inverse=True`` uses ``1 - m`` (the model
    with the subnetwork removed); ``bypass=True`` runs the unmasked layer (``F.linear`` with the original weight).

    ``n_masks=K > 1``: K independent masks, logits (K, GR, GC); ``mask_index`` (set by fastmask.mask_index) says
    which mask each row of the batch uses (see the module docstring). Per-mask views take ``mask=k``.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, weight_layout: str = "out_in",
                 estimator: str = "hard_concrete", granularity: str = "weight", block: Sequence[int] = (32, 32),
                 head_dim: Optional[int] = None, head_side: str = "in", init_keep: Optional[float] = 0.9,
                 init_logit: Optional[float] = None, beta: Optional[float] = None, gamma: float = DEFAULT_GAMMA,
                 zeta: float = DEFAULT_ZETA, tau: float = DEFAULT_TAU, seed: int = 0, n_masks: int = 1):
        super().__init__()
        checked = check_mask_fields(_WHERE, estimator=estimator, granularity=granularity, block=block,
                                    init_keep=init_keep, init_logit=init_logit, beta=beta, gamma=gamma, zeta=zeta,
                                    tau=tau, n_masks=n_masks, seed=seed)
        check_choice(head_side, HEAD_SIDES, "head_side", _WHERE)
        self._hold_frozen(weight, bias, weight_layout, _WHERE)
        self.n_masks, self.seed = checked["n_masks"], checked["seed"]
        self.weight_layout, self.estimator, self.granularity = weight_layout, estimator, granularity
        self.beta = default_beta(estimator, checked["beta"])
        self.gamma, self.zeta, self.tau = checked["gamma"], checked["zeta"], checked["tau"]
        self.head_dim = None if head_dim is None else int(head_dim)
        self.head_side = head_side
        rows, cols = weight.shape
        grid, self.block = _grid(granularity, rows, cols, weight_layout == "in_out", checked["block"], self.head_dim,
                                 head_side)
        init_logit = checked["init_logit"]
        if init_logit is None:
            init_logit = self._logit_for_keep(checked["init_keep"])
        shape = grid if n_masks == 1 else (n_masks,) + tuple(grid)  # one grid, or a stack of K (one noise stream)
        self.logits = nn.Parameter(torch.full(shape, float(init_logit), dtype=torch.float32, device=weight.device))
        self.mask_index = None  # K masks: which mask each batch row uses (fastmask.mask_index); see module doc
        self.step = 0  # noise position of the next training forward (Python int: see the module docstring)
        self.auto_step = True
        self.inverse = False
        self.bypass = False
        # The wrapped nn.Linear / Conv1D (not registered as a submodule: its parameters are ours), handed back by
        # to_module() so that hooks and attributes of the original layer survive fastmask.merge.
        object.__setattr__(self, "_base_module", None)

    def _logit_for_keep(self, keep: float) -> float:
        """The logit whose training-time keep probability (P(z != 0), or P(z = 1)) is ``keep`` (in (0, 1))."""
        logit = math.log(keep / (1 - keep))
        if self.estimator == "hard_concrete":
            return logit + self.beta * math.log(-self.gamma / self.zeta)
        if self.estimator == "threshold_st":
            return logit + self.tau
        return logit

    def _hold_frozen(self, weight: torch.Tensor, bias: Optional[torch.Tensor], weight_layout: str, where: str) -> None:
        """Check the wrapped weight (a float 2-D tensor in ``weight_layout``) and bias ((out,), the weight's dtype and
        device), and hold both as frozen parameters (the originals when they already are parameters: no copy)."""
        check_choice(weight_layout, WEIGHT_LAYOUTS, "weight_layout", where)
        check_float_tensor(weight, "weight", where)
        if weight.dim() != 2:
            raise ValueError(f"{where}: weight must be 2-D, got shape {list(weight.shape)}")
        out_features = weight.shape[0] if weight_layout == "out_in" else weight.shape[1]
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (out_features,)
                                 or bias.dtype != weight.dtype or bias.device != weight.device):
            found = (f"{type(bias).__name__}" if not isinstance(bias, torch.Tensor)
                     else f"shape {list(bias.shape)}, {bias.dtype} on {bias.device}")
            raise ValueError(f"{where}: bias must be None or a tensor of shape [{out_features}] with the weight's "
                             f"dtype and device ({weight.dtype} on {weight.device}), got {found}")
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.weight.requires_grad_(False)
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=False)
        self.bias = bias
        if bias is not None:
            bias.requires_grad_(False)

    @classmethod
    def from_module(cls, module: nn.Module, **kwargs) -> "MaskedLinear":
        """Wrap an nn.Linear or a transformers Conv1D (weight stored (in, out)) without copying its weight."""
        if isinstance(module, nn.Linear):
            masked = cls(module.weight, module.bias, weight_layout="out_in", **kwargs)
        elif _is_conv1d(module):
            masked = cls(module.weight, module.bias, weight_layout="in_out", **kwargs)
        else:
            raise TypeError(f"{cls.__name__}.from_module: expected nn.Linear or transformers Conv1D, got "
                            f"{type(module).__name__}")
        object.__setattr__(masked, "_base_module", module)
        return masked

    # --- shapes ---------------------------------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return self.weight.shape[1] if self.weight_layout == "out_in" else self.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0] if self.weight_layout == "out_in" else self.weight.shape[1]

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(GR, GC): the gate grid of one mask."""
        return tuple(self.logits.shape[-2:])

    def gate_weight_counts(self) -> torch.Tensor:
        """Number of weights each gate of one mask covers (int64, (GR, GC)): edge blocks may be partial."""
        rows, cols = self.weight.shape
        (gr, gc), (bh, bw) = self.grid_shape, self.block
        row_counts = torch.full((gr,), bh, dtype=torch.int64)
        col_counts = torch.full((gc,), bw, dtype=torch.int64)
        row_counts[-1] = rows - bh * (gr - 1)
        col_counts[-1] = cols - bw * (gc - 1)
        return row_counts[:, None] * col_counts[None, :]

    # --- gates ----------------------------------------------------------------------------------------------
    def check_mask(self, mask: Optional[int], where: str, required: bool = False) -> Optional[int]:
        """Validate a mask number (0 <= mask < n_masks, or None for all masks); ``required``: a K-mask layer needs
        one (a single subnetwork is asked for)."""
        if mask is None:
            if required and self.n_masks > 1:
                raise ValueError(f"{where}: this layer holds n_masks={self.n_masks} masks; pass mask=k with "
                                 f"0 <= k < {self.n_masks} to choose one")
            return None
        if isinstance(mask, bool) or not isinstance(mask, int) or not 0 <= mask < self.n_masks:
            raise ValueError(f"{where}: mask must be an int in [0, {self.n_masks}) (n_masks={self.n_masks}), "
                             f"got {mask!r}")
        return mask

    def _of_mask(self, t: torch.Tensor, mask: Optional[int]) -> torch.Tensor:
        """Mask ``mask``'s slice of a per-mask stack (the whole tensor for one mask or mask=None)."""
        return t if self.n_masks == 1 or mask is None else t[mask]

    def gate_params(self, offset: int = 0, *, training: Optional[bool] = None, inverse: Optional[bool] = None
                    ) -> GateParams:
        """The layer's gate parameters for one op call (estimator, beta, gamma, zeta, tau, seed; noise position
        ``offset``; ``training`` and ``inverse`` default to the layer's modes): every op call of this layer and
        fastmask.l0_penalty build their arguments from it (``op_kwargs()``, ``estimator_kwargs()``)."""
        return GateParams.of(self.estimator, self.seed, offset, self.beta, self.gamma, self.zeta, self.tau,
                             self.training if training is None else training,
                             self.inverse if inverse is None else inverse)

    def gates(self, inverse: bool = False, mask: Optional[int] = None) -> torch.Tensor:
        """The deterministic (eval-mode) gates on the logits grid (float32), detached: (GR, GC), or (K, GR, GC) for
        every mask of a K-mask layer unless ``mask=k``."""
        mask = self.check_mask(mask, "MaskedLinear.gates")
        return gate(self._of_mask(self.logits.detach(), mask),
                    **self.gate_params(training=False, inverse=inverse).op_kwargs())

    def head_gates(self, mask: Optional[int] = None) -> torch.Tensor:
        """Eval-mode gates per head (granularity="head" only): (n_heads,), or (K, n_heads) for every mask."""
        if self.granularity != "head":
            raise ValueError(f"MaskedLinear.head_gates: granularity is {self.granularity!r}, not 'head'")
        gates = self.gates(mask=mask)
        return gates.reshape(-1) if gates.dim() == 2 else gates.reshape(gates.shape[0], -1)

    def mask(self, inverse: bool = False, mask: Optional[int] = None) -> torch.Tensor:
        """The eval-mode mask expanded to the weight's shape and layout (float32); (K, R, C) for every mask of a
        K-mask layer unless ``mask=k``."""
        return expand_gates(self.gates(inverse, mask), self.block, self.weight.shape)

    @torch.no_grad()
    def merged_weight(self, inverse: bool = False, mask: Optional[int] = None) -> torch.Tensor:
        """W * m with the eval-mode mask, in the weight's dtype and layout (the product taken in float32, or
        float64, and rounded once, as the ops do). A new tensor; the weight is not modified. A K-mask layer needs
        ``mask=k``."""
        mask = self.check_mask(mask, "MaskedLinear.merged_weight", required=True)
        w = self.weight
        up = w if w.dtype == torch.float64 else w.float()
        return (up * self.mask(inverse, mask).to(up.dtype)).to(w.dtype)

    # --- forward --------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        if self.bypass:
            weight = self.weight if self.weight_layout == "out_in" else self.weight.t()
            return F.linear(x, weight, self.bias)
        index = self.mask_index
        if self.n_masks > 1 and index is None:
            raise RuntimeError(f"MaskedLinear with n_masks={self.n_masks}: say which mask each batch row uses, "
                               f"e.g. `with fastmask.mask_index(model, idx):` (idx a LongTensor (batch,)), "
                               f"fastmask.mask_index(model, 'grouped') or fastmask.mask_index(model, k)")
        offset = 0
        if self.training:
            offset = self.step * self.logits.numel()  # K masks: the whole stack's noise per step
            if self.auto_step:
                self.step = self.step + 1
        layout = dict(weight_layout=self.weight_layout, block=self.block)
        if self.n_masks == 1:
            return masked_linear(x, self.weight, self.logits, self.bias, **layout,
                                 **self.gate_params(offset).op_kwargs())
        if isinstance(index, int):  # one mask for the whole batch: the single-mask op on its slice of the stack
            params = self.gate_params(mask_offset(offset, index, self.logits[0].numel()))
            return masked_linear(x, self.weight, self.logits[index], self.bias, **layout, **params.op_kwargs())
        return grouped_masked_linear(x, self.weight, self.logits, self.bias,
                                     index=None if isinstance(index, str) else index, **layout,
                                     **self.gate_params(offset).op_kwargs())

    # --- back to a plain layer ------------------------------------------------------------------------------
    def to_module(self, weight: Optional[torch.Tensor] = None) -> nn.Module:
        """The plain nn.Linear / Conv1D this layer wraps (the original object when there is one), holding
        ``weight`` (default: the unmasked weight) and the bias."""
        weight = self.weight if weight is None else weight
        if not isinstance(weight, nn.Parameter):
            weight = nn.Parameter(weight, requires_grad=False)
        module = self._base_module
        if module is None:
            with torch.device("meta"):  # shapes only: the tensors are replaced just below
                if self.weight_layout == "out_in":
                    module = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
                else:
                    from transformers.pytorch_utils import Conv1D

                    module = Conv1D(self.out_features, self.in_features)
        module.weight = weight
        module.bias = self.bias
        return module

    def describe(self) -> dict:
        """The layer's mask hyper-parameters as plain JSON types (stored by fastmask.save_masks)."""
        return {"weight_shape": list(self.weight.shape), "weight_layout": self.weight_layout,
                "n_masks": self.n_masks,
                "estimator": self.estimator, "granularity": self.granularity, "block": list(self.block),
                "logits_shape": list(self.logits.shape), "head_dim": self.head_dim, "head_side": self.head_side,
                "beta": self.beta, "gamma": self.gamma, "zeta": self.zeta, "tau": self.tau, "seed": self.seed,
                "step": int(self.step)}

    def extra_repr(self) -> str:
        mode = " inverse" if self.inverse else (" bypass" if self.bypass else "")
        masks = f", n_masks={self.n_masks}" if self.n_masks > 1 else ""
        return (f"weight={tuple(self.weight.shape)} ({self.weight_layout}), estimator={self.estimator}, "
                f"granularity={self.granularity}, gates={tuple(self.logits.shape)}{masks}{mode}")


def masked_layers(model: nn.Module) -> dict[str, MaskedLinear]:
    """{qualified name: MaskedLinear} of a model, in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, MaskedLinear)}


def set_step(model: nn.Module, step: int, *, auto: bool = False) -> None:
    """Pin the noise of every MaskedLinear in ``model`` to training step ``step`` (an int >= 0).

    Training forwards then use offset ``step * n_gates`` until the next call (``auto=False``), or advance from
    ``step`` by one per forward (``auto=True``, the default behaviour of a fresh MaskedLinear). Call it inside a
    compiled function that receives ``step`` as an argument to train under torch.compile without recompiling
    every step (see the module docstring).
    """
    if isinstance(step, bool) or not isinstance(step, (int, torch.SymInt)):
        raise TypeError(f"fastmask.set_step: step must be an int, got {type(step).__name__}")
    if step < 0:
        raise ValueError(f"fastmask.set_step: step must be >= 0, got {step}")
    found = False
    for module in model.modules():
        if isinstance(module, MaskedLinear):
            module.step = step
            module.auto_step = auto
            found = True
    if not found:
        raise ValueError("fastmask.set_step: the model has no MaskedLinear layers (call fastmask.apply first)")


MASK_INDEX_GROUPED = "grouped"


def _multi_mask_layers(model: nn.Module, where: str) -> list[MaskedLinear]:
    layers = [m for m in model.modules() if isinstance(m, MaskedLinear)]
    if not layers:
        raise ValueError(f"{where}: the model has no MaskedLinear layers (call fastmask.apply first)")
    multi = [m for m in layers if m.n_masks > 1]
    if not multi:
        raise ValueError(f"{where}: the model's masked layers hold one mask each; a mask index needs "
                         f"MaskConfig(n_masks=K) with K > 1")
    return multi


def set_mask_index(model: nn.Module, index) -> None:
    """Say which mask each batch row uses in the K-mask layers of ``model`` (until the next call):

    a LongTensor (batch,) of mask numbers in [0, K) (row b of every layer input uses mask index[b]; the values
    are checked when the layers run), ``"grouped"`` (the batch is K equal contiguous groups, group k -> mask k:
    no gather), an int k (every row uses mask k), or None (unset: K-mask layers then refuse to run). Plain module
    state, so it can be called inside a torch.compile'd function; ``fastmask.mask_index`` is the context manager.
    """
    where = "fastmask.set_mask_index"
    layers = _multi_mask_layers(model, where)
    n_masks = min(layer.n_masks for layer in layers)
    if isinstance(index, torch.Tensor):
        if index.dtype != torch.int64 or index.dim() != 1:
            raise TypeError(f"{where}: a tensor index must be a 1-D LongTensor (batch,) of mask numbers, got "
                            f"{index.dtype} of shape {list(index.shape)}")
    elif isinstance(index, str):
        if index != MASK_INDEX_GROUPED:
            raise ValueError(f"{where}: the only string index is {MASK_INDEX_GROUPED!r}, got {index!r}")
    elif isinstance(index, bool) or not (index is None or isinstance(index, int)):
        raise TypeError(f"{where}: index must be a LongTensor (batch,), 'grouped', an int or None, got "
                        f"{type(index).__name__}")
    elif index is not None and not 0 <= index < n_masks:
        raise ValueError(f"{where}: mask number must be in [0, {n_masks}), got {index}")
    for layer in layers:
        layer.mask_index = index


@contextlib.contextmanager
def mask_index(model: nn.Module, index) -> Iterator[nn.Module]:
    """Context manager: inside it the K-mask layers of ``model`` use ``index`` (see set_mask_index); the previous
    index comes back on exit, also on exceptions.

        with fm.mask_index(model, torch.tensor([0, 2, 1, 1])):   # 4 rows, masks 0, 2, 1, 1
            loss = task_loss(model(**batch))
    """
    layers = _multi_mask_layers(model, "fastmask.mask_index")
    saved = [(layer, layer.mask_index) for layer in layers]
    try:
        set_mask_index(model, index)
        yield model
    finally:
        for layer, previous in saved:
            layer.mask_index = previous
