"""CoNLL-U dependency trees: reader, gold depths (root = 1) and gold tree distances.

Only basic dependencies are read (column HEAD). Multiword-token lines (``3-4``) and empty nodes (``8.1``) are
skipped: the syntactic words are the integer-ID lines, which is what the trees are over. Depth follows the
convention of Li et al. (2023) and their released code: the root word has depth 1, its dependents 2, and so on
(Hewitt & Manning count the root as 0; the probe's MSE differs, the rankings do not).
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

PathLike = Union[str, os.PathLike]


@dataclass
class Sentence:
    """One dependency tree: ``words[i]`` has head ``heads[i]`` (1-based word index, 0 = the root)."""

    words: list[str]
    heads: list[int]
    upos: list[str] = field(default_factory=list)
    sent_id: Optional[str] = None

    def __post_init__(self):
        if len(self.heads) != len(self.words):
            raise ValueError(f"Sentence {self.sent_id!r}: {len(self.words)} words but {len(self.heads)} heads")
        if not self.upos:
            self.upos = ["_"] * len(self.words)
        validate_heads(self.heads, where=f"sentence {self.sent_id!r}")

    def __len__(self) -> int:
        return len(self.words)

    @property
    def text(self) -> str:
        return " ".join(self.words)

    def depths(self) -> list[int]:
        return tree_depths(self.heads)

    def distances(self) -> list[list[int]]:
        return tree_distances(self.heads)

    def root(self) -> int:
        """0-based index of the root word."""
        return self.heads.index(0)

    def punctuation(self) -> list[bool]:
        """Which words are punctuation (UPOS PUNCT): left out of root accuracy and UUAS, as in the structural-probe
        evaluations."""
        return [tag == "PUNCT" for tag in self.upos]


def validate_heads(heads: list[int], where: str = "tree") -> None:
    """A tree: every head in [0, n], exactly one root, no cycles. Raises ValueError naming the problem."""
    n = len(heads)
    if n == 0:
        raise ValueError(f"{where}: empty (no words)")
    bad = [(i + 1, h) for i, h in enumerate(heads) if not isinstance(h, int) or not 0 <= h <= n]
    if bad:
        raise ValueError(f"{where}: heads must be word indices in [0, {n}], got (word, head) {bad[:3]}")
    roots = [i + 1 for i, h in enumerate(heads) if h == 0]
    if len(roots) != 1:
        raise ValueError(f"{where}: a dependency tree has exactly one root (head 0), found {len(roots)}: words "
                         f"{roots[:5]}")
    for start in range(1, n + 1):  # walk to the root; more than n steps means a cycle
        node, steps = start, 0
        while node != 0:
            node, steps = heads[node - 1], steps + 1
            if steps > n:
                raise ValueError(f"{where}: the heads contain a cycle through word {start}")


def tree_depths(heads: list[int]) -> list[int]:
    """Depth of every word, the root = 1 (number of words on the path to the root, itself included)."""
    depth = [0] * len(heads)
    for i in range(len(heads)):
        path, j = [], i
        while depth[j] == 0 and heads[j] != 0:  # climb until a known depth or the root
            path.append(j)
            j = heads[j] - 1
        if depth[j] == 0:
            depth[j] = 1  # j is the root
        d = depth[j]
        for k in reversed(path):
            d += 1
            depth[k] = d
    return depth


def tree_distances(heads: list[int]) -> list[list[int]]:
    """Path length between every pair of words in the undirected tree (n x n, zeros on the diagonal)."""
    n = len(heads)
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for i, head in enumerate(heads):
        if head:
            neighbours[i].append(head - 1)
            neighbours[head - 1].append(i)
    result = []
    for source in range(n):  # BFS from every word: O(n^2), n is a sentence length
        dist = [-1] * n
        dist[source] = 0
        queue = deque([source])
        while queue:
            node = queue.popleft()
            for nxt in neighbours[node]:
                if dist[nxt] < 0:
                    dist[nxt] = dist[node] + 1
                    queue.append(nxt)
        result.append(dist)
    return result


def iter_conllu(path: PathLike) -> Iterator[Sentence]:
    """Sentences of a CoNLL-U file, in order. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_conllu: {path} does not exist (expected a CoNLL-U file, e.g. "
                                f"en_ewt-ud-dev.conllu)")
    words, heads, upos, sent_id, start_line = [], [], [], None, 1
    with open(path, encoding="utf-8") as handle:
        for line_no, raw in enumerate(handle, 1):
            line = raw.rstrip("\n")
            if not line.strip():
                if words:
                    yield _sentence(words, heads, upos, sent_id, path, start_line)
                words, heads, upos, sent_id = [], [], [], None
                start_line = line_no + 1
                continue
            if line.startswith("#"):
                if line.startswith("# sent_id"):
                    sent_id = line.split("=", 1)[-1].strip()
                continue
            columns = line.split("\t")
            if len(columns) != 10:
                raise ValueError(f"read_conllu: {path}:{line_no}: expected 10 tab-separated columns (CoNLL-U), got "
                                 f"{len(columns)}: {line[:80]!r}")
            token_id = columns[0]
            if "-" in token_id or "." in token_id:
                continue  # multiword token range or empty node: not a syntactic word of the basic tree
            try:
                index, head = int(token_id), int(columns[6])
            except ValueError:
                raise ValueError(f"read_conllu: {path}:{line_no}: ID and HEAD must be integers, got "
                                 f"{token_id!r} and {columns[6]!r}") from None
            if index != len(words) + 1:
                raise ValueError(f"read_conllu: {path}:{line_no}: word IDs must count 1, 2, 3...; expected "
                                 f"{len(words) + 1}, got {index}")
            words.append(columns[1])
            heads.append(head)
            upos.append(columns[3])
    if words:
        yield _sentence(words, heads, upos, sent_id, path, start_line)


def _sentence(words, heads, upos, sent_id, path, line_no) -> Sentence:
    try:
        return Sentence(words, heads, upos, sent_id)
    except ValueError as error:
        raise ValueError(f"read_conllu: {path}:{line_no}: {error}") from None


def read_conllu(path: PathLike, limit: Optional[int] = None) -> list[Sentence]:
    """The first ``limit`` (all if None) sentences of a CoNLL-U file."""
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"read_conllu: limit must be a positive int or None, got {limit!r}")
    sentences = []
    for sentence in iter_conllu(path):
        sentences.append(sentence)
        if limit is not None and len(sentences) >= limit:
            break
    if not sentences:
        raise ValueError(f"read_conllu: {path} holds no sentence")
    return sentences


__all__ = ["Sentence", "read_conllu", "iter_conllu", "tree_depths", "tree_distances", "validate_heads"]
