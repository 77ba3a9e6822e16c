"""The one place that loads the torch extension fastmask._C (C++ CPU and CUDA kernels).

    status = fastmask._ext.load()      # cached; ExtStatus(available, cpu, cuda, reason, ...)

Order: `import fastmask._C` (built by `pip install`); if that fails and FASTMASK_JIT_BUILD=1 (or load(jit=True)),
compile it now with torch.utils.cpp_extension.load from the csrc/ folder next to the package (a source
checkout or an editable install), with the same CUDA_HOME, include folders and flags as setup.py
(fastmask/_build_utils.py). Nothing here runs at `import fastmask`; the first op use or backend query calls
load(), which warns once (ExtensionUnavailableWarning) when the extension, or its CUDA kernels on a machine with a
GPU, is missing: fastmask then runs its reference (PyTorch) and Triton backends.

Environment: FASTMASK_JIT_BUILD=1 (JIT build when no installed extension), FASTMASK_BUILD_CUDA=0 (JIT: CPU only),
FASTMASK_JIT_VERBOSE=1 (show the compiler), FASTMASK_JIT_BUILD_DIR (where; default torch's cache folder),
FASTMASK_CSRC_DIR (compile other sources).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import threading
import warnings
from pathlib import Path
from typing import Optional

from . import _build_utils as bu

_PACKAGE_DIR = Path(__file__).resolve().parent
BUILD_INFO_FILE = _PACKAGE_DIR / "_build_info.json"


class ExtensionUnavailableWarning(UserWarning):
    """fastmask._C (or its CUDA kernels) is missing: the reference and Triton backends are used."""


@dataclasses.dataclass(frozen=True)
class ExtStatus:
    available: bool  # the library is loaded (its op schemas are registered)
    cpu: bool  # every kernel-level op has a CPU kernel
    cuda: bool  # every kernel-level op has a CUDA kernel
    reason: str  # why something is missing, or where it was loaded from when all is there
    origin: str = ""  # "installed", "jit" or "" (not loaded)
    path: str = ""  # the loaded library file
    build_info: Optional[dict] = None  # fastmask/_build_info.json written at install, if any


_lock = threading.RLock()
_status: Optional[ExtStatus] = None
_jit_tried = False
_warned = False


def build_info() -> Optional[dict]:
    """The install-time record of the extension build (None in a source checkout that was never built)."""
    try:
        return json.loads(BUILD_INFO_FILE.read_text())
    except (OSError, ValueError):
        return None


def _has_kernels(dispatch_key: str) -> tuple[bool, list[str]]:
    import torch

    missing = []
    for op in bu.KERNEL_OPS:
        name = f"fastmask::{op}"
        try:
            ok = torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key)
        except RuntimeError:  # no schema at all
            ok = False
        if not ok:
            missing.append(op)
    return not missing, missing


def _status_after_load(origin: str, path: str, info: Optional[dict]) -> ExtStatus:
    import torch

    cpu, cpu_missing = _has_kernels("CPU")
    cuda, cuda_missing = _has_kernels("CUDA")
    problems = []
    if not cpu:
        problems.append(f"no CPU kernels for {', '.join(cpu_missing)}")
    if not cuda:
        if torch.version.cuda is None:
            problems.append("no CUDA kernels (torch is not a CUDA build)")
        elif origin == "installed" and info and not info.get("cuda"):
            problems.append(f"no CUDA kernels: {info.get('reason') or 'built without CUDA'}")
        else:
            problems.append(f"no CUDA kernels for {', '.join(cuda_missing)}")
    where = f"fastmask._C ({origin}: {path})"
    reason = f"{where}: " + "; ".join(problems) if problems else f"{where}: CPU and CUDA kernels"
    return ExtStatus(True, cpu, cuda, reason, origin, path, info)


def _import_installed(info: Optional[dict]) -> tuple[Optional[ExtStatus], str]:
    """(status, "") when `import fastmask._C` works, else (None, why not)."""
    try:
        module = importlib.import_module("fastmask._C")
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "fastmask._C":
            if info is None:
                why = ("fastmask._C is not built (a source checkout? install with "
                       "`pip install --no-build-isolation .`, or set FASTMASK_JIT_BUILD=1)")
            elif not info.get("ext_built"):
                why = f"fastmask._C was not built at install: {info.get('reason')}"
            else:
                why = "fastmask._C is missing although the install built it (a source checkout shadowing the install?)"
        else:
            why = f"import fastmask._C failed ({type(exc).__name__}: {exc})"
            import torch

            if info and info.get("torch") and info["torch"] != torch.__version__:
                why += (f"; it was built against torch {info['torch']} but torch {torch.__version__} is running: "
                        f"reinstall fastmask")
        return None, why
    except OSError as exc:
        return None, f"import fastmask._C failed ({type(exc).__name__}: {exc})"
    return _status_after_load("installed", getattr(module, "__file__", "") or "", info), ""


def _jit_build() -> tuple[Optional[ExtStatus], str]:
    """Compile and load the extension from the csrc/ folder next to the package."""
    csrc = bu.csrc_dir(str(_PACKAGE_DIR.parent / "csrc"))
    if not os.path.isfile(os.path.join(csrc, "ops.cpp")):
        return None, f"JIT build needs the source checkout: {os.path.join(csrc, 'ops.cpp')} not found"
    try:
        import torch

        cuda_home = bu.configure_cuda_home()  # before (and patching) torch.utils.cpp_extension's own guess
        from torch.utils import cpp_extension

        with_cuda = (bu.env_flag("FASTMASK_BUILD_CUDA", True) and torch.version.cuda is not None
                     and cuda_home is not None)
        sources = bu.collect_sources(csrc, with_cuda)
        with_cuda = with_cuda and bool(sources["cuda"])
        includes = [csrc] + (bu.cuda_include_dirs(cuda_home) if with_cuda else [])
        arch_env = None
        if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            arch_env = bu.DEFAULT_CUDA_ARCH_LIST  # torch picks the visible GPUs' archs; there are none
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_env
        kwargs = {}
        if os.environ.get("FASTMASK_JIT_BUILD_DIR"):
            kwargs["build_directory"] = os.environ["FASTMASK_JIT_BUILD_DIR"]
            os.makedirs(kwargs["build_directory"], exist_ok=True)
        try:
            path = cpp_extension.load(
                name="fastmask_C" if with_cuda else "fastmask_C_cpu",
                sources=sources["cpp"] + sources["cuda"],
                extra_include_paths=includes,
                extra_cflags=bu.cxx_flags() + (["-DFASTMASK_WITH_CUDA=1"] if with_cuda else []),
                extra_cuda_cflags=bu.nvcc_flags() + ["-DFASTMASK_WITH_CUDA=1"],
                extra_ldflags=bu.link_flags(),
                with_cuda=with_cuda,
                is_python_module=False,
                verbose=bu.env_flag("FASTMASK_JIT_VERBOSE", False),
                **kwargs,
            )
        finally:
            if arch_env is not None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
    except Exception as exc:  # compiler errors arrive as RuntimeError / subprocess errors
        return None, f"JIT build of fastmask._C failed ({type(exc).__name__}: {str(exc).strip()[-2000:]})"
    return _status_after_load("jit", str(path or ""), None), ""


def load(jit: Optional[bool] = None, warn: bool = True) -> ExtStatus:
    """Load fastmask._C once and report what is there. jit=True (or FASTMASK_JIT_BUILD=1) compiles it from the
    source checkout when no installed one imports. warn=True warns once when the extension is unavailable, or
    lacks CUDA kernels on a machine with a GPU."""
    global _status, _jit_tried
    if jit is None:
        jit = bu.env_flag("FASTMASK_JIT_BUILD", False)
    with _lock:
        if _status is None or (jit and not _status.available and not _jit_tried):
            info = build_info()
            status, why = _import_installed(info)
            if status is None and jit:
                _jit_tried = True
                status, jit_why = _jit_build()
                why = f"{why}; {jit_why}" if status is None else why
            if status is None:
                status = ExtStatus(False, False, False, why, "", "", info)
            _status = status
        status = _status
    if warn:
        _warn_once(status)
    return status


def _warn_once(status: ExtStatus) -> None:
    global _warned
    if _warned:
        return
    message = None
    if not status.available:
        message = (f"fastmask: the C++/CUDA extension is not available ({status.reason}); using the reference "
                   f"(PyTorch) and Triton backends. fastmask.info() shows what is used.")
    elif not status.cuda:
        import torch

        if torch.cuda.is_available():
            message = (f"fastmask: the extension has no CUDA kernels ({status.reason}); on GPUs the Triton and "
                       f"reference backends are used.")
    if message:
        _warned = True
        warnings.warn(message, ExtensionUnavailableWarning, stacklevel=3)


def _reset_for_tests() -> None:
    """Forget the cached status and the warning (the loaded library itself stays loaded)."""
    global _status, _jit_tried, _warned
    with _lock:
        _status, _jit_tried, _warned = None, False, False
