"""Build of fastmask: the Python package plus the torch extension fastmask._C (C++ CPU and CUDA kernels).

Install (the README's command; CI runs exactly this):

    pip install --no-build-isolation ".[test]"        # or: pip install --no-build-isolation -e ".[test]"

Why --no-build-isolation: the extension must be compiled against the torch that will run it (C++ ABI, CUDA
version). With build isolation pip would build in a fresh environment with another torch (a multi-GB
download), so torch is deliberately NOT in [build-system] requires: install torch first, then fastmask. If the
build runs without torch anyway (build isolation), the package installs without the extension, and says why.

Environment switches (read at build time):
  FASTMASK_BUILD_EXT=0      do not build the extension (pure Python: reference and Triton backends).
  FASTMASK_BUILD_CUDA=0     build the C++ CPU kernels only, even with a CUDA build of torch and nvcc present.
  FASTMASK_REQUIRE_EXT=1    any failure to build the extension fails the install (CI sets it). Without it a
                            failed build prints a warning and installs the package without the extension.
  TORCH_CUDA_ARCH_LIST      GPU architectures (default "8.0;9.0": Ampere, Hopper).
  MAX_JOBS                  parallel compile jobs (default 2).
  CUDA_HOME / CUDA_PATH     the CUDA toolkit (used if its bin/nvcc is a real binary; else found from the nvcc
                            on PATH, following wrapper scripts, or /usr/local/cuda*): fastmask/_build_utils.py.
  FASTMASK_CSRC_DIR         compile the sources of another folder instead of csrc/ (testing the build itself).

A CUDA build (CUDAExtension) is chosen when torch is a CUDA build and nvcc is found; no GPU is needed to build.
The outcome is recorded in fastmask/_build_info.json inside the installed package (generated, git-ignored);
fastmask._ext.load() reads it to explain a missing extension.
"""

import glob
import importlib.util
import json
import os
import shutil
import sys
import traceback
import warnings

from setuptools import setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext
from setuptools.command.build_py import build_py as _build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGE = "fastmask"
BUILD_INFO_NAME = "_build_info.json"


