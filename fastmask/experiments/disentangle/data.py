"""Data of `fastmask run disentangle`: two-factor labelled texts with a controlled correlation between the factors.

Offline default (the paper's setting 2, toxicity vs dialect in tweets): the Davidson et al. (2017) labelled tweets
(toxic = hate speech or offensive language, vs neither) with dialect inferred by the TwitterAAE demographic model
(Blodgett et al. 2016): a tweet is AAE-aligned when the model's African-American proportion is at least
``confidence`` of its African-American + White proportions, White-aligned when the White proportion is; tweets in
between are dropped (only those two topics are validated by the model's authors). The predictor below re-implements
the released one (``predict.py``: per-token likelihoods from the count table, collapsed variational Bayes (CVB0)
over the four topics with a symmetric prior, tokens lower-cased, out-of-vocabulary tokens dropped, a tweet with no
known token or fewer than 20% known tokens gets no prediction); tokenisation here is whitespace after stripping
URLs and @-mentions, not the paper's twokenize.

Offline stand-in for setting 1 (sentiment vs genre of IMDB reviews; no genre-labelled review set is reachable
offline): the Pang & Lee (2005) sentence polarity data (Rotten Tomatoes snippets, positive / negative) with a
second, genre-like attribute built from the text itself: the ASPECT a sentence talks about, from the two short
keyword lexicons ``ASPECT_LEXICON`` (acting: the performers; story: plot, script, narrative). A sentence is kept
when its words (lower-case letter runs, hyphens kept: "actor's" -> "actor") hit exactly one of the two lexicons;
sentences naming both or neither are dropped. By default the aspect words stay in the text (as genre cues do in a
review), so the aspect is decodable from word identity alone; ``keywords="neutralise"`` replaces every lexicon word
by the neutral word ``NEUTRAL_WORD`` after labelling, so the aspect must be inferred from the context.

Correlation control: every split is drawn from disjoint pools of the four (factor A, factor B) cells so that a
fraction ``agreement`` of its examples have label_A == label_B (0.5: independent and balanced; 0.8 / 0.2: the
correlation of training data / its reversal, for the robustness test).

A run's data: ``_load_splits`` (the setting's data, de-duplicated by normalised text, then cut into the train / probe /
test / shifted splits of the config);
each split's texts are then tokenised with the cached input of the first masked block (``..blocks.EncodedTexts``).
"""

from __future__ import annotations

import csv
import functools
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ...assets import data_path
from ..runner import ConfigError
from .config import DisentangleConfig


TWEET_NOISE = re.compile(r"https?://\S+|@\w+|&amp;|&lt;|&gt;|\bRT\b")


