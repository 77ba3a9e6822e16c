"""Result files of the benchmark suite: the environment columns every row carries, and the CSV files.

One file per (device, part): ``gpu_masked_linear.csv``, ``gpu_model_step.csv``, ``cpu_masked_linear.csv``,
``cpu_model_step.csv``; smoke runs (tiny shapes, a check of the code, not a measurement) write ``smoke_*.csv``,
which the report ignores. Rows are only ever appended. A file whose header lacks a column of the new rows is
rewritten with the union of the columns (old rows keep their values, new cells stay empty), atomically: the
new content goes to a temporary file beside the old one, then replaces it.
"""

from __future__ import annotations

import csv
import io
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Optional

from ..assets import atomic_write_text

# Where `fastmask bench` writes when neither --out nor this variable says otherwise: the current directory.
OUT_ENV = "FASTMASK_BENCH_OUT"
DEFAULT_OUT = "bench-results"
SMOKE_PREFIX = "smoke_"
# The columns that open every row, in this order (the rest follow in the order the runner writes them).
ENV_COLUMNS = ("date", "hardware", "device", "torch", "cuda", "triton", "git_sha", "smoke")


def out_dir(flag: Optional[str]) -> Path:
    """The folder a run writes to: --out, else $FASTMASK_BENCH_OUT, else ./bench-results."""
    return Path(flag or os.environ.get(OUT_ENV) or DEFAULT_OUT)


def file_name(device_type: str, part: str, smoke: bool) -> str:
    """``gpu_masked_linear.csv`` / ``cpu_model_step.csv`` / ``smoke_cpu_model_step.csv``."""
    device = "gpu" if device_type == "cuda" else device_type
    return f"{SMOKE_PREFIX if smoke else ''}{device}_{part}.csv"


def _git(args: list[str], cwd: Path) -> Optional[str]:
    try:
        return subprocess.check_output(["git", *args], cwd=cwd, stderr=subprocess.DEVNULL, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_sha() -> str:
    """$FASTMASK_GIT_SHA, else the short commit of the checkout holding the current directory or the imported
    fastmask (an editable install), with "+dirty" when tracked files differ from it; else "unknown"."""
    if os.environ.get("FASTMASK_GIT_SHA"):
        return os.environ["FASTMASK_GIT_SHA"]
    for where in (Path.cwd(), Path(__file__).resolve().parents[2]):
        sha = _git(["rev-parse", "--short", "HEAD"], where)
        if sha:
            dirty = _git(["status", "--porcelain", "--untracked-files=no"], where)
            return sha + ("+dirty" if dirty else "")
    return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def hardware(device_type: str) -> str:
    """The GPU's name, or the CPU model with its core and thread counts."""
    import torch

    if device_type == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{cpu_name()} x{os.cpu_count()} threads={torch.get_num_threads()}"


def environment(device_type: str, smoke: bool = False) -> dict:
    """The columns that open every row: when, on what, with which versions and commit."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "hardware": hardware(device_type),
            "device": device_type, "torch": torch.__version__, "cuda": torch.version.cuda or "",
            "triton": triton_version, "git_sha": git_sha(), "smoke": int(bool(smoke))}


def read_rows(path: Path) -> list[dict]:
    """The rows of one CSV file (dicts of strings); [] when it does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _columns(existing: list[str], rows: Iterable[dict]) -> list[str]:
    columns = list(existing)
    for row in rows:
        columns += [key for key in row if key not in columns]
    return columns


def _write_atomic(path: Path, columns: list[str], rows: list[dict]) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def append_rows(path: Path, rows: list[dict]) -> Path:
    """Append ``rows`` to the CSV file ``path`` (created with its folder if missing), atomically."""
    path = Path(path)
    if not rows:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    old = read_rows(path)
    columns = _columns(_header(path) if path.exists() else [], rows)
    _write_atomic(path, columns, old + [{k: ("" if v is None else v) for k, v in row.items()} for row in rows])
    return path


def _header(path: Path) -> list[str]:
    with path.open(newline="") as handle:
        return next(csv.reader(handle), [])


def add_results(source: Path, results: Path) -> dict[str, int]:
    """Append the rows of every non-smoke ``*.csv`` in ``source`` to the file of the same name in ``results``,
    skipping rows already there (a run added twice counts once). Returns {file name: rows added}."""
    source, results = Path(source), Path(results)
    files = sorted(p for p in source.glob("*.csv") if not p.name.startswith(SMOKE_PREFIX))
    if not files:
        raise FileNotFoundError(f"fastmask bench report --add: no result CSV files (*.csv, not smoke_*) in {source}")
    added = {}
    for src in files:
        target = results / src.name
        present = {tuple(sorted((k, v) for k, v in row.items() if v != "")) for row in read_rows(target)}
        new = [row for row in read_rows(src)
               if tuple(sorted((k, v) for k, v in row.items() if v != "")) not in present]
        append_rows(target, new)
        added[src.name] = len(new)
    return added
