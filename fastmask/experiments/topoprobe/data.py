"""Data of the topoprobe experiment: the UD English-EWT treebank (fastmask.probing.read_conllu) for the probes, the
sentences of X_ssp / X_essp (the treebank's or acceptable CoLA training sentences), the CoLA rows of the fine-tuning
runs, and the word-piece encoding of CoLA sentences."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ... import assets
from ...probing import encode_words, read_conllu
from .config import TopoprobeConfig


def treebank_split(split: str, limit: int, data_dir: Optional[str]):
    path = assets.data_path("ud-ewt", f"en_ewt-ud-{split}.conllu", data_dir_override=data_dir)
    return read_conllu(path, limit=limit or None)


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
    data = {"train": treebank_split("train", config.probe_train_sentences, config.data_dir),
            "val": treebank_split(config.val_split, config.probe_val_sentences, config.data_dir),
            "pseudo": None}
    if config.pseudo_corpus == "cola":
        acceptable = [s for s, label in read_cola("in_domain_train.tsv", config.data_dir) if label == 1]
        limit = config.probe_train_sentences or len(acceptable)
        data["pseudo"] = [s.split() for s in acceptable[:limit]]
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


def _encode_cola(tokenizer, sentences: Sequence[str], max_length: int):
    words = [sentence.split() for sentence in sentences]
    encoding, word_ids = encode_words(tokenizer, words, max_length=max_length)
    return encoding, word_ids
