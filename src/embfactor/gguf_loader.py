"""Load a GGUF causal LM in float32, fast and with little more memory than the float32 model itself.

transformers' loader (``from_pretrained(folder, gguf_file=...)``) dequantizes every tensor of the file into a state
dict and only then copies that into the model, so a load holds the model twice (plus numpy temporaries): SmolLM2-135M
peaked at 1.57× its 513 MB float32 size. :func:`load_gguf_causal_lm` builds the model with its parameters on the meta
device and fills it one tensor at a time, each dequantized in row chunks straight into its final buffer, so the peak
is the model plus about one tensor. The metadata is read with :class:`~embfactor.gguf_file.GGUFFile` (gguf's
``GGUFReader`` took ~7 s per read of SmolLM2's vocabulary, and the config read it once more).

Only the loop is ours; what it does to each tensor is transformers' own code, so the weights are bit for bit those
of ``from_pretrained`` (tests/test_gguf_architectures.py checks each architecture):

- the architectures of transformers' first GGUF loader (``modeling_gguf_pytorch_utils``): its config, its GGUF →
  transformers name map (``get_gguf_hf_weights_map``) and the architecture's ``TensorProcessor`` on each tensor
  (Llama's q/k un-permutation, Gemma's and Nemotron's ``norm - 1``, GPT-2's transposes, Bloom's qkv, Mamba's
  ``log(-A)``; what a processor stores aside, like GPT-2's head, is assigned as it comes). The one processor step
  that works across tensors, the MoE processors' stacking of ``ffn_gate_exps`` and ``ffn_up_exps`` into one
  ``gate_up_proj``, is done here: each half is dequantized into its place in the stacked parameter;
- the architectures of its newer GGUF path (``transformers.integrations.gguf``: lfm2, qwen35, qwen35moe): its
  renamings and conversion operations (``get_gguf_conversion_mapping``) on each tensor, a concatenation written
  in place;
- tied weights as ``from_pretrained`` ties them (``tie_weights(missing_keys=...)``): a head absent from the file is
  the embedding; a head present and different stays its own, whatever the config says (Falcon, Bloom).

The dequantization is ``gguf.quants.dequantize`` (numpy, vectorized over blocks), which is what the first path uses
and gives the same values as the newer path's torch code for every type that has (tested). What it cannot do falls
back to ``from_pretrained``, with the reason logged: a quantization type gguf cannot dequantize, a processor or a
conversion operation this loop does not know.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from embfactor.errors import CorruptFileError, ModelNotFoundError, some_names
from embfactor.fileio import release_free_heap, release_mapped_pages
from embfactor.gguf_file import dequantize_into, dequantize_tensor, values_shape

logger = logging.getLogger(__name__)

# GGUF architecture name -> transformers' name for it, where they differ (load_gguf_checkpoint's renames)
_TRANSFORMERS_ARCH = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}


def load_gguf_causal_lm(path: str | os.PathLike) -> nn.Module:
    """A causal LM from a GGUF file, dequantized to float32, equal to transformers' ``from_pretrained`` result.

    Handles every architecture transformers reads from GGUF (see the module docstring) and every quantization type
    ``gguf.quants.dequantize`` knows; anything else falls back to
    ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")``, which needs about twice the
    memory, with the reason logged (``logging.INFO``).

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
    architecture = _field(reader, "general.architecture")
    config = _read_config(path, reader) if reason is None else None
    # The tensors are views of the file's mapping; the reader's metadata objects (one per vocabulary entry and
    # merge) go before the model's weights are materialized. Freed, they stay in the C heap (and would count, under
    # the model, in the peak) until the heap is trimmed.
    tensors = list(reader.tensors)
    del reader
    release_free_heap()
    if config is not None:
        from embfactor.gguf_packed import NeedsTransformers

        try:
            return _load(path, tensors, architecture, *config)
        except NeedsTransformers as e:
            reason = str(e)
    del tensors  # the last views of the file's mapping: it is unmapped here
    release_free_heap()
    logger.info("%s: %s; loading it with transformers' GGUF loader", path, reason)
    return _load_with_transformers(path)


def _load(path: Path, tensors: list[Any], architecture: str, config: Any, config_dict: dict[str, Any]) -> nn.Module:
    model = _empty_model(config, path)
    if _packed_path(architecture):
        from embfactor.gguf_packed import fill_packed

        gguf_names = fill_packed(model, tensors, architecture, path, _assign)
    else:
        gguf_names = _fill(model, tensors, architecture, config_dict, path)
    _tie(model)
    _check_complete(model, path, {hf: name for name, hf in gguf_names.items()})
    model.config.architectures = [type(model).__name__]
    return model.eval()


