"""Sentence scores under the full model for the template choice: token ids (``token_ids``) and the mean NLL of every
token after the first (``sentence_nll``), cached per model in $FASTMASK_CACHE/template-nll/ by the sentence's text.

Speed. Choosing the templates of N triplets scores about 22 N candidate sentences with the whole model (1000 WordNet
ControlKG triplets: 22,000 sentences, 177,000 tokens). In padded batches the forward is compute-bound (SmolLM2-135M,
1 thread: 275 tokens/s), so batching alone cannot make it faster: fewer tokens must go through the model. The
candidates of a triplet share most prefixes ("A house is a kind of building", "A house is a sort of building", ...),
and a causal LM's output at a token depends only on the tokens before it, so each distinct prefix is computed once:
the sentences, sorted by their token ids, are packed into rows as prefix trees (one node per distinct prefix,
position id = its depth, attention to its ancestors only, through a 4D attention mask), and the LM head runs only at
the nodes whose next token is scored. For those 1000 triplets that is 51% of the tokens through the blocks and 38%
through the head. The result equals the padded forward up to float rounding (tests), for the architectures whose
positions come from ``position_ids`` and whose attention takes a 4D mask (``PACKED_MODEL_TYPES`` with sdpa or eager
attention); other models take padded batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..runner import cache as runner_cache

# Model types whose packed prefix-tree forward is tested equal to the padded one (rotary or learned positions read
# from position_ids; a 4D mask passed through to the attention as is).
PACKED_MODEL_TYPES = ("gpt2", "llama")
ROW_TOKENS = 128  # nodes per packed row (at least the longest sentence)


def token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's leading special tokens (BOS) but no trailing EOS."""
    ids = list(tokenizer(text)["input_ids"])
    eos = tokenizer.eos_token_id
    if len(ids) > 1 and eos is not None and ids[-1] == eos and ids[0] != eos:
        ids = ids[:-1]
    return ids


# --- prefix trees packed into rows ------------------------------------------------------------------------------
@dataclass
class PackedRow:
    """Prefix trees of some sentences in one row: node n holds token ``tokens[n]`` at position ``depth[n]`` and
    attends to the nodes ``ancestors[n]`` (its path from the root, itself included); ``members`` are (sentence
    index, the nodes of its tokens in order)."""

    tokens: list = field(default_factory=list)
    depth: list = field(default_factory=list)
    ancestors: list = field(default_factory=list)
    members: list = field(default_factory=list)


def pack_prefix_trees(sequences: Sequence[Sequence[int]], row_tokens: Optional[int] = None) -> list[PackedRow]:
    """The token sequences packed into rows of at most ``row_tokens`` nodes (None: ``ROW_TOKENS``; at least the
    longest sequence), each distinct prefix of a row one node. Sorted by their ids, a sequence shares with the
    earlier ones of its row at most its common prefix with the one just before it, so one pass builds the trees."""
    budget = max([ROW_TOKENS if row_tokens is None else row_tokens, *(len(s) for s in sequences)])
    rows: list[PackedRow] = []
    previous: list = []
    path: list = []
    for index in sorted(range(len(sequences)), key=lambda i: list(sequences[i])):
        sequence = list(sequences[index])
        shared = 0
        if rows:
            while shared < min(len(sequence), len(previous)) and sequence[shared] == previous[shared]:
                shared += 1
        if not rows or len(rows[-1].tokens) + len(sequence) - shared > budget:
            rows.append(PackedRow())
            shared = 0
        row, path = rows[-1], path[:shared]
        for token in sequence[shared:]:
            path = path + [len(row.tokens)]
            row.tokens.append(token)
            row.depth.append(len(path) - 1)
            row.ancestors.append(path)
        row.members.append((index, path))
        previous = sequence
    return rows


