"""Training of the knowledge experiment: ``run_experiment`` (load the model, prepare and cache the data, train the
mask on the remaining model, evaluate, write the results folder), the data preparation it runs once per results
folder (data.json), the sparsity and learning-rate schedules, and the command line (``add_arguments``,
``run_from_args``)."""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from typing import Optional

import torch

import fastmask as fm

from ... import assets
from ... import distributed as fmd
from ...assets import atomic_write_text
from ..blocks import TopBlocks, block_inputs, top_blocks
from ..runner import (BatchStream, ConfigError, Run, TrainState, add_config_arguments, open_run, resolve_device,
                      run_cli, seed_everything, weights_key)
from . import data as kd
from .config import EXPERIMENT, KnowledgeConfig
from .data import DataError, Prepared, choose_templates, encode, sentence_nll
from .evaluate import evaluate, sparsity_report, summarize
from .model import StepLoss, _load_model, final_hidden
from .report import _plots, report_markdown
from .study import run_study
from .wordnet import wordnet_controlkg, wordnet_targetkg


# --- schedules --------------------------------------------------------------------------------------------------
def reg_lambda(step: int, total: int, init: float = 2.0, final: float = 3.0) -> float:
    """Weight of the sparsity term at 0-based ``step`` of ``total``: ``init`` while step + 1 <= total // 2 (the
    first half), then linear to ``final`` at the last step (the released code's piecewise-linear schedule)."""
    t, half = step + 1, total // 2
    if t <= half or total == half:
        return float(init)
    return float(init + (final - init) * (t - half) / (total - half))


def lr_factor(step: int, total: int, warmup_frac: float) -> float:
    """Linear warm-up of the learning rate over the first ``warmup_frac`` of the steps, then 1."""
    warm = int(total * warmup_frac)
    return 1.0 if warm <= 0 or step >= warm else (step + 1) / (warm + 1)


# --- the data, prepared once per results folder (data.json) -----------------------------------------------------
def _prepare_data(config: KnowledgeConfig, model, tokenizer, pad_id: int, device, log,
                  cache_key: str) -> Prepared:
    """TargetKG, training ControlKG, evaluation ControlKG with their sentences (template chosen per model)."""
    sources = {}
    model_key = kd.paper_model_key(config.model)
    rule = config.template
    if rule == "auto":
        rule = "released" if model_key else "lowest-ppl"
    if rule == "released" and model_key is None:
        raise ConfigError(f"template must not be 'released' for model {config.model!r}: the released choices exist "
                          f"only for {list(kd.PAPER_MODELS)}")
    released_key = model_key if rule == "released" else None

    def wordnet_or_none():
        try:
            return assets.wordnet()
        except assets.AssetUnavailable as error:
            log(f"fastmask: WordNet unavailable ({str(error).splitlines()[0]})")
            return None

    # TargetKG
    use_paper = config.targetkg_source == "paper" or (config.targetkg_source == "auto"
                                                       and config.target in kd.PAPER_TARGETS)
    if use_paper:
        try:
            target = kd.paper_targetkg(config.target, released_key, config.data_dir)
            sources["targetkg"] = f"released know-subnet set wordnet/targetkg/{config.target}"
        except assets.AssetUnavailable:
            if config.targetkg_source == "paper":
                raise
            use_paper = False
    if not use_paper:
        wn = assets.wordnet()
        graph = wordnet_targetkg(config.target, config.targetkg_depth, config.targetkg_ancestors, wn=wn)
        triplets = kd.sample(graph, config.targetkg_size, config.seed)
        target = [kd.fixed_example(t) for t in triplets]
        sources["targetkg"] = (f"WordNet 3.0 graph of {config.target} (depth {config.targetkg_depth}, "
                               f"{config.targetkg_ancestors} ancestor edges: {len(graph)} triplets), "
                               f"{len(triplets)} sampled with seed {config.seed}")
    target_synsets = {s for e in target for s in (e.triplet.head, e.triplet.tail)}

    # ControlKG: evaluation = the first released validation triplets that avoid the TargetKG's synsets.
    try:
        released_val = [e for e in kd.paper_controlkg_val(released_key, config.data_dir)
                        if e.triplet.head not in target_synsets and e.triplet.tail not in target_synsets]
    except assets.AssetUnavailable:
        released_val = []
    wn = None
    if len(released_val) >= config.controlkg_eval_size:
        control_eval = released_val[:config.controlkg_eval_size]
        sources["controlkg_eval"] = "released know-subnet ControlKG validation set (first triplets)"
    else:
        wn = wn or assets.wordnet()
        triplets = wordnet_controlkg(config.controlkg_eval_size, target_synsets, seed=config.seed + 1, wn=wn)
        control_eval = [kd.fixed_example(t) for t in triplets]
        sources["controlkg_eval"] = "WordNet 3.0 triplets (the released set is not reachable)"
    eval_pairs = {(e.triplet.head, e.triplet.tail) for e in control_eval}
    control_train = None
    if config.controlkg_source in ("auto", "wordnet"):
        wn = wn or (assets.wordnet() if config.controlkg_source == "wordnet" else wordnet_or_none())
        if wn is not None:
            triplets = wordnet_controlkg(config.controlkg_size, target_synsets, eval_pairs, seed=config.seed,
                                         wn=wn)
            control_train = [kd.fixed_example(t) for t in triplets]
            sources["controlkg_train"] = f"WordNet 3.0 hypernym triplets sampled with seed {config.seed}"
    if control_train is None:
        rest = released_val[config.controlkg_eval_size:]
        if not rest:
            raise ConfigError("controlkg_source: neither WordNet nor the released ControlKG is reachable")
        control_train = kd.sample(rest, config.controlkg_size, config.seed)
        sources["controlkg_train"] = "released know-subnet ControlKG validation set (the triplets after the " \
                                     "evaluation ones)"
    # Sentences: the released choice, or the lowest-perplexity candidate under this model.
    every = target + control_train + control_eval
    if rule in ("lowest-ppl", "released"):
        nll_of = lambda sentences: sentence_nll(model, tokenizer, sentences, pad_id, config.eval_batch,  # noqa: E731
                                                device, cache_key, config.progress)
        needs_choice = [e for e in every if not e.source.startswith("released")]
        choose_templates(needs_choice, "lowest-ppl", nll_of)
    sources["template"] = {"released": f"the paper's released choice for {model_key} (lowest-perplexity candidate "
                                       f"where none was released)",
                           "lowest-ppl": "the candidate of lowest perplexity under the full model (the paper's rule)",
                           "fixed": "the first template ('A <head> is a <tail>')"}[rule]
    return Prepared(target, control_train, control_eval, sources)


