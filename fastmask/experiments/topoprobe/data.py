"""Data of the topoprobe experiment: the UD English-EWT treebank (fastmask.probing.read_conllu) for the probes, the
sentences of X_ssp / X_essp (the treebank's or acceptable CoLA training sentences), the CoLA rows of the fine-tuning
runs, and the word-piece encoding of CoLA sentences."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from ... import assets
from ...probing import encode_words, read_conllu
from ...probing.features import piece_counts
from .config import TopoprobeConfig


EFFECTIVE_METRICS = "effective-metrics"  # the released data of Li et al. in the shared data folder (its SOURCE.md)


def effective_metrics_path(relative: str, data_dir: Optional[str]) -> Path:
    """A file of the shared data folder's effective-metrics/ (the released EWT subset, GLUE sentences and results),
    checked against the sha256 its SOURCE.md lists."""
    folder = assets.data_dir(data_dir, required=True) / EFFECTIVE_METRICS
    path = folder / relative
    if not path.is_file():
        raise FileNotFoundError(f"fastmask topoprobe: {path} is missing (the released Effective_Metrics data; see "
                                f"the shared data folder's {EFFECTIVE_METRICS}/SOURCE.md)")
    expected = assets.source_checksums(folder).get(relative)
    if expected:
        assets.check_sha256(path, expected, f"{EFFECTIVE_METRICS}/{relative}")
    return path


def treebank_split(split: str, limit: int, data_dir: Optional[str], treebank: str = "ud-ewt"):
    """Sentences of one treebank split: the full UD EWT, or the released subset ("ewt-subset"; its "train" is the
    released training set, train + dev)."""
    if treebank == "ewt-subset":
        parts = ("train", "dev") if split == "train" else (split,)
        sentences = [s for part in parts
                     for s in read_conllu(effective_metrics_path(f"ewt-subset/en_ewt-ud-{part}.conllu", data_dir))]
        return sentences[:limit] if limit else sentences
    path = assets.data_path("ud-ewt", f"en_ewt-ud-{split}.conllu", data_dir_override=data_dir)
    return read_conllu(path, limit=limit or None)


def _tsv_columns(path: Path, columns: Sequence[int], header: bool) -> list[str]:
    """The non-empty cells of ``columns`` of every row of a GLUE tsv (``header``: skip the first line)."""
    out = []
    lines = path.read_text(encoding="utf-8-sig").splitlines()[1 if header else 0:]
    for line_no, line in enumerate(lines, 2 if header else 1):
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) <= max(columns):
            raise ValueError(f"{path}:{line_no}: expected at least {max(columns) + 1} tab-separated columns, got "
                             f"{len(cells)}: {line[:80]!r}")
        out += [cells[c].strip() for c in columns if cells[c].strip()]
    return out


def released_sentence_pool(data_dir: Optional[str]) -> list[str]:
    """The released X_ssp / X_essp sentences (probeDataPreproce.load_dataCSV), in its order: acceptable CoLA
    sentences of train, in-domain dev and out-of-domain dev; MRPC's two strings (train, test); RTE's two sentences
    (train, dev, test); STS-B's two sentences (train, dev, test). Differences, all header rows: the released code
    reads MRPC's and STS-B's header lines as sentences (4 strings of 47k); they are left out here. STS-B rows with
    extra source columns are read by position (sentence 1 and 2 are columns 6 and 7 in every row)."""
    pool = []
    for name in ("in_domain_train.tsv", "in_domain_dev.tsv", "out_of_domain_dev.tsv"):
        pool += [sentence for sentence, label in read_cola(name, data_dir) if label == 1]
    for name in ("msr_paraphrase_train.txt", "msr_paraphrase_test.txt"):
        path = assets.data_path("mrpc", name, data_dir_override=data_dir)
        pool += _tsv_columns(path, (3,), True) + _tsv_columns(path, (4,), True)
    for name in ("train.tsv", "dev.tsv", "test.tsv"):
        path = effective_metrics_path(f"glue-sentences/rte/{name}", data_dir)
        pool += _tsv_columns(path, (1,), True) + _tsv_columns(path, (2,), True)
    for name in ("sts-train.tsv", "sts-dev.tsv", "sts-test.tsv"):
        path = effective_metrics_path(f"glue-sentences/sts-b/{name}", data_dir)
        pool += _tsv_columns(path, (5,), False) + _tsv_columns(path, (6,), False)
    return pool


def read_cola(name: str, data_dir: Optional[str]) -> list[tuple[str, int]]:
    """(sentence, label) of a CoLA file of the official raw release (4 tab-separated columns, no header)."""
    path = assets.data_path("cola", name, data_dir_override=data_dir)
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        columns = line.split("\t")
        if len(columns) != 4 or columns[1] not in ("0", "1"):
            raise ValueError(f"{path}:{line_no}: expected 4 tab-separated columns (source, label 0/1, mark, "
                             f"sentence), got {line[:80]!r}")
        rows.append((columns[3], int(columns[1])))
    return rows


def probe_data(config: TopoprobeConfig) -> dict:
    """The sentences of the probes (``config`` with --full applied): "train" and "val" treebank sentences, and
    "pseudo", the word lists X_ssp / X_essp are trained on (None: the treebank's own)."""
    data = {"train": treebank_split("train", config.probe_train_sentences, config.data_dir, config.treebank),
            "val": treebank_split(config.val_split, config.probe_val_sentences, config.data_dir, config.treebank),
            "pseudo": None}
    if config.pseudo_corpus == "cola":
        acceptable = [s for s, label in read_cola("in_domain_train.tsv", config.data_dir) if label == 1]
        limit = config.probe_train_sentences if config.pseudo_sentences is None else config.pseudo_sentences
        data["pseudo"] = [s.split() for s in acceptable[:limit or len(acceptable)]]
    elif config.pseudo_corpus == "glue-pool":
        pool = released_sentence_pool(config.data_dir)
        # the released features come in random batches (RandomSampler, seed 42) and are split 90/10 at random:
        # shuffle, so that the validation tenth is not all STS-B
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(config.seed)).tolist()
        words = [pool[i].split() for i in order]
        data["pseudo"] = words[:config.pseudo_sentences] if config.pseudo_sentences else words
        data["pseudo_pool_size"] = len(pool)
    return data


