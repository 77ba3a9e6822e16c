"""Runs made of several whole runs ("cells": one per seed, or per target x seed), each a complete run folder of its
own under ``<out>`` with its checkpoints, and a summary over the finished cells rewritten after each one.

    run_cells(config, [(name, cell_config), ...], run_one, finished=..., summarise=..., resume=..., ...)

``--resume`` skips the cells whose folder holds finished results and resumes the others from their newest
checkpoint, so cells can be added to a run later (``seeds`` and ``targets`` are run-control fields).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

from ...assets import atomic_write_text
from .config import ConfigError, RunConfig, config_to_dict


def read_finished(folder: Path) -> Optional[dict]:
    """The metrics.json of a cell folder, or None when it is missing or unreadable (then the cell runs again)."""
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def run_cells(config: RunConfig, cells: Sequence[tuple[str, RunConfig]], run_one: Callable, *,
              finished: Callable[[RunConfig], Optional[dict]], summarise: Callable[[list], dict],
              resume: bool = False, overwrite: bool = False, log=None) -> dict:
    """Run ``run_one(cell_config, resume=, overwrite=, log=)`` for each ``(name, cell_config)`` (``cell_config.out``
    a folder under ``config.out``), skipping under ``resume`` the cells for which ``finished(cell_config)`` returns
    their metrics, and call ``summarise(metrics of the cells done so far)`` after each (it writes the summary
    files). Returns its last result ({} in the non-main processes of a data-parallel run)."""
    if not cells:
        raise ConfigError("a multi-run needs at least one cell (seed or target), got none")
    out = Path(config.out)
    cell_dirs = [Path(cell.out) for _, cell in cells]
    holds = (out / "metrics.json").exists() or any(d.is_dir() for d in cell_dirs)
    if holds and not resume:
        if not overwrite:
            raise ConfigError(f"out: {out} already holds a run (cell folders or results); pass --resume to continue "
                              f"it, --overwrite to replace it, or another --out")
        for folder in cell_dirs:
            shutil.rmtree(folder, ignore_errors=True)
        for path in out.glob("*"):
            if path.is_file():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(config_to_dict(config), indent=2) + "\n")
    say = log or print
    done, main, summary = [], True, {}
    for name, cell in cells:
        metrics = finished(cell) if resume else None
        if metrics is not None:
            say(f"fastmask: {name}: finished results in {cell.out}, not rerun")
        else:
            metrics = run_one(cell, resume=resume, overwrite=overwrite, log=log)
        if not metrics:  # a non-main process of a data-parallel run: rank 0 writes the results
            main = False
            continue
        done.append(metrics)
        summary = summarise(done)
    if not main:
        return {}
    say(f"fastmask: report over {len(done)} runs: {(out / 'report.md').resolve()}")
    return summary


__all__ = ["run_cells", "read_finished"]
