"""Loading the pretrained Hugging Face models and tokenizers the experiments mask, probe or fine-tune.

transformers is imported here on first use, never at module top: it takes seconds, and ``fastmask run X --help``
needs none of it."""

from __future__ import annotations

from .. import assets


def import_transformers(quiet: bool = False):
    """The transformers module. ``quiet``: its log at errors only, for the callers whose notices are expected (a
    classifier head that is newly initialised, an encoder loaded from a checkpoint of another head)."""
    import transformers

    if quiet:
        transformers.logging.set_verbosity_error()
    return transformers


def load_pretrained(source: str, auto_class: str = "AutoModel", device=None, *, quiet: bool = False, **kwargs):
    """``transformers.<auto_class>.from_pretrained(source, **kwargs)`` in eval mode (dropout off), on ``device``
    (when given). ``auto_class`` may also name a model class (``BertForMaskedLM``)."""
    model = getattr(import_transformers(quiet), auto_class).from_pretrained(source, **kwargs).eval()
    return model if device is None else model.to(device)


def load_tokenizer(source: str, model=None, **kwargs):
    """``AutoTokenizer.from_pretrained(source, **kwargs)``; a GPT-2 checkpoint folder without a tokenizer (``model``
    tells) gets the packaged GPT-2 tokenizer."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, TypeError):
        if model is None or getattr(model.config, "model_type", None) != "gpt2":
            raise
        return AutoTokenizer.from_pretrained(assets.gpt2_tokenizer_dir(), **kwargs)


def pad_token_id(tokenizer) -> int:
    """The tokenizer's padding id, else its end-of-text id (GPT-2 has no padding token), else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def load_model(name: str, auto_class: str, device, **kwargs) -> tuple:
    """(model in eval mode on ``device``, its tokenizer, where it came from) of ``name``: a packaged model, a local
    folder or a hub id (``fastmask.assets.resolve_model``)."""
    source = assets.resolve_model(name)
    model = load_pretrained(source, auto_class, device, **kwargs)
    return model, load_tokenizer(source, model), source


__all__ = ["import_transformers", "load_pretrained", "load_tokenizer", "pad_token_id", "load_model"]

