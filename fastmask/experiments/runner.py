"""The machinery every ``fastmask run <name>`` experiment shares: typed configs, a training loop with a progress bar,
atomic checkpoints with bit-for-bit ``--resume``, and a results folder (metrics, history, masks, plots, report).

Configs: a dataclass deriving from ``RunConfig``; each field becomes a ``--flag`` (underscores -> dashes) typed from
its annotation (int, float, str, bool, Optional[...], list[...], tuple, Literal[...]), with ``metadata={"help": ...}``.
Values come from the defaults, then a ``--config FILE`` (JSON, or YAML when PyYAML is installed; an unknown key is
an error naming it), then the flags given on the command line (flags win). ``validate()`` checks them.

    @dataclass
    class MyConfig(RunConfig):
        lr: float = field(default=0.1, metadata={"help": "Adam learning rate"})
        def validate(self):
            super().validate(); check(self.lr > 0, "lr", "a positive number", self.lr)

    def add_arguments(parser):                       # fastmask.cli calls these two
        add_config_arguments(parser, MyConfig)         # --config, --resume, --overwrite, one flag per field
    def run_from_args(args) -> int:
        config = config_from_args(MyConfig, args, experiment="mine")
        run = Run(config, resume=args.resume, overwrite=args.overwrite)
        state = TrainState(params={"logits": logits}, optimizer=opt, model=model,
                           streams={"train": BatchStream(len(data), batch_size=8, seed=config.seed)})
        run.restore(state)                            # --resume: the newest valid checkpoint -> state
        def step_fn(step):                            # one optimisation step; returns the row of history.csv
            idx = state.streams["train"].next(); ...; opt.step(); return {"loss": loss.item(), "sparsity": s}
        history = run.train(state, step_fn, show=("loss", "sparsity"))
        run.save_masks(model); run.plot_history(history, ["loss"], "loss.png")
        run.write_metrics({...}); run.write_report(markdown); print(run.finished_message())

Checkpoints (``<out>/checkpoints/step-00000050/``): ``state.safetensors`` (every tensor: trainable params, optimizer
state, RNG states, extra tensors) and ``state.json`` (step, data-stream positions, history so far, optimizer /
scheduler scalars, python and numpy RNG, MaskedLinear noise counters, ``extra``, and two sha256: of the tensors file
and of the JSON itself). Written into a temporary folder and renamed into place, so a killed run leaves either the
whole checkpoint or none; a truncated or edited checkpoint fails its checksum and is reported, never loaded (resume
falls back to the newest valid one). Never pickle.

Bit-for-bit resume: a resumed run continues from the exact optimizer, RNG, noise-counter and data-order state, so its
masks and history equal those of an uninterrupted run. The experiment's step must depend only on that state: draw
randomness from torch/numpy/random or from ``BatchStream`` / ``fastmask.set_step(model, step)``, and keep wall-clock
times out of the history (put them in metrics.json).

Results (``<out>/``): config.json (loadable with ``--config``), history.csv (one row per step), metrics.json,
masks/ (fastmask.save_masks), *.png plots, report.md.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import shutil
import sys
import tempfile
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from ..assets import atomic_write_bytes, atomic_write_text

CHECKPOINT_FORMAT = "fastmask.checkpoint"
# Version 2 added "sharded_state": the logits and optimizer state of an FSDP2 run in a DCP folder of the checkpoint.
CHECKPOINT_VERSION = 2
SHARDED_STATE_DIR = "sharded"
# Fields that may differ between a run and its resumption (they do not change any number the run computes).
RUN_CONTROL_FIELDS = ("progress", "out", "data_dir", "checkpoint_every", "keep_checkpoints")


def help_metadata(text: str) -> dict:
    """`field(metadata=help_metadata("..."))`: the help text a config field shows as a CLI flag."""
    return {"help": text}


# Under torchrun: how long a rank waits in a collective (the others wait while rank 0 prepares the data: template
# perplexities, WordNet sets; minutes for a large model on a CPU).
DISTRIBUTED_TIMEOUT_S = 1800


class ConfigError(ValueError):
    """A bad configuration value or file; the message names the field (or key) and what was expected."""


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, corrupt or does not fit the run; the message says which file and why."""


