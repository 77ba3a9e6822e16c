"""Frozen per-layer hidden states of an encoder, aligned with words.

Sentences come as lists of words (a treebank's tokens). A fast tokenizer splits them into pieces with
``is_split_into_words=True``; its ``word_ids`` say which word each piece belongs to (-1 here for [CLS], [SEP] and
padding). One forward pass with ``output_hidden_states=True`` gives every layer at once (index 0 = the
embeddings, L = the output of block L, as in HF's ``hidden_states`` and the released probing code); they are kept
per batch, padded as the model saw them, so the "padding included" behaviour of the released code can be replayed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch


@dataclass
class FeatureBatch:
    """One batch as the model saw it. hidden: (n_layers, batch, seq, hidden) in the storage dtype; word_ids:
    (batch, seq) long, -1 for special tokens and padding; attention_mask: (batch, seq); index: (batch,) positions
    of these sentences in the list given to ``extract_features``."""

    hidden: torch.Tensor
    attention_mask: torch.Tensor
    word_ids: torch.Tensor
    index: torch.Tensor

    @property
    def word_mask(self) -> torch.Tensor:
        """True for the pieces of words (special tokens and padding excluded)."""
        return self.word_ids >= 0


@dataclass
class LayerFeatures:
    """Hidden states of every requested layer for a list of sentences, in batches (see ``extract_features``)."""

    batches: list[FeatureBatch]
    layers: list[int]
    hidden_size: int
    dropped: list[int]  # sentence positions left out (too long for max_length, or a word without pieces)

    def layer_position(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"LayerFeatures: layer {layer} was not extracted; extracted: {self.layers}")
        return self.layers.index(layer)

    def iter_layer(self, layer: int) -> Iterator[tuple[torch.Tensor, FeatureBatch]]:
        """(float32 hidden states (batch, seq, hidden) of ``layer``, the batch) for every batch."""
        position = self.layer_position(layer)
        for batch in self.batches:
            yield batch.hidden[position].float(), batch

    def layer_batches(self, layer: int) -> list[tuple[torch.Tensor, FeatureBatch]]:
        """``iter_layer`` as a list: converted once, reused by every probe trained on the layer."""
        return list(self.iter_layer(layer))

    @property
    def sentence_index(self) -> list[int]:
        return [int(i) for batch in self.batches for i in batch.index]


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"fastmask.probing: the tokenizer must be a fast (Rust) tokenizer, whose word_ids align "
                         f"pieces with words; got {type(tokenizer).__name__}. Load it with "
                         f"AutoTokenizer.from_pretrained(..., use_fast=True)")


def _check_sentences(sentences, where: str) -> None:
    if not isinstance(sentences, (list, tuple)) or not sentences:
        raise ValueError(f"{where}: sentences must be a non-empty list of word lists")
    for i, words in enumerate(sentences):
        if isinstance(words, str) or not isinstance(words, (list, tuple)) or not words or \
                not all(isinstance(w, str) and w for w in words):
            raise ValueError(f"{where}: sentence {i} must be a non-empty list of non-empty strings (words), got "
                             f"{words!r:.80}")


def encode_words(tokenizer, sentences: Sequence[Sequence[str]], max_length: Optional[int] = None):
    """Tokenize pre-split sentences, padded to the longest. Returns (encoding dict of tensors, word_ids (batch, seq)
    long with -1 for special tokens and padding)."""
    _require_fast(tokenizer)
    _check_sentences(sentences, "encode_words")
    encoding = tokenizer([list(s) for s in sentences], is_split_into_words=True, padding=True,
                         truncation=max_length is not None, max_length=max_length, return_tensors="pt")
    word_ids = torch.tensor([[-1 if w is None else w for w in encoding.word_ids(i)] for i in range(len(sentences))],
                            dtype=torch.long)
    return dict(encoding), word_ids


def piece_counts(tokenizer, sentences: Sequence[Sequence[str]]) -> list[tuple[int, int]]:
    """(number of pieces with special tokens, number of words that got at least one piece) of every sentence."""
    _require_fast(tokenizer)
    encoding = tokenizer([list(s) for s in sentences], is_split_into_words=True)
    return [(len(encoding["input_ids"][i]), len({w for w in encoding.word_ids(i) if w is not None}))
            for i in range(len(sentences))]


def word_piece_targets(word_ids: torch.Tensor, values: Sequence[Sequence[float]], fill: float = 0.0) -> torch.Tensor:
    """(batch, seq) float: every piece gets the value of its word (``values[b][word]``); special tokens and padding
    (word id -1) get ``fill``."""
    if word_ids.dim() != 2 or len(values) != word_ids.shape[0]:
        raise ValueError(f"word_piece_targets: word_ids must be (batch, seq) with one value list per sentence; got "
                         f"word_ids {tuple(word_ids.shape)} and {len(values)} value lists")
    width = max(1, max(len(v) for v in values))
    table = torch.full((len(values), width), float(fill))
    for b, row in enumerate(values):
        table[b, :len(row)] = torch.as_tensor(row, dtype=torch.float32)
    over = word_ids >= torch.tensor([len(v) for v in values]).unsqueeze(1)
    if bool(over.any()):
        raise ValueError("word_piece_targets: a word id exceeds the number of values given for its sentence")
    gathered = torch.gather(table, 1, word_ids.clamp(min=0))
    return gathered.masked_fill(word_ids < 0, float(fill))


def pool_words(values: torch.Tensor, word_ids: torch.Tensor, n_words: int) -> torch.Tensor:
    """Mean over each word's pieces: values (batch, seq[, dim]) -> (batch, n_words[, dim]); words without pieces
    get 0."""
    squeeze = values.dim() == 2
    if squeeze:
        values = values.unsqueeze(-1)
    batch, _, dim = values.shape
    index = word_ids.clamp(min=0)
    weight = (word_ids >= 0).to(values.dtype).unsqueeze(-1)
    sums = values.new_zeros(batch, n_words + 1, dim).scatter_add_(1, index.unsqueeze(-1).expand(-1, -1, dim),
                                                                   values * weight)
    counts = values.new_zeros(batch, n_words + 1, 1).scatter_add_(1, index.unsqueeze(-1), weight)
    pooled = (sums / counts.clamp(min=1))[:, :n_words]
    return pooled.squeeze(-1) if squeeze else pooled


def usable_sentences(tokenizer, sentences: Sequence[Sequence[str]], max_length: int, with_lengths: bool = False):
    """(kept, dropped) sentence positions: a sentence is kept when all its pieces fit ``max_length`` and every word
    got at least one piece (so every word has a representation and a prediction). ``with_lengths`` adds the piece
    count of every sentence."""
    kept, dropped = [], []
    counts = piece_counts(tokenizer, sentences)
    for i, (pieces, covered) in enumerate(counts):
        (kept if pieces <= max_length and covered == len(sentences[i]) else dropped).append(i)
    return (kept, dropped, [pieces for pieces, _ in counts]) if with_lengths else (kept, dropped)


@torch.no_grad()
def extract_features(model, tokenizer, sentences: Sequence[Sequence[str]], *, layers: Optional[Sequence[int]] = None,
                     batch_size: int = 32, max_length: Optional[int] = None, dtype: torch.dtype = torch.float16,
                     device: Optional[torch.device] = None, sort_by_length: bool = True, progress: bool = True,
                     desc: str = "hidden states") -> LayerFeatures:
    """Hidden states of ``layers`` (default: all, 0 = embeddings) for every usable sentence, one forward pass per
    batch, stored in ``dtype`` (float16 halves the memory; the probes compute in float32).

    Sentences that do not fit ``max_length`` pieces (default: the model's position limit) or that have a word the
    tokenizer maps to no piece are left out and listed in ``LayerFeatures.dropped``. ``sort_by_length`` batches
    sentences of similar length together (less padding, the same hidden states for the words); False keeps the
    corpus order, so that batches hold as much padding as a plain loader's (what "padding included" replays)."""
    from tqdm.auto import tqdm

    _require_fast(tokenizer)
    _check_sentences(sentences, "extract_features")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"extract_features: batch_size must be a positive int, got {batch_size!r}")
    config = getattr(model, "config", None)
    n_layers = getattr(config, "num_hidden_layers", None)
    if n_layers is None:
        raise ValueError("extract_features: the model needs config.num_hidden_layers (an HF encoder)")
    available = list(range(n_layers + 1))
    layers = available if layers is None else [int(layer) for layer in layers]
    bad = [layer for layer in layers if layer not in available]
    if bad or not layers:
        raise ValueError(f"extract_features: layers must be in 0..{n_layers} (0 = embeddings), got {bad or layers}")
    limit = max_length or min(getattr(config, "max_position_embeddings", 512), 512)
    kept, dropped, lengths = usable_sentences(tokenizer, sentences, limit, with_lengths=True)
    if not kept:
        raise ValueError(f"extract_features: no sentence fits max_length={limit} pieces")
    if sort_by_length:
        kept = sorted(kept, key=lambda i: lengths[i])
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = []
    try:
        for start in tqdm(range(0, len(kept), batch_size), desc=desc, disable=not progress, unit="batch"):
            index = kept[start:start + batch_size]
            encoding, word_ids = encode_words(tokenizer, [sentences[i] for i in index])
            inputs = {k: v.to(device) for k, v in encoding.items()}
            hidden_states = model(**inputs, output_hidden_states=True).hidden_states
            if len(hidden_states) != n_layers + 1:
                raise ValueError(f"extract_features: the model returned {len(hidden_states)} hidden states, expected "
                                 f"{n_layers + 1} (embeddings + one per layer)")
            hidden = torch.stack([hidden_states[layer] for layer in layers]).to("cpu", dtype)
            batches.append(FeatureBatch(hidden, encoding["attention_mask"].cpu(), word_ids,
                                        torch.tensor(index, dtype=torch.long)))
    finally:
        model.train(was_training)
    return LayerFeatures(batches, list(layers), int(batches[0].hidden.shape[-1]), dropped)


__all__ = ["FeatureBatch", "LayerFeatures", "encode_words", "piece_counts", "word_piece_targets", "pool_words",
           "usable_sentences", "extract_features"]
