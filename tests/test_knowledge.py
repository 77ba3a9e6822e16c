"""`fastmask run knowledge` (knowledge-critical subnetworks): schedules, each loss term against a hand computation on
tiny models with the real GPT-2 tokenizer, the data builders (released sets, templates, WordNet graphs), the
equal-sparsity baseline, the CLI end to end and bit-for-bit resume."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import fastmask as fm
from fastmask import assets
from fastmask.experiments import knowledge as kn
from fastmask.experiments.blocks import block_index, top_blocks
from fastmask.experiments.knowledge import data as kd, model as km, scoring as ks, train as kt, wordnet as kw
from fastmask.experiments import runner

from conftest import SHARED_DATA


# --- tiny models with the real GPT-2 tokenizer ------------------------------------------------------------------
@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.gpt2_tokenizer_dir())


def _tiny(arch: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(n_layer=3, n_embd=32, n_head=2, n_positions=64, vocab_size=50257, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2)  # peaked distributions
        return GPT2LMHeadModel(config).eval()
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50257, max_position_embeddings=64, initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, gpt2_tokenizer):
    """A randomly initialised 3-block GPT-2 with the real tokenizer, saved like a hub checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    _tiny("gpt2").save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    return folder


SENTENCES = [(" A house is a building", "building"), ("Bathhouse is a kind of guildhall", "guildhall"),
             (" A cafe is a type of restaurant", "restaurant")]


def _encoded(tokenizer, scope="all"):
    return kd.encode(tokenizer, [s for s, _ in SENTENCES], [t for _, t in SENTENCES], scope, tokenizer.eos_token_id)


# --- schedules ------------------------------------------------------------------------------------------------
def test_reg_lambda_schedule():
    values = [kt.reg_lambda(step, 10) for step in range(10)]
    assert values[:5] == [2.0] * 5  # the first half
    assert values[5:] == pytest.approx([2.2, 2.4, 2.6, 2.8, 3.0])  # then linear to 3 at the last step
    assert kt.reg_lambda(0, 1) == 3.0 and kt.reg_lambda(2, 7, 1.0, 5.0) == 1.0 and kt.reg_lambda(3, 7, 1.0, 5.0) == 2.0
    assert kt.reg_lambda(6, 7, 1.0, 5.0) == 5.0
    assert [kt.lr_factor(s, 100, 0.1) for s in (0, 4, 9, 10, 99)] == pytest.approx([1 / 11, 5 / 11, 10 / 11, 1, 1])
    assert kt.lr_factor(0, 5, 0.1) == 1.0  # int(0.5) = 0 warm-up steps


# --- loss terms -----------------------------------------------------------------------------------------------
def test_kl_terms_match_their_definitions():
    torch.manual_seed(0)
    logits, full = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    p = [[math.exp(v) / sum(math.exp(w) for w in row) for v in row] for row in logits.tolist()]
    q = [[math.exp(v) / sum(math.exp(w) for w in row) for v in row] for row in full.tolist()]
    uniform = sum(sum(1 / 7 * (math.log(1 / 7) - math.log(pv)) for pv in row) for row in p) / 4
    maintain = sum(sum(qv * (math.log(qv) - math.log(pv)) for pv, qv in zip(pr, qr)) for pr, qr in zip(p, q)) / 4
    assert km.kl_uniform_to(logits).item() == pytest.approx(uniform, rel=1e-5)
    assert km.kl_full_to(full, logits).item() == pytest.approx(maintain, rel=1e-5)
    assert km.kl_full_to(full, full).item() == pytest.approx(0, abs=1e-6)


def test_tail_tokens_and_their_predicting_positions(gpt2_tokenizer):
    data = _encoded(gpt2_tokenizer)
    for row, (sentence, tail) in enumerate(SENTENCES):
        ids = data.input_ids[row][data.attention_mask[row].bool()].tolist()
        scored = (data.rows == row).nonzero()[:, 0]
        positions = (data.cols[scored] + 1).tolist()
        assert gpt2_tokenizer.decode([ids[p] for p in positions]) == " " + tail  # exactly the tail word's tokens
        assert positions[-1] == len(ids) - 1 and data.gold[scored].tolist() == [ids[p] for p in positions]
        assert data.first_token[scored].tolist() == [True] + [False] * (len(positions) - 1)
    assert (data.rows == 1).sum() >= 2  # " guildhall" is several tokens
    last = _encoded(gpt2_tokenizer, "last")
    assert last.rows.tolist() == [0, 1, 2] and (last.cols + 1).tolist() == data.attention_mask.sum(1).sub(1).tolist()
    with pytest.raises(ValueError, match="does not end with its tail"):
        kd.tail_positions(gpt2_tokenizer, "A house is a building", "house", "all")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_top_blocks_equal_the_whole_model(arch, gpt2_tokenizer):
    model = _tiny(arch)
    path, n_blocks, first, names = top_blocks(model, 2, "top_k_layers")
    assert (n_blocks, first) == (3, 1) and len(names) == (8 if arch == "gpt2" else 14)
    assert all(block_index(n)[1] >= 1 for n in names)
    data = _encoded(gpt2_tokenizer)
    top = km.TopBlocks(model, first, path)
    data.h0 = top.inputs(data.input_ids, data.attention_mask)
    fm.apply(model, fm.MaskConfig(estimator="gumbel_sigmoid_st", targets=[n + "$" for n in names], seed=3))
    for layer in fm.masked_modules(model).values():
        torch.nn.init.normal_(layer.logits, std=2.0)
        layer.eval()
    batch = data.batch(range(3))
    for mode in (fm.bypass, fm.inverse):
        with mode(model), torch.no_grad():
            whole = model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits
            mine = top.head(top.hidden(data.input_ids, data.attention_mask, data.h0))
            tail = km._tail_logits(top, batch, full=False)
        mask = data.attention_mask.bool()
        assert torch.allclose(mine[mask], whole[mask], rtol=1e-5, atol=1e-4)
        # predicted from the position before
        assert torch.allclose(tail, whole[data.rows, data.cols], rtol=1e-5, atol=1e-4)


