"""Load a GGUF causal LM in float32 with little more memory than the float32 model itself.

transformers' loader (``from_pretrained(folder, gguf_file=...)``) dequantizes every tensor of the file into a state
dict and only then copies that into the model, so a load holds the model twice (plus numpy temporaries): SmolLM2-135M
peaked at 1.57× its 513 MB float32 size. :func:`load_gguf_causal_lm` builds the model with its parameters on the meta
device and fills it one tensor at a time, each dequantized in row chunks straight into its final buffer, so the peak
is the model plus about one tensor.

Only the loop is ours: the config, the GGUF → transformers name map (``get_gguf_hf_weights_map``) and the per-tensor
processing (the architecture's ``TensorProcessor``, e.g. Llama's q/k un-permutation) are transformers' own functions,
and the dequantization is ``gguf.quants.dequantize``, so the weights are bit for bit those of ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from embfactor.errors import CorruptFileError, ModelNotFoundError, some_names
from embfactor.fileio import release_free_heap, release_mapped_pages

logger = logging.getLogger(__name__)

# Dequantize this many float32 values at a time (16 MB): gguf's numpy dequantization makes a few temporaries of the
# size of its input, which for a whole 49,152×576 embedding would be several hundred MB.
CHUNK_ELEMENTS = 1 << 22


def load_gguf_causal_lm(path: str | os.PathLike) -> nn.Module:
    """A causal LM from a GGUF file, dequantized to float32, equal to transformers' ``from_pretrained`` result.

    Handles the GGUF architectures whose transformers ``TensorProcessor`` works on one tensor at a time and leaves
    the rest of the file alone (llama and the architectures with no processor of their own), and every quantization
    type ``gguf.quants.dequantize`` knows. Anything else (MoE expert stacking, GPT-2's transposes, the architectures
    transformers loads through its newer packed-GGUF path, an unknown quant type) falls back to
    ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")``, which needs about twice the
    memory but loads everything it did before.

    A tied head (no ``output.weight`` in the file) is the same tensor as the input embedding, as after
    ``from_pretrained``. The model is returned in eval mode with ``config.architectures`` set.

    Raises:
        ModelNotFoundError: no such file.
        CorruptFileError: not a GGUF file, truncated, or lacking tensors the model needs.

    Example:
        >>> model = load_gguf_causal_lm(smollm2_path())   # doctest: +SKIP
        >>> model.lm_head.weight is model.model.embed_tokens.weight   # doctest: +SKIP
        True
    """
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: no such GGUF file")
    reader = open_gguf(path)
    reason = _unsupported(reader)
    if reason is not None:
        del reader
        logger.info("%s: %s; loading it with transformers' GGUF loader", path, reason)
        return _load_with_transformers(path)
    architecture = _field(reader, "general.architecture")
    tensors = _tensor_views(reader, path)
    # The reader's metadata fields (one numpy view per vocabulary entry and merge: ~140 MB of small objects for a
    # 49k vocabulary) go before the model's weights are materialized, and so does what reading the config leaves;
    # freed, they stay in the C heap (and would count, under the model, in the peak) until the heap is trimmed.
    del reader
    release_free_heap()
    config, config_dict = _read_config(path)
    release_free_heap()
    model = _empty_model(config, path)
    try:
        gguf_names = _fill(model, tensors, architecture, config_dict, path)
    finally:
        del tensors  # the last views of the file's mapping: it is unmapped here
        release_free_heap()
    model.tie_weights()
    _check_complete(model, path, {hf: name for name, hf in gguf_names.items()})
    model.config.architectures = [type(model).__name__]
    return model.eval()


def open_gguf(path: str | os.PathLike) -> Any:
    """``gguf.GGUFReader`` on ``path`` (memory-mapped: no tensor data is read), with a clear error for a bad file.

    Raises:
        ModelNotFoundError: the file cannot be opened.
        CorruptFileError: not a GGUF file, or truncated (gguf raises ValueError/IndexError/... from numpy).
    """
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        raise ModelNotFoundError(f"{path}: cannot be opened ({e})") from None
    except Exception as e:  # noqa: BLE001 - a bad header fails deep inside numpy with many exception types
        raise CorruptFileError(
            f"{path}: not a valid GGUF file, or truncated ({type(e).__name__}: {e}); download or convert it again"
        ) from None


class MappedTensor(NamedTuple):
    """What the loop needs of a ``gguf.ReaderTensor``: its name, ggml type and data (a view of the mapped file)."""

    name: str
    tensor_type: Any
    data: np.ndarray


def _tensor_views(reader: Any, path: Path) -> list[MappedTensor]:
    """The file's tensors as views of a mapping of their own, so that nothing keeps the reader's objects alive.

    The reader's own views were made among its ~300,000 metadata objects: holding them would pin those objects'
    memory (~40 MB more after the reader is gone).
    """
    blob = np.memmap(path, mode="r")
    return [
        MappedTensor(t.name, t.tensor_type, blob[t.data_offset : t.data_offset + t.n_bytes].view(t.data.dtype)
                   .reshape(t.data.shape))
        for t in reader.tensors
    ]


def _field(reader: Any, key: str) -> Any:
    from transformers.modeling_gguf_pytorch_utils import read_field

    try:
        value = read_field(reader, key)
    except Exception as e:  # noqa: BLE001 - a corrupt field fails in numpy or in utf-8 decoding
        raise CorruptFileError(f"{reader.data.filename}: unreadable GGUF metadata {key!r} ({e})") from None
    return value[0] if value else None


def _processor_class(architecture: str) -> type:
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    return TENSOR_PROCESSORS.get(architecture, TensorProcessor)


def _unsupported(reader: Any) -> str | None:
    """Why this loader cannot load the file the way transformers does, or None when it can."""
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        GGUF_SUPPORTED_ARCHITECTURES,
        LlamaTensorProcessor,
        TensorProcessor,
    )

    architecture = _field(reader, "general.architecture")
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        return f"architecture {architecture!r} is not one transformers' GGUF loader knows"
    with contextlib.suppress(ImportError):  # transformers >= 5.23 loads some architectures through a newer path
        from transformers.integrations.gguf.utils import is_gguf_arch_supported

        if is_gguf_arch_supported(architecture):
            return f"transformers loads architecture {architecture!r} through its packed-GGUF path"
    if _processor_class(architecture) not in (TensorProcessor, LlamaTensorProcessor):
        processor = _processor_class(architecture).__name__
        return f"architecture {architecture!r} needs {processor}, which works across tensors"
    if architecture in ("falcon", "bloom"):  # tied whatever the file holds (load_gguf_checkpoint's exceptions)
        return f"architecture {architecture!r} ties its head in its own way"
    for qtype in {t.tensor_type for t in reader.tensors}:
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            continue
        sizes = GGML_QUANT_SIZES.get(qtype)
        try:  # one all-zero block: whether gguf can dequantize this type at all
            if sizes is None:
                raise NotImplementedError
            dequantize(np.zeros((1, sizes[1]), dtype=np.uint8), qtype)
        except Exception:  # noqa: BLE001 - NotImplementedError, or numpy failing on an integer type
            return f"gguf cannot dequantize {getattr(qtype, 'name', qtype)} tensors"
    return None


def _read_config(path: Path) -> tuple[Any, dict[str, Any]]:
    """The model config exactly as ``AutoConfig.from_pretrained(folder, gguf_file=name)`` builds it, and its dict.

    The dict (transformers' reading of the GGUF metadata) is what transformers hands the TensorProcessor.
    """
    from transformers import PreTrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        folder = str(path.parent)
        config_dict, kwargs = PreTrainedConfig.get_config_dict(
            folder, gguf_file=path.name, local_files_only=True, _from_auto=True, name_or_path=folder
        )
        config = CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict, **kwargs)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for bad metadata
        raise CorruptFileError(f"{path}: its metadata cannot be read as a transformers config ({e})") from None
    return config, config_dict


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create every ``nn.Parameter`` on the meta device; buffers stay real (a rotary ``inv_freq`` is computed here).

    The same as accelerate's ``init_empty_weights(include_buffers=False)``, without needing accelerate.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            param = module._parameters[name]
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _empty_model(config: Any, path: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    try:
        with parameters_on_meta(), no_init_weights():
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except ValueError as e:  # no causal-LM class for this config
        raise CorruptFileError(f"{path}: holds no causal language model transformers can build ({e})") from None


def _fill(
    model: nn.Module, tensors: list[Any], architecture: str, config_dict: dict[str, Any], path: Path
) -> dict[str, str]:
    """Dequantize, process, rename and assign each tensor of the file, one at a time (the loop of transformers'
    ``load_gguf_checkpoint``, writing into the model instead of a state dict). Returns the GGUF → model name map."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    processor = _processor_class(architecture)(config=dict(config_dict))
    with _name_maps_built_once():
        names = get_gguf_hf_weights_map(model, processor)
    side_effects: dict[str, dict[str, Any]] = {"tensors": {}}
    for tensor in tensors:
        weights = dequantize_tensor(tensor, path)
        result = processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=names, parsed_parameters=side_effects
        )
        del weights
        if result.name in names:
            _assign(model, names[result.name], _to_torch(result.weights), tensor.name, path)
        del result
        release_mapped_pages(tensor.data)  # the file's pages of this tensor are not read again
    if side_effects["tensors"]:  # a processor that stores tensors itself: _unsupported should have sent it away
        raise RuntimeError(f"{type(processor).__name__} wrote tensors outside the loop; load {path} with transformers")
    return names


