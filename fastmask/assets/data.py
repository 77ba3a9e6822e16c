"""Data sets: the shared data folder (``--data-dir``, ``$FASTMASK_DATA``, else a ``shared/data`` folder found from
the current directory or the checkout), each data set's sub-folder with the sha256 of its files checked against
its SOURCE.md, and data sets of the Hugging Face hub (``hub_dataset``)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from .cache import check_sha256
from .registry import AssetUnavailable, PathLike, _unavailable, get

DATA_ENV = "FASTMASK_DATA"
DATA_ENV_ALIASES = ("FASTMASK_SHARED_DATA",)  # the tests' name for the same folder


def _data_dir_candidates(explicit: Optional[PathLike]) -> list[tuple[str, Path]]:
    found = []
    if explicit:
        found.append(("--data-dir", Path(explicit)))
    for var in (DATA_ENV, *DATA_ENV_ALIASES):
        if os.environ.get(var):
            found.append((f"${var}", Path(os.environ[var])))
    package_root = Path(__file__).resolve().parents[2]  # the checkout (fastmask/assets/..)
    for start in (Path.cwd(), package_root):
        for folder in (start, *start.parents):
            found.append(("search", folder / "shared" / "data"))
    return found


def data_dir(explicit: Optional[PathLike] = None, required: bool = True) -> Optional[Path]:
    """The shared data folder: ``explicit`` (``--data-dir``), $FASTMASK_DATA, else a ``shared/data`` folder in the
    current directory, beside the checkout or above either. An explicit or environment folder that does not
    exist is an error (not silently skipped)."""
    for how, folder in _data_dir_candidates(explicit):
        if folder.is_dir():
            return folder.resolve()
        if how != "search":
            raise AssetUnavailable(f"fastmask: the data folder given by {how} does not exist: {folder}")
    if required:
        raise AssetUnavailable(
            "fastmask: no shared data folder found. Pass --data-dir DIR, set $FASTMASK_DATA=DIR, or place a "
            "`shared/data` folder beside the checkout (or in the current directory or above it).")
    return None


def source_checksums(folder: PathLike) -> dict[str, str]:
    """{relative file path: sha256} from the tables of a data folder's SOURCE.md."""
    source = Path(folder) / "SOURCE.md"
    if not source.is_file():
        return {}
    sums = {}
    for line in source.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        hashes = [c for c in cells[1:] if re.fullmatch(r"[0-9a-f]{64}", c)]
        if cells and hashes and not cells[0].startswith("-"):
            sums[cells[0]] = hashes[0]
    return sums


def data_path(name: str, *files: str, data_dir_override: Optional[PathLike] = None, verify: bool = True) -> Path:
    """The folder of data set ``name`` in the shared data folder, or ``folder/files[0]`` when one file is given.
    Every named file must exist and, when SOURCE.md lists it, match its sha256."""
    asset = get(name)
    if asset.folder is None:
        raise KeyError(f"fastmask.assets: {asset.name!r} is a {asset.kind}, not a data folder")
    tried = []
    try:
        root = data_dir(data_dir_override, required=True)
    except AssetUnavailable as error:
        tried.append(str(error).splitlines()[0])
        raise _unavailable(asset, tried) from None
    folder = root / asset.folder
    if not folder.is_dir():
        tried.append(f"{folder}: no such folder")
        raise _unavailable(asset, tried)
    sums = source_checksums(folder) if verify else {}
    for relative in files:
        path = folder / relative
        if not path.is_file():
            raise AssetUnavailable(f"fastmask: {asset.name}: file {relative!r} is missing from {folder}")
        if relative in sums:
            check_sha256(path, sums[relative], f"{asset.name}/{relative}")
    return folder / files[0] if len(files) == 1 else folder


def hub_dataset(path: str, name: Optional[str], split: str, asset: str):
    """``datasets.load_dataset(path, name, split=split)``, or AssetUnavailable naming ``asset``'s other ways."""
    tried = []
    try:  # datasets: optional (the experiments' extra), and slow to import
        import datasets
    except ImportError:
        tried.append("the `datasets` package: not installed (pip install datasets)")
        raise _unavailable(get(asset), tried) from None
    try:
        return datasets.load_dataset(path, name, split=split)
    except Exception as error:  # noqa: BLE001 - any hub/network failure means "not reachable"
        tried.append(f"datasets.load_dataset({path!r}, {name!r}, split={split!r}): {type(error).__name__}: "
                     f"{str(error).splitlines()[0][:200] if str(error) else ''}")
        raise _unavailable(get(asset), tried) from None
