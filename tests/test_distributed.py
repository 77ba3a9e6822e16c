"""Mask learning on torch.distributed (CPU, gloo, 2 processes under torchrun): FSDP2 and DDP training of tiny
masked GPT-2 and Llama models (per-weight and head masks) follows the one-process run on the same global batch; the
consolidated mask file of a 2-process run loads into a one-process model with the same eval outputs; sharded
checkpoints (torch.distributed.checkpoint) resume with 2 or 1 processes; a rank that dies ends the job with an error
and the run resumes from its last checkpoint."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fastmask as fm
import fastmask.distributed as fmd

import distributed_worker as worker

HERE = Path(__file__).resolve().parent
# Adam's update is about lr * g / (|g| + eps) per element, so logits whose gradient is nearly 0 move by amounts that
# depend on the last bits of the gradient average (N partial means vs one mean): measured 7.6e-6 relative after 3
# steps (GPT-2 per-weight; 2e-8 for Llama heads). The bound leaves 10x room and is still 500x below one step (lr).
LOGIT_ATOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
               "127.0.0.1", "--master-port", str(_free_port()), str(HERE / "distributed_worker.py"), str(out),
               *extra]
    return subprocess.run(command, env=env, cwd=HERE, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one-process reference folder, 2-process folder) after every scenario of the worker."""
    reference, two = tmp_path_factory.mktemp("one_process"), tmp_path_factory.mktemp("two_processes")
    worker.main([str(reference), "--reference"])
    done = _torchrun(two)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return reference, two


@pytest.mark.parametrize("scenario", list(worker.SCENARIOS))
def test_two_processes_follow_the_one_process_run(runs, scenario):
    reference, two = runs
    assert (two / f"{scenario}.done").exists()
    want, got = load_file(reference / f"{scenario}.safetensors"), load_file(two / f"{scenario}.safetensors")
    assert set(got) == set(want) and got
    start = worker.masked_model(scenario)
    for name, logits in want.items():
        moved = (logits - fm.masked_modules(start)[name].logits.detach()).abs().max()
        assert moved > 0.01, f"{name}: training did not move the logits"  # the comparison is not vacuous
        torch.testing.assert_close(got[name], logits, atol=LOGIT_ATOL, rtol=0, msg=name)
    # the eval gates summed shard by shard (then over the ranks) are the one-process sums, step by step, and they
    # move; the loss's sparsity penalty read the logits sharded (FSDP2 reshards a block after its forward)
    want_eval, got_eval = (load_file(folder / f"{scenario}.eval.safetensors") for folder in (reference, two))
    torch.testing.assert_close(got_eval["gate_sums"], want_eval["gate_sums"], rtol=1e-5, atol=0)
    assert len(want_eval["gate_sums"]) == worker.STEPS and want_eval["gate_sums"].unique().numel() == worker.STEPS
    assert bool(got_eval["sharded_between_steps"].all()) == ("fsdp" in scenario)
    assert not want_eval["sharded_between_steps"].any()


@pytest.mark.parametrize("scenario", ["gpt2_weight_fsdp", "gpt2_weight_fsdp_blocks", "llama_head_fsdp",
                                      "llama_head_ddp"])
def test_consolidated_mask_file_loads_in_one_process(runs, scenario):
    """The file rank 0 wrote from the FSDP2 shards (or the DDP replica) carries the fingerprint of the unsharded
    base model (fm.load_masks refuses another) and loads into a one-process model whose eval outputs are those of
    the 2-process model itself."""
    _, two = runs
    model = fm.load_masks(worker.masked_model(scenario), two / f"{scenario}.safetensors").eval()
    with torch.no_grad():
        outputs = model(input_ids=worker.batch()).logits
    sharded = load_file(two / f"{scenario}.eval.safetensors")["logits"]
    torch.testing.assert_close(outputs, sharded, atol=1e-6, rtol=1e-6)


def _load(folder: Path, scenario: str) -> dict:
    return load_file(folder / f"{scenario}.safetensors")


