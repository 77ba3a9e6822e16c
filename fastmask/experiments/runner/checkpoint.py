"""Checkpoints of a run: ``TrainState`` (everything a step depends on), its (de)serialisation into
``state.safetensors`` + ``state.json`` with checksums (never pickle), the RNG states and MaskedLinear noise counters,
atomic ``save_checkpoint``, verified ``read_checkpoint`` / ``load_checkpoint`` (whole, or the DCP shards of an FSDP2
run) and ``checkpoint_folders``. ``CheckpointError`` names the file and the problem."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ... import distributed as fmd
from ...nn.masked_linear import masked_layers
from ...ref import NOISE, NOISE_FIRST_WORD
from ...ops._common import is_dtensor
from .config import ConfigError

CHECKPOINT_FORMAT = "fastmask.checkpoint"
# Version 2 added "sharded_state": the logits and optimizer state of an FSDP2 run in a DCP folder of the checkpoint;
# version 3 "noise": the noise definition the masks drew (fastmask.ref.NOISES; older ones drew NOISE_FIRST_WORD).
CHECKPOINT_VERSION = 3
SHARDED_STATE_DIR = "sharded"


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, corrupt or does not fit the run; the message says which file and why."""


# --- training state and its (de)serialisation ---------------------------------------------------------------
@dataclass
class TrainState:
    """Everything a step depends on. ``params``: the trainable tensors by name (restored in place); ``model``: its
    MaskedLinear noise counters are saved; ``streams``: data order; ``extra`` / ``extra_tensors``: anything else of
    the experiment (JSON types / tensors); ``history``: one dict per finished step."""

    params: dict
    optimizer: Any = None
    scheduler: Any = None
    model: Any = None
    streams: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    extra_tensors: dict = field(default_factory=dict)
    step: int = 0
    history: list = field(default_factory=list)


def _flatten(obj, key: str, tensors: dict):
    """JSON-able structure of ``obj`` with every tensor / ndarray moved into ``tensors`` (by path key)."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().to("cpu").clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        tensors[key] = torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj.copy())
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, f"{key}.k{i}", tensors), _flatten(v, f"{key}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint: cannot store a {type(obj).__name__} at {key}")


def _unflatten(obj, tensors: dict):
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy().astype(np.dtype(obj["dtype"]))
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__float__" in obj:
            return float(obj["__float__"])
    return obj


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _noise_counters(model) -> dict:
    return {name: [int(layer.step), bool(layer.auto_step)] for name, layer in masked_layers(model).items()}


def _canonical(payload: dict) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def is_sharded(state: TrainState) -> bool:
    """Whether the state's parameters are sharded over the processes (DTensors of an FSDP2 run)."""
    return any(is_dtensor(p) for p in state.params.values())


