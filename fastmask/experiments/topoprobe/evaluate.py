"""Evaluation of the topoprobe experiment: every probe of every layer and its metrics (X_sp / X_ssp / X_essp
validation MSE, depth Spearman, root accuracy, distance probe UUAS), the finished units they are written to, and the
fine-tuning runs' dev-set Matthews correlations (corpus-level and the released per-batch mean)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ...assets import atomic_write_bytes, atomic_write_text
from ...probing import (DEPTH_KINDS, ProbeSettings, depth_baselines, extract_features, matthews_corrcoef,
                        per_batch_mcc, train_depth_probe, train_distance_probe)
from ...probing.features import usable_sentences
from ..runner import Run, _json_safe
from ..stats import mean_ci
from .config import TopoprobeConfig
from .data import _encode_cola, cola_pad_length
from .model import extract_padded_features, finetune_model


# --- probing ------------------------------------------------------------------------------------------------
def _layer_chunks(layers: Sequence[int], tokens: int, hidden: int, bytes_per_value: int, budget_gb: float):
    per_layer = tokens * hidden * bytes_per_value * 1.15  # ~15% padding left after length-sorted batching
    per_pass = max(1, int(budget_gb * 2**30 // max(per_layer, 1)))
    return [list(layers[i:i + per_pass]) for i in range(0, len(layers), per_pass)]


def _unit_path(run: Run, name: str) -> Path:
    return run.path("units", f"{name}.json")


def _read_unit(run: Run, name: str) -> Optional[dict]:
    path = _unit_path(run, name)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # written atomically, so only a foreign edit gets here: recompute it


def _write_unit(run: Run, name: str, value: dict) -> None:
    atomic_write_text(_unit_path(run, name), json.dumps(_json_safe(value)) + "\n")


def probe_layers(run: Run, config: TopoprobeConfig, tokenizer, model, variant: str, data: dict, layers, device,
                 log) -> dict:
    """Every probe of every layer for one model variant ("full" or "masked"); {layer: unit}. Finished units are
    read back on --resume; the X_ssp probe weights are kept for the fine-tuning runs."""
    settings = ProbeSettings(rank=config.probe_rank, epochs=config.probe_epochs, lr=config.probe_lr,
                             seed=config.seed, include_padding=config.include_padding, progress=config.progress)
    results, todo = {}, []
    for layer in layers:
        unit = _read_unit(run, f"probe-{variant}-layer{layer:02d}") if run.resume else None
        if unit is not None and run.path("units", f"ssp-probe-{variant}-layer{layer:02d}.safetensors").is_file():
            results[layer] = unit
        else:
            todo.append(layer)
    if not todo:
        return results
    train, val, pseudo = data["train"], data["val"], data["pseudo"]
    gold_train, gold_val = [s.depths() for s in train], [s.depths() for s in val]
    dtype = torch.float16 if config.feature_dtype == "float16" else torch.float32
    corpora = {"train": [s.words for s in train], "val": [s.words for s in val]}
    if pseudo is not None:
        split = int(len(pseudo) * 0.9)  # 90/10 as the released code
        corpora.update(pseudo_train=pseudo[:split], pseudo_val=pseudo[split:])
    padded = config.protocol == "released"
    if padded:
        # the released code pads each corpus (treebank train+dev, treebank test, the X_ssp pool) to its own
        # longest sentence; it keeps every sentence BERT takes (512 pieces), whatever --max-length says
        limit = min(getattr(model.config, "max_position_embeddings", 512), 512)
        plan = {}
        for group in (("train",), ("val",), ("pseudo_train", "pseudo_val")):
            if group[0] not in corpora:
                continue
            words = [w for name in group for w in corpora[name]]
            kept, dropped, lengths = usable_sentences(tokenizer, words, limit, with_lengths=True)
            if not kept:
                raise ValueError(f"topoprobe: no {group[0]} sentence fits {limit} pieces")
            pad_to = max(lengths[i] for i in kept)
            offset = 0
            for name in group:
                n = len(corpora[name])
                plan[name] = (pad_to, [i - offset for i in kept if offset <= i < offset + n],
                              [i - offset for i in dropped if offset <= i < offset + n])
                offset += n
        tokens = sum(pad_to * len(kept) for pad_to, kept, _ in plan.values())
    else:
        word_lists = [w for words in corpora.values() for w in words]
        tokens = sum(usable_sentences(tokenizer, word_lists, config.max_length, with_lengths=True)[2])
    chunks = _layer_chunks(todo, tokens, model.config.hidden_size, dtype.itemsize, config.feature_memory_gb)
    if len(chunks) > 1:
        log(f"fastmask: hidden states of {len(todo)} layers exceed --feature-memory-gb "
            f"{config.feature_memory_gb}: {len(chunks)} extraction passes")
    extract = dict(batch_size=config.batch_size, max_length=config.max_length, dtype=dtype, device=device,
                   sort_by_length=not config.include_padding, progress=config.progress)
    descriptions = {"train": "treebank train", "val": f"treebank {config.val_split}"}
    settings_for = {kind: replace(settings, epochs=config.epochs(kind)) for kind in DEPTH_KINDS}
    for chunk in chunks:
        features = {}
        for name, words in corpora.items():
            if padded:
                pad_to, kept, dropped = plan[name]
                features[name] = extract_padded_features(model, tokenizer, words, layers=chunk, pad_to=pad_to,
                                                         batch_size=config.batch_size, dtype=dtype, device=device,
                                                         kept=kept, dropped=dropped)
            else:
                features[name] = extract_features(model, tokenizer, words, layers=chunk,
                                                  desc=f"{variant}: {descriptions.get(name, name)}", **extract)
        for layer in chunk:
            started = time.perf_counter()
            batches = {name: f.layer_batches(layer) for name, f in features.items()}
            unit = {"layer": layer, "variant": variant,
                    "dropped_sentences": {name: len(f.dropped) for name, f in features.items()}}
            ssp_probe = None
            for kind in DEPTH_KINDS:
                train_key, val_key = ("train", "val") if kind == "sp" or pseudo is None else \
                    ("pseudo_train", "pseudo_val")
                result = train_depth_probe(kind, batches[train_key], batches[val_key], settings_for[kind],
                                           gold_train=gold_train, gold_val=gold_val,
                                           val_sentences=val if kind == "sp" else None, layer=layer)
                unit[kind] = result.summary()
                if kind == "ssp":
                    ssp_probe = result.probe
            # the floors every learned X_* is read against (the same sentences, targets and loss positions)
            unit["baselines"] = depth_baselines(batches["train"], batches["val"], gold_train, gold_val,
                                                batches.get("pseudo_val"), config.include_padding)
            if config.distance_probe:
                unit["distance"] = train_distance_probe(batches["train"], batches["val"], train, val, settings,
                                                        layer=layer)
            unit["seconds"] = time.perf_counter() - started
            atomic_write_bytes(run.path("units", f"ssp-probe-{variant}-layer{layer:02d}.safetensors"),
                               safetensors_bytes({"proj": ssp_probe.proj.detach().contiguous()}))
            _write_unit(run, f"probe-{variant}-layer{layer:02d}", unit)
            results[layer] = unit
            log(f"fastmask: {variant} layer {layer}: X_sp {unit['sp']['val_mse']:.3f}  X_ssp "
                f"{unit['ssp']['val_mse']:.3f}  X_essp {unit['essp']['val_mse']:.3f}" +
                (f"  UUAS {unit['distance']['uuas']:.3f}" if config.distance_probe else "") +
                f"  ({unit['seconds']:.1f} s)")
        del features
    return results


def ssp_probe_weights(run: Run, variant: str, layer: int):
    path = run.path("units", f"ssp-probe-{variant}-layer{layer:02d}.safetensors")
    return load_file(str(path))["proj"] if path.is_file() else None


# --- fine-tuning --------------------------------------------------------------------------------------------
def cola_predictions(model, tokenizer, dev_rows, config: TopoprobeConfig, device, pad_to=None) -> list[int]:
    """The fine-tuned classifier's labels of CoLA rows, in batches of config.batch_size."""
    predictions = []
    with torch.no_grad():
        for start in range(0, len(dev_rows), config.batch_size):
            rows = dev_rows[start:start + config.batch_size]
            encoding, _ = _encode_cola(tokenizer, [r[0] for r in rows], config.max_length, pad_to)
            logits = model(**{k: v.to(device) for k, v in encoding.items()}).logits
            predictions += logits.argmax(-1).tolist()
    return predictions


