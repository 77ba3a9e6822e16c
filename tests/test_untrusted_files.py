"""Untrusted files (issue 8): masks and configs load without running code (safetensors + JSON only, nothing in the
package unpickles), and a corrupt, truncated, hand-edited or malicious file is refused with a message naming the
file, before anything is loaded; so are run checkpoints of a newer format or holding a pickle. (Masks of another
base model, other shapes or a newer format version: tests/test_io.py.)"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import fastmask as fm
from fastmask.io import _file_sha256

def _sources():
    """The installed package's Python files (fastmask and fastmask.kernels, wherever they live)."""
    import importlib.util

    dirs = {Path(fm.__file__).resolve().parent}
    spec = importlib.util.find_spec("fastmask.kernels")
    if spec is not None and spec.submodule_search_locations:
        dirs.add(Path(list(spec.submodule_search_locations)[0]).resolve())
    return sorted(p for d in dirs for p in d.rglob("*.py"))


def test_no_code_path_unpickles_or_evaluates():
    unsafe = [
        (re.compile(r"^\s*(import|from)\s+(pickle|cPickle|dill|joblib|shelve|marshal)\b", re.M), "a pickle module"),
        (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
        (re.compile(r"(?<![.\w`])(eval|exec)\("), "eval / exec"),
        (re.compile(r"\btorch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
        (re.compile(r"\bnp\.load\([^)]*allow_pickle\s*=\s*True"), "np.load(allow_pickle=True)"),
    ]
    sources = _sources()
    assert any(p.parts[-2:] == ("io", "files.py") for p in sources)  # fastmask/io/files.py reads the mask files
    assert any(p.name == "masked_linear.py" for p in sources)
    found = [f"{path}: {what}" for path in sources for pattern, what in unsafe
             if pattern.search(path.read_text(encoding="utf-8"))]
    assert found == []


def _saved(tmp_path) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = fm.apply(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), fm.MaskConfig(targets=["Linear"]))
    with torch.no_grad():
        for layer in fm.masked_modules(model).values():
            layer.logits.normal_()
    folder = tmp_path / "masks"
    fm.save_masks(model, folder)
    return model, folder


def _fresh() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _replace_masks(folder: Path, data: bytes, keep_checksum_consistent: bool = True) -> None:
    """Overwrite masks.safetensors; by default also the metadata's sha256 (an attacker controls both files)."""
    (folder / "masks.safetensors").write_bytes(data)
    if keep_checksum_consistent:
        meta_path = folder / "mask_config.json"
        meta = json.loads(meta_path.read_text())
        meta["masks_sha256"] = _file_sha256(folder / "masks.safetensors")
        meta_path.write_text(json.dumps(meta))


class _Payload:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_disguised_as_a_mask_file_is_refused_without_running(tmp_path):
    _, folder = _saved(tmp_path)
    marker = tmp_path / "code-ran"
    for payload in (pickle.dumps({"0": _Payload(marker)}), _torch_save_bytes({"0": _Payload(marker)}, tmp_path)):
        _replace_masks(folder, payload)
        with pytest.raises(ValueError, match=r"masks.safetensors is not a readable safetensors file"):
            fm.load_masks(_fresh(), folder)
        assert not marker.exists(), "loading a mask file ran code"


def _torch_save_bytes(obj, tmp_path) -> bytes:
    path = tmp_path / "payload.pt"
    torch.save(obj, path)  # a zip of pickles: what torch.load(weights_only=False) would execute
    return path.read_bytes()


def test_truncated_or_corrupt_mask_files_are_reported(tmp_path):
    _, folder = _saved(tmp_path)
    good = (folder / "masks.safetensors").read_bytes()
    _replace_masks(folder, good[: len(good) // 2], keep_checksum_consistent=False)  # an interrupted copy
    with pytest.raises(ValueError, match=r"masks.safetensors is not the file .*mask_config.json describes "
                                         r"\(sha256 differs\)"):
        fm.load_masks(_fresh(), folder)
    for bad in (good[: len(good) // 2], b"", b"\xff" * 64, good[:8] + b"{not json" + good[17:]):
        _replace_masks(folder, bad)  # the checksum matches: the file itself must be refused
        with pytest.raises(ValueError, match="is not a readable safetensors file"):
            fm.load_masks(_fresh(), folder)


def test_corrupt_metadata_is_reported(tmp_path):
    _, folder = _saved(tmp_path)
    meta_path = folder / "mask_config.json"
    text = meta_path.read_text()
    meta_path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"mask_config.json is not valid JSON .*truncated or corrupted"):
        fm.load_masks(_fresh(), folder)
    meta_path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="is not valid JSON"):
        fm.load_masks(_fresh(), folder)
    meta = json.loads(text)
    for key in ("layers", "fingerprint", "masks_sha256"):
        broken = dict(meta)
        broken[key] = None
        meta_path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=f"lacks a valid '{key}' entry"):
            fm.load_masks(_fresh(), folder)
    broken = json.loads(text)
    broken["mask_config"]["run_this"] = "rm -rf /"  # unknown config keys are an error, never ignored
    meta_path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['run_this'\]"):
        fm.load_masks(_fresh(), folder)


def test_mask_files_with_nan_or_integer_logits_are_refused(tmp_path):
    from safetensors.torch import load_file, save

    model, folder = _saved(tmp_path)
    # copies: load_file maps the file, and it is rewritten below
    tensors = {name: t.clone() for name, t in load_file(str(folder / "masks.safetensors")).items()}
    for name, bad in (("NaN", float("nan")), ("int", None)):
        edited = dict(tensors)
        first = sorted(edited)[0]
        edited[first] = edited[first].clone().fill_(bad) if bad is not None else edited[first].to(torch.int32)
        _replace_masks(folder, save(edited))
        message = "contain NaN" if name == "NaN" else "are torch.int32, expected a float dtype"
        with pytest.raises(ValueError, match=message):
            fm.load_masks(_fresh(), folder)
    _replace_masks(folder, save(tensors))  # the untouched tensors load again
    loaded = fm.load_masks(_fresh(), folder)
    for name, layer in fm.masked_modules(loaded).items():
        assert torch.equal(layer.logits, fm.masked_modules(model)[name].logits)


def _resign(folder: Path, payload: dict) -> None:
    """Rewrite a checkpoint's state.json with a valid self-checksum (what an attacker controlling it can do)."""
    from fastmask.experiments import runner

    payload = {k: v for k, v in payload.items() if k != "json_sha256"}
    payload["json_sha256"] = hashlib.sha256(runner._canonical(payload)).hexdigest()
    (folder / "state.json").write_text(json.dumps(payload))


def test_checkpoints_of_a_newer_format_or_holding_a_pickle_are_refused(tmp_path):
    from fastmask.experiments.runner import CheckpointError, TrainState, read_checkpoint, save_checkpoint

    folder = save_checkpoint(TrainState(params={"w": torch.randn(3, 2)}, step=4), tmp_path / "step-00000004")
    payload = json.loads((folder / "state.json").read_text())
    _resign(folder, dict(payload, version=payload["version"] + 1))
    with pytest.raises(CheckpointError, match="format version .* is newer .* upgrade fastmask"):
        read_checkpoint(folder)
    marker = tmp_path / "code-ran"
    blob = pickle.dumps({"w": _Payload(marker)})
    (folder / "state.safetensors").write_bytes(blob)
    _resign(folder, dict(payload, tensors_sha256=hashlib.sha256(blob).hexdigest()))
    with pytest.raises(CheckpointError, match="state.safetensors does not parse"):
        read_checkpoint(folder)
    assert not marker.exists(), "reading a checkpoint ran code"
