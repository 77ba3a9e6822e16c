"""Data of the knowledge-critical subnetwork experiment: WordNet hypernym triplets (their graphs are built in
``wordnet``), their verbalisations, the paper's released sets, template choice by perplexity, LM text blocks, and
the tokenised sentences whose tail tokens are scored (``ScoredSentences``).

Verbalisation. Each triplet has candidate sentences ("A house is a kind of building", " House is a building", ...:
with and without the head's article and a leading space, relations "is", "is a kind of", "is a sort of", "is a type
of", "is a hyponym of"; the same variants as the released "worse format" files). Per model, the candidate with the
lowest perplexity under the full model is used (the paper's "best format"); for GPT-2 models the released files
hold the paper's own choice. The knowledge is the tail: its tokens are the scored positions.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ... import assets
from ..blocks import EncodedTexts
from .scoring import sentence_nll, token_ids

RELATIONS = ("is", "is a kind of", "is a sort of", "is a type of", "is a hyponym of")
PAPER_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # the released per-model template choices
OBJECTIVE_POSITIONS = ("shifted", "released")  # where the training loss reads a tail token's logits


class DataError(ValueError):
    """A data set request that cannot be met (unknown synset, too few triplets...); the message says which."""


@dataclass(frozen=True)
class Triplet:
    head: str  # synset name of the hyponym, e.g. "house.n.12"
    tail: str  # synset name of the hypernym, e.g. "building.n.01"
    relation: str = "IsA"


@dataclass
class Example:
    """A verbalised triplet: the sentence scored, the tail text it ends with, and the candidates it was chosen
    from (empty when fixed)."""

    triplet: Triplet
    sentence: str
    tail_text: str
    candidates: list = field(default_factory=list)
    source: str = ""  # "released:<model>", "lowest-ppl" or "fixed"

    def to_dict(self) -> dict:
        return {"head": self.triplet.head, "tail": self.triplet.tail, "relation": self.triplet.relation,
                "sentence": self.sentence, "tail_text": self.tail_text, "candidates": list(self.candidates),
                "source": self.source}

    @classmethod
    def from_dict(cls, data: dict) -> "Example":
        return cls(Triplet(data["head"], data["tail"], data.get("relation", "IsA")), data["sentence"],
                   data["tail_text"], list(data.get("candidates", [])), data.get("source", ""))


# --- words and templates ------------------------------------------------------------------------------------
def synset_text(name: str) -> str:
    """The words of a synset name: "guild_hall.n.01" -> "guild hall" (the name's lemma, as the paper verbalises)."""
    parts = name.rsplit(".", 2)
    if len(parts) != 3:
        raise ValueError(f"not a WordNet synset name (lemma.pos.nn): {name!r}")
    return parts[0].replace("_", " ")


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def candidate_sentences(head: str, tail: str) -> list[str]:
    """Every template variant of "<head> IsA <tail>" (head and tail are words, not synset names), in a fixed order."""
    head_a, head_bare, tail_a = f"{article(head).capitalize()} {head}", head[:1].upper() + head[1:], \
        f"{article(tail)} {tail}"
    sentences = []
    for relation in RELATIONS:
        heads = (head_bare,) if relation == "is a hyponym of" else (head_a, head_bare)
        tails = (tail_a, tail) if relation == "is" else (tail,)
        for lead in ("", " "):
            for h in heads:
                for t in tails:
                    sentences.append(f"{lead}{h} {relation} {t}")
    return sentences


def fixed_example(triplet: Triplet) -> Example:
    """The triplet with the first candidate ("A <head> is a <tail>") and no choice (no model needed)."""
    tail = synset_text(triplet.tail)
    candidates = candidate_sentences(synset_text(triplet.head), tail)
    return Example(triplet, candidates[0], tail, candidates, "fixed")


# --- subsets ------------------------------------------------------------------------------------------------
def sample(items: Sequence, n: Optional[int], seed: int) -> list:
    """``n`` items drawn without replacement (all of them, in order, when n is None or >= len)."""
    items = list(items)
    if n is None or n >= len(items):
        return items
    chosen = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in chosen]