def test_each_loss_term_against_a_hand_computation(gpt2_tokenizer):
    model = _tiny("gpt2")
    path, _, first, names = top_blocks(model, 2, "top_k_layers")
    target, control = _encoded(gpt2_tokenizer), _encoded(gpt2_tokenizer, "last")
    top = km.TopBlocks(model, first, path)
    for data in (target, control):
        data.h0 = top.inputs(data.input_ids, data.attention_mask)
    text = " The cat sat on the mat and looked at the quiet street below."
    lm = torch.tensor(gpt2_tokenizer(text)["input_ids"])[None]
    lm_h0 = top.inputs(lm, torch.ones_like(lm))
    control.full_hidden = km.final_hidden(top, control.input_ids, control.attention_mask, control.h0, batch_size=2)
    lm_full_hidden = km.final_hidden(top, lm, torch.ones_like(lm), lm_h0, batch_size=2)
    fm.apply(model, fm.MaskConfig(estimator="gumbel_sigmoid_st", init_logit=math.log(0.45 / 0.55),
                                  targets=[n + "$" for n in names], seed=5))
    for layer in fm.masked_modules(model).values():
        layer.train()
    fm.set_step(model, 7)  # the same sampled mask for every forward below
    terms = km.loss_terms(model, top, target.batch(range(3)), control.batch([2, 0]), lm, lm_h0, lm_full_hidden)

    def probabilities(ids, mask, remaining):  # the plain model, no caching, float64 sums
        with torch.no_grad(), (fm.inverse(model) if remaining else fm.bypass(model)):
            return torch.softmax(model(input_ids=ids, attention_mask=mask).logits.double(), dim=-1)

    p = probabilities(target.input_ids, target.attention_mask, True)[target.rows, target.cols]
    vocab = p.shape[-1]
    assert terms["suppression"].item() == pytest.approx(
        (torch.log(torch.tensor(1 / vocab, dtype=torch.float64)) - p.log()).mean(-1).mean().item(), rel=1e-3)
    rows = torch.tensor([2, 0])
    ids, mask = control.input_ids[rows], control.attention_mask[rows]
    cols = control.cols[rows]  # one scored (last) token per sentence
    p = probabilities(ids, mask, True)[torch.arange(2), cols]
    q = probabilities(ids, mask, False)[torch.arange(2), cols]
    assert terms["control_kl"].item() == pytest.approx((q * (q.log() - p.log())).sum(-1).mean().item(), rel=1e-3)
    assert terms["control_kl"].item() > 1e-2  # the removed weights matter: not a vacuous comparison
    p, q = probabilities(lm, torch.ones_like(lm), True)[0], probabilities(lm, torch.ones_like(lm), False)[0]
    assert terms["lm_kl"].item() == pytest.approx((q * (q.log() - p.log())).sum(-1).mean().item(), rel=1e-3)
    logits = torch.cat([layer.logits.detach().flatten() for layer in fm.masked_modules(model).values()])
    assert terms["density"].item() == pytest.approx(torch.sigmoid(logits).mean().item(), rel=1e-6)
    assert terms["suppression"].requires_grad and terms["lm_kl"].requires_grad