def _load_build_utils():
    """fastmask/_build_utils.py by file path: setup.py must not import the fastmask package (it imports torch,
    numpy, ... and is not built yet)."""
    path = os.path.join(ROOT, PACKAGE, "_build_utils.py")
    spec = importlib.util.spec_from_file_location("_fastmask_build_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bu = _load_build_utils()

REQUIRE_EXT = bu.env_flag("FASTMASK_REQUIRE_EXT", False)
BUILD_EXT = bu.env_flag("FASTMASK_BUILD_EXT", True)
BUILD_CUDA = bu.env_flag("FASTMASK_BUILD_CUDA", True)
os.environ.setdefault("MAX_JOBS", "2")

# What gets written to fastmask/_build_info.json; build_ext fills in the outcome.
BUILD_INFO = {
    "ext_built": False,
    "cpu": False,
    "cuda": False,
    "reason": "",
    "torch": None,
    "torch_cuda": None,
    "cuda_home": None,
    "nvcc": None,
    "cuda_arch_list": None,
    "cxx_std": None,
    "sources": [],
    "python": sys.version.split()[0],
}


def _fail(message: str):
    """FASTMASK_REQUIRE_EXT=1: stop the install with the message."""
    sys.stderr.write(f"\nfastmask: {message}\n(FASTMASK_REQUIRE_EXT=1, so this is an error)\n")
    raise SystemExit(1)


def _rel(path: str) -> str:
    """Source paths relative to setup.py: setuptools rejects absolute ones."""
    return os.path.relpath(path, ROOT)


def _csrc_inside_root(csrc: str) -> str:
    """A FASTMASK_CSRC_DIR outside the checkout is reached through a symlink under build/, so that the sources
    have relative paths and their object files stay inside build/."""
    if not os.path.relpath(csrc, ROOT).startswith(".."):
        return csrc
    link = os.path.join(ROOT, "build", "fastmask-csrc-override")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.islink(link) or os.path.exists(link):
        os.remove(link)
    os.symlink(csrc, link)
    return link


def _ninja_bin_dir():
    try:
        import ninja

        return getattr(ninja, "BIN_DIR", None)
    except ImportError:
        return None


def _make_extensions():
    """The extension list ([] when it is not built) and the BuildExtension class (or None)."""
    if not BUILD_EXT:
        BUILD_INFO["reason"] = "FASTMASK_BUILD_EXT=0 at install"
        return [], None

    # Decide CUDA_HOME before torch.utils.cpp_extension is imported: it computes its own at import time.
    cuda_home, cuda_how = bu.find_cuda_home_explained()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
        import torch.utils.cpp_extension as cpp_extension
    except Exception as exc:  # torch missing (build isolation?) or broken
        why = (f"torch not importable at build time ({type(exc).__name__}: {exc}); install torch first and "
               f"use pip install --no-build-isolation")
        if REQUIRE_EXT:
            _fail(why)
        BUILD_INFO["reason"] = why
        return [], None
    if cuda_home:
        cpp_extension.CUDA_HOME = cuda_home

    BUILD_INFO.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cxx_std=bu.cxx_std())
    csrc = _csrc_inside_root(bu.csrc_dir(os.path.join(ROOT, "csrc")))

    cuda_reason = ""
    if not BUILD_CUDA:
        cuda_reason = "built without CUDA (FASTMASK_BUILD_CUDA=0 at install)"
    elif torch.version.cuda is None:
        cuda_reason = "built without CUDA (torch is not a CUDA build)"
    elif cuda_home is None:
        cuda_reason = f"built without CUDA ({cuda_how})"
    with_cuda = not cuda_reason
    try:
        sources = bu.collect_sources(csrc, with_cuda)
    except FileNotFoundError as exc:
        if REQUIRE_EXT:
            _fail(str(exc))
        BUILD_INFO["reason"] = str(exc)
        return [], None
    if with_cuda and not sources["cuda"]:
        with_cuda = False
        cuda_reason = f"built without CUDA (no CUDA sources in {os.path.join(csrc, 'cuda')})"

    cxx = bu.cxx_flags()
    kwargs = dict(
        name=f"{PACKAGE}._C",
        sources=[_rel(p) for p in sources["cpp"] + sources["cuda"]],
        depends=[_rel(p) for p in sources["headers"]],
        extra_compile_args={"cxx": cxx},
        extra_link_args=bu.link_flags(),
        py_limited_api=False,
    )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", bu.DEFAULT_CUDA_ARCH_LIST)
        # Toolkit headers first, the pip CUDA packages' headers (cuBLAS, cuSPARSE) after them as a fallback; the
        # torch include folders that CUDAExtension appends again are already on the list.
        includes = [csrc] + cpp_extension.include_paths("cuda") + bu.cuda_include_dirs(cuda_home)
        kwargs["extra_compile_args"]["nvcc"] = bu.nvcc_flags()
        kwargs["define_macros"] = [("FASTMASK_WITH_CUDA", "1")]
        extension = CUDAExtension(include_dirs=list(dict.fromkeys(includes)), **kwargs)
        BUILD_INFO.update(cuda_home=cuda_home, nvcc=bu.nvcc_version(cuda_home),
                          cuda_arch_list=os.environ["TORCH_CUDA_ARCH_LIST"])
    else:
        extension = CppExtension(include_dirs=[csrc], **kwargs)
    BUILD_INFO["sources"] = [os.path.relpath(p, csrc) for p in sources["cpp"] + sources["cuda"]]
    BUILD_INFO["_cpu_sources"] = len(sources["cpp"]) > 1
    BUILD_INFO["_with_cuda"] = with_cuda
    BUILD_INFO["_cuda_reason"] = cuda_reason
    BUILD_INFO["reason"] = "not built (build_ext did not run)"

    if shutil.which("ninja") is None:
        # The `ninja` PyPI package puts its binary in the venv's bin/, which is not on PATH when pip runs as
        # /path/to/venv/bin/python -m pip without activating the venv.
        for folder in (os.path.dirname(sys.executable), _ninja_bin_dir()):
            if folder and shutil.which("ninja", path=folder):
                os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
                break
    use_ninja = shutil.which("ninja") is not None
    return [extension], BuildExtension.with_options(use_ninja=use_ninja)


