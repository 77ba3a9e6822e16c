"""Orchestration of `fastmask run disentangle`: run_experiment (data, the unmasked baseline, the K masks trained
under the runner's checkpoints, data parallel under torchrun, the evaluation against the baselines, the pruning
sweep, the results folder; with ``seeds``, once per seed through ``seeds.run_seeds``), the sweep's training loop,
and the command line (add_arguments, run_from_args)."""

from __future__ import annotations

import argparse
import platform
import time

import torch
from tqdm.auto import tqdm

import fastmask as fm

from ..blocks import EncodedTexts, top_blocks
from ..runner import (BatchStream, ConfigError, add_config_arguments, open_run, resolve_device, run_cli,
                      seed_everything, weights_key)
from .config import EXPERIMENT, SPLITS, DisentangleConfig
from .data import TripletSampler, _load_splits
from .evaluate import (_mask_features, _unmasked_features, disentanglement_score, leakage_table, own_minus_other,
                       zero_fraction)
from .model import (StepLoss, _load_encoder, _masked_model, _optimizer, adversarial_features, finetuned_features,
                    mask_training,
                    step_loss)
from .report import _plots, report_markdown
from .seeds import run_seeds
from .syntax_run import run_syntax_seed


# --- the run ------------------------------------------------------------------------------------------------
def _train_plain(model, optimizer, encoded_train, labels, sampler, stream, steps, config, device, desc):
    """The sweep's training loop (no checkpoints: a sweep point is cheap to redo)."""
    for step in tqdm(range(steps), desc=desc, disable=not config.progress, dynamic_ncols=True):
        fm.set_step(model.encoder, step)
        loss, _ = step_loss(model, encoded_train, labels, sampler, stream.next(), step, config, device)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def run_one_seed(config: DisentangleConfig, *, resume: bool = False, overwrite: bool = False, log=None) -> dict:
    """Learn the K masks, evaluate them against the baselines, run the pruning sweep, write the results folder (one
    seed, ``config.seed``; ``config.seeds`` is not looked at). ``--data syntax``: setting 3's own run
    (``syntax_run.run_syntax_seed``: other data, triplet losses only, other scores)."""
    if config.data == "syntax":
        return run_syntax_seed(config, resume=resume, overwrite=overwrite, log=log)
    # Data parallel under torchrun (as `fastmask run knowledge`): replicated masks and heads, DDP over a StepLoss
    # module, every rank the global batch's triplets and its share of them; rank 0 owns the folder, evaluates and
    # runs the sweep; the others stop after training.
    run, rank, world = open_run(config, resume=resume, overwrite=overwrite, experiment=EXPERIMENT, log=log)
    main = rank == 0
    log = run.log
    if world > 1:
        if config.batch_size < world:
            raise ConfigError(f"batch_size must be at least the {world} processes (each needs an anchor), got "
                              f"{config.batch_size}")
    seed_everything(config.seed)
    device = resolve_device(config.device)
    fm.set_backend(config.backend)
    started = time.perf_counter()
    data, splits, duplicates = _load_splits(config)
    factors, values = data.factors, data.values
    n_classes = [len(v) for v in values]
    encoder, tokenizer, source = _load_encoder(config, device)
    encoded = {s: EncodedTexts.from_texts(tokenizer, splits[s].texts, config.max_length) for s in SPLITS}
    labels = {s: torch.tensor(splits[s].labels, dtype=torch.long) for s in SPLITS}
    # The unmasked baseline: the original (unpruned) encoder, run from the masked blocks' inputs, which are computed
    # here once (and cached on disk under the encoder's weights).
    first = top_blocks(encoder, config.top_blocks, "top_blocks")[2]
    features = {"unmasked": _unmasked_features(encoder, encoded, first, config.eval_batch, device,
                                               weights_key(encoder, config.model))}
    setup_seconds = time.perf_counter() - started

    model, pruned = _masked_model(encoder, config, n_classes, config.prune_sparsity)
    model.to(device)
    optimizer = _optimizer(model, config)
    sampler = TripletSampler(splits["train"].labels, seed=config.seed, mode=config.triplet_sampling)
    step_module = StepLoss(model, encoded["train"], labels["train"], sampler, config, device, rank, world)
    state, step_fn = mask_training(run, model, optimizer, step_module, len(encoded["train"]), config, world)

    train_started = time.perf_counter()
    history = run.train(state, step_fn, show=("loss",))
    train_seconds = time.perf_counter() - train_started
    if not main:  # rank 0 evaluates, runs the sweep and writes the results
        return {}
    run.save_masks(model.encoder)

    eval_started = time.perf_counter()
    features.update(_mask_features(model, encoded, config.eval_batch, device))
    for k in range(len(factors)):
        transform = adversarial_features(features["unmasked"]["train"], labels["train"], k, config.adv_steps,
                                         config.adv_lambda, config.seed + k)
        features[f"adversarial_{k}"] = {s: transform(features["unmasked"][s]) for s in SPLITS}
    if config.finetune_steps:
        for k in range(len(factors)):
            features[f"finetuned_{k}"] = finetuned_features(config, encoded, labels, k, n_classes, device)
    leakage = leakage_table(features, labels, config.probe_l2)
    leakage_mlp = leakage_table(features, labels, probe="mlp", seed=config.seed)
    robust = leakage_table(features, labels, config.probe_l2, train="train", test="shifted")
    in_distribution = leakage_table(features, labels, config.probe_l2, train="train", test="test")
    sparsity = fm.sparsity(model.encoder)
    per_mask_sparsity = [s["overall"] for s in sparsity["per_mask"]]
    eval_seconds = time.perf_counter() - eval_started

    sweep = [{"prune_sparsity": config.prune_sparsity, "steps": config.steps,
              "disentanglement": disentanglement_score(leakage, len(factors)),
              "disentanglement_mlp": disentanglement_score(leakage_mlp, len(factors)),
              "mask_sparsity": per_mask_sparsity, "leakage": {k: leakage[f"mask_{k}"] for k in range(len(factors))},
              "leakage_mlp": {k: leakage_mlp[f"mask_{k}"] for k in range(len(factors))},
              "zero_fraction": [zero_fraction(model.encoder, k) for k in range(len(factors))]}]
    metrics = {
        "experiment": EXPERIMENT, "model": config.model, "model_source": source,
        "factors": list(factors), "values": [list(v) for v in values],
        "data": {"raw_examples": duplicates["examples"], "deduplication": duplicates,
                 "splits": {s: len(splits[s]) for s in SPLITS},
                 "agreement": {s: (labels[s][:, 0] == labels[s][:, 1]).double().mean().item() for s in SPLITS}},
        "seed": config.seed, "leakage": leakage, "leakage_mlp": leakage_mlp,
        "own_minus_other": own_minus_other(leakage), "own_minus_other_mlp": own_minus_other(leakage_mlp),
        "robustness_shifted": robust, "in_distribution_correlated_probe": in_distribution,
        "chance": 0.5, "disentanglement": disentanglement_score(leakage, len(factors)),
        "disentanglement_mlp": disentanglement_score(leakage_mlp, len(factors)),
        "mask_sparsity": per_mask_sparsity, "pruned_fraction": (sum(pruned.values()) / len(pruned)) if pruned else 0.0,
        "sweep": sweep, "final": history[-1] if history else {},
        "seconds": {"setup": setup_seconds, "train": train_seconds, "evaluate": eval_seconds, "sweep": 0.0},
        "hardware": {"device": str(device), "machine": platform.machine(), "processor": platform.processor(),
                     "torch_threads": torch.get_num_threads()},
    }

    def write_results() -> None:  # after the main evaluation and after each sweep point: a stopped sweep keeps them
        metrics["sweep"] = sorted(sweep, key=lambda row: row["prune_sparsity"])
        run.write_metrics(metrics)
        _plots(run, history, metrics)
        run.write_report(report_markdown(config, metrics))

    write_results()
    sweep_started = time.perf_counter()
    for s in config.sweep_sparsities:
        if s == config.prune_sparsity:
            continue
        seed_everything(config.seed)
        sweep_encoder, _, _ = _load_encoder(config, device)
        sweep_model, _ = _masked_model(sweep_encoder, config, n_classes, s)
        sweep_model.to(device)
        _train_plain(sweep_model, _optimizer(sweep_model, config), encoded["train"], labels["train"], sampler,
                     BatchStream(len(encoded["train"]), config.batch_size, config.seed), config.sweep_steps, config,
                     device, desc=f"sweep {s:g}")
        sweep_features = _mask_features(sweep_model, encoded, config.eval_batch, device, ("probe", "test"))
        table = leakage_table(sweep_features, labels, config.probe_l2)
        table_mlp = leakage_table(sweep_features, labels, probe="mlp", seed=config.seed)
        sweep.append({"prune_sparsity": s, "steps": config.sweep_steps,
                      "disentanglement": disentanglement_score(table, len(factors)),
                      "disentanglement_mlp": disentanglement_score(table_mlp, len(factors)),
                      "mask_sparsity": [fm.sparsity(sweep_model.encoder, mask=k)["overall"]
                                        for k in range(len(factors))],
                      "zero_fraction": [zero_fraction(sweep_model.encoder, k) for k in range(len(factors))],
                      "leakage": {k: table[f"mask_{k}"] for k in range(len(factors))},
                      "leakage_mlp": {k: table_mlp[f"mask_{k}"] for k in range(len(factors))}})
        metrics["seconds"]["sweep"] = time.perf_counter() - sweep_started
        write_results()

    print(run.finished_message())
    return metrics


# --- command line -------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, DisentangleConfig)


def run_experiment(config: DisentangleConfig, *, resume: bool = False, overwrite: bool = False, log=None) -> dict:
    """``config.seeds`` given: ``seeds.run_seeds`` (one whole run per seed in <out>/seed-<s>/, then mean and 95% CI
    over them in <out>); else the one run of ``config.seed`` in <out> (``run_one_seed``)."""
    if config.seeds:
        return run_seeds(config, run_one_seed, resume=resume, overwrite=overwrite, log=log)
    return run_one_seed(config, resume=resume, overwrite=overwrite, log=log)


def run_from_args(args) -> int:
    return run_cli(DisentangleConfig, run_experiment, args, EXPERIMENT)


__all__ = ["run_experiment", "run_one_seed", "add_arguments", "run_from_args"]