# --- the released data (know-subnet) ------------------------------------------------------------------------
PAPER_TARGETS = ("building.n.01", "change.n.01", "communication.n.02", "location.n.01", "magnitude.n.01",
                 "representation.n.02", "statement.n.01")


def _released(relative: str, data_dir=None) -> list[dict]:
    path = assets.data_path("know-subnet", relative, data_dir_override=data_dir)
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise ValueError(f"know-subnet/{relative}: expected a list of records")
    return records


def _released_examples(best: list[dict], worse: list[dict], model_key: Optional[str]) -> list[Example]:
    """Examples of released best-format records, with the worse-format sentences of the same triplet as candidates
    (the best one added when missing); the released choice when ``model_key`` (a PAPER_MODELS name) has one."""
    variants: dict = {}
    for record in worse:
        variants.setdefault((record["head"], record["tail"]), []).append(record["best_gpt2_input"])
    examples = []
    for record in best:
        triplet = Triplet(record["head"], record["tail"], record.get("rel", "IsA"))
        tail = synset_text(triplet.tail)
        candidates = list(dict.fromkeys(variants.get((triplet.head, triplet.tail), [])))
        released = record.get(f"best_{model_key}_input") if model_key else None
        for model in PAPER_MODELS:
            chosen = record.get(f"best_{model}_input")
            if chosen and chosen not in candidates:
                candidates.append(chosen)
        if not candidates:
            candidates = candidate_sentences(synset_text(triplet.head), tail)
        if released:
            examples.append(Example(triplet, released, tail, candidates, f"released:{model_key}"))
        else:
            examples.append(Example(triplet, candidates[0], tail, candidates, "fixed"))
    return examples


def paper_targetkg(root: str, model_key: Optional[str] = None, data_dir=None) -> list[Example]:
    """The paper's released WordNet TargetKG of ``root`` (one of PAPER_TARGETS)."""
    if root not in PAPER_TARGETS:
        raise DataError(f"target: the released TargetKGs are {list(PAPER_TARGETS)}, got {root!r} (use "
                         f"targetkg_source='wordnet' to build any synset's TargetKG from WordNet)")
    return _released_examples(_released(f"wordnet/targetkg/{root}_best_format.json", data_dir),
                              _released(f"wordnet/targetkg/{root}_worse_format.json", data_dir), model_key)


def paper_controlkg_val(model_key: Optional[str] = None, data_dir=None) -> list[Example]:
    """The paper's released WordNet ControlKG validation set (400 triplets; its train set was not released)."""
    return _released_examples(_released("wordnet/controlkg/controlkg_val_best_format.json", data_dir),
                              _released("wordnet/controlkg/controlkg_val_worse_format.json", data_dir), model_key)


def paper_model_key(model_name: str) -> Optional[str]:
    """"gpt2-xl" for "gpt2-xl" / "openai-community/gpt2-xl" / ".../gpt2-xl/": the released choice to use."""
    base = Path(str(model_name).rstrip("/")).name.lower()
    return base if base in PAPER_MODELS else None


# --- LM text ------------------------------------------------------------------------------------------------
_WIKITEXT_JOINS = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "), (" ; ", "; "),
                   (" : ", ": "), (" 's", "'s"), (" n't", "n't"), ("( ", "("), (" )", ")")]


def detokenize_wikitext(text: str) -> str:
    """Undo the most visible WikiText tokenization (`` @-@ ``, spaces before punctuation); ``<unk>`` stays."""
    for old, new in _WIKITEXT_JOINS:
        text = text.replace(old, new)
    return text


