"""fastmask.io: save_masks / load_masks (safetensors + JSON, fingerprinted, atomic), merge, export_pruned.

Models as in test_hf.py (MiniLM, SmolLM2-135M from GGUF, a small random GPT-2); tests on a model that is not
installed are skipped.
"""

from __future__ import annotations

import json
import struct
import warnings

import pytest
import torch
from torch import nn

import fastmask as fm

from fastmask.config import MaskConfig
from fastmask.hf import apply, inverse, masked_modules, set_step
from fastmask.nn.masked_linear import masked_layers
from fastmask.io import export_pruned, load_masks, merge, read_mask_metadata, save_masks, unapply

from test_hf import ARCHS, GRANULARITY, gpt2_config, load, output, randomize_logits, smollm2_dir  # noqa: F401


def _gpt2(**kw):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(gpt2_config(**kw)).eval()


# --- save / load ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trips_exactly(arch, request, tmp_path):
    model, inputs = load(arch, request)
    config = MaskConfig(granularity=GRANULARITY[arch], estimator="hard_concrete", seed=11, init_keep=0.8)
    apply(model, config)
    randomize_logits(model)
    set_step(model, 17, auto=True)
    expected = output(model, inputs)
    save_masks(model, tmp_path / "masks")
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["mask_config.json", "masks.safetensors"]

    fresh, _ = load(arch, request)  # an unpatched copy of the base model: load_masks patches it
    load_masks(fresh, tmp_path / "masks")
    assert fresh.fastmask_config == config
    saved, loaded = masked_modules(model), masked_modules(fresh)
    assert list(saved) == list(loaded)
    for name in saved:
        assert torch.equal(saved[name].logits, loaded[name].logits), name
        assert (loaded[name].seed, loaded[name].step) == (saved[name].seed, 17)
    torch.testing.assert_close(output(fresh, inputs), expected, rtol=0, atol=0)
    if arch == "gpt2":  # the same noise stream continues: identical training-mode outputs
        model.train(), fresh.train()
        torch.testing.assert_close(output(fresh, inputs), output(model, inputs), rtol=0, atol=0)
    if arch == "gpt2":  # an already patched model with the same structure works too
        patched, _ = load(arch, request)
        apply(patched, config)
        load_masks(patched, tmp_path / "masks")
        torch.testing.assert_close(output(patched.eval(), inputs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_load_refuses_other_weights_unless_not_strict(arch, request, tmp_path):
    model, inputs = load(arch, request)
    apply(model, MaskConfig(granularity=GRANULARITY[arch]))
    randomize_logits(model)
    save_masks(model, tmp_path)
    other, _ = load(arch, request)
    with torch.no_grad():  # another checkpoint of the same architecture: one masked weight differs
        other.get_submodule(next(iter(masked_modules(model)))).weight.view(-1)[0] += 1.0
    with pytest.raises(ValueError, match="weights differ"):
        load_masks(other, tmp_path)
    assert not masked_modules(other)  # nothing was patched by the refused load
    with pytest.warns(UserWarning, match="weights differ"):
        load_masks(other, tmp_path, strict=False)
    assert len(masked_modules(other)) == len(masked_modules(model))


def test_load_refuses_another_architecture_or_shape_naming_what_differs(request, tmp_path):
    model = apply(_gpt2(), MaskConfig())
    save_masks(model, tmp_path)
    with pytest.raises(ValueError, match=r"(?s)parameter shape\(s\) differ.*transformer\.h\.0\.attn\.c_attn\.weight "
                                         r"\[64, 192\] -> \[96, 288\]"):
        load_masks(_gpt2(n_embd=96), tmp_path)
    with pytest.raises(ValueError, match=r"(?s)architecture: saved for GPT2LMHeadModel, this model is BertModel.*"
                                         r"masked layer\(s\) of the saved masks do not exist"):
        load_masks(load("bert")[0], tmp_path)
    from transformers import GPT2Model

    with pytest.raises(ValueError, match="architecture: saved for GPT2LMHeadModel, this model is GPT2Model"):
        load_masks(GPT2Model(gpt2_config()), tmp_path)
    with pytest.raises(ValueError, match="structure|granularity"):  # same base, other mask structure
        load_masks(apply(_gpt2(), MaskConfig(granularity="unit_in")), tmp_path)


def test_load_refuses_newer_formats_and_mismatched_files(tmp_path):
    model = apply(_gpt2(), MaskConfig())
    save_masks(model, tmp_path / "a")
    save_masks(apply(_gpt2(), MaskConfig(init_keep=0.5)), tmp_path / "b")
    meta_path = tmp_path / "a" / "mask_config.json"
    meta = json.loads(meta_path.read_text())
    assert meta["format"] == "fastmask.masks" and meta["format_version"] == 2 and meta["noise"] == fm.ref.NOISE
    assert meta["fingerprint"]["architecture"] == "GPT2LMHeadModel"
    assert meta["fingerprint"]["parameters"]["transformer.h.0.attn.c_attn.weight"] == [64, 192]
    assert len(meta["fingerprint"]["weights_sha256"]) == 64
    meta["format_version"] = 3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format version 3.*upgrade fastmask"):
        load_masks(_gpt2(), tmp_path / "a")
    meta["format_version"], meta["noise"] = 2, "philox"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="names noise 'philox'"):
        load_masks(_gpt2(), tmp_path / "a")
    (tmp_path / "a" / "masks.safetensors").write_bytes((tmp_path / "b" / "masks.safetensors").read_bytes())
    meta["format_version"], meta["noise"] = 2, fm.ref.NOISE
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="sha256 differs"):
        load_masks(_gpt2(), tmp_path / "a")
    meta_path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not fastmask mask metadata"):
        read_mask_metadata(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="mask_config.json"):
        load_masks(_gpt2(), tmp_path / "missing")


