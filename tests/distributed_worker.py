"""Worker of tests/test_distributed.py, started by torchrun (or run in one process for the reference):

    torchrun --nproc-per-node 2 distributed_worker.py OUT_DIR            # FSDP2 and DDP scenarios, 2 processes
    python distributed_worker.py OUT_DIR --reference                       # the same training, one process
    ... --stop-at 2 / --checkpoint-every 1 / --resume                       # sharded checkpoints (DCP) and resume

Each scenario trains the mask logits of a tiny masked model (GPT-2 per-weight, Llama heads) for STEPS Adam steps on
a fixed global batch, each rank on its contiguous share of the rows (the loss a mean over them), and writes the
final logits (rank 0) to OUT_DIR/<scenario>.safetensors through fm.distributed.save_masks (FSDP2: gathered from
the shards) or fm.save_masks. Also writes OUT_DIR/<scenario>.done on rank 0 when it ends.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import fastmask as fm
import fastmask.distributed as fmd

STEPS, GLOBAL_BATCH, SEQ, VOCAB = 3, 4, 8, 64
PENALTY = 0.5  # weight of the expected density in the loss


def tiny_model(family: str) -> torch.nn.Module:
    """A tiny model of the family, the same weights in every process (seeded init, no dropout)."""
    torch.manual_seed(0)
    if family == "gpt2":
        config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=SEQ, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(config)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQ, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config)


SCENARIOS = {  # name: (family, mask config, wrapping)
    "gpt2_weight_fsdp": ("gpt2", dict(granularity="weight", init_keep=0.8), "fsdp"),
    "gpt2_head_fsdp": ("gpt2", dict(granularity="head", init_keep=0.8), "fsdp"),
    "llama_weight_fsdp": ("llama", dict(granularity="weight", init_keep=0.8), "fsdp"),
    "llama_head_fsdp": ("llama", dict(granularity="head", init_keep=0.8), "fsdp"),
    # FSDP2 on the masked blocks only, under a step module (the experiments' layout: fmd.shard_masked_blocks)
    "gpt2_weight_fsdp_blocks": ("gpt2", dict(granularity="weight", init_keep=0.8, targets=[r"\.1\."]),
                                "fsdp_blocks"),
    "gpt2_weight_ddp": ("gpt2", dict(granularity="weight", init_keep=0.8), "ddp"),
    "llama_head_ddp": ("llama", dict(granularity="head", init_keep=0.8), "ddp"),
}


def masked_model(scenario: str) -> torch.nn.Module:
    family, config, _ = SCENARIOS[scenario]
    return fm.apply(tiny_model(family), fm.MaskConfig(seed=7, **config))


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))


class Step(torch.nn.Module):
    """One training step's loss as a module: the LM loss of the rows plus the sparsity penalty (outside any block's
    forward, so FSDP2 hands it the sharded logits)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, labels=ids).loss + PENALTY * fm.l0_penalty(_unwrapped(self.model),
                                                                                    normalize=True)


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def train(scenario: str, out: Path, distributed: bool, die_at_step: int = -1, stop_at: int = STEPS,
          resume: bool = False, checkpoint_every: int = 0) -> None:
    """Train, save the masks; ``stop_at`` < STEPS: write a checkpoint (out/<scenario>.ckpt) after that many steps
    and stop; ``checkpoint_every``: also write it every that many steps; ``resume``: continue from it (written with
    any number of processes)."""
    model = masked_model(scenario)
    wrapping = SCENARIOS[scenario][2]
    rank, world = fmd.rank(), fmd.world_size()
    step_loss = Step(model)
    if distributed and wrapping == "fsdp":
        fmd.shard(model)
    elif distributed and wrapping == "fsdp_blocks":
        fmd.shard_masked_blocks(model, root=step_loss)
    elif distributed:
        model = fmd.replicate(model)
        step_loss = Step(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ids = batch()
    share = GLOBAL_BATCH // world
    mine = ids[rank * share:(rank + 1) * share]
    checkpoint = out / f"{scenario}.ckpt"
    start = fmd.load_checkpoint(checkpoint, model, opt)["step"] if resume else 0
    gate_sums, sharded_between_steps = [], []
    for step in range(start, STEPS):
        if step == stop_at or (checkpoint_every and step > start and step % checkpoint_every == 0):
            fmd.save_checkpoint(checkpoint, model, opt, step=step)
        if step == stop_at:
            return
        if step == die_at_step and rank == world - 1:
            os._exit(3)  # a rank that dies mid-run, without a word to the others
        opt.zero_grad()
        step_loss(mine).backward()  # mean over my rows: the average is the global mean
        opt.step()
        # eval gates of sharded logits: each rank sums its shard's, one sum over the ranks
        layers = fm.masked_modules(_unwrapped(model)).values()
        gate_sums.append(float(sum(fm.io.full_tensor(layer.gates().sum(dtype=torch.float64)) for layer in layers)))
        sharded_between_steps.append(all(fm.ops._common.is_dtensor(layer.logits) for layer in layers))
    path = out / f"{scenario}.safetensors"
    if distributed:
        fmd.save_masks(model, path)
    else:
        fm.save_masks(model, path)
    model.eval()  # eval gates; every rank runs the sharded forward on the whole batch (FSDP2 gathers per block)
    with torch.no_grad():
        outputs = model(input_ids=ids).logits
    if rank == 0:
        save_file({"logits": outputs.contiguous(), "gate_sums": torch.tensor(gate_sums, dtype=torch.float64),
                   "sharded_between_steps": torch.tensor(sharded_between_steps)},
                  str(out / f"{scenario}.eval.safetensors"))
    if rank == 0:
        (out / f"{scenario}.done").write_text("ok\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--reference", action="store_true", help="one process, no process group")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--die-at-step", type=int, default=-1, help="the last rank exits at this step (fault test)")
    parser.add_argument("--timeout-s", type=float, default=60)
    parser.add_argument("--stop-at", type=int, default=STEPS, help="checkpoint after this many steps and stop")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/<scenario>.ckpt")
    parser.add_argument("--checkpoint-every", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.reference:
        fmd.init(timeout_s=args.timeout_s)
    for scenario in args.scenarios.split(","):
        train(scenario, args.out, distributed=not args.reference, die_at_step=args.die_at_step,
              stop_at=args.stop_at, resume=args.resume, checkpoint_every=args.checkpoint_every)
    if not args.reference:
        # Every rank done with its collectives before any tears the group down (a peer's closing socket can abort
        # a rank still inside gloo).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
