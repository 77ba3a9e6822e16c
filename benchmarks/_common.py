"""Shared benchmark plumbing: the environment columns every result row carries, and the CSV writer."""

from __future__ import annotations

import csv
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def git_sha() -> str:
    if os.environ.get("FASTMASK_GIT_SHA"):
        return os.environ["FASTMASK_GIT_SHA"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    hardware = torch.cuda.get_device_name(0) if device == "cuda" else f"{cpu_name()} x{os.cpu_count()} threads" \
        f"={torch.get_num_threads()}"
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "hardware": hardware,
            "torch": torch.__version__, "triton": triton_version, "git_sha": git_sha()}


def append_rows(name: str, rows: list[dict]) -> Path:
    """Append rows to benchmarks/results/<name>.csv (header written once; columns from the first row)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.csv"
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path
