"""The real GPT-2 byte-level BPE tokenizer, rebuilt once (``gpt2_tokenizer_dir``) from ``gpt2.tiktoken`` of an
installed openai-whisper package or its sdist (fetched with pip into the cache), sha256-checked, into a tokenizer
folder (vocab.json, merges.txt, tokenizer.json) that AutoTokenizer loads."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

from .atomic import _publish_dir
from .cache import cache_dir
from .models import package_dir
from .registry import AssetUnavailable, _unavailable, get

# sha256 of the file, whose bytes are fixed upstream.
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


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
    # tokenizer.json through the `tokenizers` library (its API is the same under transformers 4 and 5); imported
    # here: it comes with transformers, and only this one-time rebuild needs it.
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
