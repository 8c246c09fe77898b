"""The rest of a compressed model: every weight besides the embedding table, and how it is stored on disk.

embfactor computes in float32, but it writes the rest in the precision the source had: a bf16/fp16 Hugging Face
folder stays bf16/fp16 and a float32 one float32 (the dtype that holds most of the source's floating bytes, as
transformers loads a checkpoint in one dtype). A GGUF source's weights are quantized blocks that are not a Hugging
Face dtype: each ``nn.Linear`` keeps the precision its tensor had in the file (4-bit and fewer blocks as int4, 5- to
8-bit blocks as int8, :func:`gguf_linear_kinds`), and every other weight (norms, float tensors) is written in bf16,
so the output is never larger than the GGUF for a bf16 rest it did not have (SmolLM2 Q4_1: 226.6 -> 80.7 MB).
``rest="int8"`` / ``"int4"`` store every ``nn.Linear`` weight as integers
(:class:`embfactor.layers.intk_linear.IntKLinear`); the embedding and the head tied to it are already a storage
format and are left alone, as is every tensor of a format.

In memory the rest stays float32, rounded to the stored precision (:func:`store_rest_`), so the model a command
measures is the one it saves; :func:`stored_rest` casts it for the write only. What was chosen travels in the
model's :class:`~embfactor.surgery.meta.CompressionMeta` (``rest``), embfactor.json and the ``quantization_config``,
which rebuilds the integer Linears on load (:func:`build_rest_structure_`).

What a narrower rest means for the rest of embfactor:
  - formats: embfactor's loaders load in the record's ``torch_dtype`` (float32), so a format's output dtype and its
    ``dtype_anchor`` stay float32; ``config.json`` states the rest's dtype, so a plain ``from_pretrained`` builds the
    format with ``dtype=bfloat16`` (its float tensors loaded in bf16, its codes and fp16 scales as stored);
  - the planner's check scores tables on the model before its rest is stored: exact for a bf16/fp16 folder (its
    values are the stored ones), while a GGUF source's bf16 rounding and ``--rest int8/int4`` add their own error to
    the written model (measured in ``benchmarks/results/whole_model_bytes.md``), not to the table's prediction;
  - heal trains float32 copies (integer Linears: their scales, with ``--train-all``), saves the rest in its stored
    form and rounds the model in memory to it (:func:`round_rest_`).
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from embfactor.config import REST_CHOICES
from embfactor.errors import ConfigError, CorruptFileError, SurgeryError
from embfactor.layers.intk_linear import REST_SETTINGS, IntKLinear

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# safetensors' dtype names of floating tensors
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
GGUF_REST_DTYPE = torch.bfloat16


def check_rest(rest: str) -> str:
    """Validate a ``--rest`` choice (before any model is loaded).

    Example:
        >>> check_rest("int8")
        'int8'
    """
    if rest not in REST_CHOICES:
        raise ConfigError(f"rest must be one of {', '.join(REST_CHOICES)}, got {rest!r}")
    return rest


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def safetensors_dtypes(path: Path) -> dict[torch.dtype, int]:
    """Bytes per floating dtype in a safetensors file, read from its header only."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise CorruptFileError(f"{path}: not a readable safetensors header ({e})") from None
    sizes: dict[torch.dtype, int] = {}
    for name, info in header.items():
        dt = _ST_DTYPES.get(info.get("dtype")) if name != "__metadata__" and isinstance(info, dict) else None
        if dt is not None:
            start, stop = info.get("data_offsets", (0, 0))
            sizes[dt] = sizes.get(dt, 0) + stop - start
    return sizes


def source_dtype(source: str | Path | None) -> torch.dtype:
    """The dtype a source stores its weights in: most floating bytes of its safetensors; bf16 for a GGUF file.

    A source without weights files (a model built in memory) counts as float32.

    Example:
        >>> source_dtype("model.gguf")
        torch.bfloat16
    """
    if source is None:
        return torch.float32
    p = Path(source)
    if p.suffix.lower() == ".gguf":
        return GGUF_REST_DTYPE
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else ([p] if p.suffix == ".safetensors" else [])
    sizes: dict[torch.dtype, int] = {}
    for f in files:
        for dt, n in safetensors_dtypes(f).items():
            sizes[dt] = sizes.get(dt, 0) + n
    if not sizes:
        return torch.float32
    dt = max(sizes, key=lambda k: sizes[k])
    return torch.float32 if dt == torch.float64 else dt


def _stored_apart(model: nn.Module) -> set[int]:
    """Ids of the tensors stored in their own dtype: a storage format's, and an IntKLinear's integers and scales."""
    from embfactor.formats import is_row_format

    ids: set[int] = set()
    for m in model.modules():
        if is_row_format(m):
            ids.update(id(t) for t in (*m.parameters(), *m.buffers()))
        elif isinstance(m, IntKLinear):
            ids.update(id(t) for t in (m.weight, m.weight_scale, m.weight_min) if t is not None)
    return ids