def wikitext_text(part: str, source: str = "auto", data_dir=None) -> tuple[str, str]:
    """(text, where it came from) of WikiText-2 for ``part`` "train" (the mask's LM-maintenance data) or "eval"
    (held-out LM perplexity). source "local": the shared data folder (no train split there, so train uses the
    validation split and eval the raw test split); "hub": ``wikitext-2-raw-v1`` train / validation; "auto": local
    when the folder is present, else the hub."""
    if part not in ("train", "eval"):
        raise ValueError(f"part must be 'train' or 'eval', got {part!r}")
    if source not in ("auto", "local", "hub"):
        raise ValueError(f"lm_source must be auto, local or hub, got {source!r}")
    if source in ("auto", "local"):
        try:
            if part == "train":
                path = assets.data_path("wikitext-2", "valid.txt", data_dir_override=data_dir)
                return detokenize_wikitext(path.read_text(encoding="utf-8")), f"{path} (WikiText-2 valid, tokenized " \
                                                                              f"form, detokenized)"
            path = assets.data_path("wikitext-2", "wiki.test.raw", data_dir_override=data_dir)
            return path.read_text(encoding="utf-8").replace("\r\n", "\n"), f"{path} (WikiText-2 raw test)"
        except assets.AssetUnavailable:
            if source == "local":
                raise
    split = "train" if part == "train" else "validation"
    rows = assets.hub_dataset("wikitext", "wikitext-2-raw-v1", split, asset="wikitext-2")
    return "".join(rows["text"]), f"hub wikitext/wikitext-2-raw-v1 {split}"


def lm_blocks(tokenizer, text: str, block_size: int, n_blocks: int):
    """The first ``n_blocks`` consecutive blocks of ``block_size`` tokens of ``text`` (an (n, block) LongTensor)."""
    needed = block_size * n_blocks
    ids: list[int] = []
    for paragraph in text.split("\n"):  # tokenized piecewise: fast, and never longer than the model's limit
        if paragraph.strip():
            ids += tokenizer(paragraph + "\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= needed:
            break
    if len(ids) < needed:
        raise DataError(f"LM text: {len(ids)} tokens, fewer than {n_blocks} blocks of {block_size}")
    return torch.tensor(ids[:needed], dtype=torch.long).view(n_blocks, block_size)


def examples_to_json(examples: Sequence[Example]) -> list[dict]:
    return [e.to_dict() for e in examples]


def examples_from_json(rows: Sequence[dict]) -> list[Example]:
    return [Example.from_dict(r) for r in rows]


# --- tokenised data ---------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class ScoredSentences(EncodedTexts):
    """Right-padded sentences (``EncodedTexts``: token ids, cached input of the first masked block) with their scored
    tail tokens. Token ``gold[i]`` sits at position ``cols[i] + 1`` of sentence ``rows[i]`` and is predicted by the
    logits at position ``cols[i]``. ``objective``: where the training loss reads a scored token's logits, "shifted"
    (at ``cols``, the distribution that predicts it: what the evaluation scores) or "released" (at ``cols + 1``, the
    token's own position, as the released code does: the distribution of the token after it)."""

    rows: object
    cols: object
    gold: object
    first_token: object  # True for the first scored token of each sentence (gold rank is taken there)
    full_hidden: object = None  # final hidden states of the unmasked model, (N, T, H): the maintenance reference
    objective: str = "shifted"

    def __post_init__(self):
        if self.objective not in OBJECTIVE_POSITIONS:
            raise ValueError(f"objective (--objective-position) must be one of {list(OBJECTIVE_POSITIONS)}, got "
                             f"{self.objective!r}")

    def batch(self, indices: Sequence[int], device=None, objective: bool = False):
        """(input_ids, attention_mask, h0, rows, cols, gold, first_token, full_hidden) of the sentences
        ``indices``, trimmed to their longest sentence; rows renumbered within the batch. ``objective``: cols are
        the positions the training loss reads (``self.objective``), else those that predict the gold tokens."""
        ids, mask, h0 = super().batch(indices, device)
        index = torch.as_tensor(list(indices), dtype=torch.long)
        position = torch.full((len(self),), -1, dtype=torch.long)
        position[index] = torch.arange(len(index))
        keep = position[self.rows] >= 0
        cols = self.cols[keep] + (1 if objective and self.objective == "released" else 0)
        return (ids, mask, h0, position[self.rows[keep]], cols, self.gold[keep], self.first_token[keep],
                None if self.full_hidden is None else self.full_hidden[index, :ids.shape[1]])


def tail_positions(tokenizer, sentence: str, tail_text: str, scope: str) -> tuple[list[int], list[int]]:
    """(token ids of the sentence, positions of its scored tail tokens)."""
    if not sentence.endswith(tail_text):
        raise ValueError(f"sentence {sentence!r} does not end with its tail {tail_text!r}")
    ids = token_ids(tokenizer, sentence)
    prefix_ids = token_ids(tokenizer, sentence[:len(sentence) - len(tail_text)].rstrip(" "))
    if scope == "all" and 0 < len(prefix_ids) < len(ids) and ids[:len(prefix_ids)] == prefix_ids:
        return ids, list(range(len(prefix_ids), len(ids)))
    return ids, [len(ids) - 1]  # the tail's last token (also when the tokenizer merges across the boundary)


def encode(tokenizer, sentences: Sequence[str], tail_texts: Sequence[str], scope: str, pad_id: int,
           objective: str = "shifted") -> ScoredSentences:
    """The sentences tokenised and right-padded with ``pad_id``, their tail tokens scored (``scope`` "all" or
    "last", ``tail_positions``), the training loss reading them at ``objective`` ("shifted" or "released")."""
    encoded = [tail_positions(tokenizer, s, t, scope) for s, t in zip(sentences, tail_texts)]
    length = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), length), dtype=torch.long)
    rows, cols, gold, first = [], [], [], []
    for i, (ids, positions) in enumerate(encoded):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        for j, p in enumerate(positions):
            rows.append(i), cols.append(p - 1), gold.append(ids[p]), first.append(j == 0)
    return ScoredSentences(input_ids, attention, rows=torch.tensor(rows), cols=torch.tensor(cols),
                           gold=torch.tensor(gold), first_token=torch.tensor(first), objective=objective)


