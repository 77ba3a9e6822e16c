"""Orchestration of the topoprobe experiment: run_experiment (probe every layer of the full model and of the masked
subnetwork, run the fine-tuning sweep, write metrics, plots and report) and its command line (add_arguments,
run_from_args)."""

from __future__ import annotations

import argparse
import os
import shutil
import time

from tqdm.auto import tqdm

import fastmask as fm

from ... import assets
from ...bench.results import cpu_name
from ...probing.pseudo_labels import benchmark as pseudo_label_benchmark
from ..runner import ConfigError, Run, add_config_arguments, resolve_device, run_cli, seed_everything
from .config import EXPERIMENT, TopoprobeConfig
from .data import finetune_data, probe_data
from .evaluate import _read_unit, _write_unit, finetune_run, probe_layers, ssp_probe_weights, summarise_finetuning
from .model import load_encoder
from .report import _plots, report_markdown


def spread_layers(n_layers: int, count: int = 3) -> list[int]:
    """``count`` layers spread over 1..n_layers (the default fine-tuning sweep of the small budget)."""
    return sorted({max(1, round(n_layers * (i + 1) / count)) for i in range(count)})


# --- the experiment -----------------------------------------------------------------------------------------
def run_experiment(config: TopoprobeConfig, *, resume: bool = False, overwrite: bool = False, log=None) -> dict:
    """Probe every layer, fine-tune, write the results folder; returns metrics.json's content."""
    run = Run(config, resume=resume, overwrite=overwrite, experiment=EXPERIMENT, log=log)
    log = run.log
    if not resume:
        shutil.rmtree(run.path("units"), ignore_errors=True)
    run.path("units").mkdir(exist_ok=True)
    effective = config.effective()
    device = resolve_device(config.device)
    threads, threads_reason = run.threads, run.threads_reason
    seed_everything(config.seed)
    started = time.perf_counter()
    source = assets.resolve_model(config.model)
    tokenizer, model = load_encoder(source, None, device)
    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers + 1)) if effective.layers is None else sorted(set(effective.layers))
    finetune_layers = (list(range(n_layers + 1)) if effective.full else spread_layers(n_layers)) \
        if effective.finetune_layers is None else sorted(set(effective.finetune_layers))
    for name, chosen in (("layers", layers), ("finetune_layers", finetune_layers)):
        bad = [layer for layer in chosen if layer > n_layers]
        if bad:
            raise ConfigError(f"{name} must be in 0..{n_layers} for {config.model} ({n_layers} layers + "
                              f"embeddings), got {bad}")
    if effective.finetune:
        missing = [layer for layer in finetune_layers if layer not in layers]
        if missing:  # the regularising probe starts from that layer's X_ssp probe
            layers = sorted(set(layers) | set(missing))
    data = probe_data(effective)
    setup_seconds = time.perf_counter() - started

    probe_started = time.perf_counter()
    probes = {"full": probe_layers(run, effective, tokenizer, model, "full", data, layers, device, log)}
    if config.masks:
        _, masked_model = load_encoder(source, config.masks, device)
        probes["masked"] = probe_layers(run, effective, tokenizer, masked_model, "masked", data, layers, device, log)
        probes_sparsity = fm.sparsity(masked_model)["overall"] if fm.masked_modules(masked_model) else None
    else:
        probes_sparsity = None
    probe_seconds = time.perf_counter() - probe_started

    finetune_started = time.perf_counter()
    finetune_runs = []
    if effective.finetune:
        train_rows, dev_rows = finetune_data(effective)
        plan = [(None, seed) for seed in effective.finetune_seeds] + \
            [(layer, seed) for layer in finetune_layers for seed in effective.finetune_seeds]
        for layer, seed in tqdm(plan, desc="fine-tuning runs", disable=not config.progress):
            name = f"finetune-{'baseline' if layer is None else f'layer{layer:02d}'}-seed{seed}"
            unit = _read_unit(run, name) if resume else None
            if unit is None:
                run_started = time.perf_counter()
                init = None if layer is None else ssp_probe_weights(run, "full", layer)
                unit = finetune_run(source, tokenizer, train_rows, dev_rows, layer, seed, init, effective, device)
                unit["seconds"] = time.perf_counter() - run_started
                _write_unit(run, name, unit)
                log(f"fastmask: fine-tuning {'baseline' if layer is None else f'layer {layer}'} seed {seed}: MCC "
                    f"{unit['mcc']:.3f} (per-batch mean {unit['mcc_per_batch']:.3f}), {unit['seconds']:.0f} s")
            finetune_runs.append(unit)
    finetune_seconds = time.perf_counter() - finetune_started

    table = {variant: [results[layer] for layer in sorted(results)] for variant, results in probes.items()}
    sp_curve = {row["layer"]: row["sp"]["val_mse"] for row in table["full"]}
    best_layer = min(sp_curve, key=sp_curve.get)
    metrics = {
        "experiment": EXPERIMENT, "model": config.model, "model_source": source,
        "model_type": model.config.model_type, "layers": layers, "n_layers": n_layers,
        "hidden_size": model.config.hidden_size, "probe_rank": effective.probe_rank or model.config.hidden_size // 2,
        "effective_config": {k: v for k, v in vars(effective).items()},
        "data": {"treebank_train": len(data["train"]), "treebank_val": len(data["val"]),
                 "val_split": effective.val_split, "pseudo_corpus": effective.pseudo_corpus,
                 "pseudo_sentences": len(data["pseudo"]) if data["pseudo"] is not None else len(data["train"])},
        "probes": table, "masked_sparsity": probes_sparsity,
        "x_sp_curve": sp_curve, "x_sp_min_layer": best_layer,
        # layers whose learned X_sp does not beat predicting the mean depth for every token: the probe did not fit
        "x_sp_not_fitted": {variant: [row["layer"] for row in rows if "baselines" in row
                                      and row["sp"]["val_mse"] >= row["baselines"]["sp_mean_depth"]]
                            for variant, rows in table.items()},
        # U-shaped: the minimum is an inner layer, below both ends
        "u_shaped": bool(min(sp_curve) < best_layer < max(sp_curve)),
        "finetuning": {"runs": finetune_runs, "summary": summarise_finetuning(finetune_runs),
                       "layers": finetune_layers if effective.finetune else [],
                       "seeds": effective.finetune_seeds if effective.finetune else []},
        "pseudo_label_speed": pseudo_label_benchmark(),
        "timing": {"setup_seconds": setup_seconds, "probe_seconds": probe_seconds,
                   "finetune_seconds": finetune_seconds,
                   # what the finished units cost when they were computed (a --resume reads them back in no time)
                   "probe_training_unit_seconds": sum(u["seconds"] for rows in table.values() for u in rows),
                   "finetune_unit_seconds": sum(r["seconds"] for r in finetune_runs),
                   "device": str(device), "torch_threads": threads,
                   "threads_reason": threads_reason, "cpu": cpu_name(), "cpu_count": os.cpu_count()},
    }
    run.write_metrics(metrics)
    _plots(run, metrics)
    run.write_report(report_markdown(config, effective, metrics))
    log(run.finished_message())
    return metrics


# --- command line -------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TopoprobeConfig)


def run_from_args(args) -> int:
    return run_cli(TopoprobeConfig, run_experiment, args, EXPERIMENT,
                   run_errors=(FileNotFoundError, ValueError))  # bad data files, masks, model
