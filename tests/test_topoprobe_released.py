"""`fastmask run topoprobe --protocol released` (the released Effective_Metrics probing code replayed) on a tiny random
BERT with the real MiniLM tokenizer and the real released data files (EWT subset, GLUE sentence pool, released
results); the fine-tuning summary's intervals, paired differences and single-class flags."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHARED_DATA

from fastmask.cli import main
from fastmask.experiments.runner import ConfigError
from fastmask.experiments.topoprobe.config import TopoprobeConfig
from fastmask.experiments.topoprobe.data import (probe_data, released_finetuning, released_probe_losses,
                                                 released_sentence_pool, treebank_split)
from fastmask.experiments.topoprobe.evaluate import summarise_finetuning
from fastmask.experiments.topoprobe.model import extract_padded_features
from fastmask.experiments.topoprobe.report import _finetune_cells
from fastmask.experiments.topoprobe.train import bert_large_layer
from fastmask.probing import extract_features
from fastmask.probing.features import usable_sentences

DATA = str(SHARED_DATA)


def test_released_protocol_overrides_and_bad_values():
    released = TopoprobeConfig(protocol="released").effective()
    assert (released.probe_lr, released.seed, released.include_padding) == (2e-5, 42, True)
    assert (released.treebank, released.val_split, released.pseudo_corpus) == ("ewt-subset", "test", "glue-pool")
    assert (released.probe_train_sentences, released.probe_val_sentences) == (0, 0)
    assert (released.epochs("sp"), released.epochs("ssp"), released.epochs("essp")) == (300, 10, 10)
    # a reduced budget is explicit and kept
    reduced = TopoprobeConfig(protocol="released", sp_epochs=20, pseudo_epochs=2).effective()
    assert (reduced.epochs("sp"), reduced.epochs("ssp")) == (20, 2)
    default = TopoprobeConfig()
    assert default.effective() == default and default.epochs("sp") == default.epochs("ssp") == 10
    for name, value in (("protocol", "paper"), ("sp_epochs", 0), ("pseudo_sentences", -1), ("treebank", "ptb")):
        with pytest.raises(ConfigError, match=name):
            TopoprobeConfig(**{name: value}).validate()


def test_released_data_files():
    pool = released_sentence_pool(DATA)
    # CoLA acceptable (train, in-domain dev, out-of-domain dev) + MRPC + RTE + STS-B, header rows left out
    assert len(pool) == 47134
    assert pool[0] == "Our friends won't buy this analysis, let alone the next one we propose."
    assert not {"#1 String", "#2 String", "sentence1", "sentence2"} & set(pool)
    assert "Amrozi accused his brother, whom he called \"the witness\", of deliberately distorting his evidence." \
        in pool
    assert pool[-1] == "North Korea Delegation Meets With South Korean Officials"
    assert len(treebank_split("train", 0, DATA, "ewt-subset")) == 2021 + 1382
    assert len(treebank_split("test", 0, DATA, "ewt-subset")) == 711
    data = probe_data(TopoprobeConfig(protocol="released", data_dir=DATA, pseudo_sentences=500).effective())
    assert len(data["pseudo"]) == 500 and data["pseudo_pool_size"] == 47134
    sources = {tuple(words) for words in data["pseudo"]}
    assert len(sources) > 490  # shuffled: not the first 500 CoLA sentences in order
    assert [w for w in data["pseudo"][:5]] != [s.split() for s in pool[:5]]
    losses = released_probe_losses(DATA)
    assert losses["sp"][0] == pytest.approx(1.5249, abs=1e-4) and losses["sp"][16] == pytest.approx(0.5179, abs=1e-4)
    assert set(losses["ssp"]) == set(range(25))
    runs = released_finetuning(DATA)
    seeds = list(range(1, 41, 4))
    assert sorted({r["seed"] for r in runs}) == seeds and {r["epoch"] for r in runs} == {3}
    assert len([r for r in runs if r["layer"] is None]) == 10 and len(runs) == 10 + 25 * 10
    assert bert_large_layer(3, 6) == 12 and bert_large_layer(6, 6) == 24


def test_padded_features_pad_every_sentence_to_the_corpus_maximum(tiny_bert128_dir):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert128_dir)
    model = AutoModel.from_pretrained(tiny_bert128_dir).eval()
    sentences = [s.words for s in treebank_split("test", 40, DATA, "ewt-subset")]
    kept, dropped, lengths = usable_sentences(tokenizer, sentences, 128, with_lengths=True)
    pad_to = max(lengths[i] for i in kept)
    padded = extract_padded_features(model, tokenizer, sentences, layers=[0, 2], pad_to=pad_to, batch_size=16,
                                     dtype=torch.float32, device="cpu", kept=kept, dropped=dropped)
    assert all(b.hidden.shape[2] == pad_to for b in padded.batches)
    assert padded.sentence_index == kept  # corpus order, as the released loaders
    # padding is masked out of attention: the word pieces' states are those of a batch padded to its longest
    plain = extract_features(model, tokenizer, sentences, layers=[0, 2], batch_size=16, dtype=torch.float32,
                             sort_by_length=False, progress=False, max_length=128)
    for a, b in zip(padded.batches, plain.batches):
        assert torch.equal(a.index, b.index)
        width = b.hidden.shape[2]
        assert torch.equal(a.word_ids[:, :width], b.word_ids) and bool((a.word_ids[:, width:] == -1).all())
        mask = b.word_mask
        torch.testing.assert_close(a.hidden[:, :, :width][:, mask], b.hidden[:, mask], atol=1e-5, rtol=1e-5)
    # a shorter batch now carries padding up to the corpus maximum
    assert min(int(b.attention_mask.sum(1).min()) for b in padded.batches) < pad_to


def _released_args(model_dir, out, *extra):
    return ["run", "topoprobe", "--model", str(model_dir), "--out", str(out), "--data-dir", DATA,
            "--protocol", "released", "--sp-epochs", "2", "--pseudo-epochs", "1", "--pseudo-sentences", "96",
            "--layers", "0", "2", "--no-distance-probe", "--batch-size", "32", "--steps", "3", "--finetune-seeds", "1",
            "--finetune-layers", "2", "--finetune-train-sentences", "64", "--threads", "1", "--no-progress", *extra]


def test_cli_released_protocol_end_to_end_with_comparison(tiny_bert128_dir, tmp_path):
    out = tmp_path / "released"
    assert main(_released_args(tiny_bert128_dir, out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    config = metrics["effective_config"]
    assert (config["protocol"], config["probe_lr"], config["seed"], config["include_padding"]) == \
        ("released", 2e-5, 42, True)
    assert metrics["data"]["treebank"] == "ewt-subset" and metrics["data"]["treebank_train"] == 3403
    assert metrics["data"]["treebank_val"] == 711 and metrics["data"]["pseudo_pool_size"] == 47134
    rows = metrics["probes"]["full"]
    assert [r["layer"] for r in rows] == [0, 2]
    assert [len(r["sp"]["val_history"]) for r in rows] == [2, 2]
    assert [len(r["ssp"]["val_history"]) for r in rows] == [1, 1]
    # the tiny model takes 128 positions: longer EWT sentences are dropped, the rest padded to the longest kept
    assert rows[0]["dropped_sentences"]["train"] > 0 and rows[0]["dropped_sentences"]["val"] == 0
    # the fine-tuning batches are padded to the longest CoLA sentence (training subset + dev; the dev set's longest
    # has 31 pieces, the whole training set's 47), so the probe loss averages over as many positions as released
    assert {r["pad_to"] for r in metrics["finetuning"]["runs"]} <= set(range(31, 48))
    assert len({r["pad_to"] for r in metrics["finetuning"]["runs"]}) == 1
    large = metrics["comparison"]["bert_large"]
    assert {int(k): v for k, v in large["layer_map"].items()} == {0: 0, 2: 24}
    assert large["probes"]["sp"]["0"] == pytest.approx(1.5249, abs=1e-4)
    assert [row["layer"] for row in large["finetuning"]] == ["baseline", 24]
    assert large["finetuning"][0]["runs"] == 10
    report = (out / "report.md").read_text()
    assert "protocol: **released**" in report and "X_sp 2 epochs instead of 300" in report
    assert "96 pool sentences (a random subset) instead of 47134" in report
    assert "released bert-large-uncased values" in report and "| bert-large probe layer |" in report

    # a default-protocol run put beside it
    other = tmp_path / "default"
    assert main(["run", "topoprobe", "--model", str(tiny_bert128_dir), "--out", str(other), "--data-dir", DATA,
                 "--probe-train-sentences", "48", "--probe-val-sentences", "24", "--probe-epochs", "1",
                 "--layers", "0", "2", "--no-distance-probe", "--no-finetune", "--threads", "1", "--no-progress",
                 "--compare-with", str(out)]) == 0
    report = (other / "report.md").read_text()
    assert "X_sp (released protocol)" in report and "protocol: default" in report
    theirs = _table_row(report, "X_sp (released protocol)", 0)
    assert theirs[4] == f"{rows[0]['sp']['val_mse']:.3f}"


def _table_row(report: str, header_cell: str, layer: int) -> list[str]:
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if header_cell in line)
    for line in lines[start + 2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == str(layer):
            return cells
    raise AssertionError(f"no row for layer {layer}")


def test_compare_with_must_be_a_results_folder(tiny_bert128_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        main(_released_args(tiny_bert128_dir, tmp_path / "x", "--compare-with", str(tmp_path / "nothing")))
    assert error.value.code == 2 and "compare_with must be a topoprobe results folder" in capsys.readouterr().err


def test_finetuning_summary_intervals_paired_differences_and_single_class():
    runs = [{"layer": None, "seed": 1, "mcc": 0.2, "mcc_per_batch": 0.1, "predicted_acceptable": 0.8},
            {"layer": None, "seed": 2, "mcc": 0.4, "mcc_per_batch": 0.3, "predicted_acceptable": 0.7},
            {"layer": 3, "seed": 1, "mcc": 0.3, "mcc_per_batch": 0.1, "predicted_acceptable": 0.6},
            {"layer": 3, "seed": 2, "mcc": 0.7, "mcc_per_batch": 0.5, "predicted_acceptable": 0.6},
            {"layer": 5, "seed": 1, "mcc": 0.0, "mcc_per_batch": 0.0, "predicted_acceptable": 1.0}]
    base, three, five = summarise_finetuning(runs)
    assert base["mcc"]["mean"] == pytest.approx(0.3) and base["mcc_std"] == pytest.approx(0.02 ** 0.5)
    # two seeds: t_{0.975, 1} = 12.706, half-width = 12.706 * s / sqrt(2)
    assert base["mcc"]["half_width"] == pytest.approx(12.7062 * 0.02 ** 0.5 / 2 ** 0.5, rel=1e-4)
    assert three["paired"]["seeds"] == [1, 2] and three["paired"]["mcc"]["values"] == pytest.approx([0.1, 0.3])
    assert three["paired"]["mcc"]["mean"] == pytest.approx(0.2)
    assert three["paired"]["mcc_per_batch"]["values"] == pytest.approx([0.0, 0.2])
    assert three["single_class_seeds"] == [] and five["single_class_seeds"] == [1]
    assert five["paired"]["mcc"]["n"] == 1 and five["paired"]["mcc"]["half_width"] is None
    cells = _finetune_cells(three)
    assert cells[4].startswith("+0.200 ± ") and cells[5] == "+0.100 / +0.300"


def test_cola_batches_padded_to_the_corpus_maximum_only_under_the_released_protocol(tiny_bert128_dir):
    from transformers import AutoTokenizer

    from fastmask.experiments.topoprobe.data import _encode_cola, cola_pad_length, read_cola

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert128_dir)
    rows = read_cola("in_domain_train.tsv", DATA) + read_cola("in_domain_dev.tsv", DATA)
    assert cola_pad_length(tokenizer, TopoprobeConfig(), rows) is None
    assert cola_pad_length(tokenizer, TopoprobeConfig(protocol="released"), rows) == 47  # the released log's 47
    assert cola_pad_length(tokenizer, TopoprobeConfig(protocol="released", max_length=40), rows) == 40
    encoding, word_ids = _encode_cola(tokenizer, ["The cat sat .", "Dogs bark ."], 128, pad_to=47)
    assert encoding["input_ids"].shape == (2, 47) and word_ids.shape == (2, 47)
    assert word_ids[0, :6].tolist() == [-1, 0, 1, 2, 3, -1] and bool((word_ids[:, 6:] == -1).all())
    assert encoding["attention_mask"][1].sum() == 5
    plain, _ = _encode_cola(tokenizer, ["The cat sat .", "Dogs bark ."], 128)
    assert plain["input_ids"].shape == (2, 6)
