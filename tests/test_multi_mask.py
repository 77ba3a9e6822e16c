"""K masks on one model (MaskConfig(n_masks=K), fm.mask_index): one forward equals K separate single-mask models
(same seeds; mask k at the noise of single-mask step s * K + k), on MiniLM (BERT, nn.Linear) and GPT-2 (Conv1D
in_out), training and eval; penalties, statistics, save/load, merge/export per mask, inverse, torch.compile and
bad input."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import fastmask as fm
from fastmask.config import MaskConfig
from fastmask.hf import apply, masked_modules

from test_hf import gpt2_config, load, output

K = 3
# Block masks: the compile test below and the op tests (tests/test_grouped_masked_linear.py, every granularity).
CASES = [("bert", "head"), ("gpt2", "weight"), ("gpt2", "unit_in")]


def _inputs(arch: str, batch: int = 6):
    gen = torch.Generator().manual_seed(4)
    if arch == "bert":
        ids = torch.randint(1000, 5000, (batch, 8), generator=gen)
        mask = torch.ones(batch, 8, dtype=torch.long)
        mask[1, 5:] = 0  # padding too
        return {"input_ids": ids, "attention_mask": mask}
    return {"input_ids": torch.randint(0, 128, (batch, 7), generator=gen)}


def _rows(inputs: dict, rows: torch.Tensor) -> dict:
    return {key: value[rows] for key, value in inputs.items()}


def _noisy(model):
    """Training-mode gates (noise) with dropout off: the model in eval, its masked layers in train."""
    model.eval()
    for layer in masked_modules(model).values():
        layer.train()
    return model


def _base(arch: str):
    """MiniLM, or the small-vocabulary random GPT-2 of test_io (a real-vocabulary LM head would dominate the time;
    the real tokenizer is test_hf's business)."""
    if arch != "gpt2":
        return load(arch)[0]
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(gpt2_config()).eval()


def _twins(arch: str, config: MaskConfig):
    """A K-mask model and K single-mask copies of the same base model, single k holding logits[k]."""
    base = _base(arch)
    singles = [copy.deepcopy(base) for _ in range(K)]
    multi = apply(base, dataclasses.replace(config, n_masks=K))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in masked_modules(multi).values():
            layer.logits.copy_(torch.randn(layer.logits.shape, generator=gen) * 2 + 1)
    for k, single in enumerate(singles):
        apply(single, config)
        for name, layer in masked_modules(single).items():
            with torch.no_grad():
                layer.logits.copy_(masked_modules(multi)[name].logits[k])
    return multi, singles


def _loss(out: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    return (out * probe[: out.shape[0]]).sum()


@pytest.mark.parametrize("arch,granularity", CASES)
def test_one_k_mask_forward_equals_k_single_mask_models(arch, granularity):
    config = MaskConfig(granularity=granularity, block=(32, 32), seed=5)
    multi, singles = _twins(arch, config)
    inputs = _inputs(arch)
    index = torch.tensor([2, 0, 1, 1, 0, 2])
    probe = torch.randn(_single_pass(singles[0], inputs).shape, generator=torch.Generator().manual_seed(2))
    for training in (True, False):
        for step in ((3,) if training else (0,)):  # step 3: mask k of the K-mask noise = single step 3 K + k
            if training:
                for model in [multi] + singles:
                    _noisy(model)
                fm.set_step(multi, step)
                for k, single in enumerate(singles):  # single k sees the noise of K-mask step s at mask k
                    fm.set_step(single, step * K + k)
            else:
                for model in [multi] + singles:
                    model.eval()
            for p in fm.mask_parameters(multi) + [p for s in singles for p in fm.mask_parameters(s)]:
                p.grad = None
            with fm.mask_index(multi, index):
                out = _forward(multi, inputs)
            _loss(out, probe).backward()
            for k, single in enumerate(singles):
                rows = (index == k).nonzero().flatten()
                single_out = _forward(single, _rows(inputs, rows))
                torch.testing.assert_close(out[rows].detach(), single_out.detach(), rtol=1e-4, atol=1e-5,
                                           msg=f"mask {k} training={training} step={step}")
                _loss(single_out, probe[rows]).backward()
                for name, layer in masked_modules(single).items():
                    torch.testing.assert_close(masked_modules(multi)[name].logits.grad[k], layer.logits.grad,
                                               rtol=1e-4, atol=1e-5, msg=f"{name} mask {k}")
            # "grouped" (K equal contiguous groups) and an int (one mask for all rows) are the same computation
            grouped_rows = torch.arange(K).repeat_interleave(2)
            with torch.no_grad(), fm.mask_index(multi, grouped_rows):
                by_index = _forward(multi, inputs)
            with torch.no_grad(), fm.mask_index(multi, "grouped"):
                torch.testing.assert_close(_forward(multi, inputs), by_index, rtol=1e-5, atol=1e-6)
            with torch.no_grad(), fm.mask_index(multi, 1):
                one = _forward(multi, inputs)
            if training:
                fm.set_step(singles[1], step * K + 1)
            torch.testing.assert_close(one, _single_pass(singles[1], inputs), rtol=1e-4, atol=1e-5)


def _forward(model, inputs):
    out = model(**inputs)
    return out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out.logits


def _single_pass(model, inputs):
    with torch.no_grad():
        return _forward(model, inputs)


def test_training_k_masks_equals_training_k_single_masks():
    """10 Adam steps with an L0 penalty: every mask of one K-mask GPT-2 follows its single-mask twin's logits and
    loss (one forward with a mixed batch instead of K)."""
    config = MaskConfig(granularity="unit_out", seed=2)
    multi, singles = _twins("gpt2", config)
    inputs = _inputs("gpt2", batch=6)
    index = torch.tensor([0, 1, 2, 2, 1, 0])
    probe = torch.randn(_single_pass(singles[0], inputs).shape, generator=torch.Generator().manual_seed(3))
    optimizers = [torch.optim.Adam(fm.mask_parameters(m), lr=0.1) for m in [multi] + singles]
    for model in [multi] + singles:
        model.train()
    for step in range(10):
        with fm.mask_index(multi, index):
            out = multi(**inputs).logits
        per_mask = [_loss(out[index == k], probe[index == k]) for k in range(K)]
        loss = sum(per_mask) + 1e-3 * fm.l0_penalty(multi)
        optimizers[0].zero_grad()
        loss.backward()
        optimizers[0].step()
        for k, (single, optimizer) in enumerate(zip(singles, optimizers[1:])):
            fm.set_step(single, step * K + k)
            rows = (index == k).nonzero().flatten()
            single_loss = _loss(single(**_rows(inputs, rows)).logits, probe[rows])
            optimizer.zero_grad()
            (single_loss + 1e-3 * fm.l0_penalty(single)).backward()
            optimizer.step()
            torch.testing.assert_close(per_mask[k].detach(), single_loss.detach(), rtol=1e-4, atol=1e-4)
    assert multi.transformer.h[0].mlp.c_fc.step == 10  # one noise draw per K-mask forward
    for k, single in enumerate(singles):
        for name, layer in masked_modules(single).items():
            torch.testing.assert_close(masked_modules(multi)[name].logits[k], layer.logits, rtol=1e-4, atol=1e-4)
    moved = [masked_modules(multi)["transformer.h.0.mlp.c_fc"].logits[k] for k in range(K)]
    assert not torch.allclose(moved[0], moved[1])  # different data per mask: the masks went apart


def test_penalty_sparsity_inverse_per_mask():
    multi, singles = _twins("gpt2", MaskConfig(granularity="weight", seed=3))
    inputs = _inputs("gpt2")
    total = fm.l0_penalty(multi)
    torch.testing.assert_close(total, sum(fm.l0_penalty(s) for s in singles), rtol=1e-5, atol=1e-2)
    for k, single in enumerate(singles):
        torch.testing.assert_close(fm.l0_penalty(multi, mask=k), fm.l0_penalty(single), rtol=1e-6, atol=1e-3)
        torch.testing.assert_close(fm.l0_penalty(multi, mask=k, weighted=False, normalize=True),
                                   fm.l0_penalty(single, weighted=False, normalize=True))
    torch.testing.assert_close(fm.l0_penalty(multi, normalize=True),
                               sum(fm.l0_penalty(s, normalize=True) for s in singles) / K)
    stats = fm.sparsity(multi)
    assert len(stats["per_mask"]) == K and stats["total_weights"] == K * fm.sparsity(singles[0])["total_weights"]
    for k, single in enumerate(singles):
        assert stats["per_mask"][k] == fm.sparsity(single) == fm.sparsity(multi, mask=k)
    assert stats["zero_weights"] == sum(fm.sparsity(s)["zero_weights"] for s in singles)
    assert 0.0 < stats["overall"] < 1.0
    with fm.inverse(multi), fm.mask_index(multi, 2):  # 1 - m of mask 2
        removed = output(multi.eval(), inputs)
    with fm.inverse(singles[2]):
        torch.testing.assert_close(removed, output(singles[2].eval(), inputs), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"mask must be an int in \[0, 3\)"):
        fm.l0_penalty(multi, mask=3)
    with pytest.raises(ValueError, match=r"mask must be an int in \[0, 1\)"):
        fm.sparsity(singles[0], mask=1)


def test_save_load_merge_and_export_per_mask(tmp_path):
    from transformers import GPT2LMHeadModel

    multi, singles = _twins("gpt2", MaskConfig(granularity="unit_out", targets=[r"mlp\.c_fc$"], seed=4))
    inputs = _inputs("gpt2")
    fm.save_masks(multi, tmp_path / "masks")
    fresh = _base("gpt2")
    fm.load_masks(fresh, tmp_path / "masks")  # patched from the saved MaskConfig: K masks again
    assert fresh.fastmask_config.n_masks == K
    for name, layer in masked_modules(multi).items():
        assert torch.equal(masked_modules(fresh)[name].logits, layer.logits) and layer.logits.shape[0] == K
    with fm.mask_index(fresh, "grouped"), fm.mask_index(multi, "grouped"):
        torch.testing.assert_close(output(fresh.eval(), inputs), output(multi.eval(), inputs), rtol=0, atol=0)
    with pytest.raises(ValueError, match="n_masks"):  # one-mask model, K-mask file
        fm.load_masks(apply(_base("gpt2"), MaskConfig(granularity="unit_out", targets=[r"mlp\.c_fc$"], seed=4)),
                      tmp_path / "masks")

    with pytest.raises(ValueError, match=r"n_masks=3 masks; pass mask=k"):
        fm.merge(multi)
    assert masked_modules(multi)  # refused before anything changed
    for k, single in enumerate(singles):
        merged = fm.merge(multi, mask=k, copy=True)
        torch.testing.assert_close(output(merged, inputs), output(single.eval(), inputs), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # close some units of mask 1 only: export_pruned(mask=1) removes them
        for layer in masked_modules(multi).values():
            layer.logits[1].view(-1)[:100] = -10.0  # grid (1, 256) in the Conv1D (in, out) layout
            layer.logits[1].view(-1)[100:] = 10.0
    with fm.mask_index(multi, 1):
        expected = output(multi.eval(), inputs)
    pruned = fm.export_pruned(multi, mask=1)
    assert pruned.config.n_inner == 256 - 100 and not masked_modules(pruned)
    torch.testing.assert_close(output(pruned, inputs), expected, rtol=1e-5, atol=1e-5)
    pruned.save_pretrained(tmp_path / "pruned")
    torch.testing.assert_close(output(GPT2LMHeadModel.from_pretrained(tmp_path / "pruned").eval(), inputs),
                               expected, rtol=1e-5, atol=1e-5)


def test_mask_index_bad_input_and_restoring():
    from transformers import GPT2LMHeadModel

    multi = apply(GPT2LMHeadModel(gpt2_config()).eval(), MaskConfig(n_masks=K))
    ids = _inputs("gpt2")["input_ids"]
    with pytest.raises(RuntimeError, match=r"n_masks=3: say which mask each batch row uses.*fastmask.mask_index"):
        multi(ids)
    for bad, error, message in [
        (3, ValueError, r"mask number must be in \[0, 3\)"),
        (-1, ValueError, r"mask number must be in \[0, 3\)"),
        ("groups", ValueError, "the only string index is 'grouped'"),
        (True, TypeError, "index must be a LongTensor"),
        (1.0, TypeError, "index must be a LongTensor"),
        (torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.int32), TypeError, "1-D LongTensor"),
        (torch.zeros(2, 3, dtype=torch.long), TypeError, "1-D LongTensor"),
    ]:
        with pytest.raises(error, match=message):
            fm.set_mask_index(multi, bad)
    for bad, message in [(torch.tensor([0, 1, 2, 0, 1, 3]), r"index values must be mask numbers in \[0, 3\)"),
                         (torch.tensor([0, 1, 2]), r"index must have shape \[6\]")]:
        with pytest.raises(ValueError, match=message), fm.mask_index(multi, bad):
            multi(ids)
    with pytest.raises(ValueError, match="multiple of n_masks=3"), fm.mask_index(multi, "grouped"):
        multi(ids[:4])
    with pytest.raises(RuntimeError, match="boom"), fm.mask_index(multi, 2):
        assert all(layer.mask_index == 2 for layer in masked_modules(multi).values())
        raise RuntimeError("boom")
    assert all(layer.mask_index is None for layer in masked_modules(multi).values())
    with pytest.raises(ValueError, match=r"hold one mask each; a mask index needs MaskConfig\(n_masks=K\)"):
        fm.mask_index(apply(GPT2LMHeadModel(gpt2_config())), 0).__enter__()
    with pytest.raises(ValueError, match="n_masks"):
        MaskConfig(n_masks=0)


def test_k_mask_model_compiles_fullgraph():
    """Eval: the index tensor is module state read by the compiled graph (new values, no recompile). Training: a
    compiled step that sets the index and the noise step itself."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = apply(GPT2LMHeadModel(gpt2_config()).eval(), MaskConfig(n_masks=K, granularity="block", block=(16, 16)))
    eager = copy.deepcopy(model)
    for a, b in zip(fm.mask_parameters(model), fm.mask_parameters(eager)):
        with torch.no_grad():
            a.normal_(1, 2)
            b.copy_(a)
    ids = _inputs("gpt2")["input_ids"]
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for seed in range(3):
        index = torch.randint(0, K, (6,), generator=torch.Generator().manual_seed(seed))
        with fm.mask_index(model, index), fm.mask_index(eager, index):
            torch.testing.assert_close(compiled(ids).logits, eager(ids).logits, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1

    model.train(), eager.train()

    def train_step(ids, index, step):
        fm.set_mask_index(model, index)
        fm.set_step(model, step)
        return model(ids).logits.square().mean()

    counter = CompileCounterWithBackend("eager")  # graph capture (fullgraph: no break) without AOT tracing
    compiled_step = torch.compile(train_step, fullgraph=True, backend=counter)
    for step in range(3):
        index = torch.randint(0, K, (6,), generator=torch.Generator().manual_seed(10 + step))
        loss = compiled_step(ids, index, step)
        loss.backward()
        fm.set_step(eager, step)
        with fm.mask_index(eager, index):
            expected = eager(ids).logits.square().mean()
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for a, b in zip(fm.mask_parameters(model), fm.mask_parameters(eager)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    assert counter.frame_count <= 2  # one static, then one dynamic training graph
