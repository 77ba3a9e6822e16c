"""Mask learning across processes on torch.distributed: FSDP2 (``fully_shard``) or DDP around a masked model.

    # torchrun --nproc-per-node N train.py
    rank, world = fm.distributed.init()                     # gloo on CPU, nccl on GPUs, from torchrun's environment
    model = fm.apply(model, fm.MaskConfig(granularity="weight"))
    model = fm.distributed.shard(model)                     # fully_shard per transformer block, then the root
    opt = torch.optim.Adam(fm.mask_parameters(model), lr=0.1)
    for batch in my_shard_of_the_data: ...                  # each rank its own rows; loss a mean over them
    fm.distributed.save_masks(model, "masks/")              # every rank calls it; rank 0 writes ONE consolidated file

How it fits FSDP2: the logits are ordinary parameters of the masked layers (no copies outside the module), so they
shard with their block, like the frozen weights; FSDP2 all-gathers a block's parameters before its forward and
backward, the fused ops see full tensors, and the logits' gradients are reduce-scattered (averaged over ranks).
Plain ``fully_shard`` calls by the user work the same; ``shard`` only applies the usual policy. DDP (``replicate``)
keeps every parameter on every rank and all-reduces the logits' gradients.

Noise: a gate is a pure function of (layer seed, offset), and every rank's MaskedLinear counts the same steps, so
all ranks draw the same gates for the same step without communication; a one-process run on the whole batch draws
the same ones too. With equal shards and a mean loss, N processes on a global batch B follow the one-process run on
B up to float rounding of the gradient average (the tests check both).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from . import hf, io
from .assets import atomic_write_text
from .nn.masked_linear import masked_layers
from .ref import NOISE, NOISE_FIRST_WORD

# How long a collective waits for the other ranks before it fails (a rank that died must not hang the others).
DEFAULT_TIMEOUT_S = 300


def init(backend: Optional[str] = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, int]:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); returns
    (rank, world_size). A no-op when already initialised. ``backend``: "gloo" (CPU) or "nccl" (default on GPUs).
    ``timeout_s``: a collective that waits longer for a rank (one that died) raises instead of hanging."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(f"fastmask.distributed.init: {', '.join(missing)} not set: start the script with "
                           f"`torchrun --nproc-per-node N script.py` (or set them)")
    if timeout_s <= 0:
        raise ValueError(f"fastmask.distributed.init: timeout_s must be > 0, got {timeout_s}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def init_if_launched(timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, int]:
    """``init`` when a launcher such as torchrun started several processes (WORLD_SIZE > 1), else (0, 1) with no
    process group: the experiments call this, so one command line runs alone or under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return init(timeout_s=timeout_s)
    return rank(), world_size()


def share_weights(rows: list) -> list:
    """Per term, (rows on this rank) x world / (rows on all ranks): the factor that turns this rank's mean over its
    rows into its share of the global mean once DDP averages the gradients (1.0 each in one process). One
    all-reduce of len(rows) numbers."""
    if not dist.is_initialized():
        return [1.0] * len(rows)
    total = torch.tensor(rows, dtype=torch.float64)
    dist.all_reduce(total)
    return [r * world_size() / t if t > 0 else 0.0 for r, t in zip(rows, total.tolist())]


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over the ranks (the tensor itself in one process)."""
    if not dist.is_initialized():
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / world_size()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks (the modules of the one list that holds its default mask targets)."""
    path, _, _ = hf.block_list(model)
    return list(model.get_submodule(path))


