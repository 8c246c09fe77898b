"""upgrade_folder: rewrite an earlier embfactor output with everything a folder gets today.

A pipeline step: it loads through :mod:`embfactor.models` and saves through :mod:`embfactor.surgery.io`, which never
import it back.
"""

from __future__ import annotations

import os
from pathlib import Path


def upgrade_folder(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Rewrite an earlier embfactor output so that ``from_pretrained`` loads it and code without embfactor cannot
    read it as a random table: 0.1.0 folders (no ``quantization_config``), and folders written before the guard
    tensors, the shipped loader and the model card (:mod:`embfactor.surgery.share`).

    The model is loaded the way such folders still load (structure from embfactor.json, older tensor names
    mapped) and saved again to ``target`` with its tokenizer (if any), sentence-transformers modules and record.

    Example:
        >>> upgrade_folder("old/minilm-r6", "out/minilm-r6")      # doctest: +SKIP
    """
    from embfactor.models import TOKENIZER_FILES, _load_tokenizer
    from embfactor.surgery.io import load_compressed, read_record, save_compressed

    source = Path(source)
    record = read_record(source)
    model = load_compressed(source)
    tokenizer = _load_tokenizer(source) if any((source / f).is_file() for f in TOKENIZER_FILES) else None
    extra = {k: record[k] for k in ("source_model",) if k in record}
    return save_compressed(model, target, tokenizer=tokenizer, extra=extra, inputs=(source,), modules_from=source)
