"""upgrade_folder: rewrite an embfactor 0.1.0 output so that transformers' ``from_pretrained`` loads it.

Sits above :mod:`embfactor.models` and :mod:`embfactor.surgery.io` (it loads and saves through them), so that the
loaders below never import it back.
"""

from __future__ import annotations

import os
from pathlib import Path


def upgrade_folder(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Rewrite a folder written by embfactor 0.1.0 (no ``quantization_config``) so that ``from_pretrained`` loads it.

    The model is loaded the way 0.1.0 folders still load (structure from embfactor.json, older tensor names
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
