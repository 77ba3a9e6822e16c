"""Writes that never leave a half-written file: ``atomic_write_text`` / ``atomic_write_bytes`` (a temporary file
beside the target, fsync, os.replace) and ``_publish_dir`` (a fully written staging folder renamed into place)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .registry import PathLike


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path`` and move it into place (never a half-written file)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _publish_dir(staging: Path, final: Path) -> Path:
    """Move a fully written ``staging`` folder to ``final``; if another process got there first, keep theirs."""
    try:
        os.replace(staging, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return final