def rest_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The floating parameters and persistent buffers of the rest (each shared tensor once)."""
    apart = _stored_apart(model)
    seen: set[int] = set()
    out = []
    for t in (*model.parameters(), *_persistent_buffers(model)):
        if id(t) in apart or id(t) in seen or not t.is_floating_point():
            continue
        seen.add(id(t))
        out.append(t)
    return out


def _persistent_buffers(model: nn.Module) -> Iterator[torch.Tensor]:
    for m in model.modules():
        for name, b in m._buffers.items():
            if b is not None and name not in m._non_persistent_buffers_set:
                yield b


def model_dtype(model: nn.Module, layer: nn.Module) -> torch.dtype:
    """The dtype of the model's own weights: the embedding format may store its tensors narrower (fp16 codebooks).

    transformers' ``model.dtype`` is the first floating parameter's, which is the embedding's when it comes first.
    """
    own = {id(p) for p in layer.parameters()}
    rest = {id(t) for t in rest_tensors(model)}  # not an integer Linear's fp16 scales either
    for p in model.parameters():
        if id(p) not in own and id(p) in rest:
            return p.dtype
    return getattr(layer, "out_dtype", torch.float32)


def rest_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype the rest of a compressed model is stored in (None: not recorded, its in-memory dtype)."""
    from embfactor.surgery.meta import get_meta

    meta = get_meta(model)
    name = (meta.rest or {}).get("dtype") if meta is not None else None
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    return dt if isinstance(dt, torch.dtype) else None


def linears_to_store(model: nn.Module) -> dict[str, nn.Linear]:
    """Every plain ``nn.Linear`` outside a storage format and not sharing the input embedding's weight."""
    from embfactor.formats import is_row_format

    inside = {id(t) for m in model.modules() if is_row_format(m) for t in m.parameters()}
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    shared = getattr(emb, "weight", None) if isinstance(emb, nn.Embedding) else None
    found = {}
    for fqn, m in model.named_modules():
        if type(m) is nn.Linear and id(m.weight) not in inside and m.weight is not shared:
            found[fqn] = m
    return found


def store_rest_(model: nn.Module, rest: str = "auto", *, source: str | Path | None = None) -> dict[str, Any]:
    """Choose how the rest of a compressed model is stored, and make the model in memory equal to it, in place.

    Args:
        model: a model factorized by :func:`~embfactor.surgery.factorize_` (float32).
        rest: ``auto`` (the source's precision: a GGUF's quantized Linears as int4/int8, :func:`gguf_kind`, the
            rest of it in bf16), ``bf16``/``fp16``/``fp32``, or
            ``int8``/``int4`` (every other ``nn.Linear`` weight-only as integers, the rest in the auto precision).
        source: the source's weights file or folder (:func:`source_dtype` reads it for ``auto``).

    Returns:
        What is recorded (``dtype``, ``linear``, ``linear_modules``), plus ``bytes``: the rest's stored bytes.

    Example:
        >>> store_rest_(model, "int8", source="SmolLM2.gguf")["dtype"]   # doctest: +SKIP
        'bfloat16'
    """
    from embfactor.surgery.integration import attach_quantization_config
    from embfactor.surgery.meta import get_meta
    from embfactor.surgery.replace import replace_modules_

    check_rest(rest)
    meta = get_meta(model)
    if meta is None:
        raise SurgeryError(f"{type(model).__name__} is not factorized; store_rest_ stores the rest of a compressed model")
    dtype = _DTYPES.get(rest) or source_dtype(source)
    if rest in REST_SETTINGS:
        kinds = dict.fromkeys(linears_to_store(model), rest)
        if not kinds:
            raise SurgeryError(f"--rest {rest}: {type(model).__name__} has no nn.Linear besides its embedding to store")
    else:  # auto: a GGUF's quantized Linears keep their precision
        kinds = gguf_linear_kinds(source, model) if rest == "auto" and is_gguf(source) else {}
    linears = {k: m for k, m in linears_to_store(model).items() if k in kinds}
    # ---- validated: mutate below
    round_rest_(model, dtype)
    if linears:  # integers of the weights as the precision above stores them (int8 of a GGUF: of its bf16 copy)
        replace_modules_(model, {k: IntKLinear.from_linear(m, **REST_SETTINGS[kinds[k]]) for k, m in linears.items()})
    meta.rest = {"dtype": dtype_name(dtype), "linear": _one_kind(kinds) if linears else None,
                 "linear_modules": sorted(linears)}
    if meta.rest["linear"] == MIXED:
        meta.rest["linear_kinds"] = {k: kinds[k] for k in sorted(linears)}
    attach_quantization_config(model)
    return {**meta.rest, "bytes": rest_bytes(model)}


