"""Results files and figures: ``plot_history`` / ``save_figure`` / ``pyplot`` (matplotlib, optional, imported on
first use), ``read_history`` (history.csv back), ``markdown_table`` for report.md, and ``_json_safe`` (non-finite
floats to null, tensors to numbers) for metrics.json and the history."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from ...assets import atomic_write_bytes


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