def test_format_1_files_load_with_a_warning_about_their_noise(tmp_path):
    """Files of fastmask < 0.2 (format 1, no "noise") were trained with the first-word noise: their logits load
    unchanged, and the warning says that continued training draws today's noise."""
    model = apply(_gpt2(), MaskConfig())
    with torch.no_grad():
        for layer in masked_layers(model).values():
            layer.logits.normal_()
    save_masks(model, tmp_path)
    meta_path = tmp_path / "mask_config.json"
    meta = json.loads(meta_path.read_text())
    del meta["noise"]
    meta["format_version"] = 1
    meta_path.write_text(json.dumps(meta))
    assert read_mask_metadata(tmp_path)["noise"] == fm.ref.NOISE_FIRST_WORD
    with pytest.warns(UserWarning, match="philox4x32-10/first-word.*draws this fastmask's noise"):
        loaded = load_masks(_gpt2(), tmp_path)
    for name, layer in masked_layers(loaded).items():
        assert torch.equal(layer.logits, masked_layers(model)[name].logits)
    meta_path.write_text(json.dumps({**meta, "format_version": 2, "noise": fm.ref.NOISE}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # today's files: no warning
        load_masks(_gpt2(), tmp_path)


def test_files_are_safetensors_and_json_and_writes_are_atomic(tmp_path, monkeypatch):
    import fastmask.io.files as io_files

    model = apply(_gpt2(), MaskConfig(granularity="unit_out"))
    path = save_masks(model, tmp_path / "run.safetensors")  # the stem form: run.safetensors + run.json
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "run.safetensors"]
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])  # safetensors: u64 length + JSON header
    assert header["__metadata__"] == {"format": "fastmask.masks"}  # one key (see the next test)
    assert {k for k in header if k != "__metadata__"} == set(masked_modules(model))
    assert header["transformer.h.0.attn.c_attn"] == {"dtype": "F32", "shape": [1, 192],
                                                     "data_offsets": header["transformer.h.0.attn.c_attn"]
                                                     ["data_offsets"]}
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    randomize_logits(model)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(io_files, "_file_sha256", broken)  # fails after the new masks were written to a temporary file
    with pytest.raises(RuntimeError, match="disk full"):
        save_masks(model, tmp_path / "run.safetensors")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old files intact, no temporaries