@dataclass
class FactorData:
    """Texts with one integer label per factor: ``labels[i][k]`` is text i's value of factor k (0 or 1)."""

    texts: list
    labels: list
    factors: tuple
    values: tuple  # per factor, the names of its values (index = label)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> "FactorData":
        return FactorData([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.factors,
                          self.values)

    def label_column(self, k: int) -> list:
        return [row[k] for row in self.labels]


# --- the TwitterAAE demographic model -----------------------------------------------------------------------
class TwitterAAE:
    """P(topic | tweet) over (African-American, Hispanic, Asian, White) from the released count table."""

    TOPICS = ("AA", "Hispanic", "Asian", "White")

    def __init__(self, folder: Path):
        vocab = [line.split("\t")[-1].strip() for line in
                 (folder / "model_vocab.txt").read_text(encoding="utf-8").splitlines()]
        # str.split + one conversion: ~10x faster than np.loadtxt on the 192k x 4 table
        counts = np.array((folder / "model_count_table.txt").read_text(encoding="utf-8").split(), dtype=np.float64)
        counts = counts.reshape(-1, 4) if counts.size % 4 == 0 else counts
        if counts.shape != (len(vocab), 4):
            raise ValueError(f"TwitterAAE: count table {counts.shape} does not match the vocabulary ({len(vocab)})")
        self.index = {word: i for i, word in enumerate(vocab)}
        self.word_given_topic = counts / counts.sum(axis=0)

    def predict(self, tokens: Sequence[str], alpha: float = 1.0, passes: int = 5, min_known: int = 1,
                min_known_fraction: float = 0.2):
        """Topic proportions (numpy array of 4), or None when too few tokens are in the model's vocabulary."""
        known = [self.index[t.lower()] for t in tokens if t.lower() in self.index]
        if len(known) < min_known or len(known) < min_known_fraction * len(tokens):
            return None
        likelihood = self.word_given_topic[known]
        likelihood = likelihood / likelihood.sum(axis=1, keepdims=True)
        q = likelihood.copy()
        totals = q.sum(axis=0)
        for _ in range(1, passes):  # CVB0 sweeps, as in the released predictor
            for i in range(len(known)):
                totals -= q[i]
                q[i] = likelihood[i] * (totals + alpha)
                q[i] /= q[i].sum()
                totals += q[i]
        return totals / totals.sum()


@functools.lru_cache(maxsize=2)
def twitter_aae(folder: Path) -> TwitterAAE:
    """The model of ``folder``, read once per process (a 192k-row table)."""
    return TwitterAAE(Path(folder))


def tweet_tokens(text: str) -> list:
    return TWEET_NOISE.sub(" ", text).split()


def load_tweets(data_dir: Optional[str] = None, confidence: float = 0.6, limit: Optional[int] = None) -> FactorData:
    """Davidson tweets labelled (toxicity: 0 neither / 1 offensive or hate, dialect: 0 White- / 1 AAE-aligned)."""
    hate = data_path("davidson-hate", "labeled_data.csv", data_dir_override=data_dir)
    aae = twitter_aae(data_path("twitteraae", "model_vocab.txt", "model_count_table.txt",
                                data_dir_override=data_dir))
    texts, labels = [], []
    with open(hate, newline="", encoding="utf-8") as handle:
        for n, row in enumerate(csv.DictReader(handle)):
            if limit is not None and n >= limit:
                break
            tokens = tweet_tokens(row["tweet"])
            proportions = aae.predict(tokens)
            if proportions is None:
                continue
            aae_share = proportions[0] / (proportions[0] + proportions[3])
            if aae_share >= confidence:
                dialect = 1
            elif aae_share <= 1 - confidence:
                dialect = 0
            else:
                continue
            texts.append(" ".join(tokens))
            labels.append((0 if row["class"] == "2" else 1, dialect))
    return FactorData(texts, labels, ("toxicity", "dialect"), (("neither", "toxic"), ("white-aligned", "aae")))


# --- sentence polarity x aspect (stand-in for sentiment x genre) ------------------------------------------------
# Kept small and unambiguous on purpose: words such as "plays" ("plays like ...") or "character" (a story or an
# acting matter) are left out. On rt-polarity v1.0: 1,227 story and 778 acting sentences are kept (of 10,662).
ASPECT_LEXICON = {
    "story": ("story", "stories", "plot", "plots", "plotting", "script", "scripts", "screenplay", "narrative",
              "storyline", "storytelling", "dialogue", "premise", "ending", "tale", "written", "writing", "writer",
              "writers"),
    "acting": ("acting", "acted", "actor", "actors", "actress", "actresses", "performance", "performances",
               "performer", "performers", "performs", "performed", "cast", "casting", "role", "roles", "portrayal",
               "portrays", "portraying", "played", "star", "stars", "starring", "co-star", "ensemble"),
}
ASPECT_WORDS = re.compile(r"[a-z]+(?:-[a-z]+)*")
ASPECT_WORDS_ANY_CASE = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")


def review_aspect(text: str) -> Optional[int]:
    """0 (story) or 1 (acting) when the words of ``text`` hit exactly one lexicon of ASPECT_LEXICON, else None."""
    words = set(ASPECT_WORDS.findall(text.lower()))
    hits = [k for k, name in enumerate(("story", "acting")) if words & set(ASPECT_LEXICON[name])]
    return hits[0] if len(hits) == 1 else None


NEUTRAL_WORD = "thing"
REVIEW_KEYWORDS = ("keep", "neutralise")


def neutralise_aspect_words(text: str) -> str:
    """``text`` with every word of ASPECT_LEXICON (as ``review_aspect`` finds them: case-insensitive letter runs,
    hyphens kept, so "Actor's" -> "thing's" and "co-star" -> "thing") replaced by ``NEUTRAL_WORD``."""
    lexicon = {w for words in ASPECT_LEXICON.values() for w in words}
    return ASPECT_WORDS_ANY_CASE.sub(lambda m: NEUTRAL_WORD if m.group(0).lower() in lexicon else m.group(0), text)


def load_reviews(data_dir: Optional[str] = None, limit: Optional[int] = None, keywords: str = "keep") -> FactorData:
    """Pang & Lee sentences labelled (sentiment: 0 negative / 1 positive, aspect: 0 story / 1 acting): the offline
    stand-in for the paper's sentiment x genre reviews (see the module docstring). ``limit``: read only the first
    N lines of each polarity file. ``keywords``: "keep" the lexicon words in the text, or "neutralise" them
    (``neutralise_aspect_words``; the aspect is labelled from the original sentence first)."""
    if keywords not in REVIEW_KEYWORDS:
        raise ValueError(f"load_reviews: keywords must be one of {list(REVIEW_KEYWORDS)}, got {keywords!r}")
    folder = data_path("movie-reviews", "rt-polarity.pos", "rt-polarity.neg", data_dir_override=data_dir)
    texts, labels = [], []
    for sentiment, name in ((0, "rt-polarity.neg"), (1, "rt-polarity.pos")):
        lines = (folder / name).read_text(encoding="utf-8").splitlines()
        for line in lines[:limit]:
            aspect = review_aspect(line)
            if aspect is not None and line.strip():
                texts.append(neutralise_aspect_words(line.strip()) if keywords == "neutralise" else line.strip())
                labels.append((sentiment, aspect))
    return FactorData(texts, labels, ("sentiment", "aspect"), (("negative", "positive"), ("story", "acting")))


# --- de-duplication -------------------------------------------------------------------------------------------
NON_WORD = re.compile(r"[^a-z0-9']+")


def normalised_text(text: str) -> str:
    """The text as duplicates are recognised: lower case, URLs / @-mentions / RT / HTML entities removed, every run
    of other characters than letters, digits and apostrophes one space (a retweet of a tweet is the tweet)."""
    return NON_WORD.sub(" ", TWEET_NOISE.sub(" ", text).lower()).strip()


def deduplicate(data: FactorData) -> tuple[FactorData, dict]:
    """(data with one example per normalised text, counts): before splitting, so that no text sits in two splits.
    A group of duplicates whose labels agree keeps its first example; a group whose labels disagree is dropped
    whole (its labels are noise). Counts: examples before / after, duplicate groups, examples removed, groups
    dropped for disagreeing labels."""
    groups: dict = {}
    for i, text in enumerate(data.texts):
        groups.setdefault(normalised_text(text), []).append(i)
    kept, conflicting = [], 0
    for members in groups.values():
        if len({tuple(data.labels[i]) for i in members}) > 1:
            conflicting += 1
            continue
        kept.append(members[0])
    kept.sort()
    duplicates = sum(1 for members in groups.values() if len(members) > 1)
    counts = {"examples": len(data), "kept": len(kept), "duplicate_groups": duplicates,
              "removed": len(data) - len(kept), "conflicting_groups_dropped": conflicting}
    return data.subset(kept), counts


# --- splits with a chosen correlation -----------------------------------------------------------------------
def cell_counts(n: int, agreement: float) -> dict:
    """How many examples of each (a, b) cell a split of ``n`` holds so that a fraction ``agreement`` has a == b,
    both factors balanced: {(0, 0): n a / 2, (1, 1): n a / 2, (0, 1): n (1 - a) / 2, (1, 0): n (1 - a) / 2}."""
    same = round(n * agreement / 2)
    differ = round(n * (1 - agreement) / 2)
    return {(0, 0): same, (1, 1): same, (0, 1): differ, (1, 0): differ}


def correlated_splits(data: FactorData, sizes: dict, agreements: dict, seed: int) -> dict:
    """{split name: FactorData} drawn without replacement (disjoint splits) from the cells of the first two factors,
    split s holding ``sizes[s]`` examples with agreement ``agreements[s]``. ValueError naming the cell when the
    data hold too few examples of it."""
    rng = random.Random(seed)
    pools = {cell: [] for cell in ((0, 0), (0, 1), (1, 0), (1, 1))}
    for i, row in enumerate(data.labels):
        pools[(row[0], row[1])].append(i)
    for pool in pools.values():
        rng.shuffle(pool)
    needed = {cell: 0 for cell in pools}
    plans = {}
    for name in sizes:
        plans[name] = cell_counts(sizes[name], agreements[name])
        for cell, count in plans[name].items():
            needed[cell] += count
    for cell, count in needed.items():
        if count > len(pools[cell]):
            names = [f"{data.factors[k]}={data.values[k][v]}" for k, v in enumerate(cell)]
            raise ValueError(f"the data hold {len(pools[cell])} examples with {', '.join(names)}, but the splits "
                             f"need {count}: lower the split sizes or the train agreement")
    splits, taken = {}, {cell: 0 for cell in pools}
    for name, plan in plans.items():
        chosen = []
        for cell, count in plan.items():
            chosen += pools[cell][taken[cell]:taken[cell] + count]
            taken[cell] += count
        rng.shuffle(chosen)
        splits[name] = data.subset(chosen)
    return splits


# --- triplets -----------------------------------------------------------------------------------------------
class TripletSampler:
    """For an anchor and factor k: a positive (another example with the same value of factor k) and a negative (an
    example with a different value), drawn from a generator seeded by (seed, step): deterministic and resumable.

    ``mode="contrast"``: the positive also differs from the anchor in every other factor and the negative shares
    them, where the data hold such an example (else any positive / negative): the triplet loss then rewards
    ignoring the other factors instead of only separating factor k. ``mode="random"``: any positive / negative."""

    MODES = ("contrast", "random")

    def __init__(self, labels: Sequence[Sequence[int]], seed: int = 0, mode: str = "contrast"):
        if mode not in self.MODES:
            raise ValueError(f"TripletSampler: mode must be one of {self.MODES}, got {mode!r}")
        self.labels = [tuple(row) for row in labels]
        self.seed = seed
        self.mode = mode
        self.by_row = {}  # labels -> indices of the examples with exactly those labels
        for i, row in enumerate(self.labels):
            self.by_row.setdefault(row, []).append(i)
        n_factors = len(self.labels[0]) if self.labels else 0
        self.by_value = [{} for _ in range(n_factors)]
        for i, row in enumerate(self.labels):
            for k, value in enumerate(row):
                self.by_value[k].setdefault(value, []).append(i)
        for k, groups in enumerate(self.by_value):
            if len(groups) < 2:
                raise ValueError(f"TripletSampler: factor {k} has a single value in the data; a negative needs two")

    def sample(self, anchors: Sequence[int], factor: int, step: int) -> tuple[list, list]:
        """(positives, negatives) for ``anchors`` under factor ``factor`` at training step ``step``."""
        rng = random.Random((self.seed * 1_000_003 + step) * 31 + factor)
        groups = self.by_value[factor]
        positives, negatives = [], []
        for a in anchors:
            row = self.labels[a]
            value = row[factor]
            same = groups[value]
            others = [v for v in groups if v != value]
            if self.mode == "contrast":
                differing = [i for key, pool in self.by_row.items() if key[factor] == value
                             and all(key[j] != row[j] for j in range(len(row)) if j != factor) for i in pool]
                sharing = [i for key, pool in self.by_row.items() if key[factor] != value
                           and all(key[j] == row[j] for j in range(len(row)) if j != factor) for i in pool]
                same = differing or same
            candidates = [i for i in same if i != a] or [a]  # the anchor itself only when it is alone
            positives.append(candidates[rng.randrange(len(candidates))])
            if self.mode == "contrast" and sharing:
                negatives.append(sharing[rng.randrange(len(sharing))])
            else:
                pool = groups[others[rng.randrange(len(others))]]
                negatives.append(pool[rng.randrange(len(pool))])
        return positives, negatives


# --- a run's splits -----------------------------------------------------------------------------------------
def _load_splits(config: DisentangleConfig) -> tuple:
    if config.data == "reviews":
        data = load_reviews(config.data_dir, limit=config.data_limit, keywords=config.review_keywords)
    else:
        data = load_tweets(config.data_dir, confidence=config.dialect_confidence, limit=config.data_limit)
    data, duplicates = deduplicate(data)
    sizes = {"train": config.train_size, "probe": config.probe_size, "test": config.test_size,
             "shifted": config.shifted_size}
    agreements = {"train": config.train_agreement, "probe": 0.5, "test": 0.5, "shifted": 1 - config.train_agreement}
    try:
        splits = correlated_splits(data, sizes, agreements, config.seed)
    except ValueError as error:
        raise ConfigError(f"train_size/probe_size/test_size/shifted_size: {error}") from None
    return data, splits, duplicates


__all__ = ["FactorData", "TwitterAAE", "twitter_aae", "tweet_tokens", "load_tweets", "ASPECT_LEXICON", "review_aspect",
           "NEUTRAL_WORD", "REVIEW_KEYWORDS", "neutralise_aspect_words", "load_reviews", "normalised_text",
           "deduplicate", "cell_counts", "correlated_splits", "TripletSampler"]
