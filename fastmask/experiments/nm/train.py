"""Orchestration of the nm experiment: run_experiment (dense and one-shot perplexities, a learned N:M mask from
each prior, metrics, plots, report) and its command line (add_arguments, run_from_args).

Resumable: every finished unit (the dense score, a one-shot score, a learned mask with its score) is written to
``units/`` at once, and a learned mask trains in its own runner folder ``learned-<prior>/`` (checkpoints,
history.csv, masks/), so ``--resume`` skips finished units and continues a learned mask from its newest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import replace

import torch

import fastmask as fm
from fastmask.optim import OptimizerInBackward, state_bytes

from ... import nm_priors
from ...assets import atomic_write_text
from ...bench.results import cpu_name
from ..runner import BatchStream, Run, TrainState, add_config_arguments, resolve_device, run_cli, seed_everything
from . import data as nd
from .config import EXPERIMENT, NMConfig, temperature_at
from .evaluate import one_shot_perplexity, perplexity, prior_masks
from .model import apply_nm, changed_from_prior, lm_loss, load_lm, set_temperature, target_names
from .report import plots, report_markdown


def _unit(run: Run, name: str, compute, resume: bool) -> dict:
    """units/<name>.json: read back on --resume, else computed (with its wall time) and written at once."""
    path = run.path("units", f"{name}.json")
    if resume and path.is_file():
        return json.loads(path.read_text())
    started = time.perf_counter()
    result = compute()
    result["seconds"] = time.perf_counter() - started
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return result


def _learn(run: Run, config: NMConfig, model, names, masks: dict, prior: str, train_blocks, eval_blocks,
           resume: bool) -> dict:
    """Learn an N:M mask from the prior ``masks`` in the runner folder learned-<prior>/; returns its unit."""
    sub = Run(replace(config, out=str(run.path(f"learned-{prior}"))), resume=resume, overwrite=not resume,
              experiment=f"{EXPERIMENT}:{prior}", log=run.log)
    apply_nm(model, config, names, masks)
    optimizer = None
    try:
        model.train()
        optimizer = make_optimizer(config, fm.mask_parameters(model))
        stream = BatchStream(train_blocks.shape[0], config.batch, seed=config.seed)
        state = TrainState(params={name: layer.logits for name, layer in fm.masked_modules(model).items()},
                           optimizer=optimizer, model=model, streams={"train": stream})
        sub.restore(state)

        def step_fn(step: int) -> dict:
            temperature = temperature_at(config, step)
            set_temperature(model, temperature)
            fm.set_step(model, step)  # the noise of step s, also after a resume
            loss = lm_loss(model, train_blocks[stream.next()])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # OptimizerInBackward: every logit tensor is stepped here, as its gradient completes
            optimizer.step()
            return {"loss": loss.item(), "temperature": temperature}

        started = time.perf_counter()
        steps_before = state.step
        history = sub.train(state, step_fn, show=("loss",), desc=f"nm learned from {prior}")
        train_seconds = time.perf_counter() - started
        sub.save_masks(model)
        model.eval()
        result = perplexity(model, eval_blocks, config.eval_batch)
        result.update(prior=prior, steps=config.steps, changed_from_prior=changed_from_prior(model, masks),
                      optimizer=config.optimizer,
                      mask_state_bytes_per_weight=mask_state_bytes(model, optimizer) / masked_weights(model, names),
                      first_loss=history[0]["loss"], final_loss=history[-1]["loss"], train_seconds=train_seconds,
                      steps_this_process=state.step - steps_before,
                      sparsity=fm.sparsity(model)["overall"])
        # The unit is final: its checkpoints (logits + Adam moments, ~2 GB on SmolLM2) are not needed any more.
        shutil.rmtree(sub.checkpoint_dir, ignore_errors=True)
        return result
    finally:
        if isinstance(optimizer, OptimizerInBackward):
            optimizer.remove()
        if fm.masked_modules(model):
            fm.unapply(model)  # the dense model back (the weights were never modified)


def make_optimizer(config: NMConfig, params):
    """--optimizer: Adam, or Adafactor stepped inside the backward (no gradient kept between the two)."""
    if config.optimizer == "adafactor":
        return OptimizerInBackward(params, torch.optim.Adafactor, lr=config.lr)
    return torch.optim.Adam(params, lr=config.lr)


def mask_state_bytes(model, optimizer) -> int:
    """Bytes of mask state at the end of a step: the logits, their gradients (none with OptimizerInBackward: each
    is dropped as soon as its layer is stepped; at most one layer's exists at a time) and the optimizer's state."""
    logits = fm.mask_parameters(model)
    held = sum(p.numel() * p.element_size() for p in logits)
    held += sum(p.grad.numel() * p.grad.element_size() for p in logits if p.grad is not None)
    return held + state_bytes(optimizer)


def masked_weights(model, names) -> int:
    return sum(model.get_submodule(name).weight.numel() for name in names)


def run_experiment(config: NMConfig, *, resume: bool = False, overwrite: bool = False, log=None) -> dict:
    """Score dense, one-shot and learned N:M masks; write the results folder; returns metrics.json's content."""
    run = Run(config, resume=resume, overwrite=overwrite, experiment=EXPERIMENT, log=log)
    log = run.log
    if not resume:
        shutil.rmtree(run.path("units"), ignore_errors=True)
    run.path("units").mkdir(exist_ok=True)
    seed_everything(config.seed)
    device = resolve_device(config.device)
    started = time.perf_counter()
    model, tokenizer, source = load_lm(config.model, device)
    texts = nd.texts(config.lm_source, config.data_dir)
    train_blocks = nd.token_blocks(tokenizer, texts["train"][0], config.block_size, config.train_blocks).to(device)
    eval_blocks = nd.token_blocks(tokenizer, texts["test"][0], config.block_size,
                                  config.eval_blocks or None).to(device)
    names = target_names(model)
    setup_seconds = time.perf_counter() - started

    units = {"dense": _unit(run, "dense", lambda: perplexity(model, eval_blocks, config.eval_batch), resume)}
    log(f"fastmask: dense perplexity {units['dense']['ppl']:.2f}")
    norms = None
    if "wanda" in config.priors:
        calib = train_blocks[: config.calib_blocks]
        norms = nm_priors.input_norms(model, [{"input_ids": calib[i:i + config.eval_batch]}
                                              for i in range(0, calib.shape[0], config.eval_batch)], names)
    masks = {prior: prior_masks(model, prior, names, norms, config.n, config.m) for prior in config.priors}
    for prior in config.priors:
        units[prior] = _unit(run, prior, lambda: one_shot_perplexity(model, masks[prior], eval_blocks,
                                                                     config.eval_batch), resume)
        log(f"fastmask: one-shot {prior} {config.n}:{config.m} perplexity {units[prior]['ppl']:.2f}")
    for prior in config.learn_from:
        key = f"learned-{prior}"
        units[key] = _unit(run, key, lambda: _learn(run, config, model, names, masks[prior], prior, train_blocks,
                                                    eval_blocks, resume), resume)
        log(f"fastmask: learned {config.n}:{config.m} from {prior}: perplexity {units[key]['ppl']:.2f} "
            f"({units[key]['changed_from_prior']:.1%} of the groups changed)")

    metrics = {
        "experiment": EXPERIMENT, "model": config.model, "model_source": source, "n": config.n, "m": config.m,
        "masked_layers": len(names), "masked_weights": masked_weights(model, names),
        # on paper, per weight (C(m, n) / m fp32 logits each): Adam keeps logit + gradient + two moments (16 B per
        # logit); Adafactor in backward the logit and a row factor of 4 B per group of C(m, n) logits; each learned
        # unit also reports what it measured
        "mask_state_bytes_per_weight": (16 * math.comb(config.m, config.n) if config.optimizer == "adam"
                                        else 4 * math.comb(config.m, config.n) + 4) / config.m,
        "data": {"train": texts["train"][1], "test": texts["test"][1],
                 "train_tokens": int(train_blocks.numel()), "eval_tokens": int(eval_blocks.numel()),
                 "calib_tokens": int(min(config.calib_blocks, train_blocks.shape[0]) * config.block_size)},
        "units": units,
        "backend": fm.ops._backend.resolve_name(device),
        "timing": {"setup_seconds": setup_seconds, "total_seconds": time.perf_counter() - started,
                   "unit_seconds": {k: v["seconds"] for k, v in units.items()},
                   "device": str(device), "torch_threads": run.threads, "threads_reason": run.threads_reason,
                   "cpu": cpu_name(), "cpu_count": os.cpu_count()},
    }
    run.write_metrics(metrics)
    plots(run, config, metrics)
    run.write_report(report_markdown(config, metrics))
    log(run.finished_message())
    return metrics


# --- command line -------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, NMConfig)


def run_from_args(args) -> int:
    return run_cli(NMConfig, run_experiment, args, EXPERIMENT, run_errors=(nd.DataError,))


__all__ = ["run_experiment", "add_arguments", "run_from_args"]
