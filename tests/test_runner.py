"""fastmask.experiments.runner: configs (file + flags), data order, checkpoints (round trip, corruption, atomicity) and
bit-for-bit resume, also after SIGKILL of a running process (on the toy experiment in runner_toy.py)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import runner_toy
from fastmask.experiments import runner
from fastmask.experiments.runner import (BatchStream, CheckpointError, ConfigError, Run, TrainState,
                                         config_from_args, load_checkpoint, read_checkpoint, read_history,
                                         save_checkpoint)

TOY = Path(runner_toy.__file__)


def _config(argv):
    args = runner_toy.build_parser().parse_args(argv)
    return config_from_args(runner_toy.ToyConfig, args, experiment="toy")


def _masks(folder: Path) -> dict:
    return load_file(str(folder / "masks" / "masks.safetensors"))


def _assert_same_run(a: Path, b: Path):
    masks_a, masks_b = _masks(a), _masks(b)
    assert sorted(masks_a) == sorted(masks_b)
    for name in masks_a:
        assert torch.equal(masks_a[name], masks_b[name]), f"mask logits of {name} differ"
    assert (a / "history.csv").read_text() == (b / "history.csv").read_text()
    assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())


# --- configs ------------------------------------------------------------------------------------------------
def test_config_file_then_flags_and_types(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 0.5, "batch": 2, "steps": 7, "checkpoint-every": 3, "data_dir": None}))
    config = _config(["--config", str(path), "--lr", "0.25", "--no-progress", "--tags", "x", "y"])
    assert config.lr == 0.25 and config.batch == 2 and config.steps == 7  # the flag wins over the file
    assert config.checkpoint_every == 3 and config.progress is False and config.tags == ["x", "y"]
    assert _config(["--tags", "x,y"]).tags == ["x", "y"]  # comma separated
    assert _config(["--tags", ""]).tags == []  # an empty string is the empty list
    assert config.out == str(Path("fastmask-runs") / "toy") and config.seed == 0
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("lr: 1e-3\nprogress: false\nseed: 5\n")  # YAML 1.1 reads 1e-3 as a string: coerced
    config = _config(["--config", str(yaml_path)])
    assert config.lr == 1e-3 and config.progress is False and config.seed == 5


@pytest.mark.parametrize("content, message", [
    ({"lrr": 0.1}, r"unknown key\(s\) \['lrr'\]"),
    ({"batch": 1.5}, r"batch .* must be an int"),
    ({"steps": 0}, r"steps must be an int >= 1"),
    ({"progress": "maybe"}, r"progress .* must be true or false"),
    ([1, 2], r"expected a mapping"),
    ("{not json", r"not valid JSON"),
])
def test_config_file_errors_name_the_key(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError, match=message):
        _config(["--config", str(path)])


def test_config_flag_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"batch \(--batch\) must be int"):
        _config(["--batch", "abc"])
    with pytest.raises(ConfigError, match="no such file"):
        _config(["--config", str(tmp_path / "missing.json")])
    with pytest.raises(ConfigError, match="device must be"):
        _config(["--device", "tpu"])
    with pytest.raises(ConfigError, match="threads must be an int >= 0"):
        _config(["--threads", "-1"])


def test_threads_explicit_or_the_free_cores(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert runner.choose_threads(1, torch.device("cpu")) == (1, "--threads") and torch.get_num_threads() == 1
        monkeypatch.setattr(os, "cpu_count", lambda: 8)
        for load, expected in ((9.0, 1), (2.5, 5), (0.0, 6)):  # torch's default is 6 here
            monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
            torch.set_num_threads(6)
            threads, why = runner.choose_threads(0, torch.device("cpu"))
            assert threads == expected == torch.get_num_threads(), (load, threads)
            assert f"8 cores, load average {load:.1f}" in why
    finally:
        torch.set_num_threads(before)


def test_existing_run_needs_resume_or_overwrite_and_resume_refuses_changes(tmp_path):
    out = tmp_path / "run"
    assert runner_toy.main(["--out", str(out), "--steps", "3", "--no-progress"]) == 0
    with pytest.raises(ConfigError, match="already holds a run"):
        runner_toy.main(["--out", str(out), "--steps", "3", "--no-progress"])
    with pytest.raises(ConfigError, match=r"\['lr'\] differ from the stored run"):
        runner_toy.main(["--out", str(out), "--resume", "--lr", "0.3", "--no-progress"])
    # --resume alone takes the stored config; a finished run just rewrites its results; --overwrite starts over
    assert runner_toy.main(["--out", str(out), "--resume", "--no-progress"]) == 0
    assert len(read_history(out / "history.csv")) == 3
    assert runner_toy.main(["--out", str(out), "--steps", "2", "--overwrite", "--no-progress"]) == 0
    assert len(read_history(out / "history.csv")) == 2 and not (out / "checkpoints" / "step-00000003").exists()
    assert json.loads((out / "config.json").read_text())["steps"] == 2  # the plain config: loadable with --config
    assert _config(["--config", str(out / "config.json")]).steps == 2


# --- data order ---------------------------------------------------------------------------------------------
def test_batch_stream_epochs_and_state():
    stream = BatchStream(10, 4, seed=3)
    batches = [stream.next() for _ in range(5)]  # 20 indices = 2 epochs
    flat = sum(batches, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a fresh permutation per epoch
    again = BatchStream(10, 4, seed=3)
    again.load_state_dict(BatchStream(10, 4, seed=3).state_dict())
    assert [again.next() for _ in range(5)] == batches
    resumed = BatchStream(10, 4, seed=3)
    resumed.load_state_dict({**stream.state_dict(), "epoch": 0, "position": 8})
    assert resumed.next() == flat[8:12]
    with pytest.raises(CheckpointError, match="batch_size"):
        BatchStream(10, 5, seed=3).load_state_dict(stream.state_dict())


# --- checkpoints --------------------------------------------------------------------------------------------
def _state(seed=0):
    torch.manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(5, 3))
    optimizer = torch.optim.Adam([weight], lr=0.1)
    weight.sum().backward()
    optimizer.step()
    return TrainState(params={"w": weight}, optimizer=optimizer, streams={"s": BatchStream(7, 3, seed=1)},
                      extra={"tuple": (1, 2.5), 3: "int key", "nan": float("nan")},
                      extra_tensors={"t": torch.arange(4, dtype=torch.int32)}, step=4,
                      history=[{"step": 0, "loss": 0.1 + 0.2}])


def test_checkpoint_round_trip_restores_everything(tmp_path):
    state = _state()
    state.streams["s"].next()
    random.seed(11), np.random.seed(12), torch.manual_seed(13)
    save_checkpoint(state, tmp_path / "step-00000004")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    fresh = _state(seed=1)  # other values everywhere
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    load_checkpoint(fresh, tmp_path / "step-00000004")
    assert torch.equal(fresh.params["w"], state.params["w"])
    saved_opt, loaded_opt = state.optimizer.state_dict(), fresh.optimizer.state_dict()
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(saved_opt["state"][0][key], loaded_opt["state"][0][key])
    assert loaded_opt["param_groups"] == saved_opt["param_groups"]
    assert fresh.step == 4 and fresh.history == [{"step": 0, "loss": 0.1 + 0.2}]
    assert fresh.extra["tuple"] == (1, 2.5) and fresh.extra[3] == "int key" and math.isnan(fresh.extra["nan"])
    assert torch.equal(fresh.extra_tensors["t"], torch.arange(4, dtype=torch.int32))
    assert fresh.streams["s"].state_dict() == state.streams["s"].state_dict()
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])


def test_corrupt_checkpoints_are_reported_and_skipped(tmp_path):
    out = tmp_path / "run"
    assert runner_toy.main(["--out", str(out), "--steps", "6", "--checkpoint-every", "3", "--no-progress"]) == 0
    newest, older = runner.checkpoint_folders(out / "checkpoints")
    assert (newest.name, older.name) == ("step-00000006", "step-00000003")
    blob = (newest / "state.safetensors").read_bytes()
    (newest / "state.safetensors").write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(newest)
    messages = []
    state = _toy_state()
    assert Run(_config(["--out", str(out), "--resume"]), resume=True, log=messages.append).restore(state)
    assert state.step == 3 and "skipping checkpoint" in messages[0] and "step-00000006" in messages[0]
    meta = json.loads((older / "state.json").read_text())
    meta["step"] = 5  # an edit that keeps the JSON valid
    (older / "state.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        read_checkpoint(older)
    (older / "state.json").write_text('{"format": "fastmask.checkp')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_checkpoint(older)
    (older / "state.json").unlink()
    with pytest.raises(CheckpointError, match="state.json is missing"):
        read_checkpoint(older)
    messages.clear()
    assert not Run(_config(["--out", str(out), "--resume"]), resume=True, log=messages.append).restore(_toy_state())
    assert "no valid checkpoint" in messages[-1]


def test_checkpoints_of_the_old_noise_are_refused_with_the_reason(tmp_path):
    """A checkpoint of fastmask < 0.2 (format 2, no "noise") drew the first-word noise: resuming it would continue
    the masks on another stream, so the run stops with a message instead of silently mixing the two."""
    from fastmask.experiments.runner.checkpoint import _canonical

    out = tmp_path / "run"
    assert runner_toy.main(["--out", str(out), "--steps", "3", "--checkpoint-every", "3", "--no-progress"]) == 0
    (folder,) = runner.checkpoint_folders(out / "checkpoints")
    meta = json.loads((folder / "state.json").read_text())
    assert meta["version"] == 3 and meta["noise"] == "philox4x32-10/4-words" and meta["noise_counters"]
    del meta["noise"], meta["json_sha256"]
    meta["version"] = 2
    meta["json_sha256"] = hashlib.sha256(_canonical(meta)).hexdigest()
    (folder / "state.json").write_text(json.dumps(meta))
    read_checkpoint(folder)  # intact: the refusal is not corruption, and no older checkpoint is tried instead
    with pytest.raises(ConfigError, match="drew the noise 'philox4x32-10/first-word'.*new --out folder"):
        Run(_config(["--out", str(out), "--resume"]), resume=True, log=lambda m: None).restore(_toy_state())


def _toy_state():
    """A TrainState with the toy experiment's parameter names and shapes (for restore)."""
    import fastmask as fm

    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    fm.apply(model, fm.MaskConfig(estimator="gumbel_sigmoid_st", targets=[r"^0$", r"^2$"], init_keep=0.6))
    return TrainState(params={n: layer.logits for n, layer in fm.masked_modules(model).items()},
                      optimizer=torch.optim.Adam(fm.mask_parameters(model), lr=0.05), model=model,
                      streams={"train": BatchStream(23, 4, seed=0)})


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    state = _state()
    save_checkpoint(state, tmp_path / "step-00000004")
    state.step = 8
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst).name == "step-00000008":
            raise OSError("disk full (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(runner.checkpoint.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(state, tmp_path / "step-00000008")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004"]  # no partial folder, no temp left
    read_checkpoint(tmp_path / "step-00000004")


