"""One seed of setting 3, `fastmask run disentangle --data syntax`: the splits (syntax.py), the unmasked features,
mask 0 (semantics) and mask 1 (syntax) learned with the triplet losses in one grouped forward per step under the
runner's checkpoints (resumable, data parallel as the other settings), the fine-tuned baseline per factor (triplet
loss), the semantic and syntactic scores of every representation (syntax_eval.py) and the results folder."""

from __future__ import annotations

import platform
import time

import torch

import fastmask as fm

from ..blocks import EncodedTexts, TopBlocks, block_inputs, block_list, top_blocks
from ..runner import open_run, resolve_device, seed_everything, weights_key
from .config import DisentangleConfig
from .evaluate import _mask_features, _unmasked_features, zero_fraction
from .model import StepLoss, _load_encoder, _masked_model, _optimizer, finetuned_features, mask_training
from .syntax import SyntaxTripletSampler, load_syntax_splits
from .syntax_eval import own_minus_other, root_probe, semantic_scores, template_retrieval
from .syntax_report import syntax_plots, syntax_report_markdown

FACTORS = ("semantics", "syntax")
EVAL_SPLITS = ("mrpc_dev", "mrpc_test", "ewt_dev", "ewt_test")


def _scores(features: dict, splits) -> tuple:
    """({rep: semantic scores}, {rep: syntactic scores}) of every representation."""
    dev_y, test_y = splits.dev.labels, splits.test.labels
    dev_t, test_t = [r[0] for r in splits.ewt_dev.labels], [r[0] for r in splits.ewt_test.labels]
    semantic, syntactic = {}, {}
    for rep, f in features.items():
        semantic[rep] = semantic_scores(f["mrpc_dev"], dev_y, f["mrpc_test"], test_y)
        syntactic[rep] = {**template_retrieval(f["ewt_test"], test_t),
                          **root_probe(f["ewt_dev"], dev_t, f["ewt_test"], test_t)}
    return semantic, syntactic


def run_syntax_seed(config: DisentangleConfig, *, resume: bool = False, overwrite: bool = False, log=None) -> dict:
    """Learn the semantic and the syntactic mask, evaluate them against the baselines, write the results folder
    (one seed, ``config.seed``)."""
    run, rank, world = open_run(config, resume=resume, overwrite=overwrite, experiment="disentangle", log=log)
    main = rank == 0
    seed_everything(config.seed)
    device = resolve_device(config.device)
    fm.set_backend(config.backend)
    started = time.perf_counter()
    splits = load_syntax_splits(config)
    encoder, tokenizer, source = _load_encoder(config, device)
    texts = {"train": splits.pool, "mrpc_dev": splits.dev.sentences(), "mrpc_test": splits.test.sentences(),
             "ewt_dev": splits.ewt_dev.texts, "ewt_test": splits.ewt_test.texts}
    encoded = {s: EncodedTexts.from_texts(tokenizer, t, config.max_length) for s, t in texts.items()}
    first = top_blocks(encoder, config.top_blocks, "top_blocks")[2]
    key = weights_key(encoder, config.model)
    if first:  # the training pool needs only its h0 (cached on disk as the evaluation splits' are)
        train = encoded["train"]
        with torch.no_grad():
            train.h0 = block_inputs(TopBlocks(encoder, first, block_list(encoder)[0]), train.input_ids,
                                    train.attention_mask, config.eval_batch, device, key, trim=True)
    features = {"unmasked": _unmasked_features(encoder, {s: encoded[s] for s in EVAL_SPLITS}, first,
                                               config.eval_batch, device, key)}
    setup_seconds = time.perf_counter() - started

    model, pruned = _masked_model(encoder, config, [1, 1], config.prune_sparsity)  # heads unused (ce_weight 0)
    model.to(device)
    optimizer = _optimizer(model, config)
    sampler = SyntaxTripletSampler(splits, seed=config.seed)
    step_module = StepLoss(model, encoded["train"], None, sampler, config, device, rank, world)
    state, step_fn = mask_training(run, model, optimizer, step_module, len(sampler), config, world)

    train_started = time.perf_counter()
    history = run.train(state, step_fn, show=("loss",))
    train_seconds = time.perf_counter() - train_started
    if not main:
        return {}
    run.save_masks(model.encoder)

    eval_started = time.perf_counter()
    features.update(_mask_features(model, encoded, config.eval_batch, device, EVAL_SPLITS))
    if config.finetune_steps:
        for k in range(2):
            features[f"finetuned_{k}"] = finetuned_features(config, encoded, None, k, [1, 1], device,
                                                            sampler=sampler, splits=EVAL_SPLITS)
    semantic, syntactic = _scores(features, splits)
    sparsity = fm.sparsity(model.encoder)
    eval_seconds = time.perf_counter() - eval_started
    positive = sum(splits.test.labels) / len(splits.test)
    metrics = {
        "experiment": "disentangle", "setting": "syntax", "model": config.model, "model_source": source,
        "factors": list(FACTORS), "seed": config.seed, "data": splits.counts,
        "semantic": semantic, "syntactic": syntactic, "own_minus_other": own_minus_other(semantic, syntactic),
        "trivial": {"auc": 0.5, "f1_all_paraphrase": 2 * positive / (1 + positive), "test_paraphrase_share": positive,
                    "nn_chance": syntactic["unmasked"]["nn_chance"],
                    "random_edit_distance": syntactic["unmasked"]["random_edit_distance"],
                    "root_majority": syntactic["unmasked"]["root_majority"]},
        "mask_sparsity": [s["overall"] for s in sparsity["per_mask"]],
        "zero_fraction": [zero_fraction(model.encoder, k) for k in range(2)],
        "pruned_fraction": (sum(pruned.values()) / len(pruned)) if pruned else 0.0,
        "sweep": [], "final": history[-1] if history else {},
        "seconds": {"setup": setup_seconds, "train": train_seconds, "evaluate": eval_seconds},
        "hardware": {"device": str(device), "machine": platform.machine(), "processor": platform.processor(),
                     "torch_threads": torch.get_num_threads()},
    }
    run.write_metrics(metrics)
    syntax_plots(run, history, metrics)
    run.write_report(syntax_report_markdown(config, metrics))
    print(run.finished_message())
    return metrics


__all__ = ["run_syntax_seed", "FACTORS", "EVAL_SPLITS"]