def test_the_same_masks_are_the_same_bytes_in_every_process(tmp_path):
    """safetensors writes a metadata map in a random order per process: with one header key, the same masks saved
    by two processes are the same bytes (and the JSON's masks_sha256 the same), so a rerun can be checked by hash."""
    import subprocess
    import sys

    script = ("import sys, torch, fastmask as fm\n"
              "from transformers import GPT2Config, GPT2LMHeadModel\n"
              "torch.manual_seed(0)\n"
              "model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8))\n"
              "fm.save_masks(fm.apply(model, fm.MaskConfig(granularity='weight')), sys.argv[1])\n")
    for name in "abcd":  # with two keys in random order, four processes agree with probability 1/8
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / name)], capture_output=True, text=True,
                              cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
    assert len({(tmp_path / name / "masks.safetensors").read_bytes() for name in "abcd"}) == 1
    assert len({json.loads((tmp_path / name / "mask_config.json").read_text())["masks_sha256"] for name in "abcd"}) == 1


# --- merge ----------------------------------------------------------------------------------------------------
def test_merge_inverse_copy_and_unapply():
    model = apply(_gpt2(), MaskConfig(granularity="unit_in"))
    randomize_logits(model)
    ids = {"input_ids": torch.randint(0, 128, (2, 7))}
    masked = output(model, ids)
    with inverse(model):
        removed = output(model, ids)
    merged_copy = merge(model, copy=True)
    assert masked_modules(model) and not masked_modules(merged_copy)  # copy=True leaves the masked model alone
    torch.testing.assert_close(output(merged_copy, ids), masked, rtol=1e-5, atol=1e-5)
    inverse_copy = merge(model, inverse=True, copy=True)
    torch.testing.assert_close(output(inverse_copy, ids), removed, rtol=1e-5, atol=1e-5)

    base = _gpt2()
    original_modules = {name: m for name, m in base.named_modules() if type(m).__name__ == "Conv1D"}
    flags = {name: p.requires_grad for name, p in base.named_parameters()}
    expected = output(base, ids)
    apply(base, MaskConfig())
    assert not any(p.requires_grad for n, p in base.named_parameters() if not n.endswith("logits"))
    unapply(base)
    assert all(base.get_submodule(name) is module for name, module in original_modules.items())
    assert {name: p.requires_grad for name, p in base.named_parameters()} == flags
    torch.testing.assert_close(output(base, ids), expected, rtol=0, atol=0)


def test_merge_of_a_tied_lm_head_unties_it(tmp_path):
    from transformers import GPT2LMHeadModel

    model = apply(_gpt2(), MaskConfig(targets=[r"^lm_head$"], granularity="unit_in"))
    assert model.lm_head.weight is model.transformer.wte.weight
    randomize_logits(model)
    embeddings = model.transformer.wte.weight.detach().clone()
    ids = {"input_ids": torch.randint(0, 128, (2, 7))}
    masked = output(model, ids)
    with pytest.warns(UserWarning, match="shared with"):
        merge(model)
    assert model.config.tie_word_embeddings is False
    assert torch.equal(model.transformer.wte.weight, embeddings)  # the input embeddings keep the unmasked weight
    model.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(output(reloaded, ids), masked, rtol=1e-5, atol=1e-5)


# --- export_pruned --------------------------------------------------------------------------------------------
def _close_units(model, per_layer: dict, generator_seed=0):
    """Set the eval gates of ``per_layer[name]`` random units (1-D logits view) of each masked layer to 0."""
    generator = torch.Generator().manual_seed(generator_seed)
    with torch.no_grad():
        for name, layer in masked_modules(model).items():
            layer.logits.fill_(10.0)
            count = per_layer(name) if callable(per_layer) else per_layer
            off = torch.randperm(layer.logits.numel(), generator=generator)[:count]
            layer.logits.view(-1)[off] = -10.0


