"""WordNet 3.0 for nltk (``wordnet()``): the database extracted once from Debian's wordnet-base package (fetched with
``apt-get download``, no root) into the cache, its files sha256-checked, with the ``lexnames`` file nltk needs
rebuilt from the package's manual page."""

from __future__ import annotations

import getpass
import gzip
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

from .atomic import _publish_dir
from .cache import cache_dir, check_sha256
from .registry import AssetUnavailable, _unavailable, get

# sha256 of the files whose bytes are fixed upstream.
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
    try:  # nltk: optional (the experiments' extra), and slow to import
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
