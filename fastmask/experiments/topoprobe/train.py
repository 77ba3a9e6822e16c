"""Orchestration of the topoprobe experiment: run_experiment (probe every layer of the full model and of the masked
subnetwork, run the fine-tuning sweep, write metrics, plots and report) and its command line (add_arguments,
run_from_args)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

import fastmask as fm

from ... import assets
from ...assets import AssetUnavailable
from ...bench.results import cpu_name
from ...probing.pseudo_labels import benchmark as pseudo_label_benchmark
from ..runner import ConfigError, Run, add_config_arguments, resolve_device, run_cli, seed_everything
from .config import EXPERIMENT, TopoprobeConfig
from .data import finetune_data, probe_data, released_finetuning, released_probe_losses
from .evaluate import (_read_unit, _write_unit, finetune_run, probe_layers, single_class, ssp_probe_weights,
                       summarise_finetuning, summarise_released_finetuning)
from .model import load_encoder
from .report import _plots, report_markdown


def middle_layer(n_layers: int) -> int:
    """The default layer of the regularising probe: the middle block (MiniLM's X_sp is lowest there, layer 3 of 6;
    the paper's BERT-large has its minimum at layer 16 of 24, also inside the model, not at an end)."""
    return max(1, round(n_layers / 2))


# --- the experiment -----------------------------------------------------------------------------------------
def run_experiment(config: TopoprobeConfig, *, resume: bool = False, overwrite: bool = False, log=None) -> dict:
    """Probe every layer, fine-tune, write the results folder; returns metrics.json's content."""
    if config.compare_with and not (Path(config.compare_with) / "metrics.json").is_file():  # before hours of work
        raise ConfigError(f"compare_with must be a topoprobe results folder holding metrics.json, got "
                          f"{config.compare_with!r}")
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
    finetune_layers = (list(range(n_layers + 1)) if effective.full else [middle_layer(n_layers)]) \
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
                    f"{unit['mcc']:.3f} (per-batch mean {unit['mcc_per_batch']:.3f}), {unit['seconds']:.0f} s" +
                    (" -- predicts a single class" if single_class(unit) else ""))
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
        "protocol": effective.protocol,
        "data": {"treebank": effective.treebank, "treebank_train": len(data["train"]),
                 "treebank_val": len(data["val"]), "pseudo_pool_size": data.get("pseudo_pool_size"),
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
                       "single_class_runs": [{"layer": r["layer"], "seed": r["seed"]} for r in finetune_runs
                                             if single_class(r)],
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
    metrics["comparison"] = comparison(config, effective, metrics, log)
    run.write_metrics(metrics)
    _plots(run, metrics)
    run.write_report(report_markdown(config, effective, metrics))
    log(run.finished_message())
    return metrics


def bert_large_layer(layer: int, n_layers: int) -> int:
    """The released bert-large-uncased layer (of 24) at the same relative depth as ``layer`` of ``n_layers``."""
    return round(layer * 24 / n_layers)


def comparison(config: TopoprobeConfig, effective: TopoprobeConfig, metrics: dict, log) -> Optional[dict]:
    """What the report puts beside this run's per-layer table (with --protocol released or --compare-with): the
    --compare-with run's X_sp / X_ssp / X_essp and the released bert-large values at the same relative depth
    (probe losses and the CoLA fine-tuning runs), read from the shared data folder when it has them."""
    if effective.protocol != "released" and not config.compare_with:
        return None
    out = {"other": None, "bert_large": None}
    if config.compare_with:
        path = Path(config.compare_with) / "metrics.json"
        if not path.is_file():
            raise ConfigError(f"compare_with must be a topoprobe results folder holding metrics.json, got "
                              f"{config.compare_with!r} (no {path})")
        other = json.loads(path.read_text())
        if other.get("experiment") != EXPERIMENT or "full" not in other.get("probes", {}):
            raise ConfigError(f"compare_with: {path} is not a topoprobe run's metrics.json")
        out["other"] = {"folder": str(config.compare_with),
                        "protocol": other.get("effective_config", {}).get("protocol", "default"),
                        "include_padding": other.get("effective_config", {}).get("include_padding"),
                        "rows": {int(row["layer"]): {kind: row[kind]["val_mse"] for kind in ("sp", "ssp", "essp")}
                                 for row in other["probes"]["full"]}}
    try:
        n_layers = metrics["n_layers"]
        mapped = {layer: bert_large_layer(layer, n_layers) for layer in metrics["layers"]}
        losses = released_probe_losses(effective.data_dir, sorted(set(mapped.values())))
        fine_layers = sorted({bert_large_layer(layer, n_layers) for layer in metrics["finetuning"]["layers"]})
        out["bert_large"] = {"layer_map": mapped, "probes": losses,
                             "finetuning": summarise_released_finetuning(released_finetuning(effective.data_dir),
                                                                         fine_layers)}
    except (FileNotFoundError, AssetUnavailable) as error:  # the released results are optional context
        log(f"fastmask: released bert-large results not read ({str(error).splitlines()[0]})")
    return out


# --- command line -------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TopoprobeConfig)


def run_from_args(args) -> int:
    return run_cli(TopoprobeConfig, run_experiment, args, EXPERIMENT,
                   run_errors=(FileNotFoundError, ValueError))  # bad data files, masks, model