def shard(model: nn.Module, mesh=None, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 over ``mesh`` (default: all ranks, on this process's device type): ``fully_shard`` on every
    transformer block, then on the root (embeddings, norms, head). Returns the model (sharded in place)."""
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def shard_masked_blocks(model: nn.Module, root: nn.Module, mesh=None) -> list[nn.Module]:
    """FSDP2 for a training step that drives the transformer blocks itself (the experiments start their forward at
    the first masked block and never call ``model``): ``fully_shard`` on every block that holds a masked layer,
    then on ``root``, the module whose forward is one step, with every parameter outside those blocks ignored.
    The frozen rest of the model stays whole and plain on every rank (evaluation and the cached block inputs use it
    outside the step), and ``root`` makes the blocks non-root FSDP modules, which FSDP2 reshards right after their
    forward (a root keeps its parameters gathered until the backward). Returns the sharded blocks."""
    blocks = [block for block in transformer_blocks(model) if masked_layers(block)]
    if not blocks:
        raise ValueError("fastmask.distributed.shard_masked_blocks: no transformer block of the model holds a masked "
                         "layer (call fm.apply first)")
    for block in blocks:
        fully_shard(block, mesh=mesh)
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    fully_shard(root, mesh=mesh, ignored_params={p for p in root.parameters() if id(p) not in in_blocks})
    return blocks


def replicate(model: nn.Module, **ddp_kwargs) -> DistributedDataParallel:
    """DDP: every rank keeps the whole model; the gradients of the trainable parameters (the logits) are
    all-reduced. ``model.module`` is the masked model (for fm.save_masks, fm.sparsity, ...)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [device.index])
    return DistributedDataParallel(model, **ddp_kwargs)


def save_masks(model: nn.Module, path) -> Optional[Path]:
    """fm.save_masks for a model sharded by FSDP2 or wrapped by DDP: every rank calls it (the logits and the masked
    weights of the fingerprint are all-gathered, layer by layer); rank 0 writes one consolidated mask file, the
    format of fm.save_masks, which a one-process fm.load_masks reads. Returns its path on rank 0, None elsewhere;
    every rank returns once it is written."""
    payload = io.mask_payload(_inner(model))
    written = io.write_masks(payload, path) if rank() == 0 else None
    barrier()
    return written


# Only the trainable state goes into a checkpoint (the logits and Adam's moments): the frozen weights come from the
# base model, so a checkpoint is 12 B per masked weight, not 18.
_STATE_OPTIONS = StateDictOptions(ignore_frozen_params=True)
CHECKPOINT_META = "fastmask_checkpoint.json"


def save_checkpoint(folder, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    extra: Optional[dict] = None) -> Path:
    """A sharded checkpoint of mask learning with torch.distributed.checkpoint (DCP): every rank writes its shards
    of the logits and of the optimizer state; rank 0 adds ``fastmask_checkpoint.json`` (the step, each layer's noise
    counter, ``extra``). Every rank calls it. Atomic: written into a temporary folder beside ``folder`` that rank 0
    renames once every rank has finished, so a run killed meanwhile leaves the previous checkpoint as the newest.
    A one-process model and optimizer work too (DCP without a process group)."""
    folder = Path(folder)
    staging = folder.parent / f".{folder.name}.tmp"
    if rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    model_state, optim_state = get_state_dict(_inner(model), optimizer, options=_STATE_OPTIONS)
    with _single_process_quiet():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(staging),
                 no_dist=not dist.is_initialized())
    if rank() == 0:
        counters = {name: [int(layer.step), bool(layer.auto_step)]
                    for name, layer in masked_layers(_inner(model)).items()}
        # version 2: "noise" (the noise definition the masks drew; version 1 checkpoints drew NOISE_FIRST_WORD)
        meta = {"format": "fastmask.distributed_checkpoint", "version": 2, "noise": NOISE, "step": int(step),
                "world_size": world_size(), "noise_counters": counters, "extra": extra or {}}
        atomic_write_text(staging / CHECKPOINT_META, json.dumps(meta, indent=1) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    barrier()
    return folder


def load_checkpoint(folder, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore a ``save_checkpoint`` folder into ``model`` (wrapped as it is now: FSDP2, DDP or one process) and
    ``optimizer``; returns its metadata (``step``, ``extra``, ...). DCP reshards, so the number of processes may
    differ from the run that wrote it. Every rank calls it."""
    folder = Path(folder)
    meta_path = folder / CHECKPOINT_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"fastmask.distributed.load_checkpoint: {folder} holds no {CHECKPOINT_META} (not a "
                                f"checkpoint, or one whose writing did not finish)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    noise = meta.setdefault("noise", NOISE_FIRST_WORD)
    if noise != NOISE:
        warnings.warn(f"fastmask.distributed.load_checkpoint: {folder} was written while the masks drew the noise "
                      f"{noise!r} (an older fastmask); training continued from it draws {NOISE!r}, so it is not the "
                      f"run the checkpoint came from", stacklevel=2)
    inner = _inner(model)
    model_state, optim_state = get_state_dict(inner, optimizer, options=_STATE_OPTIONS)
    state = {"model": model_state, "optim": optim_state}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(folder), no_dist=not dist.is_initialized())
    # strict=False: the frozen weights are not in a checkpoint by design; every trainable tensor was read by
    # dcp.load above, which fails on a key the checkpoint lacks.
    set_state_dict(inner, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    layers = masked_layers(inner)
    for name, (step, auto_step) in meta["noise_counters"].items():
        if name not in layers:
            raise ValueError(f"fastmask.distributed.load_checkpoint: {folder} has masks for layer {name!r}, which "
                             f"this model does not mask")
        layers[name].step, layers[name].auto_step = step, auto_step
    return meta


def _inner(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def _single_process_quiet():
    """Without a process group DCP reads and writes as one process (what we ask for) and says so in a warning."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a process group)."""
    if dist.is_initialized():
        dist.barrier()