def check(condition: bool, name: str, expected: str, value: Any) -> None:
    """Raise ConfigError("<name> must be <expected>, got <value>") unless ``condition``."""
    if not condition:
        raise ConfigError(f"{name} must be {expected}, got {value!r}")


# --- configs ------------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    """Fields every experiment has. Subclass it and add yours (each needs a default)."""

    out: Optional[str] = field(default=None, metadata={"help": "results folder (default: fastmask-runs/<experiment>)"})
    seed: int = field(default=0, metadata={"help": "seed of torch / numpy / random, mask noise and data order"})
    steps: int = field(default=100, metadata={"help": "optimisation steps"})
    checkpoint_every: int = field(default=25, metadata={"help": "steps between checkpoints (0: only at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept on disk"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    data_dir: Optional[str] = field(default=None, metadata={
        "help": "shared data folder (default: $FASTMASK_DATA, else a shared/data folder beside the checkout)"})
    threads: int = field(default=0, metadata={"help": (
        "torch CPU threads (0: auto = the cores left free by the load average, at least 1; give the same value "
        "to --resume a CPU run bit for bit)")})

    def validate(self) -> "RunConfig":
        check(isinstance(self.seed, int) and 0 <= self.seed < 2**63, "seed", "an int in [0, 2**63)", self.seed)
        check(isinstance(self.steps, int) and self.steps >= 1, "steps", "an int >= 1", self.steps)
        check(isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0, "checkpoint_every",
              "an int >= 0", self.checkpoint_every)
        check(isinstance(self.keep_checkpoints, int) and self.keep_checkpoints >= 1, "keep_checkpoints",
              "an int >= 1", self.keep_checkpoints)
        check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
              "auto, cpu, cuda or cuda:N", self.device)
        check(isinstance(self.threads, int) and self.threads >= 0, "threads", "an int >= 0 (0: auto)", self.threads)
        return self


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_types(config_cls) -> dict[str, Any]:
    return typing.get_type_hints(config_cls)


def _unwrap_optional(annotation) -> tuple[Any, bool]:
    if typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _coerce(name: str, annotation, value: Any, where: str) -> Any:
    """``value`` converted to the field's type (strings from flags, numbers/lists from JSON/YAML); ConfigError
    naming the field and the expected type otherwise."""
    inner, optional = _unwrap_optional(annotation)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{name} ({where}) must not be null")
    origin = typing.get_origin(inner)
    try:
        if origin is typing.Literal:
            choices = typing.get_args(inner)
            if value not in choices:
                raise ConfigError(f"{name} ({where}) must be one of {list(choices)}, got {value!r}")
            return value
        if origin in (list, tuple) or inner in (list, tuple):
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)):
                raise ConfigError(f"{name} ({where}) must be a list, got {value!r}")
            item_types = typing.get_args(inner)
            item_type = item_types[0] if item_types else Any
            converted = [item if item_type is Any else _coerce(f"{name}[{i}]", item_type, item, where)
                         for i, item in enumerate(items)]
            return tuple(converted) if (origin or inner) is tuple else converted
        if inner is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ConfigError(f"{name} ({where}) must be true or false, got {value!r}")
        if inner is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ConfigError(f"{name} ({where}) must be an int, got {value!r}")
            return int(value)
        if inner is float:
            if isinstance(value, bool):
                raise ConfigError(f"{name} ({where}) must be a number, got {value!r}")
            return float(value)
        if inner is str:
            if not isinstance(value, str):
                raise ConfigError(f"{name} ({where}) must be a string, got {value!r}")
            return value
    except (TypeError, ValueError) as error:
        if isinstance(error, ConfigError):
            raise
        expected = getattr(inner, "__name__", str(inner))
        raise ConfigError(f"{name} ({where}) must be {expected}, got {value!r}") from None
    return value


