"""Data of setting 3 of `fastmask run disentangle` (``--data syntax``: semantics vs syntax) from offline data.

Semantics: MRPC paraphrase pairs (Dolan & Brockett 2005; ../shared/data/mrpc). Syntax: UD English-EWT dependency
trees (../shared/data/ud-ewt), read with ``fastmask.probing.read_conllu``. The paper trains on ParaNMT (paraphrases
for semantics, same-syntax pairs for syntax): not reachable offline.

Syntactic template of a sentence (``syntactic_template``): its TOP-LEVEL dependency structure, the root word's UPOS
and the UPOS of the root's non-punctuation dependents in sentence order, the root's position marked ("PRON
ROOT:VERB NOUN" = a pronoun, the verb root, a noun). It keeps what a shallow parse keeps (the clause type and the
order of the root's arguments and modifiers: subject-verb-object, a nominal fragment, an imperative) and drops the
words and everything below the root's dependents, so two sentences of one template share their top-level shape and,
in EWT, almost never their content words. (CoNLL-U dependency labels would name the relations; the reader keeps
UPOS and heads only, and in English the order of UPOS around the root carries most of the same information.)

Splits (``load_syntax_splits``), no text in two of them: every data set de-duplicated by normalised text first
(``data.deduplicate``; for MRPC a pair is its two sentences); MRPC test pairs (``test_size``) from the test file;
a dev split (``probe_size`` pairs, where the F1 threshold is picked) and the training pairs from the train file,
leaving out every pair with a sentence of a split drawn before it; EWT keeps its official train / dev / test files,
sentences of 5 to 40 words, a train sentence dropped when its normalised text is in dev or test (and a dev one when
in test). Training: ``train_size`` paraphrase pairs (anchor = sentence 1, positive = sentence 2, negative = one of
the 5 training MRPC sentences of other pairs with the most word overlap with the anchor; the sentences of
``train_size // 2`` non-paraphrase training pairs are candidates too) and ``train_size`` EWT train anchors whose
template has another member in the pool (positive = another sentence of the template, negative = a sentence of
another template).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ...assets import data_path
from ...probing import Sentence, read_conllu
from ..runner import ConfigError
from .data import FactorData, deduplicate, normalised_text

MIN_WORDS, MAX_WORDS = 5, 40  # shorter: names, greetings, signatures ("ROOT:PROPN"); longer: cut by max_length
MRPC_FILES = {"train": "msr_paraphrase_train.txt", "test": "msr_paraphrase_test.txt"}
EWT_FILES = {"train": "en_ewt-ud-train.conllu", "dev": "en_ewt-ud-dev.conllu", "test": "en_ewt-ud-test.conllu"}


def syntactic_template(sentence: Sentence) -> str:
    """The top-level dependency structure: UPOS of the root's non-PUNCT dependents and of the root ("ROOT:" marks
    it) in sentence order, e.g. "PRON ROOT:VERB NOUN"."""
    root = sentence.root()
    kept = sorted([i for i, h in enumerate(sentence.heads) if h == root + 1 and sentence.upos[i] != "PUNCT"] + [root])
    return " ".join(("ROOT:" + sentence.upos[i]) if i == root else sentence.upos[i] for i in kept)


# --- MRPC -----------------------------------------------------------------------------------------------------
@dataclass
class Pairs:
    """Sentence pairs with a label each (1 paraphrase, 0 not)."""

    first: list
    second: list
    labels: list

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> "Pairs":
        return Pairs([self.first[i] for i in indices], [self.second[i] for i in indices],
                     [self.labels[i] for i in indices])

    def sentences(self) -> list:
        return self.first + self.second


def read_mrpc(path, limit: Optional[int] = None) -> Pairs:
    """The pairs of an MRPC file (UTF-8 with BOM, a header line, then Quality, #1 ID, #2 ID, #1 String, #2 String,
    tab-separated). ValueError naming the file and line on a malformed line."""
    path = Path(path)
    pairs = Pairs([], [], [])
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    if not lines or not lines[0].startswith("Quality"):
        raise ValueError(f"read_mrpc: {path}: expected the MRPC header line 'Quality\\t#1 ID\\t...'")
    for n, line in enumerate(lines[1:], 2):
        if limit is not None and len(pairs) >= limit:
            break
        if not line.strip():
            continue
        columns = line.split("\t")
        if len(columns) != 5 or columns[0] not in ("0", "1"):
            raise ValueError(f"read_mrpc: {path}:{n}: expected 5 tab-separated columns with a 0/1 label, got "
                             f"{line[:80]!r}")
        pairs.first.append(columns[3].strip())
        pairs.second.append(columns[4].strip())
        pairs.labels.append(int(columns[0]))
    return pairs


def dedupe_pairs(pairs: Pairs) -> tuple:
    """(pairs with one pair per normalised (sentence 1, sentence 2), counts), through ``data.deduplicate``: a pair
    is the text "sentence 1 <tab> sentence 2" labelled by its paraphrase label (disagreeing duplicates dropped)."""
    joined = FactorData([f"{a}\t{b}" for a, b in zip(pairs.first, pairs.second)], [(y,) for y in pairs.labels],
                        ("paraphrase",), (("no", "yes"),))
    kept, counts = deduplicate(joined)
    firsts, seconds = zip(*(t.split("\t") for t in kept.texts)) if len(kept) else ((), ())
    return Pairs(list(firsts), list(seconds), [row[0] for row in kept.labels]), counts


def _touches(pairs: Pairs, seen: set) -> list:
    """Indices of the pairs with neither sentence (normalised) in ``seen``."""
    return [i for i in range(len(pairs)) if normalised_text(pairs.first[i]) not in seen
            and normalised_text(pairs.second[i]) not in seen]


def _normalised(texts) -> set:
    return {normalised_text(t) for t in texts}


# --- EWT ------------------------------------------------------------------------------------------------------
def load_ewt(data_dir=None, limit: Optional[int] = None) -> tuple:
    """({split: FactorData of the split's 5-40-word sentences labelled (template,)}, {split: counts}): de-duplicated
    within each split (``data.deduplicate``), then across them (train minus dev and test, dev minus test)."""
    folder = data_path("ud-ewt", *EWT_FILES.values(), data_dir_override=data_dir)
    out, counts = {}, {}
    for split, name in EWT_FILES.items():
        sentences = [s for s in read_conllu(folder / name, limit=limit) if MIN_WORDS <= len(s) <= MAX_WORDS]
        data = FactorData([s.text for s in sentences], [(syntactic_template(s),) for s in sentences], ("template",),
                          ((),))
        out[split], counts[split] = deduplicate(data)
    later: set = set()
    for split in ("test", "dev", "train"):  # a sentence stays in the later official split, leaves the earlier one
        keep = [i for i, t in enumerate(out[split].texts) if normalised_text(t) not in later]
        counts[split]["dropped_as_in_other_split"] = len(out[split]) - len(keep)
        out[split] = out[split].subset(keep)
        later |= _normalised(out[split].texts)
    return out, counts


@dataclass
class SyntaxSplits:
    """A run's data: ``pool`` (the training texts), the triplet anchors' rows into it, the evaluation sets."""

    pool: list                 # training texts: MRPC sentences, then EWT sentences
    pairs: list                # (anchor row, positive row) of the training paraphrase pairs
    mrpc_rows: list            # rows of every MRPC sentence of the pool (negative candidates, semantic mask)
    ewt_rows: list             # rows of the EWT anchors (each has another row of its template)
    templates: dict            # row -> template of the EWT rows of the pool
    dev: Pairs                 # MRPC dev pairs (threshold of the F1)
    test: Pairs                # MRPC test pairs
    ewt_dev: FactorData        # EWT dev sentences (the template probe's training set)
    ewt_test: FactorData       # EWT test sentences (nearest-neighbour retrieval, the probe's test set)
    counts: dict


def _sample(n: int, size: int, rng: random.Random) -> list:
    order = list(range(n))
    rng.shuffle(order)
    return sorted(order[:size])


def load_syntax_splits(config) -> SyntaxSplits:
    """The splits of ``config`` (train_size, probe_size, test_size, seed, data_dir, data_limit); see the module
    docstring. ConfigError naming the size when the data hold too few examples."""
    rng = random.Random(config.seed)
    folder = data_path("mrpc", *MRPC_FILES.values(), data_dir_override=config.data_dir)
    mrpc = {s: dedupe_pairs(read_mrpc(folder / f, limit=config.data_limit)) for s, f in MRPC_FILES.items()}
    test_all, train_all = mrpc["test"][0], mrpc["train"][0]
    test = test_all.subset(_sample(len(test_all), config.test_size, rng))
    seen = _normalised(test.sentences())
    free = _touches(train_all, seen)
    rng.shuffle(free)
    dev = train_all.subset(sorted(free[:config.probe_size]))
    seen |= _normalised(dev.sentences())
    train = train_all.subset(_touches(train_all, seen))
    positive = [i for i, y in enumerate(train.labels) if y == 1]
    if len(positive) < config.train_size or len(dev) < config.probe_size:
        raise ConfigError(f"train_size/probe_size: MRPC holds {len(positive)} training paraphrase pairs and "
                          f"{len(free)} dev candidates after the test split, asked for {config.train_size} and "
                          f"{config.probe_size}")
    negative = [i for i, y in enumerate(train.labels) if y == 0]
    rng.shuffle(positive)
    rng.shuffle(negative)
    unrelated = train.subset(sorted(negative[:config.train_size // 2]))  # non-paraphrase pairs: hard negatives
    train = train.subset(sorted(positive[:config.train_size]))

    ewt, ewt_counts = load_ewt(config.data_dir, limit=config.data_limit)
    ewt_test = ewt["test"].subset(_sample(len(ewt["test"]), config.test_size, rng))
    ewt_dev = ewt["dev"].subset(_sample(len(ewt["dev"]), config.probe_size, rng))
    by_template: dict = {}
    for i, (template,) in enumerate(ewt["train"].labels):
        by_template.setdefault(template, []).append(i)
    eligible = [i for members in by_template.values() if len(members) > 1 for i in members]
    if len(eligible) < 2 * config.train_size:
        raise ConfigError(f"train_size: EWT train holds {len(eligible)} sentences whose template occurs twice, "
                          f"asked for {config.train_size} anchors (and a partner each)")
    rng.shuffle(eligible)
    chosen = eligible[:config.train_size]
    taken = set(chosen)
    for i in list(chosen):  # a partner of the same template for every anchor that has none yet
        template = ewt["train"].labels[i][0]
        if sum(j in taken for j in by_template[template]) < 2:
            partner = rng.choice([j for j in by_template[template] if j not in taken])
            chosen.append(partner)
            taken.add(partner)

    pool = train.first + train.second + unrelated.sentences()
    n = len(train)
    pairs = [(i, n + i) for i in range(n)]
    start = len(pool)
    pool += [ewt["train"].texts[i] for i in chosen]
    templates = {start + r: ewt["train"].labels[i][0] for r, i in enumerate(chosen)}
    counts = {"mrpc": {s: c for s, (_, c) in mrpc.items()}, "ewt": ewt_counts,
              "splits": {"train_pairs": n, "train_non_paraphrase_pairs": len(unrelated),
                         "train_ewt_sentences": len(chosen), "dev_pairs": len(dev),
                         "test_pairs": len(test), "ewt_dev": len(ewt_dev), "ewt_test": len(ewt_test)}}
    return SyntaxSplits(pool, pairs, list(range(start)), list(range(start, start + config.train_size)), templates,
                        dev, test, ewt_dev, ewt_test, counts)


def _words(text: str) -> set:
    return set(normalised_text(text).split())


def overlap_negatives(pool: Sequence[str], pairs: Sequence[tuple], candidates: Sequence[int], k: int) -> list:
    """Per pair (anchor, positive): the ``k`` candidate rows (not of the pair) whose words overlap the anchor's most
    (Jaccard of the normalised word sets; ties by row): lexically close non-paraphrases, the kind of negative MRPC's
    own non-paraphrase pairs are (a random sentence is so far from the anchor that the triplet loss is 0 from the
    first step on)."""
    words = {r: _words(pool[r]) for r in candidates}
    result = []
    for anchor, positive in pairs:
        a = _words(pool[anchor])
        scored = sorted((-len(a & words[r]) / max(len(a | words[r]), 1), r) for r in candidates
                        if r not in (anchor, positive))
        result.append([r for _, r in scored[:k]])
    return result


class SyntaxTripletSampler:
    """Triplets of setting 3 for the anchor slots of a batch: factor 0 (semantics) slot i is paraphrase pair i
    (anchor sentence 1, positive sentence 2, negative one of the ``hard`` training MRPC sentences of another pair,
    the paraphrase pairs' and the non-paraphrase pairs' alike, with the most word overlap with the anchor:
    ``overlap_negatives``); factor 1 (syntax) slot i is EWT anchor i (positive another sentence of its template,
    negative a sentence of another template). Drawn from a generator seeded by (seed, step, factor):
    deterministic and resumable, as ``data.TripletSampler``."""

    def __init__(self, splits: SyntaxSplits, seed: int = 0, hard: int = 5):
        self.splits, self.seed = splits, seed
        self.negatives = overlap_negatives(splits.pool, splits.pairs, splits.mrpc_rows, hard)
        self.by_template: dict = {}
        for row, template in splits.templates.items():
            self.by_template.setdefault(template, []).append(row)
        if len(self.by_template) < 2:
            raise ValueError("SyntaxTripletSampler: the EWT pool has a single template; a negative needs two")

    def __len__(self) -> int:
        """The number of anchor slots (the BatchStream's n)."""
        return min(len(self.splits.pairs), len(self.splits.ewt_rows))

    def anchor_rows(self, slots: Sequence[int], factor: int) -> list:
        if factor == 0:
            return [self.splits.pairs[i][0] for i in slots]
        return [self.splits.ewt_rows[i] for i in slots]

    def sample(self, slots: Sequence[int], factor: int, step: int) -> tuple:
        rng = random.Random((self.seed * 1_000_003 + step) * 31 + factor)
        positives, negatives = [], []
        for i in slots:
            if factor == 0:
                positive = self.splits.pairs[i][1]
                negative = self.negatives[i][rng.randrange(len(self.negatives[i]))]
            else:
                anchor = self.splits.ewt_rows[i]
                template = self.splits.templates[anchor]
                same = [r for r in self.by_template[template] if r != anchor]
                positive = same[rng.randrange(len(same))]
                rows = list(self.splits.templates)
                negative = rows[rng.randrange(len(rows))]
                while self.splits.templates[negative] == template:
                    negative = rows[rng.randrange(len(rows))]
            positives.append(positive)
            negatives.append(negative)
        return positives, negatives


__all__ = ["syntactic_template", "Pairs", "read_mrpc", "dedupe_pairs", "load_ewt", "SyntaxSplits",
           "load_syntax_splits", "overlap_negatives", "SyntaxTripletSampler", "MIN_WORDS", "MAX_WORDS"]
