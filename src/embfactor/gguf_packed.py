"""The GGUF architectures transformers loads through its newer path (``transformers.integrations.gguf``: lfm2,
qwen35, qwen35moe), filled one tensor at a time by :func:`~embfactor.gguf_loader.load_gguf_causal_lm`.

That path renames each tensor with the architecture's ``WeightRenaming``\\ s, then runs the matching
``WeightConverter``'s operations on it (``get_gguf_conversion_mapping``): a norm's ``w + 1`` undone, a convolution
kernel unsqueezed, value heads reordered, the experts' gate and up concatenated. The same list drives this loop: the
one-to-one operations run as they are, on the tensor in the type the file stores it in (the norms' ``- 1`` rounds
to it, as there), then it is cast to float32 like the path's final ``Cast``; a concatenation is written in place, each
part dequantized into its slice of the parameter. Any other operation raises
:class:`NeedsTransformers` before the model is touched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from embfactor.fileio import release_mapped_pages
from embfactor.gguf_file import dequantize_into, dequantize_tensor, values_shape

logger = logging.getLogger(__name__)


class NeedsTransformers(Exception):
    """This loop cannot load the file the way transformers does (raised before the model is touched)."""


class _Step(NamedTuple):
    """What to do with one tensor of the file: its model name, the source pattern it matched, the one-to-one
    operations to run on it, or where it goes in a concatenated parameter (``dim``, ``offset``)."""

    tensor: Any
    name: str
    pattern: str | None
    operations: list[Any]
    concat: tuple[int, int] | None


def fill_packed(
    model: nn.Module, tensors: list[Any], architecture: str, path: Path, assign: Callable[..., None]
) -> dict[str, str]:
    """Fill the meta-device ``model`` from the file's ``tensors`` as transformers' newer GGUF path would, each
    finished tensor handed to ``assign(model, name, value, gguf_name, path)``.

    Returns the GGUF → model name map of the tensors it assigned.

    Raises:
        NeedsTransformers: a conversion operation this loop does not reproduce (before any tensor is read).
        CorruptFileError: a tensor that does not fit the model.
    """
    targets = {n for named in (model.named_parameters(remove_duplicate=False), model.named_buffers()) for n, _ in named}
    names = {}
    for step in _plan(model, tensors, architecture):
        if step.name not in targets:  # e.g. qwen35's multi-token-prediction block, which transformers drops
            logger.debug("%s: tensor %r maps to %s, which the model lacks: skipped", path, step.tensor.name, step.name)
            continue
        names[step.tensor.name] = step.name
        if step.concat is not None:
            dim, offset = step.concat
            param = _materialized(model, step.name)
            size = values_shape(step.tensor)[dim]
            dequantize_into(step.tensor, param.data.numpy()[(slice(None),) * dim + (slice(offset, offset + size),)],
                            path)
        else:
            value = _values(step.tensor, path)
            for operation in step.operations:
                (value,) = operation.convert(
                    {step.pattern: [value]}, source_patterns=[step.pattern], target_patterns=[step.name],
                    full_layer_name=step.name,
                ).values()
            assign(model, step.name, value.to(torch.float32).contiguous(), step.tensor.name, path)
        release_mapped_pages(step.tensor.data)
    return names


def packed_names(model: nn.Module, tensor_names: list[str], architecture: str) -> dict[str, str]:
    """GGUF name → model name of each tensor the newer path would load into ``model``."""
    from transformers.core_model_loading import rename_source_key

    renamings, converters = _mapping(model, architecture)
    targets = {n for named in (model.named_parameters(remove_duplicate=False), model.named_buffers()) for n, _ in named}
    names = {gguf: rename_source_key(gguf, renamings, converters)[0] for gguf in tensor_names}
    return {gguf: name for gguf, name in names.items() if name in targets}


def _mapping(model: nn.Module, architecture: str) -> tuple[list[Any], list[Any]]:
    from transformers.core_model_loading import WeightConverter, WeightRenaming
    from transformers.integrations.gguf.utils import get_gguf_conversion_mapping

    mapping = get_gguf_conversion_mapping(architecture, model.config)
    return ([m for m in mapping if isinstance(m, WeightRenaming)], [m for m in mapping if isinstance(m, WeightConverter)])


def _plan(model: nn.Module, tensors: list[Any], architecture: str) -> list[_Step]:
    """Each tensor's step; the offsets of the parts of a concatenation, in the order of its source patterns."""
    from transformers.core_model_loading import Concatenate, rename_source_key
    from transformers.integrations.gguf import gguf_conversion_mapping as conversions

    one_to_one = tuple(getattr(conversions, n) for n in ("SubtractOne", "LogNegate", "Unsqueeze", "PermuteRows",
                                                         "PermuteInputFeatures") if hasattr(conversions, n))
    renamings, converters = _mapping(model, architecture)
    converter_of = {pattern: c for c in converters for pattern in c.source_patterns}
    steps, parts = [], {}
    for tensor in tensors:
        name, pattern = rename_source_key(tensor.name, renamings, converters)
        operations = list(converter_of[pattern].operations) if pattern is not None else []
        concat = None
        if len(operations) == 1 and isinstance(operations[0], Concatenate):
            dim = operations[0].dim % len(values_shape(tensor))
            order = converter_of[pattern].source_patterns.index(pattern)
            parts.setdefault(name, {})[order] = values_shape(tensor)[dim]
            concat, operations = (dim, order), []  # the order becomes an offset below
        elif not all(isinstance(op, one_to_one) for op in operations):
            unknown = next(type(op).__name__ for op in operations if not isinstance(op, one_to_one))
            raise NeedsTransformers(f"transformers converts {tensor.name!r} with {unknown}, not reproduced here")
        steps.append(_Step(tensor, name, pattern, operations, concat))
    return [
        s._replace(concat=(s.concat[0], sum(size for i, size in parts[s.name].items() if i < s.concat[1])))
        if s.concat is not None else s
        for s in steps
    ]


def _values(tensor: Any, path: Path) -> torch.Tensor:
    """The tensor as the newer path hands it to the operations: a quantized one dequantized to float32, a plain one
    (F32, F16, BF16) copied in its own type."""
    from gguf import GGMLQuantizationType as Q

    if tensor.tensor_type in (Q.F32, Q.F16):
        return torch.from_numpy(np.array(tensor.data))
    if tensor.tensor_type == Q.BF16:
        return torch.from_numpy(np.array(tensor.data)).view(torch.bfloat16).reshape(values_shape(tensor))
    return torch.from_numpy(dequantize_tensor(tensor, path))


def _materialized(model: nn.Module, name: str) -> nn.Parameter:
    """The model's parameter ``name``, replaced by a zero float32 one while it is still on the meta device."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    param = module._parameters[leaf]
    if param.is_meta:
        param = nn.Parameter(torch.zeros(param.shape, dtype=torch.float32), requires_grad=param.requires_grad)
        module._parameters[leaf] = param
    return param