def test_export_pruned_gpt2_folds_constant_units_and_round_trips(tmp_path):
    from transformers import GPT2LMHeadModel

    model = _gpt2()
    with torch.no_grad():  # non-zero MLP biases: a closed c_fc unit is the constant gelu(b_j), folded into c_proj
        for block in model.transformer.h:
            block.mlp.c_fc.bias.normal_()
            block.mlp.c_proj.bias.normal_()
    apply(model, MaskConfig(granularity="unit_out", targets=[r"mlp\.c_fc$"]))
    _close_units(model, 100)
    ids = {"input_ids": torch.randint(0, 128, (2, 7))}
    masked = output(model, ids)
    pruned = export_pruned(model)
    assert pruned.config.n_inner == 256 - 100
    assert tuple(pruned.transformer.h[1].mlp.c_fc.weight.shape) == (64, 156)
    assert tuple(pruned.transformer.h[1].mlp.c_proj.weight.shape) == (156, 64)
    torch.testing.assert_close(output(pruned, ids), masked, rtol=1e-5, atol=1e-5)
    pruned.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(output(reloaded, ids), masked, rtol=1e-5, atol=1e-5)


def test_export_pruned_non_uniform_pads_or_refuses(tmp_path):
    from transformers import GPT2LMHeadModel

    def make():
        model = apply(_gpt2(), MaskConfig(granularity="unit_in", targets=[r"mlp\.c_proj$"]))
        _close_units(model, lambda name: 100 if ".h.0." in name else 40)
        return model

    ids = {"input_ids": torch.randint(0, 128, (2, 7))}
    with pytest.raises(NotImplementedError, match=r"different numbers of MLP units \(\[156, 216\]\).*single n_inner"):
        export_pruned(make(), non_uniform="error")
    model = make()
    masked = output(model, ids)
    with pytest.warns(UserWarning, match=r"different numbers of MLP units \(\[156, 216\]\).*every layer keeps 216"):
        pruned = export_pruned(model)  # pad: every layer keeps 216 units; still exact, still loadable
    assert pruned.config.n_inner == 216
    torch.testing.assert_close(output(pruned, ids), masked, rtol=1e-5, atol=1e-5)
    pruned.save_pretrained(tmp_path)
    torch.testing.assert_close(output(GPT2LMHeadModel.from_pretrained(tmp_path).eval(), ids), masked,
                               rtol=1e-5, atol=1e-5)


def test_export_pruned_bert_intermediate_units(tmp_path):
    from transformers import AutoModel

    model, inputs = load("bert")
    apply(model, MaskConfig(granularity="unit_out", targets=[r"intermediate\.dense$"]))
    _close_units(model, 512)  # real GELU(b_j) constants are folded into output.dense's bias
    masked = output(model, inputs)
    pruned = export_pruned(model)
    assert pruned.config.intermediate_size == 1024
    assert tuple(pruned.encoder.layer[3].output.dense.weight.shape) == (384, 1024)
    torch.testing.assert_close(output(pruned, inputs), masked, rtol=1e-4, atol=1e-5)
    pruned.save_pretrained(tmp_path)
    torch.testing.assert_close(output(AutoModel.from_pretrained(tmp_path).eval(), inputs), masked, rtol=1e-4,
                               atol=1e-5)


