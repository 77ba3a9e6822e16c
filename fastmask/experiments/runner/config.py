"""Run configs: ``RunConfig`` (the fields every experiment has), ``ConfigError`` / ``check``, and the command-line
wiring: one ``--flag`` per field typed from its annotation (``add_config_arguments``), values coerced from flags or a
JSON / YAML ``--config`` file, and ``config_from_args`` (defaults <- file <- flags; with ``--resume`` the stored
config of the run). See the package docstring (fastmask.experiments.runner) for how an experiment uses them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

# Fields that may differ between a run and its resumption (they do not change any number the run computes).
# "seeds" / "targets": the cells of a multi-run (runner/cells.py: each runs in a folder of its own, so adding cells on
# --resume changes no finished cell's numbers).
RUN_CONTROL_FIELDS = ("progress", "out", "data_dir", "checkpoint_every", "keep_checkpoints", "seeds", "targets")


def help_metadata(text: str) -> dict:
    """`field(metadata=help_metadata("..."))`: the help text a config field shows as a CLI flag."""
    return {"help": text}


class ConfigError(ValueError):
    """A bad configuration value or file; the message names the field (or key) and what was expected."""


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
            # A flag's values (nargs="+") may be comma separated too: "--seeds 0,1,2" == "--seeds 0 1 2"; an empty
            # string is the empty list ("--sweep-sparsities ''").
            items = [part for item in items for part in (item.split(",") if isinstance(item, str) else [item])
                     if part != ""]
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
