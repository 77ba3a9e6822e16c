"""fm.info(): what is built, what is importable, and which backend each op uses per device."""

from __future__ import annotations

import platform

import torch

from ._version import __version__
from .ops import _backend, _modes

_OPS = ("uniform", "gate", "masked_linear", "l0_norm")


def info() -> dict:
    """A JSON-serialisable description of the installation and of the backend each op uses per device."""
    from . import _ext  # here: `import fastmask` imports this module, and loads nothing of the extension (_ext's doc)

    status = _ext.load()
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    triton_ok, triton_why = _backend._triton_status()
    report = {
        "fastmask": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton": triton_why if triton_ok else None,
        "extension": {"available": status.available, "cpu": status.cpu, "cuda": status.cuda,
                      "reason": status.reason},
        "backend_setting": _backend.get_backend(),
        "deterministic_mode": _modes.is_deterministic(),
        "check_finite": _modes.get_check_finite(),
        "memory_policy": {"setting": _modes.get_memory_policy(),
                          **{device: _modes.memory_policy_for(device) for device in devices}},
        "backends": {},
        "chosen": {},
        "nondeterminism": {},
    }
    for device in devices:
        report["backends"][device] = {
            name: {"available": ok, "why": why}
            for name in _backend.BACKENDS for ok, why in [_backend.availability(name, device)]
        }
        try:
            chosen = _backend.resolve_name(torch.device(device))
        except RuntimeError as exc:
            chosen = f"error: {exc}"
        # l0_norm always runs the reference (a memory-bound reduction over the logits).
        report["chosen"][device] = {op: ("reference" if op == "l0_norm" else chosen) for op in _OPS}
        report["nondeterminism"][device] = _modes.nondeterminism(device, chosen)
    return report


def format_info(report: dict) -> str:
    """Human-readable form of info() for `fastmask info`."""
    lines = [f"fastmask {report['fastmask']}  (python {report['python']}, torch {report['torch']}, "
             f"CUDA {report['torch_cuda']}, GPU {report['gpu']})",
             f"triton: {report['triton'] or 'not available'}",
             f"extension fastmask._C: cpu={report['extension']['cpu']} cuda={report['extension']['cuda']} "
             f"({report['extension']['reason']})",
             f"backend setting: {report['backend_setting']}",
             f"deterministic mode: {report['deterministic_mode']}; NaN-logits check: {report['check_finite']}"]
    for device, table in report["backends"].items():
        lines.append(f"[{device}]")
        for name, entry in table.items():
            mark = "yes" if entry["available"] else "no "
            lines.append(f"  {name:<10} {mark}  {entry['why']}")
        chosen = report["chosen"][device]
        lines.append("  chosen: " + ", ".join(f"{op}={backend}" for op, backend in chosen.items()))
        lines.append(f"  memory policy of per-weight masks: {report['memory_policy'][device]} (setting "
                     f"{report['memory_policy']['setting']})")
        for reason in report["nondeterminism"][device]:
            lines.append(f"  not deterministic: {reason}")
    return "\n".join(lines)
