"""`fastmask run disentangle`: the TwitterAAE predictor against the released examples, the reviews setting's aspect
lexicon and loader, correlated splits, the triplet
sampler, the losses by hand, the K-mask grouped forward against K separate single-mask models, magnitude pruning,
gradient reversal, the leakage probes on synthetic features with a known answer, and the CLI end to end on a tiny
random BERT with the real MiniLM tokenizer."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch

import fastmask as fm
from fastmask.experiments import disentangle as dis
from fastmask.experiments.blocks import EncodedTexts, block_list, top_blocks
from fastmask.experiments.disentangle import config as dc, data as dd, evaluate as de, model as dm
from fastmask.experiments.runner import ConfigError
from fastmask.probing import linear_probe_accuracy

from conftest import SHARED_DATA


def _encoder(folder):
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder).eval()


# --- data ---------------------------------------------------------------------------------------------------
def test_twitteraae_predictor_reproduces_the_released_examples():
    model = dd.twitter_aae(SHARED_DATA / "twitteraae")
    # The README of slanglab/twitteraae: predict("hello there".split()) and predict("af af af".split())
    expected = {"hello there": [0.16603718, 0.27450171, 0.22886004, 0.33060107],
                "af af af": [8.42944382e-01, 1.32149345e-01, 1.11905398e-04, 2.47943681e-02]}
    for text, proportions in expected.items():
        got = model.predict(text.split())
        assert got.sum() == pytest.approx(1.0)
        assert got == pytest.approx(proportions, abs=5e-5), text
    assert model.predict(["qqqzzzxxyy"]) is None  # no known token: no prediction, as released


def test_correlated_splits_have_the_chosen_agreement_and_are_disjoint():
    labels = [(a, b) for a in (0, 1) for b in (0, 1) for _ in range(50)]
    data = dd.FactorData([f"text {i}" for i in range(len(labels))], labels, ("f0", "f1"), (("a", "b"), ("c", "d")))
    splits = dd.correlated_splits(data, {"train": 40, "shifted": 20}, {"train": 0.8, "shifted": 0.2}, seed=3)
    for name, n, agreement in (("train", 40, 0.8), ("shifted", 20, 0.2)):
        rows = splits[name].labels
        assert len(rows) == n
        assert sum(a == b for a, b in rows) == round(n * agreement)
        assert sum(a for a, _ in rows) == n // 2  # each factor balanced
    assert not set(splits["train"].texts) & set(splits["shifted"].texts)
    again = dd.correlated_splits(data, {"train": 40, "shifted": 20}, {"train": 0.8, "shifted": 0.2}, seed=3)
    assert again["train"].texts == splits["train"].texts
    with pytest.raises(ValueError, match="f0=a, f1=d"):
        dd.correlated_splits(data, {"train": 200}, {"train": 0.0}, seed=0)


def test_deduplication_by_normalised_text_before_splitting():
    texts = ["RT @bob: You are SO cool!! http://t.co/x", "you are so cool", "you are so cool?", "other text",
             "Other   text", "third one"]
    labels = [(1, 0), (1, 0), (1, 0), (0, 1), (1, 1), (0, 0)]
    data = dd.FactorData(texts, labels, ("f0", "f1"), (("a", "b"), ("c", "d")))
    assert dd.normalised_text(texts[0]) == dd.normalised_text(texts[2]) == "you are so cool"
    kept, counts = dd.deduplicate(data)
    # "you are so cool" x3 (labels agree: the first kept); "other text" x2 (labels disagree: dropped whole)
    assert kept.texts == [texts[0], "third one"] and kept.labels == [(1, 0), (0, 0)]
    assert counts == {"examples": 6, "kept": 2, "duplicate_groups": 2, "removed": 4, "conflicting_groups_dropped": 1}


@pytest.mark.skipif(not (SHARED_DATA / "davidson-hate").is_dir(), reason="shared data not beside the checkout")
def test_tweet_splits_share_no_normalised_text():
    config = dc.DisentangleConfig(data_dir=str(SHARED_DATA)).validate()
    data, splits, counts = dd._load_splits(config)
    assert counts["removed"] > 0 and counts["kept"] == len(data) == counts["examples"] - counts["removed"]
    seen = {}
    for name, split in splits.items():
        for text in split.texts:
            assert seen.setdefault(dd.normalised_text(text), name) == name, text


def test_review_aspect_lexicon_keeps_sentences_naming_exactly_one_aspect():
    assert dd.review_aspect("the plot is thin .") == 0
    assert dd.review_aspect("the actor's turn is fine .") == 1  # "actor's" -> "actor"
    assert dd.review_aspect("a co-star steals it") == 1
    assert dd.review_aspect("great acting , weak script .") is None  # both aspects: dropped
    assert dd.review_aspect("a lovely film .") is None  # neither
    assert not set(dd.ASPECT_LEXICON["story"]) & set(dd.ASPECT_LEXICON["acting"])


def test_neutralised_reviews_hide_every_aspect_word_and_keep_the_labels():
    assert dd.neutralise_aspect_words("The Actor's co-star and the PLOT ; enactment , scripts .") == \
        "The thing's thing and the thing ; enactment , thing ."
    kept = dd.load_reviews(SHARED_DATA)
    hidden = dd.load_reviews(SHARED_DATA, keywords="neutralise")
    assert hidden.labels == kept.labels and len(hidden) == 2005
    lexicon = {w for words in dd.ASPECT_LEXICON.values() for w in words}
    assert all(not set(dd.ASPECT_WORDS.findall(t.lower())) & lexicon for t in hidden.texts)
    assert all(dd.review_aspect(t) is None for t in hidden.texts)
    # only the lexicon words changed: the text outside them is the same
    for a, b in zip(kept.texts[:200], hidden.texts[:200]):
        assert dd.ASPECT_WORDS_ANY_CASE.sub("_", a) == dd.ASPECT_WORDS_ANY_CASE.sub("_", b)
    with pytest.raises(ValueError, match="load_reviews: keywords must be one of"):
        dd.load_reviews(SHARED_DATA, keywords="drop")
    with pytest.raises(ConfigError, match="review_keywords"):
        dc.DisentangleConfig(review_keywords="drop").validate()


def test_reviews_loader_counts_balance_and_correlation_control():
    """The offline stand-in for sentiment x genre: Pang & Lee polarity x the lexicon aspect; counts on v1.0."""
    data = dd.load_reviews(SHARED_DATA)
    assert data.factors == ("sentiment", "aspect") and data.values[1] == ("story", "acting")
    cells = {cell: data.labels.count(cell) for cell in ((0, 0), (0, 1), (1, 0), (1, 1))}
    assert cells == {(0, 0): 675, (0, 1): 301, (1, 0): 552, (1, 1): 477}
    assert all(dd.review_aspect(text) == aspect for text, (_, aspect) in zip(data.texts, data.labels))
    sizes = {s: dc.SETTING_DEFAULTS["reviews"][f"{s}_size"] for s in ("train", "probe", "test", "shifted")}
    splits = dd.correlated_splits(data, sizes, {"train": 0.8, "probe": 0.5, "test": 0.5, "shifted": 0.2}, seed=0)
    for name, agreement in (("train", 0.8), ("test", 0.5), ("shifted", 0.2)):
        rows = splits[name].labels
        assert sum(a == b for a, b in rows) == pytest.approx(agreement * len(rows), abs=1)
        for k in (0, 1):  # each factor balanced in every split
            assert sum(row[k] for row in rows) == pytest.approx(len(rows) / 2, abs=1)
    test = splits["test"].labels
    assert {cell: test.count(cell) for cell in cells} == {cell: 62 for cell in cells}  # round(250 / 4)
    seen = [t for s in splits.values() for t in s.texts]
    assert len(seen) == len(set(seen))  # disjoint splits
    limited = dd.load_reviews(SHARED_DATA, limit=100)
    assert 0 < len(limited) < 200 and {s for s, _ in limited.labels} == {0, 1}


def test_triplet_sampler_positives_share_negatives_differ_and_are_deterministic():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (30, 2), generator=gen).tolist()
    sampler = dd.TripletSampler(labels, seed=7)
    anchors = list(range(30))
    for factor in (0, 1):
        positives, negatives = sampler.sample(anchors, factor, step=5)
        for a, p, n in zip(anchors, positives, negatives):
            assert p != a and labels[p][factor] == labels[a][factor]
            assert labels[n][factor] != labels[a][factor]
    assert sampler.sample(anchors, 0, 5) == dd.TripletSampler(labels, seed=7).sample(anchors, 0, 5)
    assert sampler.sample(anchors, 0, 5) != sampler.sample(anchors, 0, 6)
    assert sampler.sample(anchors, 0, 5) != dd.TripletSampler(labels, seed=8).sample(anchors, 0, 5)
    with pytest.raises(ValueError, match="factor 1 has a single value"):
        dd.TripletSampler([(0, 1), (1, 1)])
    with pytest.raises(ValueError, match="mode"):
        dd.TripletSampler(labels, mode="hard")


def test_contrast_triplets_flip_the_other_factor_and_fall_back_when_a_cell_is_empty():
    labels = [(a, b) for a in (0, 1) for b in (0, 1) for _ in range(5)]
    sampler = dd.TripletSampler(labels, seed=1, mode="contrast")
    anchors = list(range(len(labels)))
    for factor in (0, 1):
        other = 1 - factor
        positives, negatives = sampler.sample(anchors, factor, step=3)
        for a, p, n in zip(anchors, positives, negatives):
            assert labels[p][factor] == labels[a][factor] and labels[p][other] != labels[a][other]
            assert labels[n][factor] != labels[a][factor] and labels[n][other] == labels[a][other]
    # no (1, 0) example: an anchor (0, 0) under factor 0 has no contrast negative (1, 0) -> any (1, *) one
    labels = [(0, 0), (0, 1), (1, 1), (0, 0)]
    positives, negatives = dd.TripletSampler(labels, mode="contrast").sample([0], 0, step=0)
    assert positives == [1] and negatives == [2]


# --- losses by hand -----------------------------------------------------------------------------------------
def test_triplet_loss_and_mean_pool_by_hand():
    a = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    p = torch.tensor([[3.0, 4.0], [1.0, 1.0]])   # distances 5, 0
    n = torch.tensor([[0.0, 1.0], [1.0, 3.0]])   # distances 1, 2
    # max(0, 5 - 1 + 0.5) = 4.5, max(0, 0 - 2 + 0.5) = 0
    assert dm.triplet_loss(a, p, n, margin=0.5).item() == pytest.approx(2.25)
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert dm.mean_pool(hidden, torch.tensor([[1, 1, 0]])).item() == pytest.approx(2.0)


def test_overlap_penalty_and_gradient_reversal_by_hand(tiny_bert_dir):
    encoder = fm.apply(_encoder(tiny_bert_dir), fm.MaskConfig(estimator="threshold_st", n_masks=2, tau=0.5))
    layers = fm.masked_modules(encoder)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in layers.values():
            layer.logits.copy_(torch.randn(layer.logits.shape, generator=gen))
    products = sum((torch.sigmoid(l.logits[0] - 0.5) * torch.sigmoid(l.logits[1] - 0.5)).sum() for l in layers.values())
    total = sum(l.weight.numel() for l in layers.values())
    assert dm.overlap_penalty(encoder).item() == pytest.approx((products / total).item(), rel=1e-5)

    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = dm.grad_reverse(x, 0.7)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([-0.7, -1.4, -2.1]))


# --- the K-mask model ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator,training", [("threshold_st", True), ("hard_concrete", False)])
def test_grouped_forward_equals_k_separate_single_mask_passes(tiny_bert_dir, estimator, training):
    from transformers import AutoTokenizer

    base = _encoder(tiny_bert_dir)
    singles = [copy.deepcopy(base) for _ in range(2)]
    config = fm.MaskConfig(estimator=estimator, granularity="unit_in", seed=3)
    model = dm.DisentangleModel(fm.apply(base, fm.MaskConfig(**{**config.to_dict(), "n_masks": 2})), [2, 3])
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in fm.masked_modules(model.encoder).values():
            layer.logits.copy_(torch.randn(layer.logits.shape, generator=gen) * 2)
    for k, single in enumerate(singles):
        fm.apply(single, config)
        for name, layer in fm.masked_modules(single).items():
            with torch.no_grad():
                layer.logits.copy_(fm.masked_modules(model.encoder)[name].logits[k])
    for m in [model.encoder] + singles:
        for layer in fm.masked_modules(m).values():
            layer.train(training)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    texts = ["a good day", "this is bad news for everyone", "ok", "what", "so so", "never again, really"]
    data = EncodedTexts.from_texts(tokenizer, texts, max_length=16)
    ids, mask, h0 = data.batch(range(6), "cpu")
    assert h0 is None
    z = model.grouped(ids, mask)
    assert z.shape == (2, 3, 32)
    for k, single in enumerate(singles):
        rows = slice(3 * k, 3 * k + 3)
        expected = dm.mean_pool(single(input_ids=ids[rows], attention_mask=mask[rows]).last_hidden_state, mask[rows])
        torch.testing.assert_close(z[k], expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.represent(ids[rows], mask[rows], k), expected, rtol=1e-4, atol=1e-5)
    # the unmasked representation is the original encoder
    plain = _encoder(tiny_bert_dir)
    torch.testing.assert_close(model.represent(ids, mask, None),
                               dm.mean_pool(plain(input_ids=ids, attention_mask=mask).last_hidden_state, mask))


def test_top_block_masks_from_cached_block_inputs_equal_the_whole_encoder(tiny_bert_dir):
    """top_blocks=1 of 2: only block 1 is masked; feeding its cached input (the unmasked block 0's output) gives
    the same representation as running the whole encoder, grouped and per mask, and the fine-tuning baseline's
    forward."""
    from transformers import AutoTokenizer

    encoder = _encoder(tiny_bert_dir)
    first = top_blocks(encoder, 1, "top_blocks")[2]
    assert first == 1 and top_blocks(encoder, 0, "top_blocks")[2] == 0 and dm.mask_targets(encoder, 0) is None
    with pytest.raises(ConfigError, match="top_blocks"):
        top_blocks(encoder, 3, "top_blocks")
    fm.apply(encoder, fm.MaskConfig(estimator="threshold_st", n_masks=2, targets=dm.mask_targets(encoder, first)))
    assert sorted(fm.masked_modules(encoder)) == sorted(
        f"encoder.layer.1.{n}" for n in ("attention.self.query", "attention.self.key", "attention.self.value",
                                         "attention.output.dense", "intermediate.dense", "output.dense"))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in fm.masked_modules(encoder).values():
            layer.logits.copy_(torch.randn(layer.logits.shape, generator=gen))
    model = dm.DisentangleModel(encoder, [2, 2], first)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    data = EncodedTexts.from_texts(tokenizer, ["a good day", "this is bad news for everyone", "ok", "what"],
                                   max_length=16)
    features = de._unmasked_features(encoder, {"x": data}, first, batch=3, device="cpu")
    assert data.h0.shape == (4, data.input_ids.shape[1], 32)
    ids, mask, h0 = data.batch([1, 3], "cpu")
    assert h0.shape[:2] == ids.shape
    torch.testing.assert_close(features["x"][[1, 3]], model.represent(ids, mask, None), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.represent(ids, mask, None, h0), model.represent(ids, mask, None),
                               rtol=1e-4, atol=1e-5)
    for k in range(2):
        torch.testing.assert_close(model.represent(ids, mask, k, h0), model.represent(ids, mask, k),
                                   rtol=1e-4, atol=1e-5)
    ids4, mask4, h04 = data.batch([1, 3, 1, 3], "cpu")
    torch.testing.assert_close(model.grouped(ids4, mask4, h04), model.grouped(ids4, mask4), rtol=1e-4, atol=1e-5)
    blocks = encoder.get_submodule(block_list(encoder)[0])
    assert all(type(b).__name__ != "PassThrough" for b in blocks)  # the lower blocks are back
    # the gradient reaches the masks of the top block only through the cached path too
    model.grouped(ids4, mask4, h04).sum().backward()
    assert all(layer.logits.grad is not None for layer in fm.masked_modules(encoder).values())


def test_block_inputs_one_way_cached_on_disk(tiny_bert_dir, tmp_path, monkeypatch):
    """The input of the first masked block: the pre-hook that stops the forward gives the whole forward's hidden state
    there; batched and trimmed per batch (zeros after each text) it agrees with the full-width batches; cached under
    the weights and the tokens, a second call reads it back bit for bit without running the model."""
    from transformers import AutoTokenizer

    from fastmask.experiments.blocks import TopBlocks, block_inputs
    from fastmask.experiments.runner import weights_key

    monkeypatch.setenv("FASTMASK_CACHE", str(tmp_path))
    encoder = _encoder(tiny_bert_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    data = EncodedTexts.from_texts(tokenizer, ["a good day", "this is bad news for everyone", "ok", "what", "so so"],
                                   max_length=16)
    top = TopBlocks(encoder, 1, block_list(encoder)[0])
    with torch.no_grad():
        whole = encoder(input_ids=data.input_ids, attention_mask=data.attention_mask, output_hidden_states=True)
    torch.testing.assert_close(top.inputs(data.input_ids, data.attention_mask), whole.hidden_states[1])
    key = weights_key(encoder, "tiny")
    trimmed = block_inputs(top, data.input_ids, data.attention_mask, 2, "cpu", key, trim=True)
    full = block_inputs(top, data.input_ids, data.attention_mask, 2, "cpu", key)
    real = data.attention_mask.bool()
    torch.testing.assert_close(trimmed[real], full[real], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full, whole.hidden_states[1])
    assert (trimmed[2:4, 3:] == 0).all()  # rows 2, 3 ("ok", "what") ran in a batch of width 3
    assert len(list((tmp_path / "block-inputs").glob("*.safetensors"))) == 2  # trimmed and full: two entries

    def no_forward(*args, **kwargs):
        raise AssertionError("the cached block inputs were computed again")

    monkeypatch.setattr(top, "inputs", no_forward)
    assert torch.equal(block_inputs(top, data.input_ids, data.attention_mask, 2, "cpu", key, trim=True), trimmed)
    assert torch.equal(block_inputs(top, data.input_ids, data.attention_mask, 2, "cpu", key), full)


def test_magnitude_pruning_removes_an_exact_fraction_globally_or_per_layer(tiny_bert_dir):
    for scope in ("global", "layer"):
        encoder = fm.apply(_encoder(tiny_bert_dir), fm.MaskConfig(n_masks=2))
        layers = fm.masked_modules(encoder)
        before = {name: layer.weight.detach().clone() for name, layer in layers.items()}
        pruned = dm.magnitude_prune(encoder, 0.3, scope)
        total = sum(w.numel() for w in before.values())
        zeros = sum(int((layer.weight == 0).sum()) for layer in layers.values())
        if scope == "layer":
            for name, layer in layers.items():
                assert int((layer.weight == 0).sum()) == int(0.3 * layer.weight.numel())
                assert pruned[name] == pytest.approx(int(0.3 * layer.weight.numel()) / layer.weight.numel())
        else:
            assert zeros == int(0.3 * total)
            assert max(pruned.values()) - min(pruned.values()) > 0.01  # one threshold: layers differ
            # every kept weight is at least as large as every removed one
            kept = torch.cat([layer.weight.detach().abs().flatten() for layer in layers.values()])
            removed = torch.cat([before[n].abs()[layers[n].weight == 0] for n in layers])
            assert kept[kept > 0].min() >= removed.max()
        for name, layer in layers.items():  # the others are untouched
            nonzero = layer.weight != 0
            assert torch.equal(layer.weight[nonzero], before[name][nonzero])
    with pytest.raises(ValueError, match="scope"):
        dm.magnitude_prune(encoder, 0.3, "row")


@pytest.mark.parametrize("granularity", ["weight", "unit_in", "unit_out"])
def test_zero_fraction_counts_pruned_or_closed_weights(tiny_bert_dir, granularity):
    encoder = fm.apply(_encoder(tiny_bert_dir), fm.MaskConfig(estimator="threshold_st", granularity=granularity,
                                                                n_masks=2))
    dm.magnitude_prune(encoder, 0.3, "global")
    layers = fm.masked_modules(encoder)
    total = sum(layer.weight.numel() for layer in layers.values())
    with torch.no_grad():
        for layer in layers.values():
            layer.logits[0].fill_(5.0)  # mask 0: every gate open -> only the pruned weights are zero
            layer.logits[1].fill_(5.0)
        first = next(iter(layers.values()))
        first.logits[1].fill_(-5.0)  # mask 1: the first layer closed entirely
    assert de.zero_fraction(encoder, 0) == pytest.approx(int(0.3 * total) / total)
    pruned_elsewhere = sum(int((layer.weight == 0).sum()) for layer in list(layers.values())[1:])
    assert de.zero_fraction(encoder, 1) == pytest.approx((first.weight.numel() + pruned_elsewhere) / total)


# --- evaluation ---------------------------------------------------------------------------------------------
def test_leakage_table_on_synthetic_features_with_a_known_answer():
    gen = torch.Generator().manual_seed(0)
    labels = {s: torch.randint(0, 2, (400, 2), generator=gen) for s in ("probe", "test")}

    def carrying(factor, split):  # feature 0 = the factor's label + small noise, the rest noise
        x = torch.randn(400, 4, generator=gen)
        if factor is not None:
            x[:, 0] += 4 * labels[split][:, factor].float()
        return x

    features = {name: {s: carrying(f, s) for s in labels} for name, f in
                (("mask_0", 0), ("mask_1", 1), ("noise", None))}
    table = de.leakage_table(features, labels)
    assert table["mask_0"][0] > 0.95 and abs(table["mask_0"][1] - 0.5) < 0.1
    assert table["mask_1"][1] > 0.95 and abs(table["mask_1"][0] - 0.5) < 0.1
    assert all(abs(a - 0.5) < 0.1 for a in table["noise"])
    assert de.disentanglement_score(table, 2) == pytest.approx(
        (table["mask_0"][0] - table["mask_0"][1] + table["mask_1"][1] - table["mask_1"][0]) / 2)
    gaps = de.own_minus_other({**table, "adversarial_1": table["mask_1"]})
    assert set(gaps) == {"mask_0", "mask_1", "adversarial_1"}
    assert gaps["mask_0"] == table["mask_0"][0] - table["mask_0"][1]
    assert gaps["adversarial_1"] == gaps["mask_1"] == table["mask_1"][1] - table["mask_1"][0]


def test_mlp_leakage_finds_a_factor_hidden_from_the_linear_probe():
    """A representation that carries factor 1 only as the XOR of two feature signs: the linear leakage table calls
    it clean (factor 1 near chance), the MLP table finds it."""
    gen = torch.Generator().manual_seed(1)
    labels = {s: torch.randint(0, 2, (400, 2), generator=gen) for s in ("probe", "test")}

    def hiding(split):
        x = torch.randn(400, 5, generator=gen)
        x[:, 0] += 4 * labels[split][:, 0].float()  # factor 0 linearly
        sign = torch.where(torch.rand(400, generator=gen) < 0.5, 1.0, -1.0)
        x[:, 1], x[:, 2] = sign * (1 + x[:, 1].abs()), sign * (2 * labels[split][:, 1].float() - 1) * (
            1 + x[:, 2].abs())  # factor 1 = whether features 1 and 2 share a sign
        return x

    features = {"mask_0": {s: hiding(s) for s in labels}}
    linear = de.leakage_table(features, labels)
    mlp = de.leakage_table(features, labels, probe="mlp", seed=0)
    assert linear["mask_0"][0] > 0.95 and abs(linear["mask_0"][1] - 0.5) < 0.1
    assert mlp["mask_0"][0] > 0.9 and mlp["mask_0"][1] > 0.85
    assert mlp == de.leakage_table(features, labels, probe="mlp", seed=0)  # deterministic per seed
    with pytest.raises(ValueError, match="leakage_table: probe must be one of"):
        de.leakage_table(features, labels, probe="rbf")


def test_adversarial_removal_hides_the_other_factor():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (300, 2), generator=gen)
    x = torch.randn(300, 4, generator=gen)
    x[:, 0] += 3 * labels[:, 0]
    x[:, 1] += 3 * labels[:, 1]
    keep = dm.adversarial_features(x[:200], labels[:200], factor=0, steps=100, strength=1.0, seed=0)
    removed_without = dm.adversarial_features(x[:200], labels[:200], factor=0, steps=100, strength=0.0, seed=0)
    other = [linear_probe_accuracy(f(x[:200]), labels[:200, 1], f(x[200:]), labels[200:, 1])
             for f in (keep, removed_without)]
    own = linear_probe_accuracy(keep(x[:200]), labels[:200, 0], keep(x[200:]), labels[200:, 0])
    assert own > 0.85
    assert other[0] < other[1] - 0.1  # gradient reversal removes the other factor that plain training keeps


# --- command line -------------------------------------------------------------------------------------------
TINY_RUN = ["--data-limit", "5000", "--train-size", "60", "--probe-size", "40", "--test-size", "40",
            "--shifted-size", "40", "--steps", "3", "--batch-size", "4", "--sweep-sparsities", "0.5",
            "--sweep-steps", "2", "--adv-steps", "5", "--no-progress", "--checkpoint-every", "2",
            "--overlap-weight", "0.1", "--l0-weight", "0.1", "--prune-sparsity", "0.2", "--top-blocks", "1",
            "--finetune-steps", "2"]


def _parse(argv):
    parser = argparse.ArgumentParser()
    dis.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_end_to_end_on_a_tiny_bert(tiny_bert_dir, tmp_path):
    from fastmask.cli import build_parser

    out = tmp_path / "run"
    args = build_parser().parse_args(["run", "disentangle", "--model", str(tiny_bert_dir), *TINY_RUN,
                                      "--out", str(out), "--data-dir", str(SHARED_DATA)])
    assert dis.run_from_args(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["leakage"]) == {"unmasked", "mask_0", "mask_1", "adversarial_0", "adversarial_1",
                                       "finetuned_0", "finetuned_1"}
    assert all(0 <= a <= 1 for row in metrics["leakage"].values() for a in row)
    assert set(metrics["leakage_mlp"]) == set(metrics["leakage"]) and metrics["seed"] == 0
    assert all(0 <= a <= 1 for row in metrics["leakage_mlp"].values() for a in row)
    assert metrics["own_minus_other_mlp"]["mask_1"] == pytest.approx(
        metrics["leakage_mlp"]["mask_1"][1] - metrics["leakage_mlp"]["mask_1"][0])
    assert all("disentanglement_mlp" in r and "leakage_mlp" in r for r in metrics["sweep"])
    assert "MLP probes" in (out / "report.md").read_text()
    assert metrics["data"]["splits"] == {"train": 60, "probe": 40, "test": 40, "shifted": 40}
    dup = metrics["data"]["deduplication"]
    assert dup["kept"] == dup["examples"] - dup["removed"]
    assert "removed as duplicates" in (out / "report.md").read_text()
    assert metrics["data"]["agreement"]["train"] == pytest.approx(0.8)
    assert metrics["data"]["agreement"]["shifted"] == pytest.approx(0.2)
    assert [r["prune_sparsity"] for r in metrics["sweep"]] == [0.2, 0.5]
    assert metrics["pruned_fraction"] > 0.15
    history = (out / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 3 and "triplet_1" in history[0] and "overlap" in history[0]
    for name in ("report.md", "config.json", "leakage.png", "sweep.png", "loss.png"):
        assert (out / name).is_file(), name
    assert "Leakage" in (out / "report.md").read_text()
    # the masks belong to the pruned encoder: the same pruning of a fresh copy takes them back
    config = json.loads((out / "config.json").read_text())
    encoder = _encoder(tiny_bert_dir)
    fm.apply(encoder, fm.MaskConfig(estimator=config["estimator"], n_masks=2, init_keep=config["init_keep"],
                                    seed=config["seed"], targets=dm.mask_targets(encoder, 1)))
    dm.magnitude_prune(encoder, 0.2, "global")
    fm.load_masks(encoder, out / "masks")
    zeros = sum(int((layer.weight == 0).sum()) for layer in fm.masked_modules(encoder).values())
    assert zeros == int(0.2 * sum(layer.weight.numel() for layer in fm.masked_modules(encoder).values()))


@pytest.mark.parametrize("keywords", ["keep", "neutralise"])
def test_cli_end_to_end_on_the_reviews_setting(tiny_bert_dir, tmp_path, keywords):
    from fastmask.cli import build_parser

    out = tmp_path / "reviews"
    args = build_parser().parse_args(["run", "disentangle", "--model", str(tiny_bert_dir), "--data", "reviews",
                                      "--review-keywords", keywords,
                                      "--train-size", "40", "--probe-size", "40", "--test-size", "40",
                                      "--shifted-size", "40", "--steps", "2", "--batch-size", "4",
                                      "--sweep-sparsities", "0", "--adv-steps", "3", "--finetune-steps", "0",
                                      "--top-blocks", "1", "--no-progress", "--out", str(out),
                                      "--data-dir", str(SHARED_DATA)])
    assert dis.run_from_args(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["factors"] == ["sentiment", "aspect"] and metrics["data"]["raw_examples"] == 2005
    assert set(metrics["leakage"]) == {"unmasked", "mask_0", "mask_1", "adversarial_0", "adversarial_1"}
    assert metrics["data"]["agreement"]["train"] == pytest.approx(0.8)
    config = json.loads((out / "config.json").read_text())
    assert config["data"] == "reviews" and config["max_length"] == 40  # the setting's default
    report = (out / "report.md").read_text()
    assert "STAND-IN" in report and "genre" in report and "co-star" in report
    assert ("the keywords stay in the text" in report) == (keywords == "keep")
    assert ("replaced by the neutral word 'thing'" in report) == (keywords == "neutralise")


def test_setting_defaults_fill_only_what_is_not_given(tmp_path):
    from fastmask.experiments.runner import config_from_args

    def config(*argv):
        return config_from_args(dis.DisentangleConfig, _parse([*argv, "--out", str(tmp_path / "x")]),
                                experiment="disentangle")

    assert (config().train_size, config().max_length) == (600, 24)
    reviews = config("--data", "reviews", "--test-size", "100")
    assert (reviews.train_size, reviews.test_size, reviews.max_length) == (500, 100, 40)


def test_bad_input_is_a_clear_error(tmp_path):
    from fastmask.experiments.runner import ConfigError, config_from_args

    for flag, value, message in (("--train-agreement", "1.5", "train_agreement"),
                                 ("--prune-sparsity", "1", "prune_sparsity"),
                                 ("--margin", "0", "margin")):
        with pytest.raises(ConfigError, match=message):
            config_from_args(dis.DisentangleConfig, _parse([flag, value, "--out", str(tmp_path / "x")]),
                             experiment="disentangle")
    with pytest.raises(ConfigError, match="shifted_size"):
        dis.run_experiment(config_from_args(dis.DisentangleConfig, _parse(
            ["--data-limit", "300", "--out", str(tmp_path / "y"), "--data-dir", str(SHARED_DATA), "--no-progress"]),
            experiment="disentangle"))


@pytest.mark.parametrize("granularity", ["unit_out", "unit_in", "block"])
def test_zero_fraction_reads_gpt2_conv1d_gates_in_their_own_layout(granularity):
    """GPT-2's Conv1D stores (in, out): the closed gates must be expanded in that layout (they once were expanded
    in the (out, in) layout of a transposed weight, which miscounts or fails on rectangular layers)."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=8))
    extra = {"block": (4, 8)} if granularity == "block" else {}
    fm.apply(model, fm.MaskConfig(granularity=granularity, **extra))
    layers = fm.masked_modules(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.logits.copy_(torch.randn(layer.logits.shape) * 3)  # hard-concrete eval gates: some exactly 0
        layers["h.0.mlp.c_fc"].weight[0, :5] = 0  # pruned weights count as zero too
    want = sum(int((layer.merged_weight(mask=0) == 0).sum()) for layer in layers.values()) / \
        sum(layer.weight.numel() for layer in layers.values())
    assert 0 < want < 1
    assert de.zero_fraction(model, 0) == pytest.approx(want, abs=0)


def test_data_parallel_run_under_torchrun_follows_the_one_process_run(tiny_bert_dir, tmp_path):
    """`torchrun --nproc-per-node 2 -m fastmask run disentangle`: every rank draws the global batch's triplets and
    trains on its share (DDP over masks and heads, per-anchor means weighted by share): the per-step losses equal the
    one-process run's to float rounding, the learned logits to 1e-3 (Adam turns gradient rounding into logit
    differences), and rank 0 alone writes the one results folder."""
    import os
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    from fastmask.experiments import runner

    argv = ["--model", str(tiny_bert_dir), *TINY_RUN, "--data-dir", str(SHARED_DATA), "--sweep-sparsities", "0.2"]
    from fastmask.cli import build_parser

    one = tmp_path / "one"
    assert dis.run_from_args(build_parser().parse_args(["run", "disentangle", *argv, "--out", str(one)])) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = tmp_path / "two"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                             "127.0.0.1", "--master-port", str(port), "-m", "fastmask", "run", "disentangle", *argv,
                             "--out", str(two)], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data parallel over 2 processes" in result.stderr
    for a, b in zip(runner.read_history(one / "history.csv"), runner.read_history(two / "history.csv"), strict=True):
        for key in a:
            if key != "step" and a[key] is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    want, got = (load_file(str(folder / "masks/masks.safetensors")) for folder in (one, two))
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-3, rtol=0, msg=name)
    assert (two / "report.md").is_file() and (two / "metrics.json").is_file()


