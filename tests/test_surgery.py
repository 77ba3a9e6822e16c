"""Model surgery (fastmask.nn.surgery) and the one validator (fastmask.ops._validate): fm.apply and
fastmask.nn.replace_linear_layers put masks in the same way, fm.merge / unapply take them out the same way after
either, and MaskConfig, MaskedLinear and the ops refuse the same values naming the same argument."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastmask as fm
from fastmask.hf import layer_seed, role_groups
from fastmask.nn import MaskedLinear, replace_linear_layers
from fastmask.nn import surgery

from test_hf import gpt2_config

NAN = float("nan")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)))


def _gpt2():
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(gpt2_config()).eval()


# --- surgery --------------------------------------------------------------------------------------------------
def test_replace_linear_layers_takes_the_path_of_apply():
    by_replace, by_apply = _mlp(), _mlp()
    by_replace[0].bias.requires_grad_(False)  # a flag set before masking comes back after unapply
    by_apply[0].bias.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in by_replace.named_parameters()}
    replaced = replace_linear_layers(by_replace, include=r"^2\.", seed=5, init_keep=0.7)
    fm.apply(by_apply, fm.MaskConfig(targets=[r"^2\."], seed=5, init_keep=0.7))
    applied = fm.masked_modules(by_apply)
    assert sorted(replaced) == sorted(applied) == ["2.0", "2.1"]
    for name, layer in replaced.items():
        assert layer.seed == applied[name].seed == layer_seed(5, name)  # seeds by name, not by position
        torch.testing.assert_close(layer.logits, applied[name].logits)
    assert by_replace._fastmask_requires_grad == by_apply._fastmask_requires_grad == flags
    assert by_replace[0].weight.requires_grad  # replace_linear_layers freezes nothing but the wrapped weights
    assert not by_apply[0].weight.requires_grad  # apply freezes every other parameter
    x = torch.randn(3, 4)
    by_replace.train(), by_apply.train()
    torch.testing.assert_close(by_replace(x), by_apply(x))  # the same noise
    for model in (by_replace, by_apply):
        fm.unapply(model)
        assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
        assert not hasattr(model, "_fastmask_requires_grad") and not fm.nn.masked_layers(model)


def test_replace_linear_layers_twice_keeps_the_first_record():
    model = _mlp()
    replace_linear_layers(model, include=r"^2\.0$")
    replace_linear_layers(model, include=r"^2\.1$")
    assert set(fm.nn.masked_layers(model)) == {"2.0", "2.1"}
    fm.merge(model)
    assert all(p.requires_grad for p in model.parameters())  # as before the first call
    with pytest.raises(ValueError, match="seed must be an int"):
        replace_linear_layers(_mlp(), seed=-1)


def test_a_failing_layer_leaves_the_model_untouched():
    model = _mlp()
    before = {name: (module, [p.requires_grad for p in module.parameters()]) for name, module in model.named_modules()}

    def make(name, module):
        if name == "2.1":
            raise RuntimeError("boom")
        return MaskedLinear.from_module(module)  # freezes the weight it wraps

    with pytest.raises(RuntimeError, match="boom"):
        replace_linear_layers(model, make=make)
    after = {name: (module, [p.requires_grad for p in module.parameters()]) for name, module in model.named_modules()}
    assert after == before and not hasattr(model, "_fastmask_requires_grad")


def test_find_replace_and_restore_modules():
    model = _mlp().eval()
    assert [name for name, _ in surgery.linear_layers(model)] == ["0", "2.0", "2.1"]
    old = model[2][1]
    masked = MaskedLinear.from_module(old)
    assert surgery.replace_module(model, "2.1", masked) is old and model[2][1] is masked
    assert [name for name, _ in surgery.linear_layers(model)] == ["0", "2.0"]
    assert [name for name, _ in surgery.linear_layers(model, masked=True)] == ["0", "2.0", "2.1"]
    masked.train()
    surgery.restore_layers(model, {"2.1": old})
    assert model[2][1] is old and old.training  # the masked layer's mode
    assert surgery.block_index("model.layers.25.self_attn.q_proj") == ("model.layers", 25)
    assert surgery.block_key("transformer.h.3.mlp.c_fc") == "transformer.h.3"
    with pytest.raises(ValueError, match="cannot find a block index"):
        surgery.block_key("lm_head")


def test_role_groups_of_masked_and_plain_layers():
    model = fm.apply(_gpt2(), fm.MaskConfig(targets=[r"mlp\.c_fc$"]))
    groups = role_groups(model, ("mlp_in", "mlp_out"))
    assert sorted(groups) == ["transformer.h.0", "transformer.h.1"]
    name, layer = groups["transformer.h.1"]["mlp_in"]
    assert name == "transformer.h.1.mlp.c_fc" and isinstance(layer, MaskedLinear)
    assert type(groups["transformer.h.1"]["mlp_out"][1]).__name__ == "Conv1D"


# --- one validator --------------------------------------------------------------------------------------------
SHARED_FIELDS = [  # (field, bad value, what the message says after the field's name)
    ("estimator", "concrete", "must be one of"),
    ("granularity", "rows", "must be one of"),
    ("block", (0, 2), "must be two positive ints"),
    ("init_keep", 1.0, r"must be in \(0, 1\)"),
    ("init_logit", NAN, "must be a finite number"),
    ("beta", 0.0, r"\(the temperature\) must be > 0"),
    ("gamma", 0.1, "must be < 0"),
    ("zeta", 0.9, "must be > 1"),
    ("tau", NAN, "must be a finite number"),
    ("n_masks", 0, "must be a positive int"),
    ("seed", 2**63, r"must be an int in \[0, 2\*\*63 - 1\]"),
    ("seed", True, "must be an int in"),
]


@pytest.mark.parametrize("field,value,message", SHARED_FIELDS)
def test_config_and_module_refuse_the_same_values(field, value, message):
    with pytest.raises(ValueError, match=rf"^MaskConfig\.{field} {message}"):
        fm.MaskConfig(**{field: value})
    with pytest.raises(ValueError, match=rf"^MaskedLinear: {field} {message}"):
        MaskedLinear(torch.randn(6, 8), **{field: value})


def test_ops_share_the_checks():
    logits = torch.zeros(3)
    with pytest.raises(ValueError, match=r"^fastmask.ops.gate: zeta must be > 1 \(.*gamma < 0 < 1 < zeta"):
        fm.ops.gate(logits, zeta=0.5)
    with pytest.raises(TypeError, match=r"offset must be an int, got float"):
        fm.ops.gate(logits, offset=1.0)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63 - 1\], got -1"):
        fm.ops.gate(logits, seed=-1)
    with pytest.raises(ValueError, match="both"):
        fm.MaskConfig(init_keep=None)
    with pytest.raises(ValueError, match="both"):
        MaskedLinear(torch.randn(2, 2), init_keep=None)


def test_layer_gate_params_build_the_op_arguments():
    layer = MaskedLinear(torch.randn(6, 8), estimator="threshold_st", tau=0.25, seed=9, init_keep=0.6)
    p = layer.gate_params(offset=48)
    assert p.estimator_name == "threshold_st" and (p.seed, p.offset, p.tau, p.training, p.inverse) == (9, 48, 0.25,
                                                                                                      True, False)
    assert p.op_kwargs() == p.ref_kwargs()
    x = torch.randn(5, 8)
    layer.step = 6  # offset = step * n_gates = 48
    torch.testing.assert_close(layer(x), fm.ops.masked_linear(x, layer.weight, layer.logits, block=layer.block,
                                                                **p.op_kwargs()), rtol=0, atol=0)
    layer.eval()
    with fm.inverse(nn.Sequential(layer)):
        assert layer.gate_params().inverse and not layer.gate_params().training
    torch.testing.assert_close(fm.ops.l0_norm(layer.logits, **p.estimator_kwargs()),
                               fm.ops.l0_norm(layer.logits, estimator="threshold_st", tau=0.25, beta=layer.beta))
