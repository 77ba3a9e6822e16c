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

Machine-wide cache (``$FASTMASK_CACHE/<kind>/<key>``): what a run computes from a model and its data that later runs
would compute again (template perplexities, block inputs), keyed by ``weights_key`` / ``content_key``; see ``cache``.

The package's modules: ``config`` (RunConfig, ConfigError, flags and config files), ``checkpoint`` (TrainState,
save / read / load checkpoints), ``data`` (BatchStream), ``run`` (Run, open_run, run_cli, devices, threads, seeds),
``report`` (plots, history.csv, markdown tables) and ``cache`` (the machine-wide cache). Import from the package: it
re-exports every name.
"""

from __future__ import annotations

from . import cache
from .cache import content_key, weights_key
from .checkpoint import (CheckpointError, TrainState, checkpoint_folders, load_checkpoint, read_checkpoint,
                         save_checkpoint)
from .config import (ConfigError, RunConfig, add_config_arguments, check, config_from_args, config_from_dict,
                     config_to_dict, load_config, read_config_file)
from .data import BatchStream
from .report import markdown_table, plot_history, pyplot, read_history, save_figure
from .run import Run, resolve_device, seed_everything

# Importable from here too (the experiments and the tests use them), though not in __all__.
from .checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, SHARDED_STATE_DIR, _canonical, _flatten,  # noqa: F401
                         _fsync_dir, _load_sharded_state, _load_whole_state, _noise_counters, _rng_state,  # noqa: F401
                         _set_rng_state, _unflatten, is_sharded)  # noqa: F401
from .config import (RUN_CONTROL_FIELDS, _coerce, _field_types, _flag, _unwrap_optional,  # noqa: F401
                     help_metadata)  # noqa: F401
from .report import _json_safe  # noqa: F401
from .run import DISTRIBUTED_TIMEOUT_S, choose_threads, open_run, run_cli  # noqa: F401

__all__ = ["RunConfig", "ConfigError", "CheckpointError", "check", "add_config_arguments", "config_from_args",
           "config_from_dict", "config_to_dict", "load_config", "read_config_file", "resolve_device",
           "seed_everything", "BatchStream", "TrainState", "save_checkpoint", "read_checkpoint", "load_checkpoint",
           "checkpoint_folders", "Run", "read_history", "plot_history", "save_figure", "pyplot", "markdown_table",
           "cache", "weights_key", "content_key"]
