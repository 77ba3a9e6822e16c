"""The model-level step: one training step of a random-init GPT-2, per configuration, each in its own process.

Configurations (random tokens, LM loss, AdamW, dropout off everywhere so that runs are comparable):

  dense           fine-tune every weight in the model dtype (bf16 on GPUs).
  dense_amp       fine-tune with fp32 master weights under torch.autocast(bf16).
  naive_mask      mask learning as users write it: every Conv1D weight (frozen, model dtype) gated through
                  torch.nn.utils.parametrize by ``W * z``, z the hard-concrete gates of fp32 per-weight logits
                  from torch ops, on fastmask.ops.uniform noise (so its noise is fastmask's); loss + L0 density.
  fastmask_mask   fm.apply over every Conv1D weight (the same logits, seeds and noise), loss + fm.l0_penalty;
                  one row per fused backend.

Every configuration runs in a fresh Python process (``python -m fastmask.bench.model --child ...``), so peak
memory (torch.cuda.max_memory_allocated; on CPUs the process's peak RSS) and allocator state belong to it alone.
The first ``trajectory_steps`` (untimed warm-up) record per step the loss, the expected mask density and a
sketch of the logits' gradient (gradient_sketch); the parent checks that fastmask's trajectory equals the
naive one within TRAJECTORY_TOL of the dtype (the noise is the same, so only float rounding may differ). Then
``steps`` further steps are timed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from ..assets import atomic_write_text
from .timing import summarize

# GPT-2 sizes (GPT2Config fields) and the batch each is stepped with. "tiny" is the CPU / smoke stand-in.
SIZES = {
    "124M": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024, batch=8, seq_len=512),
    "xl": dict(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257, n_positions=1024, batch=4, seq_len=512),
    "tiny": dict(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=32, batch=2, seq_len=16),
}
SIZE_LABELS = {"124M": "gpt2-124M", "xl": "gpt2-xl-1.56B", "tiny": "gpt2-tiny"}
CONFIGS = ("dense", "dense_amp", "naive_mask", "fastmask_mask")
MASK_LR, DENSE_LR, L0_WEIGHT = 0.1, 1e-4, 1.0
INIT_LOGIT = 1.0  # P(z != 0) ~ 0.93 under hard concrete: most gates stochastic, so the noise matters
MASK_SEED = 0
SKETCH_SEED, SKETCH_SIZE = 20_240_601, 16  # the random signs of gradient_sketch, and how many projections
# What the naive and fastmask trajectories may differ by, per recorded quantity and dtype: losses and densities
# (largest relative difference over the steps) and the gradient sketches (largest 1 - cosine). Measured on the tiny
# GPT-2 on CPU: the same noise differs by 0 (fp32) / 2e-5 (bf16: naive rounds z to bf16 before W * z) in loss
# and density, 3e-14 / 2e-5 in 1 - cosine; another noise seed by 8e-4 in loss, 4e-5 in density and 0.35-0.66
# in 1 - cosine.
TRAJECTORY_KEYS = {"losses": "loss_rel_diff", "densities": "density_rel_diff", "grad_sketches": "grad_cos_gap"}
TRAJECTORY_TOL = {
    "float32": {"losses": 1e-4, "densities": 1e-4, "grad_sketches": 1e-4},
    "bfloat16": {"losses": 5e-3, "densities": 5e-3, "grad_sketches": 1e-2},
    "float16": {"losses": 5e-3, "densities": 5e-3, "grad_sketches": 1e-2},
}
GIB = 2 ** 30


@dataclass(frozen=True)
class StepSpec:
    """What one child process runs."""

    size: str
    config: str
    device: str
    dtype: str  # weight dtype of the model ("bfloat16" on GPUs)
    backend: str = "auto"  # fastmask backend (fastmask_mask only)
    steps: int = 10  # timed steps
    trajectory_steps: int = 4  # untimed warm-up steps whose loss and density are recorded
    seed: int = 0  # model init and data
    mask_seed: int = MASK_SEED  # noise (MaskConfig.seed)


# ------------------------------------------------------------------------------------------- in the child --

def _dtype(name: str):

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def build_model(size: str, device: str, seed: int):
    """A random-init GPT2LMHeadModel of a named size (float32), built on ``device``; no download."""
    from transformers import GPT2Config, GPT2LMHeadModel

    fields = {k: v for k, v in SIZES[size].items() if k not in ("batch", "seq_len")}
    last_token = fields["vocab_size"] - 1  # GPT-2's <|endoftext|>, inside the vocabulary at every size
    config = GPT2Config(**fields, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=last_token,
                        eos_token_id=last_token, loss_type="ForCausalLM")
    torch.manual_seed(seed)
    with torch.device(device):
        model = GPT2LMHeadModel(config)
    return model.to(device).train()


def batches(size: str, device: str, seed: int, count: int = 4) -> list:
    """``count`` random token batches, the same in every process (generated on CPU from ``seed``)."""

    spec = SIZES[size]
    gen = torch.Generator().manual_seed(seed + 1)
    return [torch.randint(0, spec["vocab_size"], (spec["batch"], spec["seq_len"]), generator=gen).to(device)
            for _ in range(count)]


def conv1d_layers(model) -> list:
    """(name, module) of every transformers Conv1D (the weights both mask configurations gate)."""
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ == "Conv1D"]


def _naive_gate_module(shape, seed: int, device):
    """The parametrization ``W -> W * z``: hard concrete from torch ops on fastmask.ops.uniform noise."""
    from torch import nn

    import fastmask as fm
    from fastmask import ref

    class NaiveHardConcrete(nn.Module):
        def __init__(self):
            super().__init__()
            self.logits = nn.Parameter(torch.full(shape, INIT_LOGIT, dtype=torch.float32, device=device))
            self.seed, self.step = seed, 0

        def forward(self, weight):
            noise = fm.ops.uniform(self.logits.shape, seed=self.seed, offset=self.step * self.logits.numel(),
                                   device=self.logits.device)
            z = ref.hard_concrete_naive(self.logits, noise=noise)
            return weight * z.to(weight.dtype)

    return NaiveHardConcrete()


def _density(logits_list):
    """Expected fraction of kept weights (per-weight gates) in torch ops: sum of P(z != 0) / the count."""
    from fastmask import ref

    total = sum(ref.l0_norm_ref(logits) for logits in logits_list)
    return total / float(sum(logits.numel() for logits in logits_list))


@torch.no_grad()
def gradient_sketch(logits_list) -> list[float]:
    """SKETCH_SIZE random projections of the logits' gradient: sum_i r_ki g_i over every logit, with random signs
    r_ki from fastmask.ops.uniform (the same in every process). The gradient of a logit carries its gate's noise
    (the hard-concrete slope), so the cosine between two runs' sketches is ~1 on the same noise and far from it
    on other noise, which the loss of a random-init model barely shows."""
    import fastmask as fm

    sketch, offset = [0.0] * SKETCH_SIZE, 0
    for logits in logits_list:
        grad = logits.grad.double() if logits.grad is not None else torch.zeros_like(logits, dtype=torch.float64)
        for k in range(SKETCH_SIZE):
            signs = fm.ops.uniform(tuple(grad.shape), seed=SKETCH_SEED + k, offset=offset, device=grad.device)
            sketch[k] += torch.where(signs < 0.5, grad, -grad).sum().item()
        offset += grad.numel()
    return sketch


def prepare(spec: StepSpec):
    """(model, optimizer, step_fn(batch, step) -> (loss, density or None), mask logits or None) of a
    configuration."""
    from torch.nn.utils import parametrize

    import fastmask as fm

    dtype = _dtype(spec.dtype)
    model = build_model(spec.size, spec.device, spec.seed)
    if spec.config == "dense_amp":
        opt = torch.optim.AdamW(model.parameters(), lr=DENSE_LR)

        def step(batch, _):
            with torch.autocast(torch.device(spec.device).type, dtype=torch.bfloat16):
                loss = model(input_ids=batch, labels=batch).loss
            return loss, None
        return model, opt, step, None
    model = model.to(dtype)
    if spec.config == "dense":
        opt = torch.optim.AdamW(model.parameters(), lr=DENSE_LR)
        return model, opt, lambda batch, _: (model(input_ids=batch, labels=batch).loss, None), None
    if spec.config == "naive_mask":
        model.requires_grad_(False)
        gates = []
        for name, module in conv1d_layers(model):
            gate = _naive_gate_module(tuple(module.weight.shape), fm.hf.layer_seed(spec.mask_seed, name),
                                      spec.device)
            parametrize.register_parametrization(module, "weight", gate)
            gates.append(gate)
        logits = [g.logits for g in gates]
        opt = torch.optim.AdamW(logits, lr=MASK_LR, weight_decay=0.0)

        def step(batch, index):
            for g in gates:
                g.step = index
            density = _density(logits)
            return model(input_ids=batch, labels=batch).loss + L0_WEIGHT * density, density
        return model, opt, step, logits
    if spec.config == "fastmask_mask":
        fm.set_backend(spec.backend)
        fm.apply(model, fm.MaskConfig(targets=["Conv1D"], init_logit=INIT_LOGIT, init_keep=None,
                                      seed=spec.mask_seed))
        opt = torch.optim.AdamW(fm.mask_parameters(model), lr=MASK_LR, weight_decay=0.0)

        def step(batch, index):
            fm.set_step(model, index)
            density = fm.l0_penalty(model, normalize=True)
            return model(input_ids=batch, labels=batch).loss + L0_WEIGHT * density, density
        return model, opt, step, fm.mask_parameters(model)
    raise ValueError(f"fastmask bench model: config must be one of {CONFIGS}, got {spec.config!r}")


def _peak_memory_gib(device: str) -> tuple[float, str]:

    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / GIB, "cuda_max_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, "process_max_rss"


def run_step_spec(spec: StepSpec) -> dict:
    """Run one configuration in this process: trajectory steps, then timed steps. A JSON-ready result."""
    import fastmask as fm

    if spec.config not in CONFIGS:
        raise ValueError(f"fastmask bench model: config must be one of {CONFIGS}, got {spec.config!r}")
    if spec.size not in SIZES:
        raise ValueError(f"fastmask bench model: size must be one of {sorted(SIZES)}, got {spec.size!r}")
    on_cuda = torch.device(spec.device).type == "cuda"
    model, opt, step_fn, mask_logits = prepare(spec)
    data = batches(spec.size, spec.device, spec.seed)
    trajectory = {key: [] for key in TRAJECTORY_KEYS}

    def train_step(index, record=False):
        loss, density = step_fn(data[index % len(data)], index)
        loss.backward()
        if record:
            trajectory["losses"].append(loss.item())
            trajectory["densities"].append(density.item() if density is not None else None)
            trajectory["grad_sketches"].append(gradient_sketch(mask_logits) if mask_logits else None)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for index in range(spec.trajectory_steps):
        train_step(index, record=True)
    if on_cuda:  # the peak of steady-state steps (optimizer state exists by now), without the sketches' buffers
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for index in range(spec.trajectory_steps, spec.trajectory_steps + spec.steps):
        if on_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(index)
        if on_cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    peak, mem_kind = _peak_memory_gib(spec.device)
    backend = fm.ops._backend.resolve_name(torch.device(spec.device)) if spec.config == "fastmask_mask" else ""
    return {**asdict(spec), "pid": os.getpid(), "backend": backend, "step_ms": times,
            "n_params": sum(p.numel() for p in model.parameters()),
            "n_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "peak_mem_gib": peak, "mem_kind": mem_kind, **trajectory, "status": "ok"}


def child_main(argv=None) -> int:
    """``python -m fastmask.bench.model --child --spec JSON --result PATH``: run one spec, write its result."""
    parser = argparse.ArgumentParser(description="one configuration of the model-level benchmark (internal)")
    parser.add_argument("--child", action="store_true", required=True)
    parser.add_argument("--spec", required=True, help="StepSpec as JSON")
    parser.add_argument("--result", required=True, help="where to write the result JSON")
    args = parser.parse_args(argv)
    result = run_step_spec(StepSpec(**json.loads(args.spec)))
    _write_json_atomic(Path(args.result), result)
    return 0


def _write_json_atomic(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data))


# ------------------------------------------------------------------------------------------ in the parent --

def run_in_subprocess(spec: StepSpec, timeout_s: float = 1800) -> dict:
    """Run one spec in a fresh Python process; a failure (OOM, crash, timeout) becomes a result with a status."""
    with tempfile.TemporaryDirectory(prefix="fastmask-bench-") as tmp:
        result_path = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "fastmask.bench.model", "--child", "--spec", json.dumps(asdict(spec)),
                   "--result", str(result_path)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {**asdict(spec), "status": f"error: timed out after {timeout_s:.0f} s"}
        if done.returncode == 0 and result_path.exists():
            return json.loads(result_path.read_text())
        tail = (done.stderr or done.stdout or "").strip().splitlines()[-3:]
        status = "oom" if "out of memory" in (done.stderr or "").lower() else \
            f"error: exit {done.returncode}: {' | '.join(tail)}"[:400]
        return {**asdict(spec), "status": status}


def _cos_gap(x: list, y: list) -> float:
    dot = sum(a * b for a, b in zip(x, y))
    norm = math.sqrt(sum(a * a for a in x) * sum(b * b for b in y))
    return 1.0 - dot / norm if norm > 0 else (0.0 if x == y else 1.0)


def trajectory_diff(a: dict, b: dict, key: str = "losses") -> float:
    """Largest per-step difference of two results' ``key`` (one of TRAJECTORY_KEYS): relative difference of
    losses / densities, 1 - cosine of gradient sketches; inf when missing or of different lengths."""
    xs, ys = a.get(key) or [], b.get(key) or []
    if not xs or len(xs) != len(ys) or None in xs or None in ys:
        return math.inf
    if key == "grad_sketches":
        return max(_cos_gap(x, y) for x, y in zip(xs, ys))
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(xs, ys))


def trajectory_check(result: dict, naive: Optional[dict]) -> dict:
    """The CSV columns of fastmask's trajectory against the naive one: each difference (trajectory_diff), and
    trajectory_equal = 1 when all are within TRAJECTORY_TOL of the dtype."""
    tol = TRAJECTORY_TOL.get(result["dtype"], TRAJECTORY_TOL["bfloat16"])
    diffs = {key: (trajectory_diff(result, naive, key) if naive else math.inf) for key in TRAJECTORY_KEYS}
    return {**{TRAJECTORY_KEYS[key]: f"{diff:.2e}" for key, diff in diffs.items()},
            "trajectory_equal": int(all(diffs[key] <= tol[key] for key in TRAJECTORY_KEYS))}


def _stats(times: list) -> tuple:
    """(median, q25, q75) of step times, or Nones when there are none (a failed configuration)."""
    if not times:
        return None, None, None
    t = summarize(times, "steps")
    return t.median_ms, t.q25_ms, t.q75_ms


def result_rows(results: list[dict], env: dict) -> list[dict]:
    """CSV rows of one size's results: ratios to the dense step and the dense AMP memory, and the trajectory
    check of every fastmask row against the naive row."""
    by_config = {r["config"]: r for r in results if r.get("status") == "ok" and r["config"] != "fastmask_mask"}
    dense_ms = _stats(by_config["dense"]["step_ms"])[0] if "dense" in by_config else None
    amp_mem = by_config["dense_amp"]["peak_mem_gib"] if "dense_amp" in by_config else None
    naive = by_config.get("naive_mask")
    rows = []
    for r in results:
        size = SIZES[r["size"]]
        median, q25, q75 = _stats(r.get("step_ms") or [])
        peak = r.get("peak_mem_gib")
        check = {}
        if r["config"] == "fastmask_mask" and r.get("status") == "ok":
            check = trajectory_check(r, naive)
        rows.append({
            **env, "model": SIZE_LABELS[r["size"]], "n_layer": size["n_layer"], "n_embd": size["n_embd"],
            "n_head": size["n_head"], "batch": size["batch"], "seq_len": size["seq_len"], "config": r["config"],
            "dtype": r["dtype"], "logits_dtype": "float32" if "mask" in r["config"] else "",
            "backend": r.get("backend", ""), "n_params": r.get("n_params", ""),
            "n_trainable": r.get("n_trainable", ""), "steps": len(r.get("step_ms") or []),
            "median_step_ms": _round(median), "q25_ms": _round(q25), "q75_ms": _round(q75),
            "peak_mem_gib": _round(peak, 3), "mem_kind": r.get("mem_kind", ""),
            "ratio_to_dense": _round(median / dense_ms if median and dense_ms else None, 3),
            "mem_ratio_to_dense_amp": _round(peak / amp_mem if peak and amp_mem else None, 3),
            **{column: "" for column in TRAJECTORY_KEYS.values()}, "trajectory_equal": "", **check,
            **{key: ";".join(f"{x:.6g}" for x in r.get(key) or [] if x is not None) for key in ("losses", "densities")},
            "pid": r.get("pid", ""), "status": r.get("status", "")})
    return rows


def _round(value, digits: int = 3):
    return "" if value is None else round(value, digits)


def specs_for(size: str, device: str, dtype: str, backends: Iterable[str], configs: Iterable[str] = CONFIGS,
              steps: int = 10, trajectory_steps: int = 4) -> list[StepSpec]:
    """The specs of one model size: each non-fastmask config once, fastmask_mask once per backend."""
    specs = []
    for config in configs:
        if config not in CONFIGS:
            raise ValueError(f"fastmask bench model: config must be one of {CONFIGS}, got {config!r}")
        for backend in (backends if config == "fastmask_mask" else ("auto",)):
            specs.append(StepSpec(size, config, device, dtype, backend, steps, trajectory_steps))
    return specs


def run_sizes(sizes: Iterable[str], device: str, dtype: str, env: dict, backends: Iterable[str],
              configs: Iterable[str] = CONFIGS, steps: int = 10, trajectory_steps: int = 4,
              on_rows: Optional[Callable[[list], None]] = None, deadline: Optional[float] = None,
              progress: bool = True, log: Callable[[str], None] = print) -> tuple[list, list]:
    """Every configuration of every size, one process each. Returns (rows, skipped descriptions)."""
    from tqdm.auto import tqdm

    rows, skipped = [], []
    for size in sizes:
        if size not in SIZES:
            raise ValueError(f"fastmask bench model: size must be one of {sorted(SIZES)}, got {size!r}")
        results = []
        specs = specs_for(size, device, dtype, backends, configs, steps, trajectory_steps)
        for spec in tqdm(specs, desc=f"{SIZE_LABELS[size]} steps", disable=not progress, leave=False):
            if deadline is not None and time.monotonic() > deadline:
                skipped.append(f"model {SIZE_LABELS[size]} {spec.config} ({spec.backend})")
                continue
            results.append(run_in_subprocess(spec))
        new = result_rows(results, env)
        for row in new:
            shown = (f"{row['median_step_ms']:>9} ms  x{row['ratio_to_dense'] or '?'} of dense, "
                     f"{row['peak_mem_gib']} GiB ({row['mem_kind']})" if row["status"] == "ok" else row["status"])
            check = (f"  trajectory {'==' if row['trajectory_equal'] else '!='} naive "
                     f"(loss {row['loss_rel_diff']}, density {row['density_rel_diff']}, gradient 1-cos "
                     f"{row['grad_cos_gap']})" if row["trajectory_equal"] != "" else "")
            log(f"{row['model']:<14} {row['config']:<14} {row['backend'] or '':<9} {shown}{check}")
        rows += new
        if on_rows and new:
            on_rows(new)
    return rows, skipped


if __name__ == "__main__":
    sys.exit(child_main())
