"""`fastmask run topoprobe`: structural and tree-topological probes per layer, and probe-regularised fine-tuning
(Li, Yin, Lin, "Rethinking the Construction of Effective Metrics for Understanding the Mechanisms of Pretrained
Language Models", Findings of EMNLP 2023; released code cclx/Effective_Metrics), plus the classic structural
probes (Hewitt & Manning 2019) it builds on.

* Per layer L (0 = embeddings) of a frozen HF encoder, depth probes n_i = ||B h_i||^2 (rank = hidden / 2) trained
  with an MSE against gold UD depths (X_sp: word pieces inherit their word's depth, root = 1), against
  tree-topological pseudo-labels of their own predictions (X_ssp) and against those labels reversed in position
  (X_essp); each metric is the validation MSE. Alongside: depth Spearman and root accuracy of the X_sp probe, and a
  distance probe with UUAS and distance Spearman (H&M: lengths 5-50, punctuation out of UUAS / root accuracy), and
  the diagnostics (mean / std of n - label per depth level).
* Padding: by default only word pieces enter every loss; ``--include-padding`` replays the released code, whose
  MSE runs over the padded batch ([CLS], [SEP] and padding included; target 2.0 for X_sp). The paper's figures were
  made that way (see fastmask.probing.probes).
* Fine-tuning on CoLA: cross-entropy (``--class-weighted``: weighted by class) + ``probe_weight`` x the pseudo-label
  loss of a depth probe at layer L (initialised from that layer's X_ssp probe, trained jointly, acceptable sentences
  only; the released code's weight is 10), for each layer of the sweep and each seed, against plain fine-tuning with
  the same seeds. The in-domain dev set gives the corpus-level Matthews correlation and the mean of per-batch (32)
  MCCs that the released code reports.
* ``--masks PATH``: the same probes on the subnetwork of fastmask masks (``fm.load_masks`` patches the model with
  the saved MaskConfig; eval-mode gates), beside the full model.

Budget: the defaults fit a few minutes of a 2-core CPU on the packaged all-MiniLM-L6-v2; ``--full`` is the paper's
setting (every treebank sentence, validation on the test split, every layer and 10 seeds of 3 CoLA epochs at lr
2e-5). Every finished unit (a layer's probes, a fine-tuning run) is written to ``units/`` at once; ``--resume`` skips
the finished ones.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional, Sequence

from .runner import (BatchStream, ConfigError, Run, RunConfig, add_config_arguments, check, help_metadata,
                     markdown_table, pyplot, resolve_device, save_figure, run_cli, seed_everything)

EXPERIMENT = "topoprobe"
FULL_SEEDS = list(range(1, 41, 4))  # the released sweep: seeds 1, 5, ..., 37
# The paper's BERT-large X_sp (released doc-assets/sp_l*.csv, last epoch), for the report.
PAPER_SP = {0: 1.525, 16: 0.518, 24: 1.23}


@dataclass
class TopoprobeConfig(RunConfig):
    """Defaults: a CPU-sized budget on the packaged all-MiniLM-L6-v2; --full: the paper's setting."""

    steps: int = field(default=40, metadata=help_metadata(
        "fine-tuning optimisation steps per run: with 40 the default 8 runs took 7.5 min on 1 thread of a shared "
        "2-core CPU (about 1.2 s a step of 32); full: 3 CoLA epochs"))
    model: str = field(default="all-minilm-l6-v2", metadata=help_metadata(
        "HF encoder: a fastmask asset name (all-minilm-l6-v2), a local folder or a hub id (bert-large-uncased)"))
    masks: Optional[str] = field(default=None, metadata=help_metadata(
        "fastmask masks (fm.save_masks folder) of this model: probe the subnetwork too"))
    layers: Optional[list[int]] = field(default=None, metadata=help_metadata(
        "layers to probe (none: all, 0 = embeddings)"))
    val_split: Literal["dev", "test"] = field(default="dev", metadata=help_metadata(
        "treebank split the probes are validated on (full: test, as the released code)"))
    probe_train_sentences: int = field(default=1000, metadata=help_metadata("treebank training sentences (0: all)"))
    probe_val_sentences: int = field(default=300, metadata=help_metadata("treebank validation sentences (0: all)"))
    pseudo_corpus: Literal["treebank", "cola"] = field(default="treebank", metadata=help_metadata(
        "sentences of X_ssp / X_essp: the treebank's (comparable with X_sp) or acceptable CoLA training sentences "
        "(part of the released code's mixture)"))
    probe_rank: Optional[int] = field(default=None, metadata=help_metadata("probe rank (none: hidden size / 2)"))
    probe_epochs: int = field(default=10, metadata=help_metadata("probe training epochs (full: 30)"))
    probe_lr: float = field(default=1e-3, metadata=help_metadata(
        "Adam learning rate of the probes (linear decay to 0)"))
    batch_size: int = field(default=32, metadata=help_metadata("sentences per batch (features, probes, fine-tuning)"))
    include_padding: bool = field(default=False, metadata=help_metadata(
        "the released code's behaviour: [CLS], [SEP] and padding enter the probe losses"))
    distance_probe: bool = field(default=True, metadata=help_metadata("also train H&M's distance probe (UUAS)"))
    feature_dtype: Literal["float16", "float32"] = field(default="float16", metadata=help_metadata(
        "storage of the hidden states (the probes compute in float32)"))
    feature_memory_gb: float = field(default=4.0, metadata=help_metadata(
        "hidden states held at once; more layers than fit are extracted in several passes"))
    max_length: int = field(default=128, metadata=help_metadata("pieces per sentence; longer sentences are left out"))
    finetune: bool = field(default=True, metadata=help_metadata("run the probe-regularised fine-tuning on CoLA"))
    finetune_layers: Optional[list[int]] = field(default=None, metadata=help_metadata(
        "layers of the regularising probe (none: three spread layers; full: all)"))
    finetune_seeds: list[int] = field(default_factory=lambda: [1, 5], metadata=help_metadata(
        "fine-tuning seeds (full: 1, 5, ..., 37)"))
    finetune_train_sentences: int = field(default=0, metadata=help_metadata(
        "CoLA training sentences (0: all; the 40 default steps see 1280 of the 8551, so no subset is needed)"))
    finetune_lr: float = field(default=1e-4, metadata=help_metadata("AdamW learning rate (full: 2e-5), 10% warm-up"))
    freeze_word_embeddings: bool = field(default=True, metadata=help_metadata(
        "keep the word-embedding matrix frozen while fine-tuning (a third of the step time on a CPU; full: false)"))
    class_weighted: bool = field(default=False, metadata=help_metadata(
        "class-weighted cross-entropy (weights n / (2 n_class) of the training rows; not the paper's). CoLA is 70% "
        "acceptable: short MiniLM runs end on one class with or without it (measured, 40 steps of 32 at lr 1e-4: plain "
        "CE all 'acceptable'; weighted, one class per run, either one); a 200-step run of 16 with it reached dev MCC "
        "0.06-0.14 (docs/experiments/topoprobe.md)"))
    probe_weight: float = field(default=10.0, metadata=help_metadata("weight w of the probe loss (released: 10)"))
    full: bool = field(default=False, metadata=help_metadata(
        "the paper's setting: overrides the budget flags (sentences, epochs, layers, seeds, steps, lr, val split)"))

    def validate(self) -> "TopoprobeConfig":
        super().validate()
        for name in ("probe_train_sentences", "probe_val_sentences", "finetune_train_sentences"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 0, name, "an int >= 0 (0: all / auto)", value)
        for name in ("probe_epochs", "batch_size", "max_length"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, name, "an int >= 1", value)
        check(self.max_length >= 3, "max_length", "an int >= 3", self.max_length)
        check(self.probe_rank is None or self.probe_rank >= 1, "probe_rank", "an int >= 1 or none", self.probe_rank)
        for name in ("probe_lr", "finetune_lr", "feature_memory_gb"):
            value = getattr(self, name)
            check(math.isfinite(value) and value > 0, name, "a finite number > 0", value)
        check(math.isfinite(self.probe_weight) and self.probe_weight >= 0, "probe_weight", "a finite number >= 0",
              self.probe_weight)
        for name in ("layers", "finetune_layers"):
            value = getattr(self, name)
            check(value is None or (len(value) > 0 and all(v >= 0 for v in value)), name,
                  "none or a non-empty list of layer indices >= 0", value)
        check(len(self.finetune_seeds) > 0 and all(s >= 0 for s in self.finetune_seeds), "finetune_seeds",
              "a non-empty list of ints >= 0", self.finetune_seeds)
        return self

    def effective(self) -> "TopoprobeConfig":
        """The config with --full's values applied (the paper's setting)."""
        if not self.full:
            return self
        return replace(self, probe_train_sentences=0, probe_val_sentences=0, val_split="test", probe_epochs=30,
                       finetune_layers=None, finetune_seeds=list(FULL_SEEDS), finetune_train_sentences=0,
                       finetune_lr=2e-5, freeze_word_embeddings=False, steps=3 * math.ceil(8551 / self.batch_size))


