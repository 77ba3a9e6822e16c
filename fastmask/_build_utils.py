"""Build configuration of the torch extension fastmask._C, shared by setup.py and fastmask._ext (JIT builds).

One place decides where the CUDA toolkit is, which include folders the CUDA sources need, which sources to
compile and with which flags, so that `pip install .` and the JIT build (torch.utils.cpp_extension.load) agree.

Only the standard library is imported here (torch lazily, inside functions that need it): setup.py loads this
file by path (importlib) without importing the fastmask package, which needs torch and friends.

Why not torch's own CUDA_HOME guess: torch takes dirname(dirname(which nvcc)), which is wrong when `nvcc` on PATH
is a wrapper script (e.g. /usr/local/bin/nvcc doing `exec /usr/local/cuda-13.0/bin/nvcc "$@"`) and gives
/usr/local. And the cuBLAS/cuSPARSE headers may exist only in the pip CUDA packages that torch depends on
(site-packages/nvidia/cu13/include), not in the system toolkit.

Command line (used by .ci/run):  python fastmask/_build_utils.py --cuda-home | --report
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shutil
import sys
from typing import Optional

# Default GPU architectures of a `pip install` build: Ampere (A100) and Hopper (H100/H200). TORCH_CUDA_ARCH_LIST
# overrides it. JIT builds leave it to torch (the archs of the visible GPUs) unless no GPU is visible.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"

# Kernel-level ops defined in csrc/ops.cpp: the extension backends need every one of them.
KERNEL_OPS = ("_uniform_fill", "_gate_fwd", "_gate_bwd", "_masked_weight", "_mask_grad")

_NVCC = "nvcc.exe" if os.name == "nt" else "nvcc"


def env_flag(name: str, default: bool) -> bool:
    """A boolean environment switch: unset -> default; "0", "false", "no", "off", "" -> False; else True."""
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() not in ("0", "false", "no", "off", "")


# ---------------------------------------------------------------------------------------------------- CUDA_HOME


def is_real_binary(path: str) -> bool:
    """True when `path` is an executable file that is not a script (no '#!'): ELF on Linux, PE/Mach-O elsewhere."""
    try:
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return False
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and not head.startswith(b"#!")


def is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _valid_home(home: Optional[str]) -> bool:
    return bool(home) and is_real_binary(os.path.join(home, "bin", _NVCC))


def _script_target(script: str) -> Optional[str]:
    """The nvcc that a wrapper script runs: the first absolute path ending in /nvcc in it that exists
    (lines with `exec` first). Variables ($CUDA_HOME/bin/nvcc) are not expanded: such wrappers are skipped."""
    try:
        with open(script, "r", errors="replace") as f:
            text = f.read(65536)
    except OSError:
        return None
    pattern = re.compile(r"""(/[^\s"'$;`|&<>(){}]*/""" + re.escape(_NVCC) + r""")(?=$|[\s"';`|&<>)])""")
    lines = text.splitlines()
    ordered = [ln for ln in lines if "exec" in ln] + [ln for ln in lines if "exec" not in ln]
    for line in ordered:
        if line.lstrip().startswith("#"):
            continue
        for match in pattern.finditer(line):
            candidate = match.group(1)
            if os.path.abspath(candidate) != os.path.abspath(script) and os.path.isfile(candidate):
                return candidate
    return None


def _home_from_nvcc(nvcc: str, depth: int = 0) -> Optional[str]:
    """Follow symlinks and wrapper scripts from an nvcc path to the toolkit folder (the parent of bin/)."""
    real = os.path.realpath(nvcc)
    if is_real_binary(real):
        home = os.path.dirname(os.path.dirname(real))
        return home if _valid_home(home) else None
    if depth < 4:
        target = _script_target(real)
        if target:
            return _home_from_nvcc(target, depth + 1)
    return None


def _version_key(path: str):
    numbers = re.findall(r"\d+", os.path.basename(path))
    return tuple(int(n) for n in numbers)


def find_cuda_home_explained() -> tuple[Optional[str], str]:
    """(CUDA toolkit folder or None, how it was found / why not).

    Order: CUDA_HOME then CUDA_PATH if their bin/nvcc is a real binary; the nvcc on PATH (symlinks and wrapper
    scripts followed); /usr/local/cuda; the newest /usr/local/cuda-*.
    """
    ignored = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            if _valid_home(home):
                return os.path.abspath(home), f"${var}"
            ignored.append(f"${var}={home} has no real bin/{_NVCC}")
    nvcc = shutil.which(_NVCC)
    if nvcc:
        home = _home_from_nvcc(nvcc)
        if home:
            return home, f"{_NVCC} on PATH ({nvcc})"
        ignored.append(f"{nvcc} on PATH: could not follow it to a real {_NVCC}")
    if os.name != "nt":
        candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True)
        for home in candidates:
            if _valid_home(home):
                return os.path.realpath(home), f"found at {home}"
    why = "; ".join(ignored) if ignored else f"no {_NVCC} on PATH, no CUDA_HOME, no /usr/local/cuda*"
    return None, f"CUDA toolkit not found ({why})"


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit folder (containing bin/nvcc as a real binary), or None."""
    return find_cuda_home_explained()[0]


def configure_cuda_home() -> Optional[str]:
    """Find the toolkit and make torch use it: sets $CUDA_HOME and, if torch.utils.cpp_extension was already
    imported (it computes CUDA_HOME at import time), patches its module-level CUDA_HOME too."""
    home = find_cuda_home()
    if home:
        os.environ["CUDA_HOME"] = home
        module = sys.modules.get("torch.utils.cpp_extension")
        if module is not None and getattr(module, "CUDA_HOME", None) != home and hasattr(module, "CUDA_HOME"):
            module.CUDA_HOME = home
    return home


def nvcc_version(cuda_home: str) -> Optional[str]:
    """'13.0' etc. from the toolkit's version.json or `nvcc --version`."""
    try:
        with open(os.path.join(cuda_home, "version.json")) as f:
            data = json.load(f)
        version = data.get("cuda_nvcc", data.get("cuda", {})).get("version")
        if version:
            return ".".join(version.split(".")[:2])
    except (OSError, ValueError, AttributeError):
        pass
    import subprocess

    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", _NVCC), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


