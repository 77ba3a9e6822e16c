"""Issue 8, interrupted runs: a process SIGKILLed in the middle of writing a checkpoint (its state.safetensors
written, state.json not yet) resumes from the last complete checkpoint, and the resumed run's masks and history
equal an uninterrupted run's bit for bit (fastmask.experiments.runner)."""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from fastmask.experiments.runner import checkpoint_folders, read_history

# A small experiment on the runner. With KILL_AT=step-0000000N in the environment, the process kills itself with
# SIGKILL at the first fsync inside that checkpoint's staging folder: one file written, the rest never.
SCRIPT = '''
import argparse, os, signal, sys
import torch
import fastmask as fm
from fastmask.experiments import runner
from fastmask.experiments.runner import (BatchStream, Run, RunConfig, TrainState, add_config_arguments,
                                         config_from_args, seed_everything)

KILL_AT = os.environ.get("KILL_AT")
if KILL_AT:
    real_fsync = os.fsync

    def dying_fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").split("/")[-2].startswith(f".{KILL_AT}."):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_fsync(fd)

    runner.checkpoint.os.fsync = dying_fsync


def main(argv=None):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, RunConfig)
    args = parser.parse_args(argv)
    config = config_from_args(RunConfig, args, experiment="kill")
    run = Run(config, resume=args.resume, overwrite=args.overwrite, experiment="kill")
    seed_everything(config.seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
    fm.apply(model, fm.MaskConfig(estimator="hard_concrete", targets=["Linear"], seed=config.seed))
    data_x, data_y = torch.randn(19, 5), torch.randn(19, 2)
    optimizer = torch.optim.Adam(fm.mask_parameters(model), lr=0.05)
    state = TrainState(params={n: layer.logits for n, layer in fm.masked_modules(model).items()},
                       optimizer=optimizer, model=model, streams={"train": BatchStream(19, 4, seed=config.seed)})
    run.restore(state)
    model.train()

    def step_fn(step):
        index = state.streams["train"].next()
        x = data_x[index] + 0.1 * torch.randn(len(index), 5)
        loss = ((model(x) - data_y[index]) ** 2).mean() + 0.01 * fm.l0_penalty(model, normalize=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    run.train(state, step_fn)
    run.save_masks(model)
    run.write_metrics({"final_loss": state.history[-1]["loss"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


def _masks(folder: Path) -> dict:
    return load_file(str(folder / "masks" / "masks.safetensors"))


def test_sigkill_while_writing_a_checkpoint_then_resume_is_bit_identical(tmp_path):
    script = tmp_path / "kill_experiment.py"
    script.write_text(SCRIPT)
    common = ["--steps", "9", "--checkpoint-every", "3", "--seed", "5", "--no-progress"]
    killed, full = tmp_path / "killed", tmp_path / "full"
    env = dict(os.environ, KILL_AT="step-00000006")
    result = subprocess.run([sys.executable, str(script), "--out", str(killed), *common], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    leftovers = [p.name for p in (killed / "checkpoints").iterdir()]
    assert any(name.startswith(".step-00000006.") for name in leftovers)  # the half-written staging folder
    assert [p.name for p in checkpoint_folders(killed / "checkpoints")] == ["step-00000003"]
    assert not (killed / "metrics.json").exists()

    env.pop("KILL_AT")
    resumed = subprocess.run([sys.executable, str(script), "--out", str(killed), "--resume", "--no-progress"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr and "step-00000003" in resumed.stderr

    assert runpy.run_path(str(script))["main"](["--out", str(full), *common]) == 0  # uninterrupted, in-process
    masks_full, masks_killed = _masks(full), _masks(killed)
    assert sorted(masks_full) == sorted(masks_killed)
    for name in masks_full:
        assert torch.equal(masks_full[name], masks_killed[name]), name
    assert read_history(full / "history.csv") == read_history(killed / "history.csv")
    assert (full / "metrics.json").read_text() == (killed / "metrics.json").read_text()