def save_checkpoint(state: TrainState, folder, staging: Optional[Path] = None) -> Path:
    """Write ``state`` to ``folder`` (created; replaced if present) atomically: a temporary folder beside it is
    filled, fsynced and renamed. Returns the folder. Sharded state (``is_sharded``): the parameters and the
    optimizer are not written here but by every rank into ``staging``/sharded (``Run.checkpoint``); ``staging`` is
    then the temporary folder, which this fills with the rest and renames."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    sharded = is_sharded(state)
    if sharded and staging is None:
        raise ValueError("save_checkpoint: sharded state needs the staging folder its shards were written to")
    tensors: dict = {}
    payload = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "noise": NOISE, "step": state.step,
        "sharded_state": SHARDED_STATE_DIR if sharded else None,
        "params": {} if sharded else {name: _flatten(p, f"params.{name}", tensors) for name, p in state.params.items()},
        "optimizer": None if state.optimizer is None or sharded
        else _flatten(state.optimizer.state_dict(), "optimizer", tensors),
        "scheduler": None if state.scheduler is None else _flatten(state.scheduler.state_dict(), "scheduler", tensors),
        "rng": _flatten(_rng_state(), "rng", tensors),
        "noise_counters": None if state.model is None else _noise_counters(state.model),
        "streams": {name: stream.state_dict() for name, stream in state.streams.items()},
        "extra": _flatten(state.extra, "extra", tensors),
        "extra_tensors": {name: _flatten(t, f"extra_tensors.{name}", tensors)
                          for name, t in state.extra_tensors.items()},
        "history": _flatten(state.history, "history", tensors),
    }
    blob = save_tensors(tensors)
    payload["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
    payload["json_sha256"] = hashlib.sha256(_canonical(payload)).hexdigest()
    staging = Path(staging or tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        for name, data in (("state.safetensors", blob),
                           ("state.json", (json.dumps(payload, indent=1) + "\n").encode())):
            with open(staging / name, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        if folder.exists():  # the same step written again (a resumed run): the new copy replaces it
            shutil.rmtree(folder)
        os.replace(staging, folder)
        _fsync_dir(folder.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_checkpoint(folder) -> tuple[dict, dict]:
    """(payload, tensors) of a checkpoint folder after verifying both checksums; CheckpointError naming the file
    and the problem otherwise."""
    folder = Path(folder)
    meta_path, tensor_path = folder / "state.json", folder / "state.safetensors"
    for path in (meta_path, tensor_path):
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder}: {path.name} is missing (an incomplete checkpoint)")
    try:
        payload = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"checkpoint {folder}: state.json is not valid JSON ({error}); truncated or "
                              f"corrupt") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {folder}: state.json is not a fastmask checkpoint")
    if payload.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {folder}: format version {payload.get('version')} is newer than this "
                              f"fastmask reads ({CHECKPOINT_VERSION}); upgrade fastmask")
    claimed = payload.pop("json_sha256", None)
    if claimed != hashlib.sha256(_canonical(payload)).hexdigest():
        raise CheckpointError(f"checkpoint {folder}: state.json fails its checksum (edited or corrupt)")
    blob = tensor_path.read_bytes()
    actual = hashlib.sha256(blob).hexdigest()
    if actual != payload.get("tensors_sha256"):
        raise CheckpointError(f"checkpoint {folder}: state.safetensors has sha256 {actual[:16]}..., state.json "
                              f"expects {str(payload.get('tensors_sha256'))[:16]}... ({len(blob)} bytes: truncated "
                              f"or corrupt)")
    try:
        tensors = load_tensors(blob)
    except Exception as error:  # noqa: BLE001 - any parse failure of a checksummed file is corruption
        raise CheckpointError(f"checkpoint {folder}: state.safetensors does not parse ({error})") from None
    return payload, tensors


def load_checkpoint(state: TrainState, folder) -> TrainState:
    """Restore ``state`` in place from a verified checkpoint; the names and shapes of the params, the optimizer
    and the data streams must match the run's. A sharded checkpoint loads into a sharded run of any number of
    processes or into one process; every rank of a sharded run calls this."""
    payload, tensors = read_checkpoint(folder)
    noise = payload.get("noise", NOISE_FIRST_WORD)
    if payload["noise_counters"] and noise != NOISE:  # no older checkpoint of the run would do either
        raise ConfigError(f"checkpoint {folder}: its masks drew the noise {noise!r} (an older fastmask), this "
                          f"fastmask draws {NOISE!r}: resuming would continue the run on another noise stream. "
                          f"Finish it with the fastmask that started it, or start it again in a new --out folder")
    if payload.get("sharded_state"):
        _load_sharded_state(state, Path(folder) / payload["sharded_state"])
    elif is_sharded(state):  # a mismatch of the command line, not a damaged checkpoint: no older one would do
        raise ConfigError(f"checkpoint {folder}: written by a run whose state was whole in each process (one "
                          f"process or DDP); resume it in one process or with --data-parallel ddp")
    else:
        _load_whole_state(state, folder, payload, tensors)
    if sorted(payload["streams"]) != sorted(state.streams):
        raise CheckpointError(f"checkpoint {folder}: data streams {sorted(payload['streams'])} differ from this "
                              f"run's {sorted(state.streams)}")
    if state.scheduler is not None and payload["scheduler"] is not None:
        state.scheduler.load_state_dict(_unflatten(payload["scheduler"], tensors))
    for name, stream in state.streams.items():
        stream.load_state_dict(payload["streams"][name])
    if state.model is not None and payload["noise_counters"] is not None:
        layers = masked_layers(state.model)
        for name, (step, auto) in payload["noise_counters"].items():
            if name in layers:
                layers[name].step, layers[name].auto_step = step, auto
    state.extra = _unflatten(payload["extra"], tensors)
    state.extra_tensors = {name: _unflatten(v, tensors) for name, v in payload["extra_tensors"].items()}
    state.history = _unflatten(payload["history"], tensors)
    state.step = int(payload["step"])
    _set_rng_state(_unflatten(payload["rng"], tensors))
    return state


def _load_sharded_state(state: TrainState, folder: Path) -> None:
    """The parameters and optimizer state of a sharded checkpoint (DCP, resharded to this run's processes, or read
    whole by one process)."""
    if state.model is None or state.optimizer is None:
        raise CheckpointError(f"checkpoint {folder.parent}: sharded state needs the run's model and optimizer")
    try:
        fmd.load_checkpoint(folder, state.model, state.optimizer)
    except Exception as error:  # noqa: BLE001 - DCP raises many kinds; each means this checkpoint is unusable
        raise CheckpointError(f"checkpoint {folder.parent}: its sharded state does not load "
                              f"({type(error).__name__}: {str(error)[:300]})") from None


def _load_whole_state(state: TrainState, folder, payload: dict, tensors: dict) -> None:
    params = {name: _unflatten(v, tensors) for name, v in payload["params"].items()}
    if sorted(params) != sorted(state.params):
        missing, extra = sorted(set(state.params) - set(params)), sorted(set(params) - set(state.params))
        raise CheckpointError(f"checkpoint {folder}: its parameters differ from this run's (missing {missing[:3]}, "
                              f"unexpected {extra[:3]})")
    for name, value in params.items():
        target = state.params[name]
        if tuple(target.shape) != tuple(value.shape):
            raise CheckpointError(f"checkpoint {folder}: parameter {name} has shape {list(value.shape)}, this run "
                                  f"has {list(target.shape)}")
    with torch.no_grad():
        for name, value in params.items():
            state.params[name].copy_(value)
    if state.optimizer is not None:
        if payload["optimizer"] is None:
            raise CheckpointError(f"checkpoint {folder}: holds no optimizer state")
        state.optimizer.load_state_dict(_unflatten(payload["optimizer"], tensors))


def checkpoint_folders(root) -> list[Path]:
    """The checkpoint folders under ``root``, newest (highest step) first; temporary folders left out."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)
