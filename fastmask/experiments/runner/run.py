"""The run itself: ``Run`` (the results folder, checkpoints every ``checkpoint_every`` steps, ``restore`` for
``--resume``, the training loop under a progress bar, history / metrics / masks / plots / report), ``open_run``
(the Run of each process under torchrun), ``run_cli`` (the body of an experiment's ``run_from_args``), and the
device, CPU-thread and seed helpers."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ... import distributed as fmd
from ...assets import AssetUnavailable, atomic_write_text
from ...io import save_masks
from .checkpoint import (SHARDED_STATE_DIR, CheckpointError, TrainState, checkpoint_folders, is_sharded,
                         load_checkpoint, save_checkpoint)
from .config import ConfigError, RunConfig, config_from_args, config_to_dict
from .report import _json_safe, plot_history

# Under torchrun: how long a rank waits in a collective (the others wait while rank 0 prepares the data: template
# perplexities, WordNet sets; minutes for a large model on a CPU).
DISTRIBUTED_TIMEOUT_S = 1800


# --- devices and seeds --------------------------------------------------------------------------------------
def resolve_device(spec: str):
    """"auto" -> cuda when available else cpu; otherwise torch.device(spec), checked to exist."""
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
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- the run ------------------------------------------------------------------------------------------------
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
    rank, world = fmd.init_if_launched(DISTRIBUTED_TIMEOUT_S)
    run = Run(config, resume=resume, overwrite=overwrite, experiment=experiment, log=log) if rank == 0 else None
    fmd.barrier()
    if rank != 0:
        run = Run(config, resume=resume, experiment=experiment, log=lambda message: None, main_process=False)
    if world > 1:
        run.log(f"fastmask: data parallel over {world} processes (torch.distributed)")
    return run, rank, world


def run_cli(config_cls, run_experiment, args: argparse.Namespace, experiment: str,
            run_errors: tuple = ()) -> int:
    """The body of an experiment module's ``run_from_args``: the config of the command line, then the run. A
    ConfigError propagates (fastmask.cli turns it into a usage error, exit 2); a bad checkpoint, an unreachable
    asset or one of ``run_errors`` (bad data files, masks, ...) ends the command with its message (exit 1)."""
    try:
        config = config_from_args(config_cls, args, experiment=experiment)
        run_experiment(config, resume=args.resume, overwrite=args.overwrite)
    except ConfigError:
        raise
    except (CheckpointError, AssetUnavailable, *run_errors) as error:
        raise SystemExit(f"fastmask run {experiment}: {error}") from None
    return 0