def open_gguf(path: str | os.PathLike) -> Any:
    """The file's metadata and tensors (:class:`~embfactor.gguf_file.GGUFFile`, laid out as ``gguf.GGUFReader``;
    memory-mapped: no tensor data is read), with a clear error for a bad file.

    Raises:
        ModelNotFoundError: the file cannot be opened.
        CorruptFileError: not a GGUF file, or truncated.
    """
    from embfactor.gguf_file import GGUFFile

    try:
        return GGUFFile(path)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        raise ModelNotFoundError(f"{path}: cannot be opened ({e})") from None
    except Exception as e:  # noqa: BLE001 - a bad header fails in struct, numpy or utf-8 decoding
        raise CorruptFileError(
            f"{path}: not a valid GGUF file, or truncated ({type(e).__name__}: {e}); download or convert it again"
        ) from None


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


def _packed_path(architecture: str) -> bool:
    """Whether transformers loads this architecture through its newer GGUF path (``integrations.gguf``)."""
    try:
        from transformers.integrations.gguf.utils import is_gguf_arch_supported
    except ImportError:  # transformers before the newer path
        return False
    return is_gguf_arch_supported(architecture)


def _stacks_experts(processor: type) -> bool:
    """Whether the processor stacks ``ffn_{gate,up}_exps`` into one ``gate_up_proj`` (:func:`_fill_stacked_half`)."""
    from transformers import modeling_gguf_pytorch_utils as m

    stacking = tuple(getattr(m, n) for n in ("Qwen2MoeTensorProcessor", "MiniMaxM2TensorProcessor") if hasattr(m, n))
    return issubclass(processor, stacking)


def _per_tensor(processor: type) -> bool:
    """Whether the processor's ``process`` works on the tensor it is given alone (what it stores aside, like GPT-2's
    head, is one tensor of the model under its final name): the processors of transformers 5.23, but GPT-OSS's,
    which splits its experts into per-expert tensors no model has (and is never chosen: its key ``gpt_oss`` is not
    the name llama.cpp writes, ``gpt-oss``)."""
    from transformers import modeling_gguf_pytorch_utils as m

    known = ("TensorProcessor", "LlamaTensorProcessor", "Gemma2TensorProcessor", "NemotronTensorProcessor",
             "MambaTensorProcessor", "BloomTensorProcessor", "GPT2TensorProcessor", "T5TensorProcessor",
             "Lfm2TensorProcessor")
    return processor in tuple(getattr(m, n) for n in known if hasattr(m, n)) or _stacks_experts(processor)