# --- setup --------------------------------------------------------------------------------------------------
def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected


def load_encoder(source: str, masks: Optional[str], device):
    """(tokenizer, base encoder in eval mode). With ``masks``: the model class the masks were saved for is loaded,
    patched by fm.load_masks (saved MaskConfig, eval-mode gates) and its base encoder returned."""
    import transformers
    from transformers import AutoModel, AutoTokenizer

    import fastmask as fm

    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True)
    if masks is None:
        return tokenizer, AutoModel.from_pretrained(source).to(device).eval()
    meta = fm.io.read_mask_metadata(masks)
    architecture = meta.get("fingerprint", {}).get("architecture")
    model_class = getattr(transformers, architecture, None) if architecture else None
    if model_class is None or not hasattr(model_class, "from_pretrained"):
        model_class = AutoModel
    model = model_class.from_pretrained(source)
    fm.load_masks(model, masks)
    return tokenizer, model.base_model.to(device).eval()


# --- data ---------------------------------------------------------------------------------------------------
def treebank_split(split: str, limit: int, data_dir: Optional[str]):
    from .. import assets
    from ..probing import read_conllu

    path = assets.data_path("ud-ewt", f"en_ewt-ud-{split}.conllu", data_dir_override=data_dir)
    return read_conllu(path, limit=limit or None)