@contextlib.contextmanager
def _name_maps_built_once() -> Iterator[None]:
    """Let ``get_gguf_hf_weights_map`` build gguf's name table once instead of once per submodule.

    It recurses into every submodule (397 for SmolLM2) and calls ``gguf.get_tensor_name_map(arch, n_layers)`` in
    each, which rebuilds the same table every time: 6 of the load's ~15 s. The table is a pure function of its
    arguments and only read, so a cache for the duration of the call gives the same map.
    """
    import gguf

    build = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.cache(build)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = build


def dequantize_tensor(tensor: Any, path: str | os.PathLike = "") -> np.ndarray:
    """One tensor of the file (``gguf.ReaderTensor``, :class:`MappedTensor`) as ``gguf.quants.dequantize`` gives it.

    A quantized tensor is dequantized a few rows at a time into one preallocated float32 array: blocks are
    independent, so the values are the same, without whole-tensor temporaries.
    """
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    data, qtype = tensor.data, tensor.tensor_type
    try:
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) or data.ndim < 2:
            return dequantize(data, qtype)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        rows = data.reshape(-1, data.shape[-1])
        out = np.empty((rows.shape[0], rows.shape[1] // type_size * block_size), dtype=np.float32)
        step = max(1, CHUNK_ELEMENTS // max(out.shape[1], 1))
        for start in range(0, rows.shape[0], step):
            out[start : start + step] = dequantize(rows[start : start + step], qtype)
        return out.reshape(*data.shape[:-1], out.shape[1])
    except (ValueError, IndexError) as e:
        raise CorruptFileError(f"{path}: tensor {tensor.name!r} cannot be dequantized ({e})") from None


def _to_torch(weights: np.ndarray) -> torch.Tensor:
    # transformers copies every array (np.copy); ours are fresh from dequantize and reused as they are, except a
    # read-only view of the file (an F32 tensor) or a non-contiguous one, which np.require copies.
    weights = np.require(weights, requirements=["C_CONTIGUOUS", "WRITEABLE"])
    return torch.from_numpy(weights).to(torch.float32)


def _assign(model: nn.Module, name: str, value: torch.Tensor, gguf_name: str, path: Path) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters.get(leaf) if leaf in module._parameters else module._buffers.get(leaf)
    if old is None:
        raise CorruptFileError(f"{path}: tensor {gguf_name!r} maps to {name}, which {type(model).__name__} lacks")
    if old.shape != value.shape:
        raise CorruptFileError(
            f"{path}: tensor {gguf_name!r} has shape {tuple(value.shape)}, but {type(model).__name__}'s {name} "
            f"needs {tuple(old.shape)} (the file's metadata and tensors disagree)"
        )
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = value


def source_tensor_types(path: str | os.PathLike, model: nn.Module) -> dict[str, str]:
    """The ggml type (``"Q4_1"``, ``"Q8_0"``, ``"F32"``, ...) each of ``model``'s parameters had in the GGUF file at
    ``path``, by the model's parameter name (transformers' GGUF name map, as the load uses); tensors the map does not
    reach are absent. ``model`` may already be compressed: only the names of its layers are read.

    Example:
        >>> source_tensor_types(smollm2_path(), model)["model.layers.0.mlp.up_proj.weight"]   # doctest: +SKIP
        'Q4_1'
    """
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    reader = open_gguf(path)
    processor = _processor_class(_field(reader, "general.architecture"))(config={})
    with _name_maps_built_once():
        names = get_gguf_hf_weights_map(model, processor)
    return {names[t.name]: t.tensor_type.name for t in reader.tensors if t.name in names}


def _check_complete(model: nn.Module, path: Path, gguf_names: dict[str, str]) -> None:
    """Raise if a parameter or buffer is still on the meta device, naming it as the model and as the file would."""
    params = model.named_parameters(remove_duplicate=False)
    buffers = model.named_buffers(remove_duplicate=False)
    missing = {n for named in (params, buffers) for n, t in named if t.is_meta}
    # a tied head is missing only because what it is tied to is: name the latter alone
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    missing -= {target for target, source in tied.items() if source in missing}
    if missing:
        named = [f"{n} ({gguf_names[n]})" if n in gguf_names else n for n in sorted(missing)]
        raise CorruptFileError(
            f"{path}: lacks {len(missing)} of the model's tensors ({some_names(named)}); the file is "
            f"incomplete or its tensors are named for another architecture than {type(model).__name__}"
        )


def _load_with_transformers(path: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype="float32", local_files_only=True
    )
    # A GGUF-loaded model cannot save_pretrained; embfactor saves config + safetensors itself.
    model.config.architectures = [type(model).__name__]
    return model.eval()
