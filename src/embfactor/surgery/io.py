"""Save and load factorized models: safetensors + config JSON, written atomically, rebuilt without re-decomposing."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from embfactor.config import CONFIG_FORMAT_VERSION, FactorizationConfig
from embfactor.errors import CorruptFileError, ModelNotFoundError, SurgeryError, UnknownMethodError
from embfactor.fileio import MARKER_FILE, atomic_directory, is_temporary_dir
from embfactor.formats import get_format
from embfactor.surgery.factorize import as_module
from embfactor.surgery.replace import apply_structure_
from embfactor.surgery.hfconfig import HF_CONFIG_FILE, read_model_config, without_absent_pooler
from embfactor.surgery.meta import CompressionMeta, get_meta, set_meta
from embfactor.surgery.rest import dtype_name, model_dtype, rest_dtype, stored_rest
from embfactor.surgery.card import write_card
from embfactor.surgery.share import guard_keys, guard_tensors, write_loader

WEIGHTS_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
# the metadata fields every record has (report and extra are optional)
_META_KEYS = ("embedding_module", "head_module", "tied_head", "rank", "method", "factorization")


def save_compressed(
    model: nn.Module | Any,
    directory: str | os.PathLike,
    *,
    tokenizer: Any = None,
    extra: dict[str, Any] | None = None,
    inputs: tuple[str | os.PathLike, ...] = (),
    files: dict[str, bytes] | None = None,
    modules_from: str | os.PathLike | None = None,
    verify: Callable[[Path], Any] | None = None,
    weights: Callable[[Path], Any] | None = None,
) -> Path:
    """Write a factorized model to ``directory``: model.safetensors, config.json, embfactor.json (+ tokenizer).

    The folder is written under a temporary name and renamed into place, so an interrupted save leaves any
    earlier output intact. An existing folder is replaced only if it is an earlier embfactor output.

    Args:
        model: a model factorized by :func:`factorize_` (or loaded by :func:`load_compressed`), or what
            :func:`embfactor.load_model` returns after :func:`factorize_` (its tokenizer is saved too).
        tokenizer: saved alongside (``save_pretrained``) so the folder is a complete model that every
            ``embfactor`` command accepts; default: the tokenizer of a ``load_model`` result.
        verify: called with the complete temporary folder before it is renamed into place (a
            :class:`embfactor.verify.Verifier`); if it raises, nothing is written.
        extra: more JSON-serializable facts to record in embfactor.json (e.g. the source model name).
        inputs: paths the output must not overwrite (the source model's folder).
        files: more files (name -> contents) written into the same temporary folder, so they appear in the one
            swap together with the model (heal's classifier and resume state): never a model without them.
        modules_from: a sentence-transformers folder whose modules (modules.json, pooling, normalization, prompts)
            the output keeps; default: the folder :func:`embfactor.load_model` loaded the model from.
        weights: writes the weight files into the temporary folder in place of ``model``'s (the table-only path),
            called with the folder and the guard tensors to store beside the table (:mod:`embfactor.surgery.share`).

    Example:
        >>> save_compressed(model, "out/minilm-r6", tokenizer=tok)   # doctest: +SKIP
    """
    from embfactor.surgery.st_folder import SOURCE_ATTR, copy_sentence_transformers_files

    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None) if not isinstance(model, nn.Module) else None
    model = as_module(model, "save_compressed")
    meta = get_meta(model)
    if meta is None:
        raise SurgeryError(f"{type(model).__name__} is not factorized; call embfactor.factorize_(model, ...) first")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_file"):
        raise SurgeryError("save_compressed needs a Hugging Face model (with a .config) to rebuild it on load")
    architecture = type(model).__name__
    record = {**_record(model, meta, architecture), **(extra or {})}
    stored = rest_dtype(model)
    with atomic_directory(directory, inputs=inputs) as tmp:
        with stored_rest(model):  # the rest in the precision it is stored in (the source's, or --rest's)
            (weights or _model_weights(model))(tmp, guard_tensors(meta))
        config.architectures = [architecture]
        # the model's dtype, stated (else from_pretrained takes the file's first floating tensor, maybe a format's fp16
        # storage): the stored rest's (a bf16 source loads as bf16); embfactor's loaders use the record's torch_dtype
        config.dtype = dtype_name(stored) if stored is not None else record["torch_dtype"]
        _write_config(model, config, tmp / HF_CONFIG_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _write_files(tmp, files or {})
        source = modules_from or getattr(model, SOURCE_ATTR, None)
        copy_sentence_transformers_files(source, tmp)
        _write_record(tmp, record, verify)
        source = source or (inputs[0] if inputs else None)  # the card keeps the source's card
        write_card(tmp, record, source=Path(source) if source is not None else None)
    return Path(directory)


def _record(model: nn.Module, meta: CompressionMeta, architecture: str) -> dict[str, Any]:
    """embfactor.json's fields: the table's format and shape, the versions, the compression record."""
    from embfactor import __version__

    layer = model.get_submodule(meta.embedding_module)
    return {
        "layer_type": layer.layer_type,
        "layer_config": layer.format_config(),
        "vocab_size": layer.num_embeddings,
        "hidden_size": layer.embedding_dim,
        "padding_idx": layer.padding_idx,
        "format_version": CONFIG_FORMAT_VERSION,
        "embfactor_version": __version__,
        "architecture": architecture,
        "torch_dtype": str(model_dtype(model, layer)).removeprefix("torch."),
        **meta.to_record(),
    }


def _write_config(model: nn.Module, config: Any, path: Path) -> None:
    """config.json with the quantization_config (transformers' from_pretrained rebuilds the format through
    embfactor.hf's registered quantizer) and the auto_map of the shipped loader (trust_remote_code=True loads the
    folder without embfactor)."""
    from embfactor.surgery.integration import attach_quantization_config

    attach_quantization_config(model)
    path.write_text(write_loader(path.parent, config), encoding="utf-8")


def _model_weights(model: nn.Module) -> Callable[[Path, dict[str, torch.Tensor]], None]:
    """Writes ``model``'s state and the guard tensors as model.safetensors (shared tensors once)."""
    from embfactor import __version__

    return lambda tmp, guards: save_state(model.state_dict(), tmp / WEIGHTS_FILE, guards,
                                          metadata={"format": "pt", "embfactor_version": __version__})


def save_state(state: dict[str, torch.Tensor], path: Path, extra: dict[str, torch.Tensor],
               metadata: dict[str, str]) -> None:
    """``state`` plus ``extra`` as one safetensors file, each tensor shared by several names stored once (as
    safetensors' ``save_model`` does; the dropped names are recorded in the metadata)."""
    from safetensors.torch import _remove_duplicate_names, save_file

    state, metadata = dict(state), dict(metadata)
    for kept, dropped in _remove_duplicate_names(state).items():
        for name in dropped:
            metadata.setdefault(name, kept)
            del state[name]
    clash = set(state) & set(extra)
    if clash:
        raise SurgeryError(f"the model already has tensors named {sorted(clash)}; they would be overwritten")
    save_file({k: v.contiguous() for k, v in {**state, **extra}.items()}, str(path), metadata=metadata)


def _write_files(tmp: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        if Path(name).name != name or name in (WEIGHTS_FILE, HF_CONFIG_FILE, MARKER_FILE):
            raise SurgeryError(f"extra file name {name!r} must be a plain file name other than the model's own")
        (tmp / name).write_bytes(data)


def _write_record(tmp: Path, record: dict[str, Any], verify: Callable[[Path], Any] | None) -> None:
    """embfactor.json, then the check of the complete folder; its figure is recorded too (for inspect and /info)."""
    (tmp / MARKER_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    verified = verify(tmp) if verify is not None else None
    if isinstance(verified, dict):
        record["verified"] = verified
        (tmp / MARKER_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")


def read_record(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and validate embfactor.json of a compressed model folder."""
    directory = Path(directory)
    path = directory / MARKER_FILE
    if not directory.is_dir():
        raise ModelNotFoundError(f"no such folder: {directory}")
    if is_temporary_dir(directory):
        raise ModelNotFoundError(f"{directory} is the temporary folder of an interrupted save: incomplete; delete it")
    if not path.is_file():
        raise ModelNotFoundError(f"{directory} is not an embfactor output: {MARKER_FILE} is missing")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise CorruptFileError(f"{path}: expected a JSON object")
    if record.get("format_version") != CONFIG_FORMAT_VERSION:
        raise CorruptFileError(
            f"{path}: format_version {record.get('format_version')!r} is not supported "
            f"(this embfactor reads {CONFIG_FORMAT_VERSION})"
        )
    missing = [k for k in ("architecture", "layer_type", "layer_config", *_META_KEYS) if k not in record]
    if missing:
        raise CorruptFileError(f"{path}: missing fields {missing}")
    if not isinstance(record["rank"], int) or record["rank"] < 1:
        raise CorruptFileError(f"{path}: rank must be a positive integer, got {record['rank']!r}")
    FactorizationConfig.from_dict(record["factorization"], source=str(path))
    return record


def load_compressed(directory: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_compressed` and load its weights (strict; safetensors only).

    The model is loaded by transformers' ``from_pretrained`` through embfactor's registered quantizer (the same path
    ``AutoModel.from_pretrained(directory)`` takes), with the structure read from embfactor.json. Folders written
    before config.json carried a ``quantization_config`` (embfactor 0.1.0) are rebuilt as 0.1.0 did. Nothing is
    decomposed again.

    Example:
        >>> model = load_compressed("out/minilm-r6")   # doctest: +SKIP
    """
    from embfactor.surgery.loading import embfactor_quantization_config, from_pretrained_compressed

    directory = Path(directory)
    record = read_record(directory)
    for name in (WEIGHTS_FILE, HF_CONFIG_FILE):
        if name == WEIGHTS_FILE and (directory / SHARD_INDEX).is_file():  # a sharded output (the table-only path)
            continue
        if not (directory / name).is_file():
            raise ModelNotFoundError(f"{directory / name} is missing; the folder is not a complete embfactor output")
    if embfactor_quantization_config(directory) is not None:
        model = from_pretrained_compressed(directory, record)
    else:  # written by embfactor 0.1.0, before config.json carried a quantization_config
        model = _load_without_quantization_config(directory, record, device)
    check_record_against_model(directory, record, model)
    model.to(device)
    model.eval()
    set_meta(model, CompressionMeta.from_record(record, source=str(directory / MARKER_FILE)))
    return model


def check_record_against_model(directory: Path, record: dict[str, Any], model: nn.Module) -> None:
    """Refuse an embfactor.json whose rank or sizes disagree with the embedding the weights built."""
    layer = model.get_submodule(record["embedding_module"])
    # strict loading has checked the tensors' shapes against layer_config, so its rank is the stored factors' rank
    stored_rank = record["layer_config"].get("rank") if isinstance(record["layer_config"], dict) else None
    if stored_rank is not None and stored_rank != record["rank"]:
        raise CorruptFileError(
            f"{directory / MARKER_FILE}: rank {record['rank']} disagrees with the stored factors, which have rank "
            f"{stored_rank} ({directory / WEIGHTS_FILE}); the files belong to different saves"
        )
    for key, actual in (("vocab_size", layer.num_embeddings), ("hidden_size", layer.embedding_dim)):
        if key in record and record[key] != actual:
            raise CorruptFileError(
                f"{directory / MARKER_FILE}: {key} {record[key]!r} disagrees with the stored embedding ({actual})"
            )


def _load_without_quantization_config(directory: Path, record: dict[str, Any], device: str | torch.device) -> nn.Module:
    """Rebuild the model from embfactor.json alone and load_state_dict (strict), as embfactor 0.1.0 did.

    Kept for folders written before config.json carried a ``quantization_config``: ``load_state_dict`` lets a
    format map its older tensor names (the block format's ``U.<b>`` keys). ``embfactor.pipeline.upgrade.upgrade_folder``
    rewrites such a folder so that transformers' ``from_pretrained`` loads it too.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_model

    config, cls, dtype = read_model_config(directory, record)
    try:
        model = cls._from_config(config, dtype=dtype) if hasattr(cls, "_from_config") else cls(config)
    except (ValueError, TypeError, AttributeError, ZeroDivisionError, IndexError, KeyError) as e:
        raise CorruptFileError(
            f"{directory / HF_CONFIG_FILE}: {record['architecture']} cannot be built from it ({type(e).__name__}: {e})"
        ) from None
    try:
        layer_cls = get_format(record["layer_type"])
        dense = model.get_submodule(record["embedding_module"])
        new = layer_cls.empty(
            dense.num_embeddings, dense.embedding_dim, dense.padding_idx, **record["layer_config"], dtype=dtype
        )
        apply_structure_(
            model,
            embedding_module=record["embedding_module"],
            new_embedding=new,
            tied_head=bool(record["tied_head"]),
            head_module=record["head_module"],
            embed_scale=record.get("embed_scale"),
            shared_modules=record.get("shared_modules"),
        )
    except (SurgeryError, AttributeError, TypeError, UnknownMethodError) as e:
        raise CorruptFileError(f"{directory / MARKER_FILE}: does not match the model in config.json ({e})") from None
    try:
        with safe_open(str(directory / WEIGHTS_FILE), "pt") as fh:
            stored = set(fh.keys())
        without_absent_pooler(model, set(model.state_dict()) - stored)
        missing, unexpected = load_model(model, str(directory / WEIGHTS_FILE), strict=False, device=str(device))
    except (SafetensorError, OSError) as e:
        raise CorruptFileError(f"{directory / WEIGHTS_FILE}: corrupt or truncated safetensors file ({e})") from None
    except RuntimeError as e:
        raise CorruptFileError(f"{directory / WEIGHTS_FILE}: weights do not match the model structure ({e})") from None
    guards = set(guard_keys(CompressionMeta.from_record(record)))  # a folder written since the guards (share.py)
    unexpected = sorted(set(unexpected) - guards)
    if missing or unexpected:
        raise CorruptFileError(f"{directory / WEIGHTS_FILE}: weights do not match the model structure (missing "
                               f"{sorted(missing)}, unexpected {unexpected})")
    return model