def _data_file(run: Run):
    return run.path("data.json")


def _save_prepared(run: Run, prepared: Prepared) -> None:
    atomic_write_text(_data_file(run), json.dumps({
        "sources": prepared.sources, "targetkg": kd.examples_to_json(prepared.target),
        "controlkg_train": kd.examples_to_json(prepared.control_train),
        "controlkg_eval": kd.examples_to_json(prepared.control_eval)}, indent=1))


def _load_prepared(run: Run) -> Optional[Prepared]:
    path = _data_file(run)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return Prepared(kd.examples_from_json(data["targetkg"]), kd.examples_from_json(data["controlkg_train"]),
                    kd.examples_from_json(data["controlkg_eval"]), data["sources"])


# --- the experiment ---------------------------------------------------------------------------------------------
def run_experiment(config: KnowledgeConfig, *, resume: bool = False, overwrite: bool = False, log=None) -> dict:
    """Train the mask, evaluate, write the results folder; returns metrics.json's content. With ``targets`` or
    ``seeds``: the study (study.py), this function once per target x seed."""
    if config.targets or config.seeds:
        return run_study(config, run_experiment, resume=resume, overwrite=overwrite, log=log)
    # Data parallel under torchrun: every rank draws the same global batches and the same gates and trains on its
    # share of each batch. FSDP2 (default) shards the masked blocks over the ranks, DDP keeps a copy on each; either
    # way the logits' gradients are averaged. Rank 0 owns the results folder (data.json, checkpoints, history,
    # report) and evaluates; the others stop after training.
    run, rank, world = open_run(config, resume=resume, overwrite=overwrite, experiment=EXPERIMENT, log=log)
    main = rank == 0
    log = run.log
    seed_everything(config.seed)
    device = resolve_device(config.device)
    started = time.perf_counter()
    model, tokenizer, pad_id, source = _load_model(config, device)
    blocks_path, n_blocks, first, names = top_blocks(model, config.top_k_layers, "top_k_layers")
    cache_key = weights_key(model, config.model)  # keys the template-NLL and block-input caches
    prepared = _load_prepared(run) if resume else None
    if prepared is None and main:
        prepared = _prepare_data(config, model, tokenizer, pad_id, device, log, cache_key)
        _save_prepared(run, prepared)
    fmd.barrier()
    if prepared is None:  # another rank: the data rank 0 prepared
        prepared = _load_prepared(run)
    lm_train_text, lm_train_source = kd.wikitext_text("train", config.lm_source, config.data_dir)
    lm_eval_text, lm_eval_source = kd.wikitext_text("eval", config.lm_source, config.data_dir)
    prepared.sources.update(lm_train=lm_train_source, lm_eval=lm_eval_source)
    lm_train = kd.lm_blocks(tokenizer, lm_train_text, config.lm_block_size, config.lm_train_blocks)
    lm_eval = kd.lm_blocks(tokenizer, lm_eval_text, config.lm_block_size, config.lm_eval_blocks)

    top = TopBlocks(model, first, blocks_path)
    sets = {}
    for key, examples in (("targetkg", prepared.target), ("controlkg_train", prepared.control_train),
                          ("controlkg", prepared.control_eval)):
        sets[key] = encode(tokenizer, [e.sentence for e in examples], [e.tail_text for e in examples],
                           config.tail_tokens, pad_id, config.objective_position)
    # The paraphrase test: the TargetKG's other templates, never trained on, scored at the end.
    paraphrase_sentences, paraphrase_tails = kd.paraphrases(prepared.target)
    if paraphrase_sentences:
        sets["targetkg_paraphrase"] = encode(tokenizer, paraphrase_sentences, paraphrase_tails, config.tail_tokens,
                                             pad_id)
    # Inputs of the first masked block: the lower blocks never change, so they run once (and are cached on disk).
    for data in sets.values():
        data.h0 = block_inputs(top, data.input_ids, data.attention_mask, config.eval_batch, device, cache_key)
    lm_train_h0, lm_eval_h0 = (block_inputs(top, b, torch.ones_like(b), config.eval_batch, device, cache_key)
                               for b in (lm_train, lm_eval))
    lm_train, lm_eval = lm_train.to(device), lm_eval.to(device)
    # The unmasked model's outputs on the maintenance data, once (before the masks exist; also on --resume).
    control_train = sets["controlkg_train"]
    control_train.full_hidden = final_hidden(top, control_train.input_ids, control_train.attention_mask,
                                             control_train.h0, config.eval_batch)
    lm_train_full_hidden = final_hidden(top, lm_train, torch.ones_like(lm_train), lm_train_h0, config.eval_batch)
    setup_seconds = time.perf_counter() - started

    mask_config = fm.MaskConfig(estimator=config.estimator, granularity=config.granularity, beta=config.temperature,
                                init_keep=config.init_keep,  # gumbel_sigmoid_st: logits = logit(init_keep)
                                targets=[re.escape(n) + "$" for n in names], seed=config.seed)
    fm.apply(model, mask_config)
    layers = fm.masked_modules(model)
    for layer in layers.values():
        layer.train()
    step_loss = StepLoss(model, top)
    sharded = world > 1 and config.data_parallel == "fsdp"
    if sharded:
        fmd.shard_masked_blocks(model, root=step_loss)
    elif world > 1:
        step_loss = fmd.replicate(step_loss)
    optimizer = torch.optim.Adam(fm.mask_parameters(model), lr=config.lr)  # after sharding: its logits are DTensors
    target_data, control_data = sets["targetkg"], sets["controlkg_train"]
    streams = {"targetkg": BatchStream(len(target_data), config.targetkg_batch or len(target_data), config.seed),
               "controlkg": BatchStream(len(control_data), config.controlkg_batch, config.seed + 1),
               "lm": BatchStream(lm_train.shape[0], config.lm_batch, config.seed + 2)}
    for name, stream in streams.items():
        if stream.batch_size < world:
            raise ConfigError(f"{name} batches of {stream.batch_size} cannot be shared by {world} processes: every "
                              f"process needs at least one row (use larger batches or fewer processes)")
    state = TrainState(params={name: layer.logits for name, layer in layers.items()}, optimizer=optimizer,
                       model=model, streams=streams)
    run.restore(state)
    eval_sets = {"targetkg": sets["targetkg"], "controlkg": sets["controlkg"]}

    def step_fn(step: int) -> dict:
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, config.steps, config.warmup_frac)
        fm.set_step(model, step)  # one sampled subnetwork per step, shared by the three terms
        # The global batches (the same on every rank), then this rank's share of each.
        target_batch = target_data.batch(streams["targetkg"].next()[rank::world], objective=True)
        control_batch = control_data.batch(streams["controlkg"].next()[rank::world], objective=True)
        lm_index = torch.as_tensor(streams["lm"].next()[rank::world], device=device)
        terms = step_loss(target_batch, control_batch, lm_train[lm_index], lm_train_h0[lm_index],
                          lm_train_full_hidden[lm_index])
        # Each KL term is a mean over this rank's scored rows; weighted by rows here / rows of all ranks (x world, as
        # DDP averages) the ranks' gradients average to the gradient of the global mean. One process: weights 1.0.
        rows = [len(target_batch[3]), len(control_batch[3]), lm_index.numel() * lm_train.shape[1]]
        weights = fmd.share_weights(rows)
        suppression, control_kl, lm_kl = (terms[k] * w for k, w in zip(("suppression", "control_kl", "lm_kl"),
                                                                         weights))
        density = terms["density"]
        lam = reg_lambda(step, config.steps, config.lambda_reg_init, config.lambda_reg_final)
        loss = (config.lambda_target * suppression + config.lambda_control * control_kl + config.lambda_lm * lm_kl
                + lam * density)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # The logged values are the global ones: the ranks' weighted terms averaged.
        loss, suppression, control_kl, lm_kl = fmd.mean_over_ranks(
            torch.stack([loss.detach(), suppression.detach(), control_kl.detach(), lm_kl.detach()]))
        with torch.no_grad():  # (sharded logits: each rank counts its shard, then one sum over the ranks)
            closed = sum(fm.io.full_tensor((layer.gates() == 0).sum()) for layer in layers.values()).item()
        row = {"loss": loss.item(), "target_kl_uniform": suppression.item(), "control_kl": control_kl.item(),
               "lm_kl": lm_kl.item(), "density": density.item(), "lambda_reg": lam,
               "lr": optimizer.param_groups[0]["lr"],
               "sparsity": closed / sum(layer.logits.numel() for layer in layers.values())}
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
            scores = evaluate(model, top, eval_sets, None, None, config.eval_batch, config.seed,
                              which=("remaining",))["remaining"]
            row.update(targetkg_ppl_remaining=scores["targetkg"]["ppl"],
                       controlkg_ppl_remaining=scores["controlkg"]["ppl"])
        return row

    train_started = time.perf_counter()
    steps_before = state.step
    history = run.train(state, step_fn, show=("loss", "target_kl_uniform", "control_kl", "lm_kl", "sparsity"),
                        desc=f"knowledge {config.target}")
    train_seconds = time.perf_counter() - train_started
    if sharded:
        # The masks gathered into one file (every rank takes part); rank 0 evaluates a whole model that reads it,
        # exactly as a user would load the run's masks.
        fmd.save_masks(model, run.path("masks"))
        if main:
            model = _load_model(config, device)[0]
            fm.load_masks(model, run.path("masks"))
            top = TopBlocks(model, first, blocks_path)
            layers = fm.masked_modules(model)
    if not main:  # rank 0 evaluates and writes the results
        return {}

    eval_started = time.perf_counter()
    # The ControlKG training triplets too: the paper's over- vs under-training check (held out vs seen); and the
    # TargetKG's other templates: the paraphrase test (is the knowledge gone, or only its trained wording?).
    final_sets = {**eval_sets, "controlkg_train": sets["controlkg_train"]}
    if "targetkg_paraphrase" in sets:
        final_sets["targetkg_paraphrase"] = sets["targetkg_paraphrase"]
    results = evaluate(model, top, final_sets, lm_eval, lm_eval_h0, config.eval_batch, config.seed + 7,
                       random_draws=config.random_draws)
    eval_seconds = time.perf_counter() - eval_started
    sparsity = sparsity_report(model)
    summary = summarize(results)
    metrics = {
        "experiment": EXPERIMENT, "model": config.model, "model_source": source,
        "model_type": model.config.model_type, "target": config.target, "seed": config.seed, "steps": config.steps,
        "masked_layers": len(layers), "masked_blocks": [first, n_blocks - 1], "n_blocks": n_blocks,
        "masked_weights": sparsity["total_weights"], "backend": fm.ops._backend.resolve_name(device),
        "data": {"targetkg": len(prepared.target), "controlkg_train": len(prepared.control_train),
                 "controlkg_eval": len(prepared.control_eval),
                 "targetkg_paraphrase": len(paraphrase_sentences), "lm_train_tokens": int(lm_train.numel()),
                 "lm_eval_tokens": int(lm_eval.numel()), "sources": prepared.sources},
        "summary": summary, "sparsity": sparsity,
        "scores": {mode: {k: {kk: vv for kk, vv in v.items() if kk != "logprob"} for k, v in r.items()}
                   for mode, r in results.items()},
        "final_train_row": history[-1] if history else None,
        "timing": {"setup_seconds": setup_seconds, "train_seconds": train_seconds,
                   "train_steps_this_process": state.step - steps_before, "eval_seconds": eval_seconds,
                   "device": str(device), "torch_threads": torch.get_num_threads(),
                   "machine": f"{platform.machine()} {platform.processor() or ''}".strip()},
    }
    if not sharded:
        run.save_masks(model)
    run.write_metrics(metrics)
    _plots(run, history, summary, sparsity)
    run.write_report(report_markdown(config, metrics, prepared))
    log(run.finished_message())
    return metrics


# --- command line -------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, KnowledgeConfig)


def run_from_args(args) -> int:
    return run_cli(KnowledgeConfig, run_experiment, args, EXPERIMENT, run_errors=(DataError,))


__all__ = ["reg_lambda", "lr_factor", "run_experiment", "add_arguments", "run_from_args"]