def test_cli_seeds_run_each_seed_then_mean_and_ci_and_resume_per_seed(tiny_bert_dir, tmp_path, monkeypatch):
    from fastmask.cli import build_parser
    from fastmask.experiments.stats import mean_ci

    out = tmp_path / "seeds"
    argv = ["run", "disentangle", "--model", str(tiny_bert_dir), *TINY_RUN, "--out", str(out),
            "--data-dir", str(SHARED_DATA), "--seeds", "0,3"]
    assert dis.run_from_args(build_parser().parse_args(argv)) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["seeds"] == [0, 3] and summary["n_seeds"] == 2
    per_seed = [json.loads((out / f"seed-{s}" / "metrics.json").read_text()) for s in (0, 3)]
    assert [m["seed"] for m in per_seed] == [0, 3]
    assert json.loads((out / "seed-3" / "config.json").read_text())["seed"] == 3
    # every figure is the mean / t-interval of the per-seed values
    for probe in ("", "_mlp"):
        for rep in ("mask_0", "mask_1", "adversarial_0", "finetuned_1"):
            values = [m[f"own_minus_other{probe}"][rep] for m in per_seed]
            got = summary[f"own_minus_other{probe}"][rep]
            assert got["values"] == pytest.approx(values)
            assert got["mean"] == pytest.approx(mean_ci(values)["mean"])
            assert got["half_width"] == pytest.approx(12.706204736 * abs(values[0] - values[1]) / 2, abs=1e-9)
            row, k = per_seed[0][f"leakage{probe}"][rep], int(rep[-1])
            assert values[0] == pytest.approx(row[k] - row[1 - k])
        assert summary[f"leakage{probe}"]["unmasked"][1]["values"] == pytest.approx(
            [m[f"leakage{probe}"]["unmasked"][1] for m in per_seed])
    assert [r["prune_sparsity"] for r in summary["sweep"]] == [0.2, 0.5]
    assert summary["sweep"][1]["disentanglement_mlp"]["values"] == pytest.approx(
        [m["sweep"][1]["disentanglement_mlp"] for m in per_seed])
    verdict = summary["own_minus_other_ci_above_0"]["mask_0"]["linear"]
    assert verdict == (summary["own_minus_other"]["mask_0"]["low"] > 0)
    report = (out / "report.md").read_text()
    assert "over 2 seeds" in report and "MLP probes" in report and " ± " in report
    for name in ("report.md", "config.json", "leakage.png", "sweep.png"):
        assert (out / name).is_file(), name
    # a second run without --resume refuses the folder; --resume with every seed finished reruns none of them
    with pytest.raises(ConfigError, match="out: .* already holds a run"):
        dis.run_from_args(build_parser().parse_args(argv))
    calls = []
    monkeypatch.setattr(dis.train, "run_one_seed", lambda *a, **k: calls.append(a) or {})
    assert dis.run_from_args(build_parser().parse_args(argv + ["--resume"])) == 0
    assert calls == []
    # more seeds on --resume: only the new one runs (here a stand-in that writes nothing)
    more = [a if a != "0,3" else "0,3,4" for a in argv] + ["--resume"]
    assert dis.run_from_args(build_parser().parse_args(more)) == 0
    assert [c[0].seed for c in calls] == [4] and calls[0][0].out == str(out / "seed-4")
    assert json.loads((out / "metrics.json").read_text())["seeds"] == [0, 3]  # the stand-in finished nothing
    # an unfinished seed (its metrics gone, its checkpoints kept) is resumed from its checkpoint, the other kept
    (out / "seed-3" / "metrics.json").unlink()
    monkeypatch.undo()
    assert dis.run_from_args(build_parser().parse_args(argv + ["--resume"])) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["own_minus_other"]["mask_1"]["values"] == pytest.approx(summary["own_minus_other"]["mask_1"]["values"])
    assert again["disentanglement_mlp"]["values"] == pytest.approx(summary["disentanglement_mlp"]["values"])


def test_seeds_flag_keeps_a_single_seed_working_and_checks_its_values(tmp_path):
    one = dc.DisentangleConfig(out=str(tmp_path), seed=5).validate()
    assert one.seeds == [] and one.seed == 5
    assert _parse(["--seeds", "0", "1", "2"]).seeds == ["0", "1", "2"]
    from fastmask.experiments.runner import config_from_args
    assert config_from_args(dc.DisentangleConfig, _parse(["--seeds", "0,1,2"]), "disentangle").seeds == [0, 1, 2]
    assert config_from_args(dc.DisentangleConfig, _parse(["--sweep-sparsities", "0.5,0.8"]),
                            "disentangle").sweep_sparsities == [0.5, 0.8]
    with pytest.raises(ConfigError, match="seeds must be distinct"):
        dc.DisentangleConfig(seeds=[1, 1]).validate()
    with pytest.raises(ConfigError, match="seeds"):
        dc.DisentangleConfig(seeds=[-1]).validate()
    with pytest.raises(ConfigError, match=r"seeds\[1\]"):
        config_from_args(dc.DisentangleConfig, _parse(["--seeds", "0,x"]), "disentangle")
