"""embfactor's loader of compressed folders, on top of transformers' ``from_pretrained`` and the registered quantizer.

``embfactor.load`` (Python), every CLI command and the server open a compressed folder here, and this calls the same
``from_pretrained`` a transformers user calls, so a folder one of them accepts, all accept. embfactor adds what
transformers does not check: a readable config, a strict weights file (no tensor missing, none left over), errors
that name the file at fault, and the structure from embfactor.json (so folders written before config.json carried a
``quantization_config`` still load).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from embfactor.errors import CorruptFileError, EmbfactorError, some_names
from embfactor.fileio import MARKER_FILE

WEIGHTS_FILE = "model.safetensors"
HF_CONFIG_FILE = "config.json"


def from_pretrained_compressed(directory: str | os.PathLike, record: dict[str, Any]) -> nn.Module:
    """Load a compressed folder with ``from_pretrained``; the structure comes from ``record`` (embfactor.json).

    Args:
        directory: the folder (config.json, model.safetensors, embfactor.json).
        record: its validated embfactor.json (:func:`embfactor.surgery.io.read_record`).

    Example:
        >>> model = from_pretrained_compressed(folder, read_record(folder))   # doctest: +SKIP
    """
    # importing transformers' quantizer registry registers embfactor's quantizer (the hook `import embfactor`
    # installs, embfactor.hf.hook), which from_pretrained looks up by the record's quant_method
    import transformers.quantizers.auto  # noqa: F401
    from safetensors import SafetensorError

    from embfactor.surgery.hfconfig import read_model_config, without_absent_pooler, without_load_report
    from embfactor.surgery.qconfig import EmbfactorConfig, format_class

    directory = Path(directory)
    marker, weights = directory / MARKER_FILE, directory / WEIGHTS_FILE
    config, cls, dtype = read_model_config(directory, record)
    try:
        qconfig = EmbfactorConfig.from_record(record)
        format_class(qconfig.format)  # an unknown format fails here, naming the valid ones
    except (EmbfactorError, KeyError, TypeError) as e:
        raise CorruptFileError(f"{marker}: does not match the model in config.json ({e})") from None
    # embfactor.json is the record of what was saved; its structure is the one rebuilt (config.json carries the same)
    config.quantization_config = qconfig.to_dict()
    try:
        with without_load_report():
            model, info = cls.from_pretrained(
                str(directory), config=config, dtype=dtype, local_files_only=True, use_safetensors=True,
                output_loading_info=True,
            )
    except SafetensorError as e:
        raise CorruptFileError(f"{weights}: corrupt or truncated safetensors file ({e})") from None
    except (EmbfactorError, AttributeError) as e:  # raised by the quantizer while swapping in the format
        raise CorruptFileError(f"{marker}: does not match the model in config.json ({e})") from None
    except OSError as e:
        raise CorruptFileError(f"{weights}: corrupt or truncated safetensors file ({e})") from None
    except RuntimeError as e:  # shape mismatches between the record's structure and the weights
        raise CorruptFileError(f"{weights}: weights do not match the model structure ({e})") from None
    except (ValueError, TypeError, ZeroDivisionError, IndexError, KeyError) as e:
        # the model's constructor rejects the config (transformers checks little before building)
        raise CorruptFileError(
            f"{directory / HF_CONFIG_FILE}: {record['architecture']} cannot be built from it ({type(e).__name__}: {e})"
        ) from None
    missing = without_absent_pooler(model, set(info.get("missing_keys") or ()))
    problems = []
    if missing:
        problems.append(f"Missing key(s) in state_dict: {some_names(missing)}")
    if info.get("unexpected_keys"):
        problems.append(f"Unexpected key(s) in state_dict: {some_names(sorted(info['unexpected_keys']))}")
    if info.get("mismatched_keys"):
        shown = [f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in info["mismatched_keys"]]
        problems.append(f"size mismatch: {some_names(shown)}")
    if problems:
        raise CorruptFileError(f"{weights}: weights do not match the model structure ({'; '.join(problems)})")
    return model


def embfactor_quantization_config(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The ``quantization_config`` of ``directory/config.json`` when it is embfactor's, else None (never raises).

    A folder written by ``save_pretrained`` of a compressed model has it but no embfactor.json.
    """
    import json

    from embfactor.surgery.qconfig import QUANT_METHOD

    try:
        config = json.loads((Path(directory) / HF_CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    q = config.get("quantization_config") if isinstance(config, dict) else None
    return q if isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD else None


def record_from_quantization_config(q: dict[str, Any]) -> dict[str, Any]:
    """An embfactor.json-like record (what LoadedModel.record holds) for a folder that has only the config."""
    meta = q.get("meta") or {}
    fmt = q.get("format")
    return {
        "layer_type": fmt, "layer_config": q.get("format_config"), "vocab_size": q.get("num_embeddings"),
        "hidden_size": q.get("embedding_dim"), "padding_idx": q.get("padding_idx"),
        "embedding_module": q.get("embedding_module"), "head_module": q.get("head_module"),
        "tied_head": bool(q.get("tied_head")), "embfactor_version": q.get("embfactor_version"),
        "rank": meta.get("rank", (q.get("format_config") or {}).get("rank")), "method": meta.get("method", fmt),
        "factorization": meta.get("factorization", {}), "report": {}, "rest": q.get("rest") or {},
    }
