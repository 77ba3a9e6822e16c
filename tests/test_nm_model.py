"""Learned N:M masks on Hugging Face models: MaskConfig(granularity="nm"), fm.apply on nn.Linear and Conv1D, merge
to exactly-N:M weights, save / load, the magnitude and Wanda priors, and the semi-structured export."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fastmask as fm
from fastmask import nm_priors
from fastmask.io.semi_structured import _to_linear, densify, export_semi_structured, is_nm
from fastmask.nn.nm import NMMaskedLinear
from fastmask.ref import nm_patterns


def _gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def _llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(config).eval()


def _ids(seed=1):
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(seed))


def _out_in(module):
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2-conv1d", "llama-linear"])
def test_apply_train_merge_exact(make):
    model = fm.apply(make(), fm.MaskConfig(granularity="nm", n=2, m=4, seed=3))
    layers = fm.masked_modules(model)
    assert layers and all(isinstance(layer, NMMaskedLinear) for layer in layers.values())
    for layer in layers.values():
        assert layer.logits.shape == (layer.out_features, layer.in_features // 4, 6)
    assert [p.requires_grad for p in model.parameters()].count(True) == len(layers)
    model.train()
    opt = torch.optim.Adam(fm.mask_parameters(model), lr=0.5)
    ids = _ids()
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        assert all(layer.logits.grad is not None and layer.logits.grad.abs().sum() > 0 for layer in layers.values())
        opt.step()
    assert all(layer.step == 3 for layer in layers.values())
    model.eval()
    assert fm.sparsity(model)["overall"] == 0.5
    assert float(fm.l0_penalty(model, normalize=True)) == 0.5
    y = model(ids).logits
    merged = fm.merge(model, copy=True)
    torch.testing.assert_close(merged(ids).logits, y, rtol=0, atol=0)
    for name in layers:
        weight = _out_in(merged.get_submodule(name))
        assert is_nm(weight)
        nonzero = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1)
        assert (nonzero == 2).all()  # random weights are never exactly 0: exactly 2 of every 4 kept
    # inverse: the complement, also exactly 2:4 here
    with fm.inverse(model):
        y_inv = model(ids).logits
    inv = fm.merge(model, copy=True, inverse=True)
    torch.testing.assert_close(inv(ids).logits, y_inv)


def test_save_load_round_trip(tmp_path):
    model = fm.apply(_gpt2(), granularity="nm", n=2, m=4)
    with torch.no_grad():
        for layer in fm.masked_modules(model).values():
            layer.logits.normal_()
    fm.save_masks(model, tmp_path / "masks")
    fresh = fm.load_masks(_gpt2(), tmp_path / "masks")
    model.eval()
    fresh.eval()
    ids = _ids()
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert fresh.fastmask_config.granularity == "nm" and fresh.fastmask_config.n == 2


def test_config_validation():
    cfg = fm.MaskConfig(granularity="nm", n=1, m=4)
    assert cfg.estimator == "nm_gumbel"
    assert fm.MaskConfig.from_json(cfg.to_json()) == cfg
    assert fm.MaskConfig().n == 2 and fm.MaskConfig().estimator == "hard_concrete"
    with pytest.raises(ValueError, match="MaskConfig.n must be"):
        fm.MaskConfig(granularity="nm", n=4, m=4)
    with pytest.raises(ValueError, match="MaskConfig.m must be"):
        fm.MaskConfig(granularity="nm", n=2, m=16)
    with pytest.raises(ValueError, match="MaskConfig.estimator must be 'nm_gumbel'"):
        fm.MaskConfig(granularity="nm", estimator="threshold_st")
    with pytest.raises(ValueError, match="MaskConfig.n_masks must be 1"):
        fm.MaskConfig(granularity="nm", n_masks=2)
    with pytest.raises(ValueError, match="MaskConfig.nm_scale"):
        fm.MaskConfig(granularity="nm", nm_scale=0.0)
    with pytest.raises(ValueError, match="multiple of m=5"):
        fm.apply(_llama(), granularity="nm", n=2, m=5, targets=["mlp.down_proj"])  # 48 inputs
    with pytest.raises(ValueError, match="logits must have shape"):
        NMMaskedLinear(torch.randn(4, 8), logits=torch.zeros(4, 2, 5))


def test_magnitude_and_wanda_masks():
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.0, -1.0, 0.2]])
    mask = nm_priors.nm_mask_from_scores(nm_priors.scores(w, "magnitude"))
    assert mask.tolist() == [[0, 1, 1, 0, 1, 1, 0, 0]]  # tie 1.0 / 1.0 / -1.0: the lower indices
    norms = torch.tensor([10.0, 0.1, 0.1, 1.0, 1.0, 1.0, 1.0, 10.0])
    wanda = nm_priors.nm_mask_from_scores(nm_priors.scores(w, "wanda", norms))
    # |W| * norm: group 1 scores (1.0, 0.3, 0.2, 0.5) -> keep 0, 3; group 2 (1, 1, 1, 2) -> keep 7 and 4
    assert wanda.tolist() == [[1, 0, 0, 1, 1, 0, 0, 1]]
    with pytest.raises(ValueError, match="norms of shape"):
        nm_priors.scores(w, "wanda")
    with pytest.raises(ValueError, match="kind must be one of"):
        nm_priors.scores(w, "sparsegpt")


def test_input_norms_and_one_shot_masks():
    model = _llama()
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    seen = []
    handle = model.get_submodule(names[0]).register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    batches = [{"input_ids": _ids(s)} for s in (1, 2)]
    norms = nm_priors.input_norms(model, batches, names)
    handle.remove()
    manual = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]).pow(2).sum(0).sqrt()
    torch.testing.assert_close(norms[names[0]], manual)
    masks = nm_priors.one_shot_masks(model, "wanda", names, norms)
    for name in names:
        w = model.get_submodule(name).weight
        want = nm_priors.nm_mask_from_scores(w.abs() * norms[name])
        assert torch.equal(masks[name], want)
        assert (masks[name].reshape(w.shape[0], -1, 4).sum(-1) == 2).all()
    pruned = nm_priors.prune_(_llama(), masks)
    assert is_nm(pruned.get_submodule(names[1]).weight)
    with pytest.raises(ValueError, match="needs input norms"):
        nm_priors.one_shot_masks(model, "wanda", names)


@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2-conv1d", "llama-linear"])
def test_prior_initialisation_gives_the_prior_mask(make):
    base = make()
    masks = nm_priors.one_shot_masks(base, "magnitude", [n for n, _ in fm.hf.find_targets(base, fm.MaskConfig())])
    model = fm.apply(base, granularity="nm")
    nm_priors.init_logits(model, masks, strength=2.0)
    for name, layer in fm.masked_modules(model).items():
        mask = layer.mask()
        assert torch.equal(mask if layer.weight_layout == "out_in" else mask.t(), masks[name])
        idx = nm_priors.pattern_index(masks[name])
        assert torch.equal(idx, layer.pattern_index())
        assert torch.equal(nm_patterns(2, 4)[idx].reshape(mask.shape[0] if layer.weight_layout == "out_in"
                                                           else mask.shape[1], -1), masks[name])
    logits = nm_priors.prior_logits(masks[name], strength=2.0)
    assert logits.max().item() == 2.0 and logits.min().item() == 0.0
    with pytest.raises(ValueError, match="not exactly 2:4"):
        nm_priors.pattern_index(torch.ones(2, 8))
    with pytest.raises(ValueError, match="no prior mask"):
        nm_priors.init_logits(model, {})


def test_conv1d_to_linear_is_the_same_layer():
    conv = _gpt2().transformer.h[0].mlp.c_fc
    x = torch.randn(3, 32)
    linear = _to_linear(conv)
    assert isinstance(linear, nn.Linear)
    torch.testing.assert_close(linear(x), conv(x))


@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2-conv1d", "llama-linear"])
def test_export_fallback_save_reload(tmp_path, make):
    from transformers import AutoModelForCausalLM

    model = fm.apply(make(), granularity="nm")
    with torch.no_grad():
        for layer in fm.masked_modules(model).values():
            layer.logits.normal_()
    model.eval()
    ids = _ids()
    y = model(ids).logits
    names = list(fm.masked_modules(model))
    with pytest.warns(UserWarning, match="kept dense .*NVIDIA GPU"):
        exported, report = export_semi_structured(model)
    assert report["sparse"] == [] and set(report["dense"]) == set(names)
    torch.testing.assert_close(exported(ids).logits, y, rtol=0, atol=0)
    densify(exported).save_pretrained(tmp_path / "exported")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    torch.testing.assert_close(reloaded(ids).logits, y, rtol=0, atol=0)
    assert all(is_nm(_out_in(reloaded.get_submodule(name))) for name in names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, again = export_semi_structured(reloaded)
    assert set(again["dense"]) == set(names)  # found 2:4 again after the round trip
    with pytest.raises(RuntimeError, match="kept dense"):
        export_semi_structured(reloaded, require=True)
    with pytest.raises(ValueError, match="no linear layer of the model has 2:4"):
        export_semi_structured(make())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
                    reason="semi-structured sparsity needs an NVIDIA GPU of compute capability >= 8.0")
def test_export_semi_structured_on_gpu(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=64)
    model = fm.apply(LlamaForCausalLM(config).eval().half().cuda(), granularity="nm")
    with torch.no_grad():
        for layer in fm.masked_modules(model).values():
            layer.logits.normal_()
    model.eval()
    ids = _ids().cuda()
    y = model(ids).logits.float()
    exported, report = export_semi_structured(model, require=False)
    assert report["sparse"], report["dense"]
    torch.testing.assert_close(exported(ids).logits.float(), y, rtol=2e-2, atol=2e-2)
    densify(exported).save_pretrained(tmp_path / "gpu")