MIXED = "mixed"  # the record's "linear" when the integer Linears differ in kind ("linear_kinds" names each)


def _one_kind(kinds: dict[str, str]) -> str:
    return next(iter(set(kinds.values()))) if len(set(kinds.values())) == 1 else MIXED


def is_gguf(source: str | Path | None) -> bool:
    return source is not None and Path(source).suffix.lower() == ".gguf"


def gguf_kind(ggml_type: str) -> str | None:
    """How ``--rest auto`` stores a Linear whose GGUF tensor has this ggml type: ``"int4"`` (4 bits per weight or
    fewer: Q4_0/Q4_1/Q4_K, Q3_K, Q2_K, IQ*, TQ*), ``"int8"`` (5 to 8 bits: Q5_*, Q6_K, Q8_*), None (a float
    tensor, kept in the rest's float dtype).

    Example:
        >>> gguf_kind("Q4_1"), gguf_kind("Q6_K"), gguf_kind("F16")
        ('int4', 'int8', None)
    """
    t = ggml_type.upper()
    if t.startswith(("F", "BF")):
        return None
    if t.startswith(("Q5", "Q6", "Q8")):
        return "int8"
    return "int4"  # Q4*, Q3_K, Q2_K, IQ1..IQ4, TQ1/TQ2: 4 bits or fewer


def gguf_linear_kinds(source: str | Path, model: nn.Module) -> dict[str, str]:
    """{Linear fqn: "int4" | "int8"} for each of ``model``'s Linears (:func:`linears_to_store`) whose weight was a
    quantized tensor of the GGUF file ``source`` (:func:`gguf_kind`); float tensors and unmapped Linears absent."""
    from embfactor.gguf_loader import source_tensor_types

    types = source_tensor_types(source, model)
    out = {}
    for fqn in linears_to_store(model):
        kind = gguf_kind(types[f"{fqn}.weight"]) if f"{fqn}.weight" in types else None
        if kind is not None:
            out[fqn] = kind
    return out


def round_rest_(model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Round the rest's values to ``dtype`` (default: its stored dtype) in place, keeping their own dtype.

    What a save then writes is exactly the model in memory (heal calls it after training the rest).
    """
    dtype = dtype or rest_dtype(model)
    if dtype is None:
        return
    with torch.no_grad():
        for t in rest_tensors(model):
            if t.dtype != dtype and t.dtype.itemsize > dtype.itemsize:
                t.copy_(t.to(dtype))


def rest_bytes(model: nn.Module) -> int:
    """Bytes the rest takes on disk: its floating tensors in the stored dtype, plus the integer Linears."""
    dt = rest_dtype(model)
    total = sum(t.numel() * (dt.itemsize if dt is not None else t.element_size()) for t in rest_tensors(model))
    return total + sum(m.num_bytes() for m in model.modules() if isinstance(m, IntKLinear))


@contextlib.contextmanager
def stored_rest(model: nn.Module) -> Iterator[None]:
    """The rest cast to its stored dtype while the block runs (a save), then restored as it was."""
    dt = rest_dtype(model)
    params = [t for t in rest_tensors(model) if dt is not None and t.dtype != dt]
    before = [t.data for t in params]
    try:
        for t in params:
            t.data = t.data.to(dt)
        yield
    finally:
        for t, data in zip(params, before):
            t.data = data


def build_rest_structure_(model: nn.Module, rest: dict[str, Any], *, dtype: torch.dtype | None = None) -> None:
    """Swap the Linears a saved model stored as integers for empty IntKLinears (before its weights load)."""
    from embfactor.surgery.replace import replace_modules_

    kind, names = rest.get("linear"), rest.get("linear_modules") or []
    if not names:
        return
    kinds = rest.get("linear_kinds") if kind == MIXED else dict.fromkeys(names, kind)
    if not isinstance(kinds, dict) or any(kinds.get(n) not in REST_SETTINGS for n in names):
        bad = kind if kind != MIXED else (kinds or {})
        raise CorruptFileError(f"rest linear {bad!r} is not one of {', '.join(REST_SETTINGS)} (or {MIXED!r} with "
                               "linear_kinds naming one for each of linear_modules)")
    new = {}
    for fqn in names:
        try:
            m = model.get_submodule(fqn)
        except AttributeError:
            m = None
        if type(m) is not nn.Linear:
            raise CorruptFileError(
                f"rest linear_modules names {fqn!r}, which in {type(model).__name__} is "
                f"{type(m).__name__ if m is not None else 'absent'}, not an nn.Linear"
            )
        device = m.weight.device
        new[fqn] = IntKLinear(m.in_features, m.out_features, m.bias is not None, device=device,
                              dtype=dtype or m.weight.dtype, **REST_SETTINGS[kinds[fqn]])
    replace_modules_(model, new)