def add_config_arguments(parser: argparse.ArgumentParser, config_cls) -> None:
    """Add ``--config FILE``, ``--resume``, ``--overwrite`` and one flag per field of ``config_cls`` to ``parser``.
    Field flags default to "not given" (argparse.SUPPRESS) so that config_from_args knows which ones won."""
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="JSON (or YAML) file of config values; flags given on the command line win")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its newest valid checkpoint (bit for bit)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run's results in --out")
    types = _field_types(config_cls)
    defaults = config_cls()
    for f in fields(config_cls):
        default = getattr(defaults, f.name)
        # argparse %-formats help strings: a literal "%" (e.g. "10% warm-up") must reach it as "%%"
        help_text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")
        inner, _ = _unwrap_optional(types[f.name])
        if inner is bool:
            parser.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
            continue
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if typing.get_origin(inner) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(inner))
        elif typing.get_origin(inner) in (list, tuple) or inner in (list, tuple):
            kwargs["nargs"] = "+"
        parser.add_argument(_flag(f.name), **kwargs)


def read_config_file(path) -> dict:
    """The mapping in a JSON or YAML config file (``.yaml`` / ``.yml`` need PyYAML)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"--config {path}: YAML needs PyYAML (pip install pyyaml), or use a .json file") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"--config {path}: not valid YAML ({error})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"--config {path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of field names to values, got {type(data).__name__}")
    return data


def config_from_dict(config_cls, data: dict, where: str = "dict", base=None):
    """``base`` (default: the defaults) updated with ``data``; unknown keys and bad values are ConfigErrors."""
    types = _field_types(config_cls)
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(k for k in data if k.replace("-", "_") not in known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    values = dataclasses.asdict(base) if base is not None else {}
    for key, value in data.items():
        name = key.replace("-", "_")
        values[name] = _coerce(name, types[name], value, where)
    config = config_cls(**values)
    config.validate()
    return config


def config_to_dict(config) -> dict:
    """Plain JSON types (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def load_config(config_cls, path):
    """A config from a JSON/YAML file over the defaults."""
    return config_from_dict(config_cls, read_config_file(path), where=f"--config {path}")


def config_from_args(config_cls, args: argparse.Namespace, experiment: str):
    """The config of a command line: defaults <- ``--config`` file <- flags given. With ``--resume`` the stored
    config of ``--out`` is the base instead of the defaults, and a value that would change the run's numbers is an
    error naming it. ``out`` defaults to ``fastmask-runs/<experiment>``."""
    types = _field_types(config_cls)
    file_values = read_config_file(args.config) if getattr(args, "config", None) else {}
    given = {f.name: getattr(args, f.name) for f in fields(config_cls) if hasattr(args, f.name)}
    flag_values = {name: _coerce(name, types[name], value, _flag(name)) for name, value in given.items()}
    config = config_from_dict(config_cls, file_values, where=f"--config {args.config}") if file_values else \
        config_cls()
    config = config_from_dict(config_cls, flag_values, where="command line", base=config)
    if config.out is None:
        config = dataclasses.replace(config, out=str(Path("fastmask-runs") / experiment))
    if getattr(args, "resume", False):
        stored_path = Path(config.out) / "config.json"
        if stored_path.is_file():
            stored = config_from_dict(config_cls, read_config_file(stored_path), where=str(stored_path))
            overrides = {**file_values, **flag_values}
            merged = config_from_dict(config_cls, {k.replace("-", "_"): v for k, v in overrides.items()},
                                      where="command line", base=stored)
            changed = [f.name for f in fields(config_cls) if f.name not in RUN_CONTROL_FIELDS
                       and getattr(merged, f.name) != getattr(stored, f.name)]
            if changed:
                raise ConfigError(f"--resume: {changed} differ from the stored run in {stored_path} (a resumed run "
                                  f"must compute the same numbers); drop those flags or start a new --out")
            config = dataclasses.replace(merged, out=config.out)
    config.validate()
    return config


# --- devices and seeds --------------------------------------------------------------------------------------
def run_cli(config_cls, run_experiment, args: argparse.Namespace, experiment: str,
            run_errors: tuple = ()) -> int:
    """The body of an experiment module's ``run_from_args``: the config of the command line, then the run. A
    ConfigError propagates (fastmask.cli turns it into a usage error, exit 2); a bad checkpoint, an unreachable
    asset or one of ``run_errors`` (bad data files, masks, ...) ends the command with its message (exit 1)."""
    from ..assets import AssetUnavailable

    try:
        config = config_from_args(config_cls, args, experiment=experiment)
        run_experiment(config, resume=args.resume, overwrite=args.overwrite)
    except ConfigError:
        raise
    except (CheckpointError, AssetUnavailable, *run_errors) as error:
        raise SystemExit(f"fastmask run {experiment}: {error}") from None
    return 0


def resolve_device(spec: str):
    """"auto" -> cuda when available else cpu; otherwise torch.device(spec), checked to exist."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device must be available here, got {spec!r} (no CUDA GPU visible)")
    return device


def choose_threads(requested: int, device) -> tuple[int, str]:
    """Set torch's CPU threads. Auto leaves a core for each process already running (the load average, rounded
    up) and uses at least 1: OpenMP threads that share a core wait for each other at every op (measured on a
    shared 2-core machine: one probe epoch 10 s with 2 threads, 0.4 s with 1; a SmolLM2 knowledge step 10 s with 2,
    3.7 s with 1), while a spare core only speeds an op up by less than 2x. Returns (threads, why)."""
    import torch

    if requested > 0:
        torch.set_num_threads(requested)
        return requested, "--threads"
    if device.type != "cpu":
        return torch.get_num_threads(), "auto: torch default (the work runs on the GPU)"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = os.cpu_count() or 1
    threads = max(1, min(torch.get_num_threads(), cores - math.ceil(load)))
    torch.set_num_threads(threads)
    return threads, f"auto: {cores} cores, load average {load:.1f}"


def seed_everything(seed: int) -> None:
    """Seed python's random, numpy and torch (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- data order ---------------------------------------------------------------------------------------------