def read_cola(name: str, data_dir: Optional[str]) -> list[tuple[str, int]]:
    """(sentence, label) of a CoLA file of the official raw release (4 tab-separated columns, no header)."""
    from .. import assets

    path = assets.data_path("cola", name, data_dir_override=data_dir)
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        columns = line.split("\t")
        if len(columns) != 4 or columns[1] not in ("0", "1"):
            raise ValueError(f"{path}:{line_no}: expected 4 tab-separated columns (source, label 0/1, mark, "
                             f"sentence), got {line[:80]!r}")
        rows.append((columns[3], int(columns[1])))
    return rows


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
    from ..assets import atomic_write_text
    from .runner import _json_safe

    atomic_write_text(_unit_path(run, name), json.dumps(_json_safe(value)) + "\n")


def probe_layers(run: Run, config: TopoprobeConfig, tokenizer, model, variant: str, data: dict, layers, device,
                 log) -> dict:
    """Every probe of every layer for one model variant ("full" or "masked"); {layer: unit}. Finished units are
    read back on --resume; the X_ssp probe weights are kept for the fine-tuning runs."""
    import torch
    from safetensors.torch import save as safetensors_bytes

    from ..assets import atomic_write_bytes
    from ..probing import DEPTH_KINDS, ProbeSettings, extract_features, train_depth_probe, train_distance_probe
    from ..probing.features import usable_sentences

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
    word_lists = [s.words for s in train] + [s.words for s in val] + list(pseudo or [])
    tokens = sum(usable_sentences(tokenizer, word_lists, config.max_length, with_lengths=True)[2])
    chunks = _layer_chunks(todo, tokens, model.config.hidden_size, dtype.itemsize, config.feature_memory_gb)
    if len(chunks) > 1:
        log(f"fastmask: hidden states of {len(todo)} layers exceed --feature-memory-gb "
            f"{config.feature_memory_gb}: {len(chunks)} extraction passes")
    extract = dict(batch_size=config.batch_size, max_length=config.max_length, dtype=dtype, device=device,
                   sort_by_length=not config.include_padding, progress=config.progress)
    for chunk in chunks:
        features = {
            "train": extract_features(model, tokenizer, [s.words for s in train], layers=chunk,
                                      desc=f"{variant}: treebank train", **extract),
            "val": extract_features(model, tokenizer, [s.words for s in val], layers=chunk,
                                    desc=f"{variant}: treebank {config.val_split}", **extract)}
        if pseudo is not None:
            split = int(len(pseudo) * 0.9)  # 90/10 as the released code
            for name, words in (("pseudo_train", pseudo[:split]), ("pseudo_val", pseudo[split:])):
                features[name] = extract_features(model, tokenizer, words, layers=chunk, desc=f"{variant}: {name}",
                                                  **extract)
        for layer in chunk:
            started = time.perf_counter()
            batches = {name: f.layer_batches(layer) for name, f in features.items()}
            unit = {"layer": layer, "variant": variant,
                    "dropped_sentences": {name: len(f.dropped) for name, f in features.items()}}
            ssp_probe = None
            for kind in DEPTH_KINDS:
                train_key, val_key = ("train", "val") if kind == "sp" or pseudo is None else \
                    ("pseudo_train", "pseudo_val")
                result = train_depth_probe(kind, batches[train_key], batches[val_key], settings,
                                           gold_train=gold_train, gold_val=gold_val,
                                           val_sentences=val if kind == "sp" else None, layer=layer)
                unit[kind] = result.summary()
                if kind == "ssp":
                    ssp_probe = result.probe
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
    from safetensors.torch import load_file

    path = run.path("units", f"ssp-probe-{variant}-layer{layer:02d}.safetensors")
    return load_file(str(path))["proj"] if path.is_file() else None