def paraphrases(examples: Sequence[Example]) -> tuple[list[str], list[str]]:
    """(sentences, their tail texts): every other template of each example, i.e. its candidates but the sentence
    it uses (for the released TargetKGs: the released "worse format" sentences and the other models' choices), in
    order; the paraphrase test scores the remaining model on them."""
    sentences, tails = [], []
    for example in examples:
        for candidate in example.candidates:
            if candidate != example.sentence and candidate.endswith(example.tail_text):
                sentences.append(candidate), tails.append(example.tail_text)
    return sentences, tails


# --- template choice ------------------------------------------------------------------------------------------
def choose_templates(examples, rule: str, nll_of) -> None:
    """Set each example's sentence: "lowest-ppl" picks the candidate of lowest NLL (``nll_of(sentences)``)."""
    if rule != "lowest-ppl":
        return
    scores = nll_of([c for e in examples for c in e.candidates])
    for example in examples:
        example.sentence = min(example.candidates, key=lambda s: (scores[s], example.candidates.index(s)))
        example.source = "lowest-ppl"


# --- what a run prepares before training --------------------------------------------------------------------
@dataclass
class Prepared:
    """Everything a run computes before training (saved to data.json, so a resumed run reuses it exactly)."""

    target: list
    control_train: list
    control_eval: list
    sources: dict


__all__ = ["DataError", "Triplet", "Example", "RELATIONS", "PAPER_MODELS", "PAPER_TARGETS", "synset_text", "article",
           "candidate_sentences", "fixed_example", "sample", "paper_targetkg", "paper_controlkg_val", "paper_model_key",
           "detokenize_wikitext", "wikitext_text", "lm_blocks", "examples_to_json", "examples_from_json",
           "OBJECTIVE_POSITIONS", "ScoredSentences", "encode", "tail_positions", "paraphrases", "sentence_nll",
           "choose_templates", "Prepared"]