class BatchStream:
    """Endless batches of indices into ``n`` items: a fresh permutation per epoch (from ``seed`` and the epoch, not
    from a global RNG), so its whole state is (epoch, position) and a resumed run sees the same batches."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True):
        if n < 1 or batch_size < 1:
            raise ValueError(f"BatchStream: n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
        self.n, self.batch_size, self.seed, self.shuffle = n, min(batch_size, n), seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = None

    def _permutation(self) -> list[int]:
        import torch

        if not self.shuffle:
            return list(range(self.n))
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        return torch.randperm(self.n, generator=generator).tolist()

    def next(self) -> list[int]:
        """The next batch of indices; an epoch's last batch is completed from the next epoch (equal batch sizes)."""
        batch = []
        while len(batch) < self.batch_size:
            if self._order is None:
                self._order = self._permutation()
            take = self._order[self.position:self.position + self.batch_size - len(batch)]
            batch += take
            self.position += len(take)
            if self.position >= self.n:
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return batch

    def state_dict(self) -> dict:
        return {"n": self.n, "batch_size": self.batch_size, "seed": self.seed, "shuffle": self.shuffle,
                "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        differ = [k for k in ("n", "batch_size", "seed", "shuffle") if state.get(k) != mine[k]]
        if differ:
            raise CheckpointError(f"BatchStream: the checkpoint's data stream differs in {differ} "
                                  f"({ {k: state.get(k) for k in differ} } vs { {k: mine[k] for k in differ} })")
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


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
    import numpy as np
    import torch

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
    import numpy as np

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
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _noise_counters(model) -> dict:
    from ..nn.masked_linear import masked_layers

    return {name: [int(layer.step), bool(layer.auto_step)] for name, layer in masked_layers(model).items()}


def _canonical(payload: dict) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def is_sharded(state: TrainState) -> bool:
    """Whether the state's parameters are sharded over the processes (DTensors of an FSDP2 run)."""
    from ..ops._common import is_dtensor

    return any(is_dtensor(p) for p in state.params.values())


def save_checkpoint(state: TrainState, folder, staging: Optional[Path] = None) -> Path:
    """Write ``state`` to ``folder`` (created; replaced if present) atomically: a temporary folder beside it is
    filled, fsynced and renamed. Returns the folder. Sharded state (``is_sharded``): the parameters and the
    optimizer are not written here but by every rank into ``staging``/sharded (``Run.checkpoint``); ``staging`` is
    then the temporary folder, which this fills with the rest and renames."""
    from safetensors.torch import save as save_tensors

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    sharded = is_sharded(state)
    if sharded and staging is None:
        raise ValueError("save_checkpoint: sharded state needs the staging folder its shards were written to")
    tensors: dict = {}
    payload = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": state.step,
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
    from safetensors.torch import load as load_tensors

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
        from ..nn.masked_linear import masked_layers

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
    from .. import distributed as fmd

    if state.model is None or state.optimizer is None:
        raise CheckpointError(f"checkpoint {folder.parent}: sharded state needs the run's model and optimizer")
    try:
        fmd.load_checkpoint(folder, state.model, state.optimizer)
    except Exception as error:  # noqa: BLE001 - DCP raises many kinds; each means this checkpoint is unusable
        raise CheckpointError(f"checkpoint {folder.parent}: its sharded state does not load "
                              f"({type(error).__name__}: {str(error)[:300]})") from None


def _load_whole_state(state: TrainState, folder, payload: dict, tensors: dict) -> None:
    import torch

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


# --- plots --------------------------------------------------------------------------------------------------
def save_figure(fig, path) -> Path:
    """Save a matplotlib figure atomically (PNG at 120 dpi) and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_history(history: Sequence[dict], keys: Sequence[str], path, title: str = "",
                 secondary: Sequence[str] = ()) -> Optional[Path]:
    """Line plot of history columns over steps (``secondary`` ones on a right-hand axis). None without matplotlib."""
    plt = pyplot()
    if plt is None or not history:
        return None
    steps = [row["step"] for row in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        ax.plot(steps, [row.get(key, float("nan")) for row in history], label=key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if secondary:
        right = ax.twinx()
        for i, key in enumerate(secondary):
            right.plot(steps, [row.get(key, float("nan")) for row in history], "--", color=f"C{len(keys) + i}",
                       label=key)
        right.set_ylabel(", ".join(secondary))
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, fontsize=8, loc="best")
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


# --- the run ------------------------------------------------------------------------------------------------
def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # 0-dim tensors / numpy scalars
        return _json_safe(value.item())
    return value


class Run:
    """A results folder: config.json, checkpoints/, history.csv, metrics.json, masks/, plots, report.md.

    A fresh run refuses a folder that already holds a run unless ``overwrite`` (then the old results go);
    ``resume=True`` keeps the folder and ``restore`` continues from its newest valid checkpoint."""

    def __init__(self, config: RunConfig, *, resume: bool = False, overwrite: bool = False,
                 experiment: Optional[str] = None, log=None, main_process: bool = True):
        self.config = config
        self.dir = Path(config.out)
        self.resume = resume
        # main_process=False (the other ranks of a data-parallel run): read checkpoints, write nothing, no progress
        # bar; the main process owns the folder and must have set it up first.
        self.main_process = main_process
        self.log = log or (lambda message: print(message, file=sys.stderr))
        self.experiment = experiment or type(config).__name__
        self.threads, self.threads_reason = choose_threads(config.threads, resolve_device(config.device))
        if not main_process:
            return
        stored = self.dir / "config.json"
        # A folder with a config but no checkpoint and no results is a run that failed while setting up: reusable.
        holds_run = stored.exists() and (bool(checkpoint_folders(self.dir / "checkpoints"))
                                         or (self.dir / "metrics.json").exists())
        if holds_run and not resume:
            if not overwrite:
                raise ConfigError(f"out: {self.dir} already holds a run (checkpoints or results); pass --resume to "
                                  f"continue it, --overwrite to replace it, or another --out")
            for name in ("checkpoints", "masks"):
                shutil.rmtree(self.dir / name, ignore_errors=True)
            for path in self.dir.glob("*"):
                if path.is_file():
                    path.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        # The plain config mapping: `--config <out>/config.json` reproduces the run.
        atomic_write_text(stored, json.dumps(config_to_dict(config), indent=2) + "\n")

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def report_path(self) -> Path:
        return self.dir / "report.md"

    # -- checkpoints --
    def checkpoint(self, state: TrainState) -> Path:
        """Save ``state`` as checkpoints/step-<step>/ and keep only the newest ``keep_checkpoints``. Replicated
        state (one process, DDP): the main process writes it all. Sharded state (FSDP2): every rank calls this and
        writes its shards of the logits and the optimizer into sharded/ (DCP), then the main process adds the rest
        and renames the whole folder into place: a run killed meanwhile leaves the previous checkpoint newest."""
        from .. import distributed as fmd

        folder = self.checkpoint_dir / f"step-{state.step:08d}"
        staging = None
        if is_sharded(state):
            staging = self.checkpoint_dir / f".{folder.name}.sharded.tmp"
            if self.main_process:
                shutil.rmtree(staging, ignore_errors=True)
            fmd.barrier()
            fmd.save_checkpoint(staging / SHARDED_STATE_DIR, state.model, state.optimizer, state.step)
        if self.main_process:
            save_checkpoint(state, folder, staging=staging)
            for old in checkpoint_folders(self.checkpoint_dir)[self.config.keep_checkpoints:]:
                shutil.rmtree(old, ignore_errors=True)
            self.write_history(state.history)
        if staging is not None:
            fmd.barrier()  # no rank goes on (and maybe dies) before the checkpoint is complete
        return folder

    def restore(self, state: TrainState) -> bool:
        """With ``resume``: load the newest checkpoint that verifies into ``state`` (corrupt ones are reported and
        skipped) and return True; False when there is nothing to resume (the run starts at step 0)."""
        if not self.resume:
            return False
        folders = checkpoint_folders(self.checkpoint_dir)
        for folder in folders:
            try:
                load_checkpoint(state, folder)
            except CheckpointError as error:
                self.log(f"fastmask: skipping checkpoint: {error}")
                continue
            self.log(f"fastmask: resumed from {folder} (step {state.step})")
            return True
        self.log(f"fastmask: --resume: no {'valid ' if folders else ''}checkpoint in {self.checkpoint_dir}; "
                 f"starting at step 0")
        return False

    # -- the loop --
    def train(self, state: TrainState, step_fn: Callable[[int], dict], *, steps: Optional[int] = None,
              show: Iterable[str] = (), desc: Optional[str] = None,
              on_checkpoint: Optional[Callable[[TrainState], None]] = None) -> list[dict]:
        """Run ``step_fn(step)`` for step = state.step .. steps-1 (default: config.steps) under a tqdm bar whose
        postfix shows the ``show`` keys (all keys when empty). Each returned dict (floats) becomes a history row
        (with "step"); a checkpoint is written every ``checkpoint_every`` steps and after the last one."""
        from tqdm.auto import tqdm

        total = self.config.steps if steps is None else steps
        every = self.config.checkpoint_every
        show = tuple(show)
        bar = tqdm(total=total, initial=state.step, desc=desc or self.experiment,
                   disable=not (self.config.progress and self.main_process), dynamic_ncols=True)
        try:
            while state.step < total:
                step = state.step
                row = step_fn(step)
                if not isinstance(row, dict):
                    raise TypeError(f"step_fn must return a dict of floats, got {type(row).__name__}")
                row = {"step": step, **{k: _json_safe(v) for k, v in row.items()}}
                state.history.append(row)
                state.step = step + 1
                bar.update(1)
                keys = show or [k for k in row if k != "step"]
                bar.set_postfix({k: f"{row[k]:.4g}" if isinstance(row.get(k), float) else row.get(k)
                                 for k in keys if k in row}, refresh=False)
                if state.step == total or (every and state.step % every == 0):
                    self.checkpoint(state)
                    if on_checkpoint is not None:
                        on_checkpoint(state)
        finally:
            bar.close()
        self.write_history(state.history)
        return state.history

    # -- results --
    def write_history(self, history: Sequence[dict]) -> Path:
        """history.csv: one row per step, columns in order of first appearance (written by the main process)."""
        if not self.main_process:
            return self.path("history.csv")
        columns: list[str] = []
        for row in history:
            columns += [k for k in row if k not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns or ["step"], lineterminator="\n")
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v)
                             for k, v in row.items()})
        return atomic_write_text(self.path("history.csv"), buffer.getvalue())

    def write_metrics(self, metrics: dict) -> Path:
        """metrics.json (non-finite numbers become null)."""
        return atomic_write_text(self.path("metrics.json"), json.dumps(_json_safe(metrics), indent=2) + "\n")

    def save_masks(self, model) -> Path:
        """The model's masks in fastmask.save_masks format under masks/."""
        from ..io import save_masks

        return save_masks(model, self.path("masks"))

    def plot_history(self, history, keys, name: str, title: str = "", secondary=()) -> Optional[Path]:
        return plot_history(history, keys, self.path(name), title=title, secondary=secondary)

    def write_report(self, markdown: str) -> Path:
        return atomic_write_text(self.report_path, markdown if markdown.endswith("\n") else markdown + "\n")

    def finished_message(self) -> str:
        return f"fastmask: report: {self.report_path.resolve()}\nfastmask: results folder: {self.dir.resolve()}"


def open_run(config: RunConfig, *, resume: bool, overwrite: bool, experiment: str, log=None) -> tuple:
    """(run, rank, world): the Run of this process, alone or under torchrun (``fastmask.distributed
    .init_if_launched``). Data parallel, rank 0 sets the results folder up first and owns it; the other ranks get a
    Run that reads checkpoints and writes nothing (and logs nothing)."""
    from .. import distributed as fmd

    rank, world = fmd.init_if_launched(DISTRIBUTED_TIMEOUT_S)
    run = Run(config, resume=resume, overwrite=overwrite, experiment=experiment, log=log) if rank == 0 else None
    fmd.barrier()
    if rank != 0:
        run = Run(config, resume=resume, experiment=experiment, log=lambda message: None, main_process=False)
    if world > 1:
        run.log(f"fastmask: data parallel over {world} processes (torch.distributed)")
    return run, rank, world


def read_history(path) -> list[dict]:
    """history.csv back as dicts of floats (ints for "step"); empty cells are None."""
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for raw in csv.DictReader(handle):
            row = {}
            for key, value in raw.items():
                if value == "" or value is None:
                    row[key] = None
                elif key == "step":
                    row[key] = int(value)
                else:
                    try:
                        row[key] = float(value)
                    except ValueError:
                        row[key] = value
            rows.append(row)
    return rows


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 4) -> str:
    """A GitHub-markdown table; floats printed with ``digits`` significant digits."""
    def cell(value):
        if isinstance(value, float):
            return "n/a" if not math.isfinite(value) else f"{value:.{digits}g}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


__all__ = ["RunConfig", "ConfigError", "CheckpointError", "check", "add_config_arguments", "config_from_args",
           "config_from_dict", "config_to_dict", "load_config", "read_config_file", "resolve_device",
           "seed_everything", "BatchStream", "TrainState", "save_checkpoint", "read_checkpoint", "load_checkpoint",
           "checkpoint_folders", "Run", "read_history", "plot_history", "save_figure", "pyplot", "markdown_table"]