def finetune_run(source: str, tokenizer, train_rows, dev_rows, layer: Optional[int], seed: int, probe_init,
                 config: TopoprobeConfig, device) -> dict:
    """One fine-tuning run on CoLA (``layer`` None: plain fine-tuning) and its dev-set MCCs."""
    pad_to = cola_pad_length(tokenizer, config, list(train_rows) + list(dev_rows))
    model, training = finetune_model(source, tokenizer, train_rows, layer, seed, probe_init, config, device, pad_to)
    predictions = cola_predictions(model, tokenizer, dev_rows, config, device, pad_to)
    gold = [r[1] for r in dev_rows]
    return {"layer": layer, "seed": seed, "mcc": matthews_corrcoef(predictions, gold),
            "mcc_per_batch": per_batch_mcc(predictions, gold, config.batch_size),
            "accuracy": sum(int(p == g) for p, g in zip(predictions, gold)) / len(gold),
            "predicted_acceptable": sum(predictions) / len(predictions), "pad_to": pad_to, **training}


def single_class(run: dict) -> bool:
    """Whether a fine-tuning run predicted one class for the whole dev set (its MCC is 0 by definition)."""
    return run["predicted_acceptable"] in (0.0, 1.0)


def summarise_finetuning(runs: list[dict], confidence: float = 0.95) -> list[dict]:
    """Per layer ("baseline" = plain fine-tuning): mean, sample std and Student-t interval over seeds of both MCCs,
    the runs that predicted a single class, and for a probe layer the paired difference from the baseline on the
    seeds both have (per seed: layer MCC - baseline MCC; the same seed gives both the same head initialisation and
    data order, so the pairing removes that part of the seed-to-seed spread)."""
    baseline = {r["seed"]: r for r in runs if r["layer"] is None}
    rows = []
    for layer in ["baseline"] + sorted({r["layer"] for r in runs if r["layer"] is not None}):
        chosen = [r for r in runs if (r["layer"] is None if layer == "baseline" else r["layer"] == layer)]
        if not chosen:
            continue
        row = {"layer": layer, "runs": len(chosen), "seeds": [r["seed"] for r in chosen],
               "single_class_seeds": [r["seed"] for r in chosen if single_class(r)],
               "predicted_acceptable": float(np.mean([r["predicted_acceptable"] for r in chosen]))}
        for key in ("mcc", "mcc_per_batch"):
            summary = mean_ci([r[key] for r in chosen], confidence)
            row[key] = summary
            row[f"{key}_mean"], row[f"{key}_std"] = summary["mean"], summary["std"]
        if layer != "baseline":
            pairs = [(r, baseline[r["seed"]]) for r in chosen if r["seed"] in baseline]
            row["paired"] = {"seeds": [r["seed"] for r, _ in pairs],
                             **{key: mean_ci([r[key] - b[key] for r, b in pairs], confidence) if pairs else None
                                for key in ("mcc", "mcc_per_batch")}}
        rows.append(row)
    return rows


def summarise_released_finetuning(runs: list[dict], layers, confidence: float = 0.95) -> list[dict]:
    """The released bert-large CoLA runs (data.released_finetuning) as summarise_finetuning's rows, per-batch MCC
    only (the released logs hold no corpus MCC): plain fine-tuning, then each of ``layers`` with its paired
    difference from plain fine-tuning on the same seed."""
    baseline = {r["seed"]: r for r in runs if r["layer"] is None}
    rows = []
    for layer in [None, *layers]:
        chosen = [r for r in runs if r["layer"] == layer]
        if not chosen:
            continue
        row = {"layer": "baseline" if layer is None else layer, "runs": len(chosen),
               "mcc_per_batch": mean_ci([r["mcc_per_batch"] for r in chosen], confidence)}
        if layer is not None:
            diffs = [r["mcc_per_batch"] - baseline[r["seed"]]["mcc_per_batch"] for r in chosen
                     if r["seed"] in baseline]
            row["paired"] = {"mcc_per_batch": mean_ci(diffs, confidence) if diffs else None}
        rows.append(row)
    return rows