def finetune_data(config: TopoprobeConfig) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(training rows, dev rows) of the fine-tuning runs (``config`` with --full applied): CoLA's in-domain training
    set (a random subset of finetune_train_sentences of it, drawn with config.seed, when set) and its dev set."""
    train_rows = read_cola("in_domain_train.tsv", config.data_dir)
    if config.finetune_train_sentences:
        order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(config.seed)).tolist()
        train_rows = [train_rows[i] for i in order[:config.finetune_train_sentences]]
    dev_rows = read_cola("in_domain_dev.tsv", config.data_dir)
    return train_rows, dev_rows


def _encode_cola(tokenizer, sentences: Sequence[str], max_length: int, pad_to: Optional[int] = None):
    """(encoding, word ids) of CoLA sentences, padded to the batch's longest, or to ``pad_to`` pieces (the released
    fine-tuning pads every sentence to the corpus maximum, which sets how many positions its probe loss averages)."""
    words = [sentence.split() for sentence in sentences]
    if pad_to is None:
        return encode_words(tokenizer, words, max_length=max_length)
    encoding = tokenizer(words, is_split_into_words=True, padding="max_length", truncation=True, max_length=pad_to,
                         return_tensors="pt")
    word_ids = torch.tensor([[-1 if w is None else w for w in encoding.word_ids(i)] for i in range(len(words))],
                            dtype=torch.long)
    return dict(encoding), word_ids


def cola_pad_length(tokenizer, config: TopoprobeConfig, rows: Sequence[tuple[str, int]]) -> Optional[int]:
    """The fine-tuning pad length: None (each batch to its longest) unless --protocol released, which pads every
    sentence to the longest of the training and dev rows (the released True_dataPrepare; 47 pieces for CoLA with
    BERT's uncased vocabulary), at most --max-length."""
    if config.protocol != "released":
        return None
    return min(max(pieces for pieces, _ in piece_counts(tokenizer, [r[0].split() for r in rows])), config.max_length)


# --- the released results (effective-metrics/released-results), for the report ----------------------------------
def _released_records(path: Path, first_key: str) -> list[dict]:
    """The released per-epoch logs: "key<TAB>value" lines, a new record at every ``first_key`` line."""
    records = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition("\t")
        if not sep:
            raise ValueError(f"{path}:{line_no}: expected 'key<TAB>value', got {line[:80]!r}")
        if key == first_key or not records:
            records.append({})
        records[-1][key] = value
    return records


def released_probe_losses(data_dir: Optional[str], layers: Sequence[int] = range(25)) -> dict:
    """{"sp" | "ssp" | "essp": {layer: validation loss of the last epoch}} of the released bert-large-uncased
    probes (the paper's metric); layers whose log is missing are left out."""
    out = {}
    for kind in ("sp", "ssp", "essp"):
        out[kind] = {}
        for layer in layers:
            try:
                path = effective_metrics_path(f"released-results/measuring/{kind}_l{layer}.csv", data_dir)
            except FileNotFoundError:
                continue
            out[kind][layer] = float(_released_records(path, "epoch")[-1]["Valid. Loss"])
    return out


def released_finetuning(data_dir: Optional[str]) -> list[dict]:
    """The released CoLA fine-tuning of bert-large-uncased, last epoch of every run: {"layer" (None: plain
    fine-tuning), "seed", "mcc_per_batch" (the released "Valid. Matthews.", a mean over batches of 32)}."""
    runs = []
    for name, first_key in (("cola-seed1-40.csv", "epoch"), ("freeze_prob_cola-seed1-40.csv", "Layer")):
        last = {}
        for record in _released_records(effective_metrics_path(f"released-results/fine-tuning/{name}", data_dir),
                                        first_key):
            layer = int(record["Layer"]) if "Layer" in record else None
            last[(layer, int(record["Seed"]))] = record  # epochs come in order: the last one stays
        runs += [{"layer": layer, "seed": seed, "mcc_per_batch": float(r["Valid. Matthews."]),
                  "epoch": int(r["epoch"])} for (layer, seed), r in sorted(last.items(), key=lambda kv: (
                      -1 if kv[0][0] is None else kv[0][0], kv[0][1]))]
    return runs
