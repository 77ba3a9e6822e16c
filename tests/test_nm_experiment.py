"""`fastmask run nm` end to end on a tiny GPT-2 (Conv1D layers) with the real GPT-2 tokenizer and the shared
WikiText-2 files: results folder, saved masks that reproduce the reported perplexity, --resume, bad flags."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import fastmask as fm
from fastmask import assets
from fastmask.experiments.nm import config as nc, data as nd, evaluate as ne

from conftest import SHARED_DATA

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "wikitext-2" / "wiki.test.raw").is_file(),
                                reason="WikiText-2 is not in the shared data folder")

TINY_RUN = ["--steps", "4", "--train-blocks", "6", "--calib-blocks", "2", "--eval-blocks", "3", "--block-size",
            "16", "--batch", "2", "--checkpoint-every", "2", "--lr", "2.0", "--prior-strength", "1.0",
            "--learn-from", "magnitude,wanda",
            "--no-progress", "--threads", "1", "--data-dir", str(SHARED_DATA)]


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-gpt2-nm")
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=50257, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2)
    GPT2LMHeadModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(assets.gpt2_tokenizer_dir()).save_pretrained(folder)
    return folder


def _run(model_dir, out, *extra):
    return subprocess.run([sys.executable, "-m", "fastmask", "run", "nm", "--model", str(model_dir), "--out",
                           str(out), *TINY_RUN, *extra], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_gpt2_dir):
    out = tmp_path_factory.mktemp("nm-cli") / "run"
    return out, _run(tiny_gpt2_dir, out)


def test_cli_end_to_end(cli_run, tiny_gpt2_dir):
    out, result = cli_run
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("config.json", "metrics.json", "report.md", "ppl.png", "loss.png", "units/dense.json",
                 "units/magnitude.json", "units/wanda.json", "units/learned-magnitude.json",
                 "units/learned-wanda.json", "learned-wanda/history.csv", "learned-wanda/masks/masks.safetensors"):
        assert (out / name).is_file(), name
    assert not (out / "learned-wanda" / "checkpoints").exists()  # a finished unit drops its checkpoints
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["masked_layers"] == 8 and metrics["mask_state_bytes_per_weight"] == 24
    units = metrics["units"]
    for key in ("magnitude", "wanda"):
        assert units[f"learned-{key}"]["sparsity"] == 0.5
        assert units[f"learned-{key}"]["steps"] == 4
        # measured: logits, gradients and Adam's moments (+ its step counters) = 24 B per weight
        assert units[f"learned-{key}"]["mask_state_bytes_per_weight"] == pytest.approx(24, rel=1e-3)
    assert "valid" in metrics["data"]["train"] and "test" in metrics["data"]["test"]
    report = (out / "report.md").read_text()
    assert "masks train on the\nvalidation split" in report and "| dense |" in report
    history = (out / "learned-magnitude" / "history.csv").read_text().splitlines()
    assert history[0].startswith("step,loss,temperature") and len(history) == 5


def test_saved_masks_reproduce_the_reported_perplexity(cli_run, tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, result = cli_run
    assert result.returncode == 0, result.stderr[-3000:]
    units = json.loads((out / "metrics.json").read_text())["units"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    blocks = nd.token_blocks(tokenizer, nd.texts("local", SHARED_DATA)["test"][0], 16, 3)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    assert ne.perplexity(model, blocks, 4)["ppl"] == pytest.approx(units["dense"]["ppl"], rel=1e-5)
    fm.load_masks(model, out / "learned-wanda" / "masks")
    assert ne.perplexity(model, blocks, 4)["ppl"] == pytest.approx(units["learned-wanda"]["ppl"], rel=1e-5)


def test_resume_recomputes_only_missing_units(cli_run, tiny_gpt2_dir):
    out, result = cli_run
    assert result.returncode == 0, result.stderr[-3000:]
    before = json.loads((out / "metrics.json").read_text())["units"]
    (out / "units" / "learned-wanda.json").unlink()
    again = _run(tiny_gpt2_dir, out, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    after = json.loads((out / "metrics.json").read_text())["units"]
    assert after["dense"] == before["dense"] and after["learned-magnitude"] == before["learned-magnitude"]
    # the learned mask trained again from its prior, with the same noise and data order: the same result
    assert after["learned-wanda"]["ppl"] == pytest.approx(before["learned-wanda"]["ppl"], rel=1e-6)
    assert after["learned-wanda"]["final_loss"] == pytest.approx(before["learned-wanda"]["final_loss"], rel=1e-6)


def test_adafactor_in_backward_keeps_at_most_8_bytes_per_weight(tmp_path, tiny_gpt2_dir):
    """--optimizer adafactor: no gradient kept, a factored second moment: 7 B of mask state per weight for 2:4
    (measured at the end of training), the mask still exactly 2:4, and an interrupted run resumes to the same mask."""
    flags = ("--optimizer", "adafactor", "--learn-from", "wanda", "--lr", "0.5")
    result = _run(tiny_gpt2_dir, tmp_path / "run", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    unit = metrics["units"]["learned-wanda"]
    assert metrics["mask_state_bytes_per_weight"] == 7 and unit["optimizer"] == "adafactor"
    assert 7 <= unit["mask_state_bytes_per_weight"] <= 8 and unit["sparsity"] == 0.5
    assert unit["changed_from_prior"] > 0  # it learned something at this lr
    assert "Adafactor (stepped in the backward)" in (tmp_path / "run" / "report.md").read_text()
    # interrupted after the checkpoint of step 2 (in-process: the third training loss raises), then resumed: the
    # per-parameter Adafactor states came back from the checkpoint, so the mask and its perplexity are the same
    from fastmask.cli import main
    from fastmask.experiments.nm import train as nm_train

    calls, real_loss = [], nm_train.lm_loss

    def loss_that_dies_at_step_2(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("stopped by the test")
        return real_loss(*args)

    argv = ["run", "nm", "--model", str(tiny_gpt2_dir), "--out", str(tmp_path / "stopped"), *TINY_RUN, *flags]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nm_train, "lm_loss", loss_that_dies_at_step_2)
        with pytest.raises(KeyboardInterrupt):
            main(argv)
    assert not (tmp_path / "stopped" / "units" / "learned-wanda.json").exists()
    assert main(argv + ["--resume"]) == 0
    again = json.loads((tmp_path / "stopped" / "metrics.json").read_text())["units"]["learned-wanda"]
    assert again["steps_this_process"] == 2 and again["ppl"] == pytest.approx(unit["ppl"], rel=1e-6)


@pytest.mark.parametrize("flags,message", [(["--n", "4", "--m", "4"], "n must be"),
                                           (["--priors", "sparsegpt"], "priors must be"),
                                           (["--priors", "magnitude"], "learn_from must be"),
                                           (["--batch", "9"], "batch must be")])
def test_bad_flags_are_usage_errors(tmp_path, tiny_gpt2_dir, flags, message):
    result = _run(tiny_gpt2_dir, tmp_path / "run", *flags)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]


def test_temperature_schedule():
    config = nc.NMConfig(steps=5, temperature=2.0, temperature_final=0.5)
    assert [nc.temperature_at(config, s) for s in (0, 4)] == [2.0, 0.5]
    assert nc.temperature_at(config, 2) == pytest.approx(1.25)