# --- fine-tuning --------------------------------------------------------------------------------------------
def _encode_cola(tokenizer, sentences: Sequence[str], max_length: int):
    from ..probing import encode_words

    words = [sentence.split() for sentence in sentences]
    encoding, word_ids = encode_words(tokenizer, words, max_length=max_length)
    return encoding, word_ids


def finetune_run(source: str, tokenizer, train_rows, dev_rows, layer: Optional[int], seed: int, probe_init,
                 config: TopoprobeConfig, device) -> dict:
    """One fine-tuning run on CoLA (``layer`` None: plain fine-tuning) and its dev-set MCCs."""
    import torch
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    from ..probing import DepthProbe, matthews_corrcoef, per_batch_mcc, probe_regulariser_loss

    _quiet_transformers()
    seed_everything(seed)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2).to(device)
    if config.freeze_word_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    # CoLA is 70% acceptable: with plain CE a short run predicts the majority class for everything (MCC 0)
    counts = torch.bincount(torch.tensor([r[1] for r in train_rows]), minlength=2).clamp(min=1).float()
    class_weight = (counts.sum() / (2 * counts)).to(device) if config.class_weighted else None
    probe = None
    if layer is not None:
        probe = DepthProbe(model.config.hidden_size, config.probe_rank).to(device)
        if probe_init is not None:
            with torch.no_grad():
                probe.proj.copy_(probe_init.to(device))
        params += list(probe.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.finetune_lr, eps=1e-8)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.1 * config.steps), config.steps)
    stream = BatchStream(len(train_rows), config.batch_size, seed=seed)
    losses, probe_losses = [], []
    model.train()
    for _ in range(config.steps):
        rows = [train_rows[i] for i in stream.next()]
        encoding, word_ids = _encode_cola(tokenizer, [r[0] for r in rows], config.max_length)
        labels = torch.tensor([r[1] for r in rows], device=device)
        out = model(**{k: v.to(device) for k, v in encoding.items()}, output_hidden_states=probe is not None)
        ce = torch.nn.functional.cross_entropy(out.logits.float(), labels, weight=class_weight)
        loss = ce
        if probe is not None:
            norms = probe(out.hidden_states[layer])
            regulariser = probe_regulariser_loss(norms, (word_ids >= 0).to(device), labels,
                                                 include_padding=config.include_padding)
            loss = loss + config.probe_weight * regulariser
            probe_losses.append(float(regulariser.detach()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(ce.detach()))
    model.eval()
    predictions = []
    with torch.no_grad():
        for start in range(0, len(dev_rows), config.batch_size):
            rows = dev_rows[start:start + config.batch_size]
            encoding, _ = _encode_cola(tokenizer, [r[0] for r in rows], config.max_length)
            logits = model(**{k: v.to(device) for k, v in encoding.items()}).logits
            predictions += logits.argmax(-1).tolist()
    gold = [r[1] for r in dev_rows]
    return {"layer": layer, "seed": seed, "mcc": matthews_corrcoef(predictions, gold),
            "mcc_per_batch": per_batch_mcc(predictions, gold, config.batch_size),
            "accuracy": sum(int(p == g) for p, g in zip(predictions, gold)) / len(gold),
            "predicted_acceptable": sum(predictions) / len(predictions),
            "final_ce": float(sum(losses[-10:]) / len(losses[-10:])), "trainable_parameters": trainable,
            "class_weighted": bool(config.class_weighted),
            "final_probe_loss": float(sum(probe_losses[-10:]) / len(probe_losses[-10:])) if probe_losses else None}


def spread_layers(n_layers: int, count: int = 3) -> list[int]:
    """``count`` layers spread over 1..n_layers (the default fine-tuning sweep of the small budget)."""
    return sorted({max(1, round(n_layers * (i + 1) / count)) for i in range(count)})


def summarise_finetuning(runs: list[dict]) -> list[dict]:
    """Mean +- std (population over seeds) of both MCCs per layer ("baseline" = plain fine-tuning)."""
    import numpy as np

    rows = []
    for layer in ["baseline"] + sorted({r["layer"] for r in runs if r["layer"] is not None}):
        chosen = [r for r in runs if (r["layer"] is None if layer == "baseline" else r["layer"] == layer)]
        if not chosen:
            continue
        mcc, per_batch = np.array([r["mcc"] for r in chosen]), np.array([r["mcc_per_batch"] for r in chosen])
        rows.append({"layer": layer, "runs": len(chosen), "mcc_mean": float(mcc.mean()), "mcc_std": float(mcc.std()),
                     "mcc_per_batch_mean": float(per_batch.mean()), "mcc_per_batch_std": float(per_batch.std()),
                     "predicted_acceptable": float(np.mean([r["predicted_acceptable"] for r in chosen]))})
    return rows


# --- the experiment -----------------------------------------------------------------------------------------
def run_experiment(config: TopoprobeConfig, *, resume: bool = False, overwrite: bool = False, log=None) -> dict:
    """Probe every layer, fine-tune, write the results folder; returns metrics.json's content."""
    import shutil

    import torch

    from .. import assets
    from ..bench.results import cpu_name
    from ..probing.pseudo_labels import benchmark as pseudo_label_benchmark

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
    data = {"train": treebank_split("train", effective.probe_train_sentences, config.data_dir),
            "val": treebank_split(effective.val_split, effective.probe_val_sentences, config.data_dir),
            "pseudo": None}
    if effective.pseudo_corpus == "cola":
        acceptable = [s for s, label in read_cola("in_domain_train.tsv", config.data_dir) if label == 1]
        limit = effective.probe_train_sentences or len(acceptable)
        data["pseudo"] = [s.split() for s in acceptable[:limit]]
    setup_seconds = time.perf_counter() - started

    probe_started = time.perf_counter()
    probes = {"full": probe_layers(run, effective, tokenizer, model, "full", data, layers, device, log)}
    if config.masks:
        import fastmask as fm

        _, masked_model = load_encoder(source, config.masks, device)
        probes["masked"] = probe_layers(run, effective, tokenizer, masked_model, "masked", data, layers, device, log)
        probes_sparsity = fm.sparsity(masked_model)["overall"] if fm.masked_modules(masked_model) else None
    else:
        probes_sparsity = None
    probe_seconds = time.perf_counter() - probe_started

    finetune_started = time.perf_counter()
    finetune_runs = []
    if effective.finetune:
        train_rows = read_cola("in_domain_train.tsv", config.data_dir)
        if effective.finetune_train_sentences:
            order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(config.seed)).tolist()
            train_rows = [train_rows[i] for i in order[:effective.finetune_train_sentences]]
        dev_rows = read_cola("in_domain_dev.tsv", config.data_dir)
        plan = [(None, seed) for seed in effective.finetune_seeds] + \
            [(layer, seed) for layer in finetune_layers for seed in effective.finetune_seeds]
        from tqdm.auto import tqdm

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


