"""Keep a sentence-transformers model's modules (pooling, normalization, prompts) when a folder is compressed.

A sentence-transformers folder is a Hugging Face folder plus ``modules.json`` (the pipeline: Transformer, Pooling,
Normalize, Dense ...), one subfolder per module with settings (``1_Pooling/config.json``), and
``sentence_bert_config.json`` / ``config_sentence_transformers.json`` (max_seq_length, prompts, similarity
function). The compressed folder keeps all of them, so ``SentenceTransformer(folder)`` runs the same pipeline on the
compressed transformer (which it loads through ``from_pretrained``, hence through embfactor's quantizer).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

# The folder a model was loaded from, recorded by embfactor.load_model so a later save can keep its modules.
SOURCE_ATTR = "embfactor_source"
MODULES_FILE = "modules.json"
ST_CONFIG_FILES = ("sentence_bert_config.json", "config_sentence_transformers.json")


def sentence_transformers_files(source: str | os.PathLike) -> list[str]:
    """The files and module folders (relative to ``source``) that make it a sentence-transformers folder.

    Empty when ``source`` is not one, or when its transformer is not the folder itself (``path`` other than ``""``:
    then the compressed folder, which holds the transformer at its root, could not reuse the pipeline).

    Example:
        >>> sentence_transformers_files(minilm_path())                     # doctest: +SKIP
        ['modules.json', 'sentence_bert_config.json', 'config_sentence_transformers.json', '1_Pooling']
    """
    source = Path(source)
    path = source / MODULES_FILE
    if not path.is_file():
        return []
    try:
        modules = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []  # not a pipeline sentence-transformers could read either: nothing worth keeping
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        return []
    paths = [str(m.get("path", "")) for m in modules]
    transformers_at_root = any(
        p == "" and str(m.get("type", "")).rsplit(".", 1)[-1] == "Transformer" for p, m in zip(paths, modules)
    )
    if not transformers_at_root:
        return []
    keep = [MODULES_FILE, *(f for f in ST_CONFIG_FILES if (source / f).is_file())]
    root = source.resolve()
    for p in paths:
        if not p:
            continue
        sub = (source / p).resolve()
        # only subfolders inside the source (a crafted "../x" must not copy files from elsewhere)
        if sub.parent == root and sub.is_dir():
            keep.append(sub.name)
    return keep


def copy_sentence_transformers_files(source: str | os.PathLike | None, target: str | os.PathLike) -> list[str]:
    """Copy the sentence-transformers modules of ``source`` (if it is such a folder) into ``target``.

    Returns the names copied (empty for a plain Hugging Face source).

    Example:
        >>> copy_sentence_transformers_files(minilm_path(), "out/tmp")    # doctest: +SKIP
        ['modules.json', 'sentence_bert_config.json', 'config_sentence_transformers.json', '1_Pooling']
    """
    if source is None:
        return []
    source, target = Path(source), Path(target)
    names = sentence_transformers_files(source)
    for name in names:
        src = source / name
        if src.is_dir():
            shutil.copytree(src, target / name, dirs_exist_ok=True)
        else:
            shutil.copy2(src, target / name)
    return names
