"""What makes a compressed folder safe to hand to code that never imports embfactor.

transformers skips a ``quant_method`` it does not know and initializes every tensor the checkpoint lacks at random,
so a plain ``from_pretrained`` of a compressed folder would run with a random table. Every folder embfactor writes
therefore carries:

- **guard tensors**: a zero-size tensor under each dense name of the table (``<embedding>.weight``, and the tied or
  shared modules' names). Without embfactor, transformers finds a tensor of the wrong shape there and raises (a size
  mismatch is an error unless ``ignore_mismatched_sizes=True``), and its load report lists a tensor whose name
  (:data:`GUARD_NOTE`) says how to load the folder. embfactor's quantizer ignores them.
- **the shipped loader**: ``embfactor_remote.py`` (:mod:`embfactor.surgery.remote_code`, plain PyTorch) and an
  ``auto_map`` in config.json, so ``from_pretrained(folder, trust_remote_code=True)`` decodes the table on a
  machine without embfactor. ``model_type`` stays the architecture's own: transformers.js, sentence-transformers
  and ONNX tools read it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from embfactor.surgery import remote_code
from embfactor.surgery.meta import CompressionMeta
from embfactor.surgery.qconfig import EmbfactorConfig

REMOTE_FILE = "embfactor_remote.py"
GUARD_NOTE = remote_code.GUARD_NOTE


def guard_keys(meta: CompressionMeta | EmbfactorConfig) -> list[str]:
    """The dense tensor names a plain transformers load would look for the table under, and the note's (``meta``:
    the model's record or its quantization_config; both name the embedding, head and shared modules)."""
    names = [meta.embedding_module, *(meta.shared_modules or {})]
    if meta.tied_head and meta.head_module:
        names.append(meta.head_module)
    return [*dict.fromkeys(f"{n}.weight" for n in names), GUARD_NOTE]


def guard_tensors(meta: CompressionMeta) -> dict[str, torch.Tensor]:
    """Zero-size tensors under :func:`guard_keys` (0 bytes of data each)."""
    return {k: torch.zeros(0, dtype=torch.uint8) for k in guard_keys(meta)}


def is_guard(key: str) -> bool:
    """Whether ``key`` of a checkpoint is the note tensor (the dense names are the model's own)."""
    return key == GUARD_NOTE


def auto_map(config: Any) -> dict[str, str]:
    """config.json's ``auto_map``: each transformers Auto class that can build ``config``'s architecture -> the
    shipped loader's class of the same name."""
    import transformers

    out = {}
    for name in remote_code.AUTO_CLASSES:
        auto = getattr(transformers, name, None)
        mapping = getattr(auto, "_model_mapping", None)
        try:
            fits = mapping is not None and type(config) in mapping
        except (KeyError, AttributeError, ValueError):  # a lazy mapping entry whose class is not importable
            fits = False
        if fits:
            out[name] = f"{Path(REMOTE_FILE).stem}.{name}"
    return out


def write_loader(folder: Path, config: Any) -> str:
    """Ship :mod:`embfactor.surgery.remote_code` as ``embfactor_remote.py`` in ``folder`` and return ``config`` as
    the config.json text that names it (its ``auto_map``), so the config is written once."""
    (folder / REMOTE_FILE).write_text(Path(remote_code.__file__).read_text(encoding="utf-8"), encoding="utf-8")
    data = json.loads(config.to_json_string())
    data["auto_map"] = {**(data.get("auto_map") or {}), **auto_map(config)}
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