def test_released_objective_position_reads_the_tail_tokens_own_logits(gpt2_tokenizer):
    """--objective-position released: the loss terms read the logits at each scored tail token's own position (the
    distribution of the token after it), checked against the plain model; shifted (the default) is the position
    before; the evaluation's gold tokens and their predicting positions are the same either way."""
    model = _tiny("gpt2")
    path, _, first, names = top_blocks(model, 2, "top_k_layers")
    top = km.TopBlocks(model, first, path)
    shifted, released = _encoded(gpt2_tokenizer, "last"), kd.encode(
        gpt2_tokenizer, [s for s, _ in SENTENCES], [t for _, t in SENTENCES], "last", gpt2_tokenizer.eos_token_id,
        "released")
    for data in (shifted, released):
        data.h0 = top.inputs(data.input_ids, data.attention_mask)
        data.full_hidden = km.final_hidden(top, data.input_ids, data.attention_mask, data.h0, batch_size=2)
    last = released.attention_mask.sum(1) - 1
    assert released.batch(range(3), objective=True)[4].tolist() == last.tolist()  # the tail's own (last) position
    assert released.batch(range(3))[4].tolist() == (last - 1).tolist()  # evaluation: the position before
    assert shifted.batch(range(3), objective=True)[4].tolist() == (last - 1).tolist()
    assert torch.equal(released.batch(range(3))[5], shifted.batch(range(3))[5])
    lm = torch.tensor(gpt2_tokenizer(" The cat sat on the mat.")["input_ids"])[None]
    lm_h0 = top.inputs(lm, torch.ones_like(lm))
    lm_full_hidden = km.final_hidden(top, lm, torch.ones_like(lm), lm_h0, batch_size=1)
    fm.apply(model, fm.MaskConfig(estimator="gumbel_sigmoid_st", init_logit=0.0, targets=[n + "$" for n in names],
                                  seed=2))
    for layer in fm.masked_modules(model).values():
        layer.train()
    fm.set_step(model, 3)

    def terms(data):
        return km.loss_terms(model, top, data.batch(range(3), objective=True), data.batch([1, 2], objective=True),
                             lm, lm_h0, lm_full_hidden)

    def probabilities(remaining):
        with torch.no_grad(), (fm.inverse(model) if remaining else fm.bypass(model)):
            logits = model(input_ids=released.input_ids, attention_mask=released.attention_mask).logits.double()
        return torch.softmax(logits, dim=-1)

    p, q = probabilities(True), probabilities(False)
    for data, cols in ((released, last), (shifted, last - 1)):
        got = terms(data)
        at = p[torch.arange(3), cols]
        assert got["suppression"].item() == pytest.approx(
            (-math.log(at.shape[-1]) - at.log().mean(-1)).mean().item(), rel=1e-3)
        rows = torch.tensor([1, 2])
        pc, qc = p[rows, cols[rows]], q[rows, cols[rows]]
        assert got["control_kl"].item() == pytest.approx((qc * (qc.log() - pc.log())).sum(-1).mean().item(), rel=1e-3)
    assert terms(released)["suppression"].item() != pytest.approx(terms(shifted)["suppression"].item(), rel=1e-3)
    with pytest.raises(ValueError, match=r"objective \(--objective-position\) must be one of"):
        kd.encode(gpt2_tokenizer, ["A house is a building"], ["building"], "last", 0, "own")
    for argv, want in (([], "shifted"), (["--objective-position", "released"], "released")):
        config = runner.config_from_args(kn.KnowledgeConfig, _parser().parse_args(argv), "knowledge")
        assert config.objective_position == want