EXTENSIONS, _BASE_BUILD_EXT = _make_extensions()


def _write_build_info(package_dir: str) -> None:
    os.makedirs(package_dir, exist_ok=True)
    public = {k: v for k, v in BUILD_INFO.items() if not k.startswith("_")}
    with open(os.path.join(package_dir, BUILD_INFO_NAME), "w") as f:
        json.dump(public, f, indent=2)
        f.write("\n")


class build_py(_build_py):
    """Also writes fastmask/_build_info.json (the extension's outcome; build_ext rewrites it after building)."""

    def run(self):
        super().run()
        if not EXTENSIONS:
            # No extension this time: a .so left in the build folder by an earlier build would otherwise be
            # packed into the wheel next to a record saying it was not built.
            for path in glob.glob(os.path.join(self.build_lib, PACKAGE, "_C.*")):
                os.remove(path)
        if getattr(self, "editable_mode", False):
            _write_build_info(os.path.join(ROOT, PACKAGE))  # editable: the package is the source folder
        else:
            _write_build_info(os.path.join(self.build_lib, PACKAGE))


class build_ext(_BASE_BUILD_EXT or _setuptools_build_ext):
    """torch's BuildExtension (ninja, nvcc) that records its outcome, and, unless FASTMASK_REQUIRE_EXT=1, turns
    a failed build into a warning so the package still installs (reference and Triton backends)."""

    def finalize_options(self):
        super().finalize_options()
        # Always go through ninja (it recompiles only what changed, headers included) and relink: setuptools'
        # own up-to-date check looks at source timestamps only, and would keep a .so built for another torch.
        self.force = True

    def _package_dir(self) -> str:
        if self.inplace or getattr(self, "editable_mode", False):
            return os.path.join(ROOT, PACKAGE)
        return os.path.join(self.build_lib, PACKAGE)

    def _stale_outputs(self):
        """The .so in the build folder and, for in-place/editable builds, its copy in the source package."""
        for ext in self.extensions:
            yield self.get_ext_fullpath(ext.name)
            if self.inplace or getattr(self, "editable_mode", False):
                yield os.path.join(ROOT, PACKAGE, os.path.basename(self.get_ext_filename(ext.name)))

    def run(self):
        if not self.extensions:
            return
        self._failed = False
        try:
            super().run()
        except (Exception, SystemExit) as exc:
            self._failed = True
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()
            reason = (f"build failed ({detail[-1] if detail else type(exc).__name__}); reinstall with "
                      f"FASTMASK_REQUIRE_EXT=1 and pip -v to see the compiler output")
            BUILD_INFO.update(ext_built=False, cpu=False, cuda=False, reason=reason)
            # Never ship a stale .so from an earlier build next to a record saying the build failed.
            for path in self._stale_outputs():
                if os.path.exists(path):
                    os.remove(path)
            _write_build_info(self._package_dir())
            if REQUIRE_EXT:
                raise
            message = (f"fastmask: the C++/CUDA extension fastmask._C was NOT built: {reason}. fastmask still "
                       f"works with its reference (PyTorch) and Triton backends.")
            sys.stderr.write("\n" + "!" * 100 + "\n" + message + "\n" + "!" * 100 + "\n")
            warnings.warn(message)
            return
        with_cuda = BUILD_INFO.get("_with_cuda", False)
        cpu = bool(BUILD_INFO.get("_cpu_sources"))
        parts = [f"built with CUDA (archs {BUILD_INFO['cuda_arch_list']})" if with_cuda
                 else BUILD_INFO.get("_cuda_reason") or "built without CUDA"]
        if not cpu:
            parts.append("no CPU kernel sources in csrc/cpu")
        BUILD_INFO.update(ext_built=True, cpu=cpu, cuda=with_cuda, reason="; ".join(parts))
        _write_build_info(self._package_dir())

    def get_outputs(self):
        if getattr(self, "_failed", False):
            return []
        return super().get_outputs()

    def get_output_mapping(self):
        if getattr(self, "_failed", False):
            return {}
        return super().get_output_mapping()


setup(
    ext_modules=EXTENSIONS,
    cmdclass={"build_py": build_py, "build_ext": build_ext},
)
