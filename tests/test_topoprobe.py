"""`fastmask run topoprobe` end to end on a tiny random BERT (the real MiniLM WordPiece tokenizer, the real UD EWT and
CoLA files): results folder, report, resume, the masked-subnetwork bonus, padding included, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SHARED_DATA

import fastmask as fm
from fastmask.cli import main
from fastmask.experiments.topoprobe.config import TopoprobeConfig
from fastmask.experiments.topoprobe.data import read_cola
from fastmask.experiments.topoprobe.evaluate import finetune_run, summarise_finetuning
from fastmask.experiments.topoprobe.train import middle_layer


def _args(model_dir, out, *extra):
    return ["run", "topoprobe", "--model", str(model_dir), "--out", str(out), "--data-dir", str(SHARED_DATA),
            "--probe-train-sentences", "48", "--probe-val-sentences", "24", "--probe-epochs", "2",
            "--batch-size", "16", "--steps", "3", "--finetune-seeds", "1", "--finetune-layers", "2",
            "--finetune-train-sentences", "64", "--threads", "1", "--no-progress", *extra]


def test_cli_end_to_end_report_and_resume(tiny_bert128_dir, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_bert128_dir, out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["probes"]["full"]
    assert [row["layer"] for row in rows] == [0, 1, 2]
    for row in rows:
        for kind in ("sp", "ssp", "essp"):
            assert math.isfinite(row[kind]["val_mse"]) and len(row[kind]["val_history"]) == 2
            assert sum(d["count"] for d in row[kind]["diagnostics"]) > 0
        assert 0 <= row["distance"]["uuas"] <= 1 and -1 <= row["sp"]["spearman"] <= 1
    assert metrics["x_sp_min_layer"] in (0, 1, 2) and metrics["data"]["treebank_train"] == 48
    # the trivial floors: the same for every layer, star 0 for X_ssp; a layer is "not fitted" iff X_sp >= the floor
    floors = rows[0]["baselines"]
    assert all(row["baselines"] == floors for row in rows)
    assert floors["ssp_star"] == 0 and 0 < floors["ssp_constant"] < 1 and floors["sp_mean_depth"] > 0
    assert metrics["x_sp_not_fitted"]["full"] == [row["layer"] for row in rows
                                                   if row["sp"]["val_mse"] >= floors["sp_mean_depth"]]
    runs = metrics["finetuning"]["runs"]
    assert [(r["layer"], r["seed"]) for r in runs] == [(None, 1), (2, 1)]
    assert all(-1 <= r["mcc"] <= 1 and -1 <= r["mcc_per_batch"] <= 1 for r in runs)
    assert runs[1]["final_probe_loss"] is not None and runs[0]["final_probe_loss"] is None
    assert runs[0]["pad_to"] is None  # batches padded to their longest (only --protocol released pads further)
    assert [row["layer"] for row in metrics["finetuning"]["summary"]] == ["baseline", 2]
    assert metrics["pseudo_label_speed"]["speedup"] > 1
    report = (out / "report.md").read_text()
    assert "| layer | X_sp | X_ssp | X_essp |" in report and "U-shaped" in report and "per-batch MCC" in report
    assert "| every token at depth 2 |" in report and "a star: the first token at 1" in report
    assert ("did not fit at layer" in report) == bool(metrics["x_sp_not_fitted"]["full"])
    for name in ("probes.png", "finetuning.png", "config.json", "units/probe-full-layer02.json",
                 "units/ssp-probe-full-layer02.safetensors", "units/finetune-layer02-seed1.json"):
        assert (out / name).is_file(), name

    # a finished run is not overwritten by accident; --resume reads every finished unit back
    with pytest.raises(SystemExit) as error:
        main(_args(tiny_bert128_dir, out))
    assert error.value.code == 2
    unit = out / "units" / "probe-full-layer01.json"
    before = (unit.stat().st_mtime_ns, unit.read_text())
    assert main(_args(tiny_bert128_dir, out, "--resume")) == 0
    assert (unit.stat().st_mtime_ns, unit.read_text()) == before
    again = json.loads((out / "metrics.json").read_text())
    assert again["probes"] == metrics["probes"] and again["finetuning"]["runs"] == runs
    # the report's timing still counts what the read-back units cost
    for key in ("probe_training_unit_seconds", "finetune_unit_seconds"):
        assert again["timing"][key] == metrics["timing"][key] > 0


def test_masked_subnetwork_probes_with_padding_included_on_cola_sentences(tiny_bert128_dir, tmp_path):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert128_dir)
    fm.apply(model, fm.MaskConfig(granularity="unit_out", init_logit=3.0))
    with torch.no_grad():
        for layer in fm.masked_modules(model).values():
            layer.logits[: layer.logits.shape[0] // 2] = -10.0  # close half of every layer's output units
    fm.save_masks(model, tmp_path / "masks")
    out = tmp_path / "run"
    assert main(_args(tiny_bert128_dir, out, "--masks", str(tmp_path / "masks"), "--no-finetune", "--layers", "0", "2",
                      "--include-padding", "--no-distance-probe", "--pseudo-corpus", "cola")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    full, masked = metrics["probes"]["full"], metrics["probes"]["masked"]
    assert [r["layer"] for r in masked] == [0, 2] and 0.4 < metrics["masked_sparsity"] < 0.6
    # the masks leave the embeddings alone: layer 0 is the same model (same features, same seed); layer 2 is not
    assert masked[0]["sp"]["val_mse"] == full[0]["sp"]["val_mse"]
    assert masked[1]["sp"]["val_mse"] != full[1]["sp"]["val_mse"]
    assert "distance" not in masked[0] and metrics["finetuning"]["runs"] == []
    assert metrics["data"]["pseudo_corpus"] == "cola" and metrics["data"]["pseudo_sentences"] == 48
    report = (out / "report.md").read_text()
    assert "subnetwork of" in report and "INCLUDED" in report


def test_bad_input_is_refused_with_a_message(tiny_bert128_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        main(_args(tiny_bert128_dir, tmp_path / "a", "--layers", "9"))
    assert error.value.code == 2 and "layers must be in 0..2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:
        main(_args(tiny_bert128_dir, tmp_path / "b", "--probe-epochs", "0"))
    assert error.value.code == 2 and "probe_epochs must be an int >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="does not exist"):
        main(_args(tiny_bert128_dir, tmp_path / "c", "--masks", str(tmp_path / "no-masks"), "--no-finetune"))
    (tmp_path / "data" / "cola").mkdir(parents=True)
    (tmp_path / "data" / "cola" / "in_domain_train.tsv").write_text("gj04\t1\t\tfine\nonly two\tcolumns\n")
    with pytest.raises(ValueError, match=r"in_domain_train.tsv:2: expected 4 tab-separated columns"):
        read_cola("in_domain_train.tsv", str(tmp_path / "data"))


def test_full_preset_and_default_layer():
    full = TopoprobeConfig(full=True).effective()
    assert full.finetune_seeds == [1, 5, 9, 13, 17, 21, 25, 29, 33, 37] and full.val_split == "test"
    assert full.probe_train_sentences == 0 and full.finetune_lr == 2e-5 and full.steps == 3 * 268
    assert TopoprobeConfig().class_weighted and not full.class_weighted  # the paper's plain CE under --full
    assert TopoprobeConfig().effective() == TopoprobeConfig()
    assert middle_layer(6) == 3 and middle_layer(24) == 12 and middle_layer(1) == 1
    summary = summarise_finetuning([
        {"layer": None, "seed": 1, "mcc": 0.2, "mcc_per_batch": 0.1, "predicted_acceptable": 0.5},
        {"layer": None, "seed": 2, "mcc": 0.4, "mcc_per_batch": 0.3, "predicted_acceptable": 0.7},
        {"layer": 3, "seed": 1, "mcc": 0.5, "mcc_per_batch": 0.5, "predicted_acceptable": 0.6}])
    # std over seeds: the sample std (n - 1), as the t-interval uses
    assert {k: summary[0][k] for k in ("layer", "runs", "mcc_mean", "mcc_std", "mcc_per_batch_mean",
                                        "mcc_per_batch_std", "predicted_acceptable")} == pytest.approx(
        {"layer": "baseline", "runs": 2, "mcc_mean": 0.3, "mcc_std": 0.02 ** 0.5, "mcc_per_batch_mean": 0.2,
         "mcc_per_batch_std": 0.02 ** 0.5, "predicted_acceptable": 0.6})
    # one seed: no spread and no interval; the paired difference uses the baseline of the same seed
    assert summary[1]["layer"] == 3 and summary[1]["mcc_std"] is None
    assert summary[1]["paired"]["mcc"]["values"] == pytest.approx([0.3])


def test_finetune_run_leaves_the_majority_class_and_trains_everything_but_word_embeddings(tiny_bert128_dir):
    """The regression behind 'every run predicts acceptable': on an imbalanced (75/25) but separable set a short run
    must predict both classes, and every parameter except the frozen word embeddings must be trained."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert128_dir)
    rows = [(f"the {w} sat on the mat .", 1) for w in ("cat", "dog", "man", "boy", "girl", "bird")] * 4 + \
        [(f"mat the on sat {w} the", 0) for w in ("cat", "dog")] * 4
    config = TopoprobeConfig(steps=40, batch_size=8, finetune_lr=1e-2, max_length=16, progress=False,
                             class_weighted=False)  # the paper's plain CE: no reweighting to lean on
    torch.set_num_threads(1)
    unit = finetune_run(str(tiny_bert128_dir), tokenizer, rows, rows, None, 1, None, config,
                        torch.device("cpu"))
    assert 0 < unit["predicted_acceptable"] < 1 and unit["mcc"] > 0.5, unit
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert128_dir, num_labels=2)
    total = sum(p.numel() for p in model.parameters())
    assert unit["trainable_parameters"] == total - model.get_input_embeddings().weight.numel()