def _unsupported(reader: Any) -> str | None:
    """Why this loader cannot load the file the way transformers does, or None when it can."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    architecture = _field(reader, "general.architecture")
    packed = _packed_path(architecture)
    known = {architecture, _TRANSFORMERS_ARCH.get(architecture)} & set(GGUF_SUPPORTED_ARCHITECTURES)
    if not packed and not known:  # transformers raises its own error for it
        return f"architecture {architecture!r} is not one transformers' GGUF loader knows"
    if not packed and not _per_tensor(_processor_class(architecture)):
        processor = _processor_class(architecture).__name__
        return f"architecture {architecture!r} needs {processor}, which works across tensors in a way not reproduced here"
    for qtype in {t.tensor_type for t in reader.tensors}:
        if not _can_dequantize(qtype):
            return f"gguf cannot dequantize {getattr(qtype, 'name', qtype)} tensors"
    return None


@functools.cache
def _can_dequantize(qtype: Any) -> bool:
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return True
    sizes = GGML_QUANT_SIZES.get(qtype)
    try:  # one all-zero block: whether gguf can dequantize this type at all
        if sizes is None:
            raise NotImplementedError
        dequantize(np.zeros((1, sizes[1]), dtype=np.uint8), qtype)
    except Exception:  # noqa: BLE001 - NotImplementedError, or numpy failing on an integer type
        return False
    return True


def _read_config(path: Path, reader: Any = None) -> tuple[Any, dict[str, Any]]:
    """The model config exactly as ``AutoConfig.from_pretrained(folder, gguf_file=name)`` builds it, and its dict.

    The dict (transformers' reading of the GGUF metadata) is what transformers hands the TensorProcessor. The
    metadata is read with :class:`~embfactor.gguf_file.GGUFFile` standing in for ``gguf.GGUFReader`` (``reader``,
    when the file is already open): the same fields, read in a fraction of the time.
    """
    from transformers import PreTrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from embfactor.gguf_file import gguf_reader_replaced

    try:
        folder = str(path.parent)
        with gguf_reader_replaced(reader):
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
    stacked = getattr(processor, "GGUF_MOE_WEIGHTS_PATTERN", None) if _stacks_experts(type(processor)) else None
    aside: dict[str, dict[str, Any]] = {"tensors": {}}  # what a processor stores itself (GPT-2's head, MoE's down)
    for tensor in tensors:
        half = stacked.fullmatch(tensor.name) if stacked is not None else None
        if half is not None and half["w"] in ("gate", "up") and half["name"] in names:
            _fill_stacked_half(model, names[half["name"]], half["w"], tensor, path)
            names[tensor.name] = names[half["name"]]
        else:
            weights = dequantize_tensor(tensor, path)
            result = processor.process(
                weights=weights, name=tensor.name, tensor_key_mapping=names, parsed_parameters=aside
            )
            del weights
            if result.name in names:
                _assign(model, names[result.name], _to_torch(result.weights), tensor.name, path)
            del result
            for hf_name, value in aside["tensors"].items():
                names.setdefault(tensor.name, hf_name)
                _assign(model, hf_name, value.to(torch.float32), tensor.name, path, unexpected_ok=True)
            aside["tensors"].clear()
        release_mapped_pages(tensor.data)  # the file's pages of this tensor are not read again
    return names


def _fill_stacked_half(model: nn.Module, hf_name: str, which: str, tensor: Any, path: Path) -> None:
    """Dequantize an MoE layer's ``ffn_gate_exps`` or ``ffn_up_exps`` (experts × I × H) into its half of the
    model's ``gate_up_proj`` (experts × 2I × H, gate first), as ``Qwen2MoeTensorProcessor._set_moe_expert_tensor``
    does (it starts from zeros: so does this, for a file with one half only)."""
    module_name, _, leaf = hf_name.rpartition(".")
    module = model.get_submodule(module_name)
    param = module._parameters.get(leaf)
    shape = values_shape(tensor)
    if param is None or len(shape) != 3 or tuple(param.shape) != (shape[0], 2 * shape[1], shape[2]):
        raise CorruptFileError(
            f"{path}: tensor {tensor.name!r} of shape {shape} does not fit {type(model).__name__}'s {hf_name} "
            f"({None if param is None else tuple(param.shape)}; the file's metadata and tensors disagree)"
        )
    if param.is_meta:
        param = nn.Parameter(torch.zeros(param.shape, dtype=torch.float32), requires_grad=param.requires_grad)
        module._parameters[leaf] = param
    start = 0 if which == "gate" else shape[1]
    dequantize_into(tensor, param.data.numpy()[:, start : start + shape[1]], path)


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


def _to_torch(weights: np.ndarray) -> torch.Tensor:
    # transformers copies every array (np.copy); ours are fresh from dequantize and reused as they are, except a
    # non-contiguous one (GPT-2's transposes), which np.require copies.
    weights = np.require(weights, requirements=["C_CONTIGUOUS", "WRITEABLE"])
    return torch.from_numpy(weights).to(torch.float32)


def _assign(
    model: nn.Module, name: str, value: torch.Tensor, gguf_name: str, path: Path, *, unexpected_ok: bool = False
) -> None:
    """Make ``value`` the model's parameter (or buffer) ``name``, in place of the meta one.

    ``unexpected_ok``: a name the model lacks is skipped (logged), as ``from_pretrained`` skips an unexpected key.
    """
    module_name, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    old = None if module is None else module._parameters.get(leaf, module._buffers.get(leaf))
    if old is None:
        if unexpected_ok:
            logger.debug("%s: tensor %r maps to %s, which %s lacks: skipped", path, gguf_name, name,
                         type(model).__name__)
            return
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
    architecture = _field(reader, "general.architecture")
    if _packed_path(architecture):
        from embfactor.gguf_packed import packed_names

        names = packed_names(model, [t.name for t in reader.tensors], architecture)
    else:
        with _name_maps_built_once():
            names = get_gguf_hf_weights_map(model, _processor_class(architecture)(config={}))
    # stacked experts are keyed without their ".weight" (Qwen2MoeTensorProcessor.perform_fallback_tensor_mapping)
    found = [(names.get(t.name, names.get(t.name.removesuffix(".weight"))), t.tensor_type.name) for t in reader.tensors]
    return {hf: qtype for hf, qtype in found if hf is not None}


def _tie(model: nn.Module) -> None:
    """Tie the weights as ``from_pretrained`` does after loading: a tied weight absent from the file becomes the one
    present; two present and different stay apart (a Falcon or Bloom file with its own ``output.weight``, which
    transformers' config always ties)."""
    named = (model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    missing = {n for tensors in named for n, t in tensors if t.is_meta}
    model.tie_weights(missing_keys=missing, recompute_mapping=False)


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