# ------------------------------------------------------------------------------------------------- include dirs


def pip_cuda_include_dirs() -> list[str]:
    """Include folders of the pip CUDA packages (nvidia-cublas, nvidia-cusparse, ...) that CUDA builds of torch
    depend on: nvidia/cu13/include (one folder for all, CUDA 13 wheels) or nvidia/<lib>/include (older wheels)."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for root in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(root, "*", "include")))

        def rank(path: str):
            name = os.path.basename(os.path.dirname(path))
            return (0 if re.fullmatch(r"cu\d+", name) else 1 if name == "cuda_runtime" else 2, name)

        dirs += [d for d in sorted(found, key=rank) if os.path.isdir(d)]
    return list(dict.fromkeys(dirs))


def cuda_include_dirs(cuda_home: Optional[str]) -> list[str]:
    """Extra include folders of a CUDA build, in search order: the toolkit's own include folder first (so its
    cuda_runtime.h etc. match nvcc), then the pip CUDA packages' folders as a fallback for the headers the
    toolkit lacks (cublas_v2.h, cusparse.h)."""
    dirs = []
    if cuda_home and os.path.isdir(os.path.join(cuda_home, "include")):
        dirs.append(os.path.join(cuda_home, "include"))
    dirs += pip_cuda_include_dirs()
    return list(dict.fromkeys(dirs))


# ------------------------------------------------------------------------------------------------ flags, sources


def torch_include_dir() -> Optional[str]:
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "include")
    return path if os.path.isdir(path) else None


def cxx_std() -> str:
    """The C++ standard torch's headers need: c++20 for torch >= 2.10 (ATen.h errors out below C++20), else
    c++17. Read from ATen/ATen.h so it follows the installed torch, not a version table."""
    include = torch_include_dir()
    if include:
        try:
            with open(os.path.join(include, "ATen", "ATen.h")) as f:
                text = f.read(4096)
            match = re.search(r"__cplusplus\s*<\s*(\d+)L", text)
            if match and int(match.group(1)) >= 202002:
                return "c++20"
        except OSError:
            pass
    return "c++17"


def cxx_flags() -> list[str]:
    # Portable: no -march=native (wheels and CI artifacts run on other CPUs); the CPU kernels pick their
    # instruction set at run time. -fopenmp: at::parallel_for is header code and runs on ONE thread unless the
    # extension itself is compiled with OpenMP (it then shares torch's libgomp).
    return ["-O3", f"-std={cxx_std()}", "-fopenmp"]


def link_flags() -> list[str]:
    return ["-fopenmp"]


def nvcc_flags() -> list[str]:
    # No --use_fast_math: the Philox noise and the gate math must match the reference bit for bit.
    return ["-O3", "--expt-relaxed-constexpr", f"-std={cxx_std()}"]


def csrc_dir(default: str) -> str:
    """The C++/CUDA source folder: $FASTMASK_CSRC_DIR (testing the build with other sources) or `default`."""
    return os.path.abspath(os.environ.get("FASTMASK_CSRC_DIR") or default)


def collect_sources(csrc: str, with_cuda: bool) -> dict:
    """{'cpp': [ops.cpp, cpu/*.cpp], 'cuda': [cuda/*.cu, cuda/*.cpp] (if with_cuda), 'headers': [...]}, sorted.
    The kernel folders may be empty; ops.cpp (the op schemas and the module init) must exist."""
    ops = os.path.join(csrc, "ops.cpp")
    if not os.path.isfile(ops):
        raise FileNotFoundError(f"{ops} not found: the extension needs csrc/ops.cpp")
    cpp = [ops] + sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    cuda = sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")) + glob.glob(os.path.join(csrc, "cuda", "*.cpp"))) \
        if with_cuda else []
    headers = sorted(p for ext in ("h", "hpp", "cuh")
                     for p in glob.glob(os.path.join(csrc, "**", f"*.{ext}"), recursive=True))
    return {"cpp": cpp, "cuda": cuda, "headers": headers}


def report() -> dict:
    home, how = find_cuda_home_explained()
    return {"cuda_home": home, "cuda_home_how": how, "nvcc_version": nvcc_version(home) if home else None,
            "cuda_include_dirs": cuda_include_dirs(home), "cxx_std": cxx_std(),
            "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST")}


def main(argv: list[str]) -> int:
    if argv[1:] == ["--cuda-home"]:
        home, how = find_cuda_home_explained()
        if home is None:
            print(how, file=sys.stderr)
            return 1
        print(home)
        return 0
    if argv[1:] == ["--report"]:
        print(json.dumps(report(), indent=2))
        return 0
    print("usage: python _build_utils.py --cuda-home | --report", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
