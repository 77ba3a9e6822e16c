"""Masks on disk and back into plain models: save_masks / load_masks, merge, export_pruned.

    files.py         save_masks / load_masks (safetensors + JSON, checksummed, atomic), mask_payload / write_masks
                     (fastmask.distributed's save), read_mask_metadata; the format is described there
    fingerprints.py  the base-model fingerprint stored with the masks, and what differs from a model
    merging.py       merge (bake the masks into the weights), unapply (drop them)
    export.py        export_pruned (merge, then remove the MLP units and attention heads that are off)
    dtensor.py       full_tensor / architecture_name: FSDP2-sharded parameters and modules, without importing
                     torch.distributed

Import from the package: it re-exports every name of the modules (the one-module ``fastmask.io`` had them all).
A test that monkeypatches a function must patch the module whose functions look it up (e.g. ``fastmask.io.files
.fingerprint`` for save_masks), not the package.
"""

from __future__ import annotations

from .export import export_pruned
from .files import FORMAT_VERSION, load_masks, read_mask_metadata, save_masks
from .fingerprints import fingerprint, weights_sha256
from .merging import merge, unapply

# Importable from here too, as from the one-module fastmask.io (fastmask.distributed, the experiments and the tests
# use some of them), though not in __all__.
from .dtensor import architecture_name, full_tensor  # noqa: F401
from .files import FORMAT, MASKS_FILE, META_FILE, PathLike, mask_payload, write_masks  # noqa: F401
from .export import (_ACT_ATTRS, _HEAD_EXPORT_FAMILIES, _INTERMEDIATE_ATTR, _activation,  # noqa: F401
                     _dead_heads, _export_heads, _head_weight_rows, _heads_to_keep,  # noqa: F401
                     _rows, _take_heads, _take_units, _unit_constants)  # noqa: F401
from .files import (_STRUCTURE_DEFAULTS, _STRUCTURE_FIELDS, _fastmask_version, _file_sha256, _paths,  # noqa: F401
                    _read_logits)  # noqa: F401
from .fingerprints import _HASH_CHUNK_BYTES, _fingerprint_differences, _has_module, _parameter_shapes  # noqa: F401
from .merging import _swap_back  # noqa: F401

__all__ = ["save_masks", "load_masks", "read_mask_metadata", "merge", "unapply", "export_pruned", "fingerprint",
           "weights_sha256", "FORMAT_VERSION"]