def test_export_pruned_llama_gated_units(request):
    model, inputs = load("llama", request)
    apply(model, MaskConfig(granularity="unit_out", targets=[r"mlp\.(gate|up)_proj$"]))
    _close_units(model, lambda name: 300 if "gate" in name else 0, generator_seed=1)
    with torch.no_grad():  # close 212 more units through up_proj (in other positions): 512 in all
        for i, block in enumerate(model.model.layers):
            gate_open = (block.mlp.gate_proj.gates().view(-1) > 0).nonzero().flatten()
            block.mlp.up_proj.logits.view(-1)[gate_open[:212]] = -10.0
    masked = output(model, inputs)
    pruned = export_pruned(model)
    assert pruned.config.intermediate_size == 1536 - 512
    assert tuple(pruned.model.layers[0].mlp.down_proj.weight.shape) == (576, 1024)
    # Shorter fp32 sums in down_proj (1024 instead of 1536 terms) over 30 layers; LM logits are O(10).
    torch.testing.assert_close(output(pruned, inputs), masked, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_export_pruned_heads_of_bert_and_gpt2_refuse_removal_or_keep_zeros(arch):
    """BertConfig / GPT2Config derive the head size from hidden_size / num_attention_heads: fewer heads cannot be
    loaded, so removal is refused (before anything changes) and heads='keep' keeps them as zero weights."""
    model, inputs = load(arch)
    apply(model, MaskConfig(granularity="head", init_logit=10.0))
    with torch.no_grad():
        next(iter(masked_modules(model).values())).logits.view(-1)[1] = -10.0
    masked = output(model, inputs)
    if not hasattr(model, "prune_heads"):  # transformers 5
        with pytest.raises(NotImplementedError, match=r"derives the head size from hidden_size / "
                                                      r"num_attention_heads.*heads='keep'"):
            export_pruned(model)
        assert masked_modules(model)  # refused before anything changed
    kept = export_pruned(model, heads="keep")
    assert not masked_modules(kept)
    torch.testing.assert_close(output(kept, inputs), masked, rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="supports"):
        export_pruned(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="heads must be 'remove' or 'keep'"):
        export_pruned(kept, heads="error")


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # 6 query heads in 2 key/value groups (n_rep = 3), head_dim 8
    config = LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, vocab_size=96, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def _close_heads(model, per_layer: dict):
    apply(model, MaskConfig(granularity="head", init_logit=10.0))
    with torch.no_grad():
        for i, heads in per_layer.items():
            model.model.layers[i].self_attn.o_proj.logits[0, heads] = -10.0


def test_export_pruned_removes_llama_heads_and_round_trips(tmp_path):
    import warnings

    from transformers import LlamaForCausalLM

    ids = {"input_ids": torch.randint(0, 96, (2, 7))}
    model = _tiny_llama()
    _close_heads(model, {0: [0, 4], 1: [2, 3]})  # every key/value group of every layer keeps 2 of 3
    masked = output(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # uniform: nothing padded, nothing to warn about
        pruned = export_pruned(model)
    assert pruned.config.num_attention_heads == 4 and pruned.config.head_dim == 8
    attention = pruned.model.layers[1].self_attn
    assert tuple(attention.q_proj.weight.shape) == (32, 48) and tuple(attention.o_proj.weight.shape) == (48, 32)
    assert tuple(attention.k_proj.weight.shape) == (16, 48) and attention.num_key_value_groups == 2
    torch.testing.assert_close(output(pruned, ids), masked, rtol=1e-5, atol=1e-5)
    pruned.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    for implementation in ("sdpa", "eager"):
        reloaded.set_attn_implementation(implementation)
        torch.testing.assert_close(output(reloaded, ids), masked, rtol=1e-5, atol=1e-5)


def test_export_pruned_non_uniform_llama_heads_pad_with_a_warning_or_refuse():
    ids = {"input_ids": torch.randint(0, 96, (2, 7))}
    model = _tiny_llama()
    _close_heads(model, {0: [0], 1: [1, 2, 5]})  # kept per group: layer 0 (2, 3), layer 1 (1, 2)
    with pytest.raises(NotImplementedError, match=r"different numbers of query heads \(\[1, 2, 3\]\)"):
        export_pruned(model, non_uniform="error")
    assert masked_modules(model)  # refused before anything changed
    masked = output(model, ids)
    with pytest.warns(UserWarning, match=r"every group keeps 3"):
        pruned = export_pruned(model)
    assert pruned.config.num_attention_heads == 6  # the fullest group keeps all 3: nothing can go
    torch.testing.assert_close(output(pruned, ids), masked, rtol=1e-5, atol=1e-5)
    model = _tiny_llama()
    _close_heads(model, {0: [0, 3, 4], 1: [1, 2, 5]})  # layer 0 (1, 1), layer 1 (1, 2): pad to 2 per group
    masked = output(model, ids)
    with pytest.warns(UserWarning, match=r"every group keeps 2"):
        pruned = export_pruned(model)
    assert pruned.config.num_attention_heads == 4
    torch.testing.assert_close(output(pruned, ids), masked, rtol=1e-5, atol=1e-5)
