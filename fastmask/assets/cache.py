"""The cache folder (``$FASTMASK_CACHE``, default ~/.cache/fastmask: converted models, rebuilt tokenizers,
downloaded packages) and sha256 checks of files whose bytes are fixed upstream."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .registry import AssetUnavailable, PathLike

CACHE_ENV = "FASTMASK_CACHE"


def cache_dir(*parts: str, create: bool = True) -> Path:
    """$FASTMASK_CACHE (default ~/.cache/fastmask), or a sub-folder of it."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fastmask").expanduser()
    path = root.joinpath(*parts)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: PathLike, expected: str, what: str = "") -> Path:
    """``path`` if its sha256 is ``expected``; else an AssetUnavailable naming the file and both hashes."""
    actual = sha256_file(path)
    if actual != expected:
        raise AssetUnavailable(f"fastmask: checksum mismatch for {what or Path(path).name} at {path}: sha256 "
                               f"{actual}, expected {expected} (a truncated or different file; delete it to refetch "
                               f"cached files, or restore the original)")
    return Path(path)
