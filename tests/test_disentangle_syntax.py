"""`fastmask run disentangle --data syntax` (setting 3, semantics vs syntax): the template, the MRPC and EWT
loaders on the shared data (counts, de-duplication, no sentence in two splits), the triplet sampler, the metrics on
hand-made inputs with known answers, the config's per-setting defaults, and the CLI end to end (one seed and
--seeds with --resume) on a tiny random BERT with the real MiniLM tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from fastmask.experiments import disentangle as dis
from fastmask.experiments.disentangle import config as dc, syntax as sx, syntax_eval as se
from fastmask.experiments.runner import ConfigError
from fastmask.probing import Sentence

from conftest import SHARED_DATA

needs_data = pytest.mark.skipif(not (SHARED_DATA / "mrpc").is_dir() or not (SHARED_DATA / "ud-ewt").is_dir(),
                                reason="shared data (mrpc, ud-ewt) not beside the checkout")


# --- template and loaders ---------------------------------------------------------------------------------------
def test_template_is_the_roots_upos_and_its_non_punct_dependents_in_order():
    # She quickly ate the apple .   (ate = root; she, quickly, apple, "." depend on it; "the" on apple)
    s = Sentence(["She", "quickly", "ate", "the", "apple", "."], [3, 3, 0, 5, 3, 3],
                 ["PRON", "ADV", "VERB", "DET", "NOUN", "PUNCT"])
    assert sx.syntactic_template(s) == "PRON ADV ROOT:VERB NOUN"
    same = Sentence(["They", "never", "read", "long", "books", "!"], [3, 3, 0, 5, 3, 3],
                    ["PRON", "ADV", "VERB", "ADJ", "NOUN", "PUNCT"])
    assert sx.syntactic_template(same) == sx.syntactic_template(s)  # different words, one template
    assert sx.syntactic_template(Sentence(["Thanks"], [0], ["NOUN"])) == "ROOT:NOUN"
    assert se.root_upos("PRON ADV ROOT:VERB NOUN") == "VERB"


def test_read_mrpc_and_pair_deduplication(tmp_path):
    path = tmp_path / "m.txt"
    path.write_bytes("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n1\t1\t2\tA cat sat.\tThe cat sat.\r\n"
                     "0\t3\t4\tDogs bark.\tCats meow.\r\n1\t5\t6\ta CAT sat\tthe cat sat!\r\n"
                     "1\t7\t8\tDogs bark\tCats meow\r\n".encode("utf-8"))
    pairs = sx.read_mrpc(path)
    assert pairs.first == ["A cat sat.", "Dogs bark.", "a CAT sat", "Dogs bark"] and pairs.labels == [1, 0, 1, 1]
    assert len(sx.read_mrpc(path, limit=2)) == 2
    kept, counts = sx.dedupe_pairs(pairs)
    # pair 3 duplicates pair 1 (labels agree: kept once); pair 4 duplicates pair 2 with another label: both dropped
    assert kept.first == ["A cat sat."] and kept.second == ["The cat sat."] and kept.labels == [1]
    assert counts == {"examples": 4, "kept": 1, "duplicate_groups": 2, "removed": 3, "conflicting_groups_dropped": 1}
    bad = tmp_path / "bad.txt"
    bad.write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n2\t1\t2\ta\tb\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"read_mrpc: .*bad.txt:2: expected 5 tab-separated columns"):
        sx.read_mrpc(bad)


@needs_data
def test_mrpc_counts_match_the_source_file():
    folder = SHARED_DATA / "mrpc"
    train, test = sx.read_mrpc(folder / sx.MRPC_FILES["train"]), sx.read_mrpc(folder / sx.MRPC_FILES["test"])
    assert (len(train), sum(train.labels)) == (4076, 2753)  # SOURCE.md: 2753 / 1323
    assert (len(test), sum(test.labels)) == (1725, 1147)


@needs_data
def test_ewt_loader_counts_templates_and_no_sentence_in_two_splits():
    ewt, counts = sx.load_ewt(SHARED_DATA)
    assert {s: c["examples"] for s, c in counts.items()} == {"train": 9986, "dev": 1494, "test": 1481}
    for split, c in counts.items():
        assert len(ewt[split]) == c["kept"] - c["dropped_as_in_other_split"]
        assert all(sx.MIN_WORDS <= len(t.split()) <= sx.MAX_WORDS for t in ewt[split].texts)
    seen = {}
    for split, data in ewt.items():
        for text in data.texts:
            assert seen.setdefault(dis.data.normalised_text(text), split) == split, text
    assert counts["train"]["dropped_as_in_other_split"] > 0
    assert all(t.count("ROOT:") == 1 for (t,) in ewt["dev"].labels)


@needs_data
def test_syntax_splits_sizes_partners_and_no_leakage():
    config = dc.DisentangleConfig(data="syntax", data_dir=str(SHARED_DATA), train_size=200, probe_size=150,
                                  test_size=300).validate()
    splits = sx.load_syntax_splits(config)
    assert splits.counts["splits"] == {"train_pairs": 200, "train_non_paraphrase_pairs": 100,
                                       "train_ewt_sentences": len(splits.templates), "dev_pairs": 150,
                                       "test_pairs": 300, "ewt_dev": 150, "ewt_test": 300}
    assert len(splits.ewt_rows) == 200 and 200 < len(splits.templates) <= 400
    norm = dis.data.normalised_text
    train = {norm(splits.pool[r]) for r in splits.mrpc_rows}
    dev, test = {norm(t) for t in splits.dev.sentences()}, {norm(t) for t in splits.test.sentences()}
    assert not train & dev and not train & test and not dev & test  # no MRPC sentence in two splits
    ewt_train = {norm(splits.pool[r]) for r in splits.templates}
    ewt_dev, ewt_test = {norm(t) for t in splits.ewt_dev.texts}, {norm(t) for t in splits.ewt_test.texts}
    assert not ewt_train & ewt_dev and not ewt_train & ewt_test and not ewt_dev & ewt_test
    assert len(splits.pairs) == 200 and len(splits.mrpc_rows) == 600  # 200 pairs + 100 non-paraphrase pairs
    for row in splits.ewt_rows:  # every anchor has another sentence of its template in the pool
        assert sum(t == splits.templates[row] for t in splits.templates.values()) >= 2
    again = sx.load_syntax_splits(config)
    assert again.pool == splits.pool and again.test.first == splits.test.first
    other = sx.load_syntax_splits(dc.DisentangleConfig(**{**config.__dict__, "seed": 1}))
    assert other.pool != splits.pool
    with pytest.raises(ConfigError, match="train_size/probe_size"):
        sx.load_syntax_splits(dc.DisentangleConfig(data="syntax", data_dir=str(SHARED_DATA), train_size=5000)
                              .validate())


def test_syntax_triplets_share_the_factor_and_are_deterministic():
    templates = {4: "A", 5: "A", 6: "B", 7: "B", 8: "C"}
    splits = sx.SyntaxSplits(pool=[f"t{i}" for i in range(9)], pairs=[(0, 1), (2, 3)], mrpc_rows=[0, 1, 2, 3],
                             ewt_rows=[4, 6], templates=templates, dev=None, test=None, ewt_dev=None, ewt_test=None,
                             counts={})
    sampler = sx.SyntaxTripletSampler(splits, seed=3)
    assert len(sampler) == 2
    assert sampler.anchor_rows([1, 0], 0) == [2, 0] and sampler.anchor_rows([1, 0], 1) == [6, 4]
    for step in range(20):
        pos, neg = sampler.sample([0, 1], 0, step)
        assert pos == [1, 3] and neg[0] not in (0, 1) and neg[1] not in (2, 3) and set(neg) <= {0, 1, 2, 3}
        pos, neg = sampler.sample([0, 1], 1, step)
        assert pos == [5, 7] and templates[neg[0]] != "A" and templates[neg[1]] != "B"
    assert sampler.sample([0, 1], 1, 4) == sx.SyntaxTripletSampler(splits, seed=3).sample([0, 1], 1, 4)
    with pytest.raises(ValueError, match="single template"):
        sx.SyntaxTripletSampler(sx.SyntaxSplits(**{**splits.__dict__, "templates": {4: "A", 5: "A"}}))


def test_semantic_negatives_are_the_other_pairs_sentences_with_the_most_word_overlap():
    pool = ["the cat sat on the mat", "a cat sat on a mat", "the dog sat on the mat", "stocks fell sharply",
            "the cat lay on the mat", "dogs bark"]
    negatives = sx.overlap_negatives(pool, [(0, 1)], candidates=range(6), k=2)
    # Jaccard with {the, cat, sat, on, mat}: row 4 (4/6), row 2 (4/6); row 1 is the pair's own positive
    assert negatives == [[2, 4]]
    assert sx.overlap_negatives(pool, [(3, 5)], candidates=[0, 3, 5], k=3) == [[0]]


# --- metrics on hand-made inputs ----------------------------------------------------------------------------------
def test_roc_auc_and_f1_by_hand():
    assert se.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)  # 3 of 4 (pos, neg) pairs ordered
    assert se.roc_auc([1, 2, 3], [0, 1, 1]) == 1.0 and se.roc_auc([3, 2, 1], [0, 1, 1]) == 0.0
    assert se.roc_auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5  # ties count one half
    assert se.roc_auc([0.2, 0.5, 0.5], [0, 0, 1]) == pytest.approx(0.75)  # (1 + 0.5) / 2
    with pytest.raises(ValueError, match="both classes"):
        se.roc_auc([0.1, 0.2], [1, 1])
    # threshold 0.35: predicted 1 for 0.4, 0.35, 0.8 -> tp 2, fp 1, fn 0 -> F1 = 4 / 5
    assert se.f1_at([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.35) == pytest.approx(0.8)
    assert se.best_threshold([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == (pytest.approx(0.35), pytest.approx(0.8))
    assert se.best_threshold([0.1, 0.9, 0.8], [0, 1, 1]) == (pytest.approx(0.8), 1.0)
    # pairs: rows i and n + i
    first = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    second = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(se.pair_cosines(torch.cat([first, second]), 2), torch.tensor([1.0, 0.0]).double())
    scores = se.semantic_scores(torch.cat([first, second]), [1, 0], torch.cat([first, second]), [1, 0])
    assert scores["auc"] == 1.0 and scores["f1"] == 1.0 and scores["threshold"] == pytest.approx(1.0)


def test_nearest_neighbour_templates_and_edit_distance_by_hand():
    assert se.edit_distance("kitten", "sitting") == 3 and se.edit_distance([], ["a"]) == 1
    assert se.edit_distance("A ROOT:V".split(), "A ROOT:V B".split()) == 1
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, -1.0]])
    templates = ["A ROOT:V", "A ROOT:V", "ROOT:N", "ROOT:N", "ROOT:N B"]
    assert se.nearest_neighbours(features).tolist()[:4] == [1, 0, 3, 2]
    r = se.template_retrieval(features, templates)
    assert r["queries"] == 4 and r["nn_accuracy"] == 1.0
    # chance: A has 2 members -> 1/4; ROOT:N has 2 -> 1/4 (n - 1 = 4 other rows)
    assert r["nn_chance"] == pytest.approx(0.25)
    # swap the rows so that every neighbour has another template
    r = se.template_retrieval(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]]),
                              ["ROOT:X", "ROOT:X", "ROOT:Y", "ROOT:Y"])
    assert r["nn_accuracy"] == 0.0 and r["nn_edit_distance"] == 1.0
    # random pairs: 8 ordered pairs of different templates (distance 1) among 12
    assert r["random_edit_distance"] == pytest.approx(8 / 12)


def test_root_probe_reads_a_separable_root_class_and_reports_the_majority():
    gen = torch.Generator().manual_seed(0)
    templates = ["PRON ROOT:VERB"] * 30 + ["ROOT:NOUN"] * 20 + ["ROOT:ADJ"] * 3  # ADJ: too rare, left out
    y = torch.tensor([0] * 30 + [1] * 20 + [2] * 3)
    x = torch.randn(53, 4, generator=gen) + torch.nn.functional.one_hot(y, 4).float() * 4
    r = se.root_probe(x, templates, x, templates)
    assert r["root_classes"] == ["NOUN", "VERB"] and r["root_test_sentences"] == 50
    assert r["root_probe"] > 0.95 and r["root_majority"] == pytest.approx(30 / 50)
    noise = se.root_probe(torch.randn(53, 4, generator=gen), templates, torch.randn(53, 4, generator=gen), templates)
    assert noise["root_probe"] < 0.85


def test_own_minus_other_compares_each_mask_with_the_other_and_the_unmasked():
    semantic = {"unmasked": {"auc": 0.7}, "mask_0": {"auc": 0.8}, "mask_1": {"auc": 0.6}}
    syntactic = {"unmasked": {"nn_accuracy": 0.2}, "mask_0": {"nn_accuracy": 0.1}, "mask_1": {"nn_accuracy": 0.3}}
    gaps = se.own_minus_other(semantic, syntactic)
    assert gaps["mask_0"] == {"other": pytest.approx(0.2), "unmasked": pytest.approx(0.1)}
    assert gaps["mask_1"] == {"other": pytest.approx(0.2), "unmasked": pytest.approx(0.1)}


# --- config -----------------------------------------------------------------------------------------------------
def test_syntax_setting_defaults_and_its_clear_errors():
    c = dc.DisentangleConfig(data="syntax").validate()
    assert (c.train_size, c.probe_size, c.test_size, c.max_length) == (600, 300, 600, 32)
    assert c.ce_weight == 0.0 and c.sweep_sparsities == [] and c.shifted_size is None
    t = dc.DisentangleConfig().validate()
    assert t.ce_weight == 1.0 and t.sweep_sparsities == [0.5, 0.8]
    assert dc.DisentangleConfig(data="syntax", ce_weight=0.5, train_size=10).validate().ce_weight == 0.5
    with pytest.raises(ConfigError, match="shifted_size must be unset for --data syntax"):
        dc.DisentangleConfig(data="syntax", shifted_size=10).validate()
    with pytest.raises(ConfigError, match="sweep_sparsities must be empty for --data syntax"):
        dc.DisentangleConfig(data="syntax", sweep_sparsities=[0.5]).validate()
    with pytest.raises(ConfigError, match="ce_weight"):
        dc.DisentangleConfig(ce_weight=-1.0).validate()


# --- command line -------------------------------------------------------------------------------------------------
TINY = ["--data", "syntax", "--train-size", "30", "--probe-size", "60", "--test-size", "80", "--steps", "3",
        "--batch-size", "4", "--finetune-steps", "2", "--top-blocks", "1", "--no-progress", "--checkpoint-every", "2"]


@needs_data
def test_cli_end_to_end_syntax_on_a_tiny_bert(tiny_bert_dir, tmp_path):
    from fastmask.cli import build_parser

    out = tmp_path / "syntax"
    argv = ["run", "disentangle", "--model", str(tiny_bert_dir), *TINY, "--out", str(out), "--data-dir",
            str(SHARED_DATA)]
    assert dis.run_from_args(build_parser().parse_args(argv)) == 0
    m = json.loads((out / "metrics.json").read_text())
    reps = {"unmasked", "mask_0", "mask_1", "finetuned_0", "finetuned_1"}
    assert m["setting"] == "syntax" and set(m["semantic"]) == reps and set(m["syntactic"]) == reps
    assert all(0 <= m["semantic"][r]["auc"] <= 1 and 0 <= m["syntactic"][r]["root_probe"] <= 1 for r in reps)
    assert m["data"]["splits"]["test_pairs"] == 80 and m["data"]["splits"]["ewt_test"] == 80
    assert m["data"]["mrpc"]["train"]["examples"] == 4076 and m["data"]["ewt"]["dev"]["examples"] == 1494
    gap = m["own_minus_other"]["mask_1"]
    assert gap["other"] == pytest.approx(m["syntactic"]["mask_1"]["nn_accuracy"]
                                         - m["syntactic"]["mask_0"]["nn_accuracy"])
    assert m["own_minus_other"]["mask_0"]["unmasked"] == pytest.approx(m["semantic"]["mask_0"]["auc"]
                                                                       - m["semantic"]["unmasked"]["auc"])
    assert m["trivial"]["auc"] == 0.5 and 0 < m["trivial"]["root_majority"] < 1
    history = (out / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 3 and "triplet_1" in history[0] and "ce_0" not in history[0]  # triplet losses only
    report = (out / "report.md").read_text()
    assert "paraphrase AUC" in report and "NN same template" in report and "ParaNMT" in report
    assert "trivial baseline" in report and "Removed as duplicates" in report
    for name in ("report.md", "config.json", "masks", "loss.png"):
        assert (out / name).exists(), name


@needs_data
def test_cli_syntax_seeds_mean_ci_and_resume(tiny_bert_dir, tmp_path, monkeypatch):
    from fastmask.cli import build_parser

    out = tmp_path / "seeds"
    argv = ["run", "disentangle", "--model", str(tiny_bert_dir), *TINY, "--finetune-steps", "0", "--out", str(out),
            "--data-dir", str(SHARED_DATA), "--seeds", "0,2"]
    assert dis.run_from_args(build_parser().parse_args(argv)) == 0
    summary = json.loads((out / "metrics.json").read_text())
    per_seed = [json.loads((out / f"seed-{s}" / "metrics.json").read_text()) for s in (0, 2)]
    assert summary["n_seeds"] == 2 and summary["setting"] == "syntax"
    values = [m["semantic"]["mask_0"]["auc"] for m in per_seed]
    assert summary["semantic"]["mask_0"]["auc"]["values"] == pytest.approx(values)
    assert summary["semantic"]["mask_0"]["auc"]["half_width"] == pytest.approx(
        12.706204736 * abs(values[0] - values[1]) / 2, abs=1e-9)
    sizes = [{k: v for k, v in m["data"]["splits"].items() if k != "train_ewt_sentences"} for m in per_seed]
    assert sizes[0] == sizes[1] and per_seed[0]["seed"] == 0 and per_seed[1]["seed"] == 2
    assert "over 2 seeds" in (out / "report.md").read_text()
    calls = []
    monkeypatch.setattr(dis.train, "run_one_seed", lambda *a, **k: calls.append(a) or {})
    assert dis.run_from_args(build_parser().parse_args(argv + ["--resume"])) == 0
    assert calls == []  # both seeds finished: none rerun
    # an unfinished seed (its metrics gone, its checkpoints kept) is resumed from its checkpoint: the same figures
    (out / "seed-2" / "metrics.json").unlink()
    monkeypatch.undo()
    assert dis.run_from_args(build_parser().parse_args(argv + ["--resume"])) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["semantic"]["mask_0"]["auc"]["values"] == pytest.approx(values)
    assert again["syntactic"]["mask_1"]["nn_accuracy"]["values"] == pytest.approx(
        summary["syntactic"]["mask_1"]["nn_accuracy"]["values"])


def test_syntax_scores_use_the_dev_threshold_not_the_test_one():
    dev = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # cosines 1 (label 1), 0 (label 0)
    test = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.8, 0.6], [0.9, 0.1]])  # cosines 0.8 (label 1), ~0.99 (label 0)
    s = se.semantic_scores(dev, [1, 0], test, [1, 0])
    assert s["threshold"] == pytest.approx(1.0) and s["f1"] == 0.0 and s["auc"] == 0.0
    assert s["dev_f1"] == 1.0 and s["dev_auc"] == 1.0