# --- plots and report ---------------------------------------------------------------------------------------
def _plots(run: Run, metrics: dict) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    styles = {"full": "-", "masked": "--"}
    for variant, rows in metrics["probes"].items():
        layers = [r["layer"] for r in rows]
        for i, kind in enumerate(("sp", "ssp", "essp")):
            left.plot(layers, [r[kind]["val_mse"] for r in rows], styles[variant], marker="o", color=f"C{i}",
                      label=f"X_{kind}" + (" (subnetwork)" if variant == "masked" else ""))
        metric_rows = [("depth Spearman", lambda r: r["sp"].get("spearman")),
                       ("root accuracy", lambda r: r["sp"].get("root_accuracy"))]
        if "distance" in rows[0]:
            metric_rows += [("UUAS", lambda r: r["distance"]["uuas"]),
                            ("distance Spearman", lambda r: r["distance"]["spearman"])]
        for i, (name, get) in enumerate(metric_rows):
            right.plot(layers, [get(r) for r in rows], styles[variant], marker="o", color=f"C{i + 3}",
                       label=name + (" (subnetwork)" if variant == "masked" else ""))
    left.set_yscale("log")
    left.set_xlabel("layer (0 = embeddings)")
    left.set_ylabel("validation MSE")
    left.set_title(f"{metrics['model']}: depth probes per layer")
    right.set_xlabel("layer (0 = embeddings)")
    right.set_title("structural-probe metrics (H&M)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, run.path("probes.png"))
    summary = metrics["finetuning"]["summary"]
    if summary:
        fig, ax = plt.subplots(figsize=(7, 4))
        base = next((row for row in summary if row["layer"] == "baseline"), None)
        rows = [row for row in summary if row["layer"] != "baseline"]
        for offset, (key, label) in enumerate((("mcc", "corpus MCC"), ("mcc_per_batch", "per-batch MCC (released)"))):
            ax.errorbar([row["layer"] + 0.08 * offset for row in rows], [row[f"{key}_mean"] for row in rows],
                        yerr=[row[f"{key}_std"] for row in rows], fmt="o", capsize=3, color=f"C{offset}",
                        label=f"{label}, probe-regularised")
            if base:
                ax.axhline(base[f"{key}_mean"], color=f"C{offset}", ls="--", lw=1, label=f"{label}, plain fine-tuning")
        ax.set_xlabel("layer of the probe loss")
        ax.set_ylabel("CoLA in-domain dev MCC")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save_figure(fig, run.path("finetuning.png"))


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else \
        f"{value:.{digits}f}"


def report_markdown(config: TopoprobeConfig, effective: TopoprobeConfig, metrics: dict) -> str:
    timing, data = metrics["timing"], metrics["data"]
    lines = [f"# fastmask topoprobe: {metrics['model']}", "",
             f"- model `{metrics['model_source']}` ({metrics['model_type']}, {metrics['n_layers']} layers + embeddings,"
             f" hidden {metrics['hidden_size']}); probe rank {metrics['probe_rank']}",
             f"- UD English-EWT: {data['treebank_train']} training sentences, {data['treebank_val']} validation "
             f"sentences ({data['val_split']} split); X_ssp / X_essp on {data['pseudo_sentences']} "
             f"{data['pseudo_corpus']} sentences",
             f"- probes: {effective.probe_epochs} epochs, Adam lr {effective.probe_lr} (linear decay), "
             + ("padding and special tokens INCLUDED in the losses (the released code)" if effective.include_padding
                else "word pieces only in the losses (padding and special tokens excluded)"),
             f"- hardware: {timing['cpu']} ({timing['cpu_count']} cores), device {timing['device']}, "
             f"{timing['torch_threads']} torch thread(s) ({timing['threads_reason']}); setup "
             f"{timing['setup_seconds']:.0f} s, probes {timing['probe_seconds']:.0f} s, fine-tuning "
             f"{timing['finetune_seconds']:.0f} s in this invocation; summed over the finished units when they were "
             f"computed: probe training {timing['probe_training_unit_seconds']:.0f} s (hidden-state extraction not "
             f"included), fine-tuning runs {timing['finetune_unit_seconds']:.0f} s", "",
             "## Depth probes per layer (validation MSE; lower is better)", "",
             "![probes](probes.png)", ""]
    for variant, rows in metrics["probes"].items():
        if len(metrics["probes"]) > 1:
            title = "full model" if variant == "full" else \
                f"subnetwork of `{config.masks}` (sparsity {_fmt(metrics['masked_sparsity'])})"
            lines += [f"### {title}", ""]
        header = ["layer", "X_sp", "X_ssp", "X_essp", "depth Spearman", "root acc"]
        if "distance" in rows[0]:
            header += ["UUAS", "dist. Spearman"]
        body = []
        for row in rows:
            cells = [row["layer"], _fmt(row["sp"]["val_mse"]), _fmt(row["ssp"]["val_mse"]),
                     _fmt(row["essp"]["val_mse"]), _fmt(row["sp"].get("spearman")),
                     _fmt(row["sp"].get("root_accuracy"))]
            if "distance" in row:
                cells += [_fmt(row["distance"]["uuas"]), _fmt(row["distance"]["spearman"])]
            body.append(cells)
        lines += [markdown_table(header, body), ""]
    curve, best = metrics["x_sp_curve"], metrics["x_sp_min_layer"]
    first, last = min(curve), max(curve)
    lines += [f"X_sp is lowest at layer {best} ({_fmt(curve[best])}), against {_fmt(curve[first])} at layer {first} "
              f"and {_fmt(curve[last])} at layer {last}: "
              f"{'a U-shaped curve' if metrics['u_shaped'] else 'NOT a U-shaped curve'} over the layers. The paper's "
              f"BERT-large (released logs): " + ", ".join(f"{v} at layer {k}" for k, v in PAPER_SP.items()) +
              " (padding included there).", ""]
    rows = {r["layer"]: r for r in metrics["probes"]["full"]}
    lines += [f"### Diagnostics at layer {best}: n - label per depth level (validation tokens)", "",
              markdown_table(["probe", "level", "count", "mean", "std"],
                             [[kind, d["level"], d["count"], _fmt(d["mean"]), _fmt(d["std"])]
                              for kind in ("sp", "ssp") for d in rows[best][kind]["diagnostics"]]), ""]
    summary = metrics["finetuning"]["summary"]
    if summary:
        lines += ["## Probe-regularised fine-tuning on CoLA (in-domain dev, 527 sentences)", "",
                  f"{'Class-weighted CE' if effective.class_weighted else 'CE'} + {effective.probe_weight} x "
                  f"tree-topological probe loss at the layer (acceptable sentences only; probe initialised from that "
                  f"layer's X_ssp probe), {effective.steps} AdamW steps of "
                  f"{effective.batch_size} at lr {effective.finetune_lr} (word embeddings "
                  f"{'frozen' if effective.freeze_word_embeddings else 'trained'}) on "
                  f"{effective.finetune_train_sentences or 'all'} training sentences; seeds "
                  f"{metrics['finetuning']['seeds']}. Mean +- std over seeds. 'per-batch' is the mean of the MCCs of "
                  f"batches of {effective.batch_size} (what the released code reports); 'corpus' is the MCC of the "
                  "whole dev set.", "", "![fine-tuning](finetuning.png)", "",
                  markdown_table(["probe layer", "runs", "corpus MCC", "per-batch MCC", "predicted acceptable"],
                                 [[row["layer"], row["runs"], f"{row['mcc_mean']:.3f} +- {row['mcc_std']:.3f}",
                                   f"{row['mcc_per_batch_mean']:.3f} +- {row['mcc_per_batch_std']:.3f}",
                                   f"{row['predicted_acceptable']:.0%}"] for row in summary]), ""]
        if all(min(r["predicted_acceptable"], 1 - r["predicted_acceptable"]) < 0.05
               for r in metrics["finetuning"]["runs"]):
            lines += ["**Every run predicts (almost) a single class** (95% or more of the dev set; MCC about 0), so "
                      "this sweep compares nothing: within this budget the model has learnt little more than a class "
                      "prior. A few hundred `--steps` (with `--class-weighted`) or `--full`'s 3 epochs are needed.", ""]
    speed = metrics["pseudo_label_speed"]
    lines += ["## Pseudo-label construction", "",
              f"Vectorised (one sort + one cumulative minimum, exact) vs the direct per-token transcription on a "
              f"32 x 128 batch: {speed['vectorised_ms']:.3f} ms vs {speed['direct_ms']:.1f} ms, "
              f"**{speed['speedup']:.0f}x** (best of several, this machine).", "",
              "Files: `metrics.json` (every number, per-level diagnostics, each fine-tuning run), `units/` (finished "
              "units, read back by --resume), `probes.png`, `finetuning.png`, `config.json` (`--config` reruns it)."]
    return "\n".join(lines) + "\n"


# --- command line -------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TopoprobeConfig)


def run_from_args(args) -> int:
    return run_cli(TopoprobeConfig, run_experiment, args, EXPERIMENT,
                   run_errors=(FileNotFoundError, ValueError))  # bad data files, masks, model


__all__ = ["TopoprobeConfig", "run_experiment", "finetune_run", "probe_layers", "summarise_finetuning",
           "spread_layers", "read_cola", "treebank_split", "load_encoder",
           "add_arguments", "run_from_args"]