def _packed_nll(model, rows: Sequence[PackedRow], pad_id: int, device, head_chunk: int = 512) -> dict[int, float]:
    """{sentence index: mean NLL of its tokens after the first} of the members of ``rows`` (one forward)."""
    length = max(len(row.tokens) for row in rows)
    dtype = model.get_input_embeddings().weight.dtype
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    allowed = torch.eye(length, dtype=torch.bool).repeat(len(rows), 1, 1)  # padding attends to itself only
    parents, golds, owners = [], [], []  # per scored token: (row, node) predicting it, its id, its sentence
    for r, row in enumerate(rows):
        n = len(row.tokens)
        ids[r, :n], positions[r, :n] = torch.tensor(row.tokens), torch.tensor(row.depth)
        for node, path in enumerate(row.ancestors):
            allowed[r, node, path] = True
        for sentence, path in row.members:
            for before, node in zip(path[:-1], path[1:]):
                parents.append((r, before)), golds.append(row.tokens[node]), owners.append(sentence)
    mask = torch.zeros((len(rows), 1, length, length), dtype=dtype).masked_fill(~allowed[:, None],
                                                                                 torch.finfo(dtype).min)
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                  position_ids=positions.to(device), use_cache=False).last_hidden_state
        unique = sorted(set(parents))
        slot = {p: i for i, p in enumerate(unique)}
        where = torch.tensor(unique, dtype=torch.long).view(-1, 2)
        parent_slot = torch.tensor([slot[p] for p in parents], dtype=torch.long)
        gold = torch.tensor(golds, dtype=torch.long)
        logp = torch.empty(len(parents))
        head = model.get_output_embeddings()
        for start in range(0, len(unique), head_chunk):  # the head's (nodes, vocabulary) logits a chunk at a time
            stop = min(start + head_chunk, len(unique))
            logits = head(hidden[where[start:stop, 0].to(device), where[start:stop, 1].to(device)]).float()
            logits = torch.log_softmax(logits, dim=-1).cpu()
            chosen = (parent_slot >= start) & (parent_slot < stop)
            logp[chosen] = logits[parent_slot[chosen] - start, gold[chosen]]
    totals: dict[int, list] = {sentence: [0.0, 0] for row in rows for sentence, _ in row.members}
    for sentence, value in zip(owners, logp.tolist()):
        totals[sentence][0] -= value
        totals[sentence][1] += 1
    return {sentence: total / max(count, 1) for sentence, (total, count) in totals.items()}


def _padded_nll(model, ids: Sequence[Sequence[int]], pad_id: int, device) -> list[float]:
    """Mean NLL of every sequence's tokens after the first, in one right-padded batch."""
    length = max(len(i) for i in ids)
    batch = torch.full((len(ids), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for r, row in enumerate(ids):
        batch[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), 1
    with torch.no_grad():
        logits = model(input_ids=batch.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch[:, 1:, None].to(device))[..., 0]
    valid = mask[:, 1:].to(device).float()
    return (-(logp * valid).sum(1) / valid.sum(1).clamp(min=1)).tolist()


def packs_prefixes(model) -> bool:
    """Whether ``sentence_nll`` can score ``model`` in packed prefix trees (else padded batches)."""
    config = getattr(model, "config", None)
    return (getattr(config, "model_type", None) in PACKED_MODEL_TYPES
            and getattr(config, "_attn_implementation", None) in ("sdpa", "eager"))


def sentence_nll(model, tokenizer, sentences: Sequence[str], pad_id: int, batch_size: int, device,
                 cache_key: Optional[str] = None, progress: bool = False,
                 packed: Optional[bool] = None) -> dict[str, float]:
    """{sentence: mean NLL of its tokens after the first} under the (unmasked) model. ``packed`` (None: when
    ``packs_prefixes(model)``): shared prefixes computed once, about ``batch_size`` x 16 tokens a forward; False:
    right-padded batches of ``batch_size`` sentences sorted by length. Results are cached in
    $FASTMASK_CACHE/template-nll/<cache_key>.json by sentence (``cache_key``: the model's ``runner.weights_key``),
    so a model scores each sentence once per machine; the cache is written as it fills (a killed run keeps its
    progress)."""
    if packed is None:
        packed = packs_prefixes(model)
    elif packed and not packs_prefixes(model):
        raise ValueError(f"sentence_nll: packed=True needs a model of type {list(PACKED_MODEL_TYPES)} with sdpa or "
                         f"eager attention, got {getattr(model.config, 'model_type', None)!r}")
    cache = (runner_cache.read_json("template-nll", cache_key) if cache_key else None) or {}
    todo = sorted({s for s in sentences if s not in cache}, key=len)
    ids = [token_ids(tokenizer, s) for s in todo]
    if packed:
        rows = pack_prefix_trees(ids)
        per_batch = max(1, batch_size * 16 // max(len(r.tokens) for r in rows)) if rows else 1
        rows.sort(key=lambda r: len(r.tokens))  # similar lengths together: little padding
        batches = [rows[i:i + per_batch] for i in range(0, len(rows), per_batch)]
    else:
        batches = [list(range(i, min(i + batch_size, len(todo)))) for i in range(0, len(todo), batch_size)]
    for number, batch in enumerate(tqdm(batches, desc="template perplexity", disable=not progress or not todo,
                                        leave=False)):
        if packed:
            cache.update((todo[i], value) for i, value in _packed_nll(model, batch, pad_id, device).items())
        else:
            cache.update(zip((todo[i] for i in batch), _padded_nll(model, [ids[i] for i in batch], pad_id, device)))
        if cache_key and (number % 16 == 15 or number + 1 == len(batches)):  # progress survives a kill
            runner_cache.write_json("template-nll", cache_key, cache)
    return {s: cache[s] for s in sentences}


__all__ = ["PACKED_MODEL_TYPES", "token_ids", "PackedRow", "pack_prefix_trees", "packs_prefixes", "sentence_nll"]