# --- resume -------------------------------------------------------------------------------------------------
def test_resume_after_a_crash_is_bit_identical(tmp_path, monkeypatch):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    common = ["--steps", "12", "--no-progress", "--seed", "3"]
    assert runner_toy.main(["--out", str(full), "--checkpoint-every", "4", *common]) == 0
    real_sleep = time.sleep

    def crash_on_step_seven(seconds):  # the toy sleeps once per step when --sleep is set
        crash_on_step_seven.calls += 1
        if crash_on_step_seven.calls == 7:
            raise KeyboardInterrupt
        real_sleep(0)

    crash_on_step_seven.calls = 0
    monkeypatch.setattr(runner_toy.time, "sleep", crash_on_step_seven)
    with pytest.raises(KeyboardInterrupt):
        runner_toy.main(["--out", str(crashed), "--checkpoint-every", "5", "--sleep", "0.001", *common])
    assert [p.name for p in runner.checkpoint_folders(crashed / "checkpoints")] == ["step-00000005"]
    monkeypatch.setattr(runner_toy.time, "sleep", real_sleep)
    assert runner_toy.main(["--out", str(crashed), "--resume", "--no-progress"]) == 0
    _assert_same_run(full, crashed)


def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    common = ["--steps", "20", "--checkpoint-every", "5", "--no-progress", "--seed", "1", "--sleep", "0.1"]
    process = subprocess.Popen([sys.executable, str(TOY), "--out", str(killed), *common],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "step-00000005").is_dir():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert not (killed / "metrics.json").exists()  # it really died mid-run
    result = subprocess.run([sys.executable, str(TOY), "--out", str(killed), "--resume", "--no-progress"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stderr
    assert runner_toy.main(["--out", str(full), *common[:-2]]) == 0  # uninterrupted, in this process
    _assert_same_run(full, killed)
    assert len(read_history(killed / "history.csv")) == 20
