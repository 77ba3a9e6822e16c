"""WikiText-2 for the nm experiment: the training text (the validation split offline: the shared data folder has no
train split), the test text, and consecutive token blocks of them."""

from __future__ import annotations

from typing import Optional

import torch

from ..knowledge.data import DataError, wikitext_text


def texts(lm_source: str, data_dir=None) -> dict:
    """{"train": (text, where from), "test": (text, where from)}. Offline ("local"): train = WikiText-2 valid
    (tokenized form, detokenized), test = the raw test split; hub: wikitext-2-raw-v1 train and test (the knowledge
    experiment's hub "eval" text is the validation split, so the test split is read here)."""
    train = wikitext_text("train", lm_source, data_dir)
    test = wikitext_text("eval", lm_source, data_dir)
    if not test[1].endswith("(WikiText-2 raw test)"):  # the hub: knowledge's eval text is the validation split
        from ... import assets

        rows = assets.hub_dataset("wikitext", "wikitext-2-raw-v1", "test", asset="wikitext-2")
        test = ("".join(rows["text"]), "hub wikitext/wikitext-2-raw-v1 test")
    return {"train": train, "test": test}


def token_blocks(tokenizer, text: str, block_size: int, n_blocks: Optional[int]) -> torch.Tensor:
    """(n, block_size) LongTensor of consecutive tokens of ``text`` (paragraph by paragraph, no special tokens): the
    first ``n_blocks`` blocks, or every whole block for ``n_blocks=None``."""
    needed = None if n_blocks is None else block_size * n_blocks
    ids: list[int] = []
    for paragraph in text.split("\n"):
        if paragraph.strip():
            ids += tokenizer(paragraph + "\n", add_special_tokens=False)["input_ids"]
        if needed is not None and len(ids) >= needed:
            break
    count = len(ids) // block_size if n_blocks is None else n_blocks
    if count < 1 or len(ids) < block_size * count:
        raise DataError(f"WikiText-2: {len(ids)} tokens, fewer than {max(count, 1)} blocks of {block_size}")
    return torch.tensor(ids[: block_size * count], dtype=torch.long).view(count, block_size)


__all__ = ["texts", "token_blocks", "DataError"]
