"""The knowledge graphs of the experiment built from WordNet 3.0 (read through nltk: ``fastmask.assets.wordnet``):
the TargetKG graph of a synset and ControlKG triplets sampled from every noun hypernym edge.

Knowledge graphs (Bayazit et al., EMNLP 2024). A triplet is (hyponym, IsA, hypernym) between WordNet 3.0 noun
synsets. The TargetKG of a synset ``root`` is the hypernym tree below it to ``depth`` 2 (every edge whose hypernym
is ``root`` or a direct hyponym of it) plus ``ancestors`` 2 edges up from ``root``; the paper's released TargetKGs
(know-subnet data, 11-19 triplets each) are samples of exactly these graphs (tests check it for all seven). A
ControlKG is other triplets: hypernym edges sampled from all of WordNet that touch no TargetKG synset.
"""

from __future__ import annotations

import re

from ... import assets
from ..runner import cache
from .data import DataError, Triplet, sample

_PLAIN_NAME = re.compile(r"^[A-Za-z][A-Za-z_'-]*\.n\.\d\d$")


# --- WordNet graphs -----------------------------------------------------------------------------------------
def wordnet_targetkg(root: str, depth: int = 2, ancestors: int = 2, wn=None) -> list[Triplet]:
    """The hypernym graph of ``root``: (hyponym, hypernym) for every hypernym at distance < ``depth`` below
    ``root`` (breadth first, WordNet's order), then ``ancestors`` edges up along each first hypernym."""
    wn = wn or assets.wordnet()
    try:
        start = wn.synset(root)
    except Exception as error:  # nltk raises WordNetError / ValueError for unknown names
        raise DataError(f"target: {root!r} is not a WordNet 3.0 noun synset ({error})") from None
    if start.pos() != "n":
        raise DataError(f"target: {root!r} is not a noun synset (pos {start.pos()!r})")
    edges, seen, frontier = [], {start}, [start]
    for _ in range(depth):
        below = []
        for synset in frontier:
            for child in synset.hyponyms():
                edges.append(Triplet(child.name(), synset.name()))
                if child not in seen:
                    seen.add(child)
                    below.append(child)
        frontier = below
    synset = start
    for _ in range(ancestors):
        parents = synset.hypernyms()
        if not parents:
            break
        edges.append(Triplet(synset.name(), parents[0].name()))
        synset = parents[0]
    return list(dict.fromkeys(edges))


def noun_hypernym_edges(wn=None) -> list[Triplet]:
    """Every (noun, first-listed hypernyms) edge of WordNet 3.0 between plainly named synsets, cached as JSON in
    $FASTMASK_CACHE/wordnet/ (listing 82k synsets takes a few seconds)."""
    edges = cache.read_json("wordnet", "noun_hypernym_edges")
    if edges is not None:
        return [Triplet(h, t) for h, t in edges]
    wn = wn or assets.wordnet()
    edges = []
    for synset in wn.all_synsets("n"):
        for parent in synset.hypernyms():
            if _PLAIN_NAME.match(synset.name()) and _PLAIN_NAME.match(parent.name()):
                edges.append((synset.name(), parent.name()))
    edges.sort()
    cache.write_json("wordnet", "noun_hypernym_edges", edges)
    return [Triplet(h, t) for h, t in edges]


def wordnet_controlkg(n: int, exclude_synsets: set, exclude_triplets: set = frozenset(), seed: int = 0,
                      wn=None) -> list[Triplet]:
    """``n`` WordNet hypernym triplets sampled with ``seed`` that touch none of ``exclude_synsets`` (the TargetKG's)
    and are not in ``exclude_triplets`` (e.g. the evaluation ControlKG)."""
    pool = [t for t in noun_hypernym_edges(wn) if t.head not in exclude_synsets and t.tail not in exclude_synsets
            and (t.head, t.tail) not in exclude_triplets]
    if n > len(pool):
        raise DataError(f"controlkg_size: only {len(pool)} WordNet triplets are available, asked for {n}")
    return sample(pool, n, seed)


__all__ = ["wordnet_targetkg", "noun_hypernym_edges", "wordnet_controlkg"]