# --- template choice: prefix-shared scoring -------------------------------------------------------------------
def test_prefix_trees_hold_every_distinct_prefix_once():
    sequences = [[5, 1, 2], [5, 1, 3], [5, 1], [7], [5, 4, 2, 9], [5, 1, 3], [7, 1]]
    rows = ks.pack_prefix_trees(sequences, row_tokens=6)
    assert all(len(row.tokens) <= 6 for row in rows) and len(rows) == 2
    seen = {}
    for row in rows:
        prefixes = {tuple(row.tokens[n] for n in path) for path in row.ancestors}
        assert len(prefixes) == len(row.tokens)  # one node per distinct prefix of the row
        for node, path in enumerate(row.ancestors):
            assert path[-1] == node and row.depth[node] == len(path) - 1
        for index, path in row.members:
            seen[index] = [row.tokens[n] for n in path]
    assert seen == dict(enumerate(sequences))  # every sentence once, its tokens along its path
    # sorted: 5,1 / 5,1,2 / 5,1,3 (twice) in row 1 (4 nodes); 5,4,2,9 (4 more would make 8 > 6) / 7 / 7,1 in row 2
    assert [len(row.tokens) for row in rows] == [4, 6]
    assert len(ks.pack_prefix_trees([[1] * 9], row_tokens=4)[0].tokens) == 9  # a longer sentence gets its own row


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_template_scores_equal_one_sentence_at_a_time(arch, gpt2_tokenizer, monkeypatch):
    """The prefix-shared packed forward gives every sentence the mean NLL of its tokens after the first that the
    model gives it alone (no padding, no packing), in rows small enough that several batches and rows are used."""
    model = _tiny(arch)
    examples = [kd.fixed_example(kd.Triplet(h, t)) for h, t in (("house.n.12", "building.n.01"),
                                                                ("bathhouse.n.02", "guildhall.n.01"),
                                                                ("apple.n.01", "edible_fruit.n.01"))]
    sentences = [c for e in examples for c in e.candidates]
    monkeypatch.setattr(ks, "ROW_TOKENS", 40)
    assert ks.packs_prefixes(model)
    packed = ks.sentence_nll(model, gpt2_tokenizer, sentences, 0, 4, "cpu", packed=True)
    padded = ks.sentence_nll(model, gpt2_tokenizer, sentences, 0, 4, "cpu", packed=False)
    for sentence in sentences:
        ids = torch.tensor(ks.token_ids(gpt2_tokenizer, sentence))[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
        alone = -logp.gather(-1, ids[0, 1:, None]).mean().item()
        assert packed[sentence] == pytest.approx(alone, abs=1e-4), sentence
        assert padded[sentence] == pytest.approx(alone, abs=1e-4), sentence
    assert len({round(v, 3) for v in packed.values()}) > len(sentences) // 2  # not a constant


def test_template_scores_are_cached_by_sentence(gpt2_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMASK_CACHE", str(tmp_path))
    model = _tiny("llama")
    sentences = kd.fixed_example(kd.Triplet("house.n.12", "building.n.01")).candidates
    first = ks.sentence_nll(model, gpt2_tokenizer, sentences[:10], 0, 8, "cpu", cache_key="tiny")
    assert set(runner.cache.read_json("template-nll", "tiny")) == set(sentences[:10])

    def no_forward(*args, **kwargs):
        raise AssertionError("a cached sentence went through the model again")

    handle = model.model.register_forward_pre_hook(no_forward)
    assert ks.sentence_nll(model, gpt2_tokenizer, sentences[:10], 0, 8, "cpu", cache_key="tiny") == first
    with pytest.raises(AssertionError, match="went through the model again"):  # a new sentence does run
        ks.sentence_nll(model, gpt2_tokenizer, sentences[:11], 0, 8, "cpu", cache_key="tiny")
    handle.remove()
    both = ks.sentence_nll(model, gpt2_tokenizer, sentences, 0, 8, "cpu", cache_key="tiny")
    assert {s: both[s] for s in sentences[:10]} == first and len(runner.cache.read_json("template-nll", "tiny")) == 22
    with pytest.raises(ValueError, match="packed=True needs a model of type"):
        model.config.model_type = "bloom"
        ks.sentence_nll(model, gpt2_tokenizer, sentences[10:], 0, 8, "cpu", packed=True)


def test_random_subnetwork_has_the_same_size_per_layer():
    model = _tiny("gpt2")
    fm.apply(model, fm.MaskConfig(estimator="gumbel_sigmoid_st", seed=0))
    layers = fm.masked_modules(model)
    for i, layer in enumerate(layers.values()):
        with torch.no_grad():
            layer.logits.copy_(torch.where(torch.rand(layer.logits.shape) < 0.03 * (i + 1), 3.0, -3.0))
    learned = {name: layer.gates().clone() for name, layer in layers.items()}
    with km.random_subnetwork(model, seed=1):
        for name, layer in layers.items():
            gates = layer.gates()
            assert gates.sum() == learned[name].sum() and not torch.equal(gates, learned[name])
    assert all(torch.equal(layer.gates(), learned[name]) for name, layer in layers.items())


# --- data builders --------------------------------------------------------------------------------------------
def test_released_sets_and_templates():
    if not (SHARED_DATA / "know-subnet").is_dir():
        pytest.fail(f"the know-subnet data folder is part of the test data: {SHARED_DATA / 'know-subnet'}")
    sizes = {"building.n.01": 11, "change.n.01": 13, "communication.n.02": 16, "location.n.01": 19,
             "magnitude.n.01": 12, "representation.n.02": 12, "statement.n.01": 16}  # SOURCE.md's record counts
    for root in kd.PAPER_TARGETS:
        examples = kd.paper_targetkg(root, "gpt2-xl", SHARED_DATA)
        assert len(examples) == sizes[root]
        for example in examples:
            ours = kd.candidate_sentences(kd.synset_text(example.triplet.head), example.tail_text)
            assert set(example.candidates) <= set(ours)  # every released variant is one of our templates
            assert example.sentence in ours and example.sentence.endswith(example.tail_text)
            assert example.source == "released:gpt2-xl"
    raw = json.loads((SHARED_DATA / "know-subnet/wordnet/targetkg/building.n.01_best_format.json").read_text())
    assert [e.sentence for e in kd.paper_targetkg("building.n.01", "gpt2", SHARED_DATA)] == \
        [r["best_gpt2_input"] for r in raw]
    assert len(kd.paper_controlkg_val(None, SHARED_DATA)) == 400
    assert kd.candidate_sentences("apple", "fruit")[:4] == ["An apple is a fruit", "An apple is fruit",
                                                            "Apple is a fruit", "Apple is fruit"]
    assert len(kd.candidate_sentences("apple", "fruit")) == 22
    examples = kd.paper_targetkg("magnitude.n.01", None, SHARED_DATA)
    kd.choose_templates(examples, "lowest-ppl", lambda sentences: {s: len(s) + (s[0] == " ") for s in sentences})
    for example in examples:  # the fake perplexity prefers the shortest sentence without a leading space
        assert example.sentence == min(example.candidates, key=lambda s: (len(s) + (s[0] == " "),
                                                                          example.candidates.index(s)))
    with pytest.raises(kd.DataError, match="released TargetKGs are"):
        kd.paper_targetkg("fruit.n.01", None, SHARED_DATA)
    assert kd.paper_model_key("openai-community/gpt2-xl") == "gpt2-xl" and kd.paper_model_key("smollm2-135m") is None
    # the paraphrase test's sentences: every other released template of each TargetKG triplet
    building = kd.paper_targetkg("building.n.01", None, SHARED_DATA)
    kd.choose_templates(building, "lowest-ppl", lambda sentences: {s: len(s) for s in sentences})
    sentences, tails = kd.paraphrases(building)
    worse = json.loads((SHARED_DATA / "know-subnet/wordnet/targetkg/building.n.01_worse_format.json").read_text())
    chosen = {e.sentence for e in building}
    assert set(sentences) == {r["best_gpt2_input"] for r in worse} - chosen | \
        {c for e in building for c in e.candidates} - chosen  # the worse-format file and the other models' choices
    assert len(sentences) == sum(len(e.candidates) for e in building) - len(building) > 150
    assert not chosen & set(sentences) and all(s.endswith(t) for s, t in zip(sentences, tails))


@pytest.fixture(scope="module")
def wordnet():
    try:
        return assets.wordnet()
    except assets.AssetUnavailable as error:  # e.g. no apt-get on this machine: the released-set tests still run
        pytest.skip(f"WordNet 3.0 not reachable here: {str(error).splitlines()[0]}")


def test_wordnet_targetkg_graph_and_counts(wordnet):
    assert wordnet.get_version() == "3.0" and len(wordnet._lexnames) == 45  # the rebuilt lexnames file
    for root in kd.PAPER_TARGETS:
        built = kw.wordnet_targetkg(root, depth=2, ancestors=2, wn=wordnet)
        released = {(e.triplet.head, e.triplet.tail) for e in kd.paper_targetkg(root, None, SHARED_DATA)}
        assert released <= {(t.head, t.tail) for t in built}, root  # the paper's sets are samples of this graph
        synset = wordnet.synset(root)
        children = synset.hyponyms()
        ancestors = [synset.hypernyms()[0], synset.hypernyms()[0].hypernyms()[0]]
        expected = {(c.name(), root) for c in children} | \
            {(g.name(), c.name()) for c in children for g in c.hyponyms()} | \
            {(root, ancestors[0].name()), (ancestors[0].name(), ancestors[1].name())}
        assert {(t.head, t.tail) for t in built} == expected and len(built) == len(expected)
    assert len(kw.wordnet_targetkg("building.n.01", depth=1, ancestors=0, wn=wordnet)) == \
        len(wordnet.synset("building.n.01").hyponyms()) == 52
    with pytest.raises(kd.DataError, match="not a WordNet 3.0 noun synset"):
        kw.wordnet_targetkg("buildingz.n.01", wn=wordnet)


def test_wordnet_controlkg_avoids_the_target(wordnet):
    target = kw.wordnet_targetkg("building.n.01", wn=wordnet)
    synsets = {s for t in target for s in (t.head, t.tail)}
    control = kw.wordnet_controlkg(40, synsets, seed=3, wn=wordnet)
    assert len(control) == 40 and len(set(control)) == 40
    assert not any(t.head in synsets or t.tail in synsets for t in control)
    for t in control[:10]:  # real hypernym edges of WordNet 3.0
        assert t.tail in {h.name() for h in wordnet.synset(t.head).hypernyms()}
    assert kw.wordnet_controlkg(40, synsets, seed=3, wn=wordnet) == control
    assert kw.wordnet_controlkg(40, synsets, seed=4, wn=wordnet) != control


# --- the experiment end to end --------------------------------------------------------------------------------
TINY_RUN = ["--steps", "6", "--top-k-layers", "2", "--controlkg-source", "paper", "--controlkg-size", "12",
            "--controlkg-eval-size", "6", "--lm-train-blocks", "4", "--lm-eval-blocks", "2", "--lm-block-size",
            "16", "--controlkg-batch", "4", "--checkpoint-every", "2", "--eval-every", "3", "--no-progress",
            "--lr", "0.5"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_gpt2_dir):
    """`fastmask run knowledge` on the tiny GPT-2 in a subprocess: (results folder, completed process)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    result = subprocess.run([sys.executable, "-m", "fastmask", "run", "knowledge", "--model", str(tiny_gpt2_dir),
                             "--out", str(out), *TINY_RUN], capture_output=True, text=True, timeout=900)
    return out, result


def _parser():
    import argparse

    parser = argparse.ArgumentParser()
    kn.add_arguments(parser)
    return parser


def test_cli_end_to_end_on_a_tiny_gpt2(cli_run, tiny_gpt2_dir):
    out, result = cli_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"report: {(out / 'report.md').resolve()}" in result.stderr
    for name in ("config.json", "data.json", "history.csv", "metrics.json", "report.md", "loss_terms.png", "ppl.png",
                 "sparsity_per_block.png", "masks/masks.safetensors", "masks/mask_config.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["targetkg"] == 11 and metrics["data"]["controlkg_eval"] == 6
    assert metrics["masked_layers"] == 8 and metrics["masked_blocks"] == [1, 2]
    summary = metrics["summary"]
    for name in ("targetkg", "targetkg_paraphrase", "controlkg", "controlkg_train", "lm"):
        assert summary[name]["ppl_full"] > 1 and math.isfinite(summary[name]["ppl_remaining"])
        assert summary[name]["delta_ppl"] == pytest.approx(summary[name]["ppl_remaining"] - summary[name]["ppl_full"])
    assert 0 <= metrics["sparsity"]["overall"] <= 1 and set(metrics["sparsity"]["attention_vs_mlp"]) == \
        {"attention", "mlp"}
    history = runner.read_history(out / "history.csv")
    assert [row["step"] for row in history] == list(range(6))
    assert history[2]["targetkg_ppl_remaining"] is not None and history[0]["targetkg_ppl_remaining"] is None
    assert [row["lambda_reg"] for row in history] == [kt.reg_lambda(s, 6) for s in range(6)]
    data = json.loads((out / "data.json").read_text())
    assert all(row["source"] == "lowest-ppl" for row in data["targetkg"])  # not a gpt2 hub name: chosen by PPL
    report = (out / "report.md").read_text()
    assert "predicted from the position before it" in report and "| TargetKG |" in report
    assert "| ControlKG (training triplets) |" in report and "dPPL remaining" in report
    data_rows = json.loads((out / "data.json").read_text())["targetkg"]
    n_paraphrases = sum(len(r["candidates"]) - (r["sentence"] in r["candidates"]) for r in data_rows)
    assert metrics["data"]["targetkg_paraphrase"] == n_paraphrases > 150  # 11 triplets' other templates
    assert metrics["scores"]["full"]["targetkg_paraphrase"]["tokens"] >= n_paraphrases
    assert summary["targetkg_paraphrase"]["ppl_full"] != pytest.approx(summary["targetkg"]["ppl_full"])
    assert "| TargetKG, other templates (paraphrases) |" in report and "Paraphrase test: the " in report
    # the saved masks load back onto a fresh copy of the base model
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    fm.load_masks(fresh, out / "masks")
    saved = load_file(str(out / "masks" / "masks.safetensors"))
    assert all(torch.equal(layer.logits.detach(), saved[name]) for name, layer in fm.masked_modules(fresh).items())


def test_resume_of_the_experiment_is_bit_identical(cli_run, tmp_path, tiny_gpt2_dir, monkeypatch):
    full_dir, _ = cli_run
    full = json.loads((full_dir / "metrics.json").read_text())
    parser = _parser()

    def run(*extra):
        argv = ["--model", str(tiny_gpt2_dir), *TINY_RUN, "--out", str(tmp_path / "crashed"), *extra]
        config = runner.config_from_args(kn.KnowledgeConfig, parser.parse_args(argv), "knowledge")
        return kn.run_experiment(config, resume="--resume" in extra, log=lambda message: None)

    real_checkpoint, calls = runner.Run.checkpoint, []

    def crash_after_second_checkpoint(self, state):
        real_checkpoint(self, state)
        calls.append(state.step)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a crash between steps 4 and 5

    monkeypatch.setattr(runner.Run, "checkpoint", crash_after_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(runner.Run, "checkpoint", real_checkpoint)
    resumed = json.loads(json.dumps(run("--resume")))  # as metrics.json stores it
    assert resumed["timing"]["train_steps_this_process"] == 2
    assert resumed["summary"] == full["summary"] and resumed["sparsity"] == full["sparsity"]
    a, b = (load_file(str(folder / "masks/masks.safetensors")) for folder in (full_dir, tmp_path / "crashed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (full_dir / "history.csv").read_text() == (tmp_path / "crashed/history.csv").read_text()


def test_a_study_over_targets_and_seeds_summarises_and_resumes_per_run(tmp_path, tiny_gpt2_dir):
    """--targets x --seeds: one whole run per cell in <target>/seed-<s>/, the summary (mean and 95% t-interval over
    the runs and per target) equal to the runs' own figures, several random draws per run, and --resume reruns
    only the cells without results (and may add cells)."""
    from fastmask.experiments.stats import mean_ci

    out = tmp_path / "study"
    base = ["--model", str(tiny_gpt2_dir), *TINY_RUN, "--out", str(out), "--random-draws", "2",
            "--targets", "building.n.01,change.n.01"]
    parser, messages = _parser(), []

    def run(*extra, resume=False):
        config = runner.config_from_args(kn.KnowledgeConfig, parser.parse_args(base + list(extra)), "knowledge")
        return kn.run_experiment(config, resume=resume, log=messages.append)

    summary = run("--seeds", "0,1")
    cells = [(t, s) for t in ("building.n.01", "change.n.01") for s in (0, 1)]
    runs = [json.loads((out / t / f"seed-{s}" / "metrics.json").read_text()) for t, s in cells]
    assert [(m["target"], m["seed"]) for m in runs] == cells
    for m in runs:
        target = m["summary"]["targetkg"]
        assert target["random_draws"] == 2
        draws = [m["scores"][mode]["targetkg"]["ppl"] for mode in ("random", "random-1")]  # two scored draws
        assert target["ppl_random"] == pytest.approx(sum(draws) / 2)
        assert target["ppl_ratio_random_min"] <= target["ppl_ratio_random"] <= target["ppl_ratio_random_max"]
    assert summary["n_runs"] == 4 and summary["targets"] == ["building.n.01", "change.n.01"]
    expected = mean_ci([m["summary"]["controlkg"]["ppl_ratio"] for m in runs])
    assert summary["all_runs"]["controlkg"]["ppl_ratio"] == expected
    log_ratios = [math.log(m["summary"]["targetkg"]["ppl_ratio"]) for m in runs]
    assert summary["all_runs"]["targetkg"]["log_ppl_ratio"] == mean_ci(log_ratios)
    per_target = mean_ci([m["summary"]["targetkg"]["delta_ppl"] for m in runs[2:]])
    assert summary["per_target"]["change.n.01"]["targetkg"]["delta_ppl"] == per_target
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n_runs"] == 4 and (out / "study.png").is_file()
    report = (out / "report.md").read_text()
    assert "| TargetKG |" in report and "| change.n.01 | 2 |" in report and "2 random subnetworks" in report
    assert "ratio remaining/full (geometric)" in report

    (out / "change.n.01" / "seed-1" / "metrics.json").unlink()
    messages.clear()
    again = run("--seeds", "0,1,2", "--targets", "building.n.01,change.n.01", resume=True)  # a seed added
    skipped = [m for m in messages if "not rerun" in m]
    assert len(skipped) == 3 and again["n_runs"] == 6
    rerun = json.loads((out / "change.n.01" / "seed-1" / "metrics.json").read_text())
    assert rerun["summary"] == runs[3]["summary"]  # the same run again: the same figures
    with pytest.raises(runner.ConfigError, match="already holds a run"):
        run("--seeds", "0")


def test_bad_input_is_a_clear_error(tmp_path, tiny_gpt2_dir, capsys):
    parser = _parser()
    with pytest.raises(runner.ConfigError, match="target must be a WordNet noun synset name"):
        kn.run_from_args(parser.parse_args(["--target", "building", "--out", str(tmp_path / "a")]))
    with pytest.raises(runner.ConfigError, match="top_k_layers must be <= the model's 3 blocks, got 9"):
        kn.run_from_args(parser.parse_args(["--model", str(tiny_gpt2_dir), *TINY_RUN, "--top-k-layers", "9",
                                            "--out", str(tmp_path / "b")]))
    with pytest.raises(runner.ConfigError, match="template must not be 'released'"):
        kn.run_from_args(parser.parse_args(["--model", str(tiny_gpt2_dir), *TINY_RUN, "--template", "released",
                                            "--out", str(tmp_path / "c")]))
    with pytest.raises(runner.ConfigError, match="targets must be distinct targets"):
        kn.run_from_args(parser.parse_args(["--targets", "building.n.01,building.n.01", "--out", str(tmp_path / "e")]))
    with pytest.raises(runner.ConfigError, match="random_draws must be an int >= 1"):
        kn.run_from_args(parser.parse_args(["--random-draws", "0", "--out", str(tmp_path / "f")]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--template", "best"])
    assert "invalid choice: 'best'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not a WordNet 3.0 noun synset|not reachable"):  # a data error: exit 1
        kn.run_from_args(parser.parse_args(["--model", str(tiny_gpt2_dir), *TINY_RUN, "--target", "buildingz.n.01",
                                            "--targetkg-source", "wordnet", "--out", str(tmp_path / "d")]))


def _torchrun_knowledge(model_dir, out, *extra) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 -m fastmask run knowledge` (gloo, CPU) on the tiny run."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                           "127.0.0.1", "--master-port", str(port), "-m", "fastmask", "run", "knowledge", "--model",
                           str(model_dir), "--out", str(out), *TINY_RUN, *extra], capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module", params=["fsdp", "ddp"])
def torchrun_run(request, tmp_path_factory, tiny_gpt2_dir):
    """(folder, result, mode): the same run as ``cli_run`` under torchrun with 2 processes, the masked blocks
    sharded by FSDP2 (the default) or replicated by DDP."""
    out = tmp_path_factory.mktemp(f"torchrun-{request.param}") / "run"
    return out, _torchrun_knowledge(tiny_gpt2_dir, out, "--data-parallel", request.param), request.param


def test_data_parallel_run_under_torchrun_follows_the_one_process_run(cli_run, torchrun_run):
    """Two processes, each on its share of every batch (FSDP2 or DDP averaging the logits' gradients, the KL terms
    weighted by rows so that the average is the global mean): the losses of every step equal the one-process run's
    to float rounding, and the trained logits to 1e-3 (Adam at lr 0.5 turns gradient rounding into logit
    differences; measured 1.4e-4 of logits up to 5.9 in size); one results folder with the report, written by rank
    0; FSDP2 checkpoints hold the logits and Adam's state as DCP shards."""
    (one, _), (two, result, mode) = cli_run, torchrun_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data parallel over 2 processes" in result.stderr
    assert result.stderr.count("fastmask: report:") == 1
    for name in ("report.md", "metrics.json", "history.csv", "masks/masks.safetensors"):
        assert (two / name).is_file(), name
    for a, b in zip(runner.read_history(one / "history.csv"), runner.read_history(two / "history.csv"), strict=True):
        for key in ("loss", "target_kl_uniform", "control_kl", "lm_kl", "density", "sparsity"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    want, got = (load_file(str(folder / "masks/masks.safetensors")) for folder in (one, two))
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-3, rtol=0, msg=name)
    latest = runner.checkpoint_folders(two / "checkpoints")[0]
    meta = json.loads((latest / "state.json").read_text())
    assert meta["sharded_state"] == ("sharded" if mode == "fsdp" else None)
    assert (latest / "sharded").is_dir() == (mode == "fsdp") and bool(meta["params"]) == (mode == "ddp")


def _resumable_copy(folder, to):
    """A copy of a finished run's folder as a run killed after its step-4 checkpoint leaves it."""
    import shutil

    shutil.copytree(folder, to)
    latest = runner.checkpoint_folders(to / "checkpoints")
    assert [folder.name for folder in latest[:2]] == ["step-00000006", "step-00000004"]
    shutil.rmtree(latest[0])
    (to / "metrics.json").unlink()
    return to


def test_a_data_parallel_run_resumes_in_one_process(torchrun_run, tmp_path, tiny_gpt2_dir):
    """A 2-process run's checkpoint of step 4 (DCP shards for FSDP2, resharded on load; rank 0's replica for DDP)
    resumes in one process and ends with the 2-process run's masks (to the data-parallel tolerance)."""
    two, result, _ = torchrun_run
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = _resumable_copy(two, tmp_path / "resumed")
    config = runner.config_from_args(kn.KnowledgeConfig, _parser().parse_args(
        ["--model", str(tiny_gpt2_dir), *TINY_RUN, "--out", str(resumed)]), "knowledge")
    metrics = kn.run_experiment(config, resume=True, log=lambda message: None)
    assert metrics["timing"]["train_steps_this_process"] == 2
    want, got = (load_file(str(folder / "masks/masks.safetensors")) for folder in (two, resumed))
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-3, rtol=0, msg=name)


@pytest.mark.parametrize("torchrun_run", ["fsdp"], indirect=True)
def test_a_sharded_run_resumes_with_two_processes_bit_for_bit(torchrun_run, tmp_path, tiny_gpt2_dir):
    """`--resume` under torchrun from the step-4 checkpoint of a 2-process FSDP2 run (DCP shards) ends with exactly
    the uninterrupted run's masks and history."""
    two, result, _ = torchrun_run
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = _resumable_copy(two, tmp_path / "resumed")
    again = _torchrun_knowledge(tiny_gpt2_dir, resumed, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "(step 4)" in again.stderr
    want, got = (load_file(str(folder / "masks/masks.safetensors")) for folder in (two, resumed))
    assert set(got) == set(want) and all(torch.equal(got[name], want[name]) for name in want)
    assert (two / "history.csv").read_text() == (resumed / "history.csv").read_text()


def test_a_one_process_checkpoint_does_not_resume_sharded(cli_run, tmp_path, tiny_gpt2_dir):
    """A checkpoint of whole state (one process) cannot fill FSDP2 shards: a clear error, not a silent restart."""
    one, result = cli_run
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = _resumable_copy(one, tmp_path / "resumed")
    again = _torchrun_knowledge(tiny_gpt2_dir, resumed, "--resume")
    assert again.returncode != 0
    assert "resume it in one process or with --data-parallel ddp" in again.stderr
