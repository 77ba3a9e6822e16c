"""The build of the extension fastmask._C and its loader (fastmask/_ext.py, fastmask/_build_utils.py).

CI (.ci/run) sets FASTMASK_REQUIRE_EXT=1: there the extension must be installed, load, and (with a CUDA build of
torch) carry CUDA kernels. Elsewhere those checks skip, saying why.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

import fastmask
from fastmask import _build_utils as bu
from fastmask import _ext

REQUIRE_EXT = bu.env_flag("FASTMASK_REQUIRE_EXT", False)


def test_load_reports_a_status_with_a_reason():
    status = _ext.load(warn=False)
    assert isinstance(status, _ext.ExtStatus)
    assert isinstance(status.reason, str) and status.reason.strip()
    assert status.available or not (status.cpu or status.cuda)
    assert _ext.load(warn=False) is status  # cached


def test_installed_package_not_shadowed_by_the_checkout():
    """`python -m pytest` from the repository root imports the checkout's fastmask/ (no compiled _C, no
    fastmask.kernels) instead of the installed one: the tests must run from tests/."""
    # Every metadata folder named fastmask on sys.path (a build leaves fastmask.egg-info in the checkout too).
    located = {Path(dist.locate_file("fastmask/__init__.py")).resolve()
               for dist in importlib.metadata.distributions(name="fastmask")}
    located = {path for path in located if path.is_file()}
    if not located:
        pytest.skip("fastmask is not installed, or installed editable (the checkout is the installed package)")
    imported = Path(fastmask.__file__).resolve()
    others = sorted(str(path) for path in located - {imported})
    assert not others, (
        f"the tests import {imported} but fastmask is installed at {', '.join(others)}: run the tests from "
        f"tests/ (cd tests && TRITON_INTERPRET=1 python -m pytest -q)")


@pytest.mark.skipif(not REQUIRE_EXT, reason="FASTMASK_REQUIRE_EXT is not set (only CI requires the extension)")
def test_extension_built_and_loaded_when_required():
    info = _ext.build_info()
    status = _ext.load(warn=False)
    assert info is not None, f"no {_ext.BUILD_INFO_FILE}: fastmask was not installed with setup.py ({status.reason})"
    assert info["ext_built"], f"the extension was not built: {info['reason']}"
    assert status.available, status.reason
    assert status.cpu, status.reason
    if torch.version.cuda is not None:
        assert info["cuda"], f"torch {torch.__version__} is a CUDA build but the extension is not: {info['reason']}"
        assert status.cuda, status.reason
        assert info["torch"] == torch.__version__


def test_build_info_record_is_consistent():
    info = _ext.build_info()
    if info is None:
        pytest.skip("no build record (a source checkout that was never installed)")
    for key in ("ext_built", "cuda", "reason", "torch", "cuda_arch_list"):
        assert key in info
    assert isinstance(info["reason"], str) and info["reason"]
    if info["cuda"]:
        assert info["ext_built"] and info["cuda_arch_list"]


def test_cuda_home_of_the_nvcc_on_path_is_a_real_toolkit():
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH")
    home = bu.find_cuda_home()
    assert home is not None, bu.find_cuda_home_explained()[1]
    nvcc = Path(home) / "bin" / "nvcc"
    assert bu.is_elf(str(nvcc)), f"{nvcc} is not an ELF binary"


def _fake_toolkit(root: Path, name: str) -> Path:
    home = root / name
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    nvcc = home / "bin" / "nvcc"
    nvcc.write_bytes(b"\x7fELF" + b"\0" * 60)
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    return home


def _wrapper(path: Path, target: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
    path.chmod(0o755)


def test_cuda_home_follows_an_nvcc_wrapper_script(tmp_path, monkeypatch):
    home = _fake_toolkit(tmp_path, "cuda-99.1")
    _wrapper(tmp_path / "wrap" / "bin" / "nvcc", home / "bin" / "nvcc")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "wrap" / "bin") + os.pathsep + os.environ.get("PATH", ""))
    assert bu.find_cuda_home() == str(home)


def test_cuda_home_env_honoured_only_with_a_real_nvcc(tmp_path, monkeypatch):
    home = _fake_toolkit(tmp_path, "cuda-env")
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert bu.find_cuda_home() == str(home)
    # A CUDA_HOME whose bin/nvcc is a wrapper (torch's wrong guess) is not taken.
    bogus = tmp_path / "bogus"
    _wrapper(bogus / "bin" / "nvcc", home / "bin" / "nvcc")
    monkeypatch.setenv("CUDA_HOME", str(bogus))
    monkeypatch.setenv("PATH", str(bogus / "bin"))
    assert bu.find_cuda_home() == str(home)


def test_cuda_include_dirs_put_the_toolkit_first(tmp_path):
    home = _fake_toolkit(tmp_path, "cuda-inc")
    dirs = bu.cuda_include_dirs(str(home))
    assert dirs[0] == str(home / "include")
    assert all(Path(d).is_dir() for d in dirs)


def test_sources_and_flags(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cuda").mkdir()
    with pytest.raises(FileNotFoundError):
        bu.collect_sources(str(tmp_path), with_cuda=True)
    (tmp_path / "ops.cpp").write_text("")
    empty = bu.collect_sources(str(tmp_path), with_cuda=True)  # kernel folders may still be empty
    assert empty["cpp"] == [str(tmp_path / "ops.cpp")] and empty["cuda"] == []
    (tmp_path / "cpu" / "a.cpp").write_text("")
    (tmp_path / "cuda" / "b.cu").write_text("")
    full = bu.collect_sources(str(tmp_path), with_cuda=True)
    assert full["cpp"][1:] == [str(tmp_path / "cpu" / "a.cpp")] and full["cuda"] == [str(tmp_path / "cuda" / "b.cu")]
    assert bu.collect_sources(str(tmp_path), with_cuda=False)["cuda"] == []
    assert "-march=native" not in bu.cxx_flags()
    assert "--use_fast_math" not in bu.nvcc_flags()
    assert bu.cxx_std() in ("c++17", "c++20")


def test_triton_older_than_3_4_is_refused_with_the_reason(monkeypatch):
    """Before triton 3.4, tl.rand with an int64 offset ran a 64-bit Philox: other noise than every other backend."""
    triton = pytest.importorskip("triton")
    from fastmask.ops import _backend

    assert _backend._version_tuple("3.4.0+git5f1") == (3, 4, 0) and _backend._version_tuple("3.10") == (3, 10)
    _backend._triton_status.cache_clear()
    monkeypatch.setattr(triton, "__version__", "3.3.1")
    try:
        ok, why = _backend._triton_status()
        assert not ok and "older than 3.4" in why and "triton>=3.4" in why
    finally:
        monkeypatch.undo()
        _backend._triton_status.cache_clear()
    assert _backend._triton_status()[0]


def test_every_package_of_the_source_tree_is_installed():
    """pyproject.toml lists the packages by hand: a sub-package missing there installs nowhere but an editable
    checkout (CI installs the wheel, so its tests would not even import)."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(("fastmask",) + init.parent.relative_to(root / "fastmask").parts)
               for init in (root / "fastmask").rglob("__init__.py")}
    on_disk |= {"fastmask.kernels"} if (root / "kernels" / "__init__.py").exists() else set()
    assert on_disk <= listed, f"not in pyproject.toml's packages: {sorted(on_disk - listed)}"