@pytest.mark.parametrize("scenario", ["gpt2_weight_fsdp", "llama_head_ddp"])
def test_sharded_checkpoint_resumes_with_two_or_one_processes(runs, scenario, tmp_path):
    """A 2-process run checkpointed after 2 of 3 steps (torch.distributed.checkpoint: each rank its shards) and
    resumed: with 2 processes it ends bit for bit as the uninterrupted 2-process run; with 1 process (DCP reshards)
    as the uninterrupted one-process run within LOGIT_ATOL."""
    reference, two = runs
    stopped = tmp_path / "two"
    stopped.mkdir()
    done = _torchrun(stopped, "--scenarios", scenario, "--stop-at", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (stopped / f"{scenario}.safetensors").exists()  # it did stop
    one = tmp_path / "one"
    shutil.copytree(stopped, one)
    done = _torchrun(stopped, "--scenarios", scenario, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    uninterrupted, resumed = _load(two, scenario), _load(stopped, scenario)
    assert all(torch.equal(resumed[name], logits) for name, logits in uninterrupted.items())
    worker.main([str(one), "--reference", "--scenarios", scenario, "--resume"])
    for name, logits in _load(reference, scenario).items():
        torch.testing.assert_close(_load(one, scenario)[name], logits, atol=LOGIT_ATOL, rtol=0, msg=name)


def test_a_rank_that_dies_ends_the_job_and_the_run_resumes_from_its_last_checkpoint(runs, tmp_path):
    reference, two = runs
    start = time.monotonic()
    done = _torchrun(tmp_path, "--scenarios", "gpt2_weight_fsdp", "--checkpoint-every", "1", "--die-at-step", "2",
                     "--timeout-s", "30", timeout=120)
    took = time.monotonic() - start
    assert done.returncode != 0, done.stderr[-3000:]
    assert took < 100, f"{took:.0f} s: {done.stderr[-3000:]}"
    assert "exitcode  : 3" in done.stderr, done.stderr[-3000:]  # torchrun names the rank that failed and how
    assert not (tmp_path / "gpt2_weight_fsdp.done").exists()
    meta = json.loads((tmp_path / "gpt2_weight_fsdp.ckpt" / fmd.CHECKPOINT_META).read_text())
    assert meta["step"] == 2 and meta["world_size"] == 2
    done = _torchrun(tmp_path, "--scenarios", "gpt2_weight_fsdp", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    uninterrupted, resumed = _load(two, "gpt2_weight_fsdp"), _load(tmp_path, "gpt2_weight_fsdp")
    assert all(torch.equal(resumed[name], logits) for name, logits in uninterrupted.items())


def test_a_checkpoint_of_the_old_noise_loads_with_a_warning(tmp_path):
    """Version 1 checkpoints (no "noise") drew the first-word noise: the state loads, and the warning says that
    training continued from it draws today's noise. One process: DCP without a process group."""
    model = worker.masked_model("gpt2_weight_fsdp")
    opt = torch.optim.Adam(fm.mask_parameters(model))
    folder = fmd.save_checkpoint(tmp_path / "ckpt", model, opt, step=3)
    meta_path = folder / fmd.CHECKPOINT_META
    meta = json.loads(meta_path.read_text())
    assert meta["version"] == 2 and meta["noise"] == fm.ref.NOISE
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fmd.load_checkpoint(folder, model, opt)
    del meta["noise"]
    meta["version"] = 1
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="drew the noise 'philox4x32-10/first-word'"):
        assert fmd.load_checkpoint(folder, model, opt)["step"] == 3


def test_load_checkpoint_refuses_a_folder_without_its_metadata(tmp_path):
    model = worker.masked_model("gpt2_weight_fsdp")
    opt = torch.optim.Adam(fm.mask_parameters(model))
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no fastmask_checkpoint.json"):
        fmd.load_checkpoint(tmp_path / "half", model, opt)
