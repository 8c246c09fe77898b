"""Table-only compression: the embedding of a safetensors checkpoint larger than memory, the rest copied unchanged.

``compress`` loads the whole model in float32 (an 8B checkpoint: 32 GB) to plan with a check on the model. For a
checkpoint that will not fit, this path reads only the embedding table (memory-mapped, in its stored dtype) from
the shard that holds it, plans its tiers with the proxy alone (no model to check plans on: the report says so),
and writes an output folder whose other tensors are copied byte for byte, shard by shard, a tensor at a time: a
bf16 tensor stays bf16 and no shard is ever in memory whole. The output is the same kind of folder ``compress``
writes (config.json with the quantization_config, embfactor.json, the tokenizer), sharded like its source, and
loads with ``from_pretrained`` after ``import embfactor``.

The model's structure comes from its config.json, built on the meta device (no memory); the format replaces its
embedding there exactly as in a loaded model, so the folder's records are written by the same code.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embfactor.errors import ConfigError, CorruptFileError, ModelNotFoundError
from embfactor.surgery.io import SHARD_INDEX
from embfactor.surgery.io import WEIGHTS_FILE as SINGLE_FILE
from embfactor.surgery.share import is_guard

# safetensors dtype names -> (numpy storage dtype, torch dtype); bf16 and fp8 are read as raw bytes and viewed
ST_DTYPES: dict[str, tuple[Any, torch.dtype]] = {
    "F64": (np.float64, torch.float64), "F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
    "BF16": (np.uint16, torch.bfloat16), "I64": (np.int64, torch.int64), "I32": (np.int32, torch.int32),
    "I16": (np.int16, torch.int16), "I8": (np.int8, torch.int8), "U8": (np.uint8, torch.uint8),
    "BOOL": (np.bool_, torch.bool), "F8_E4M3": (np.uint8, torch.float8_e4m3fn), "F8_E5M2": (np.uint8, torch.float8_e5m2),
}
TORCH_TO_ST = {t: name for name, (_, t) in ST_DTYPES.items()}
COPY_CHUNK = 64 << 20  # bytes copied at a time from a source shard to its output


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header, offset of the data) of a safetensors file; CorruptFileError names the file when it is not one."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CorruptFileError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 << 20:
                raise CorruptFileError(f"{path}: not a safetensors file (header length {n:,} bytes)")
            header = json.loads(fh.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header, 8 + n


@dataclass
class Checkpoint:
    """A safetensors checkpoint folder (one file or shards with an index): where each tensor is, read lazily."""

    folder: Path
    weight_map: dict[str, str]  # tensor name -> shard file name
    shards: list[str]  # shard file names in order
    headers: dict[str, tuple[dict[str, Any], int]]  # shard -> (header, data offset)

    @property
    def sharded(self) -> bool:
        return (self.folder / SHARD_INDEX).is_file() and not (self.folder / SINGLE_FILE).is_file()

    def info(self, name: str) -> dict[str, Any]:
        return self.headers[self.weight_map[name]][0][name]

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` memory-mapped from its shard (no copy; pages are read as they are touched)."""
        shard = self.weight_map[name]
        header, start = self.headers[shard]
        info = header[name]
        if info["dtype"] not in ST_DTYPES:
            raise CorruptFileError(f"{self.folder / shard}: tensor {name!r} has dtype {info['dtype']!r}, which "
                                   f"embfactor cannot read (known: {', '.join(ST_DTYPES)})")
        np_dtype, t_dtype = ST_DTYPES[info["dtype"]]
        a, b = info["data_offsets"]
        shape = tuple(info["shape"])
        if b == a:
            return torch.empty(shape, dtype=t_dtype)
        # copy-on-write mapping: writable for torch, never written back to the source
        arr = np.memmap(self.folder / shard, dtype=np_dtype, mode="c", offset=start + a, shape=shape)
        return torch.from_numpy(arr).view(t_dtype)

    def bytes_on_disk(self) -> int:
        return sum((self.folder / s).stat().st_size for s in self.shards)

    def float32_bytes(self) -> int:
        """Bytes of every floating tensor in float32 (what ``compress`` would hold of the model once loaded)."""
        total = 0
        for shard in self.shards:
            for name, info in self.headers[shard][0].items():
                if name != "__metadata__":
                    n = int(np.prod(info["shape"])) if info["shape"] else 1
                    total += n * (4 if info["dtype"].startswith(("F", "BF")) else np.dtype(ST_DTYPES.get(
                        info["dtype"], (np.uint8,))[0]).itemsize)
        return total


def open_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    """The safetensors checkpoint in ``folder``: model.safetensors, or shards listed by model.safetensors.index.json.

    Example:
        >>> ckpt = open_checkpoint("models/llama-8b")                 # doctest: +SKIP
        >>> ckpt.tensor("model.embed_tokens.weight").shape            # doctest: +SKIP
        torch.Size([128256, 4096])
    """
    folder = Path(folder)
    single, index = folder / SINGLE_FILE, folder / SHARD_INDEX
    if single.is_file():
        shards = [SINGLE_FILE]
        headers = {SINGLE_FILE: read_header(single)}
        weight_map = {k: SINGLE_FILE for k in headers[SINGLE_FILE][0] if k != "__metadata__"}
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CorruptFileError(f"{index}: not a safetensors index (needs a 'weight_map' object; {e})") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelNotFoundError(f"{index} lists shards that are missing: {', '.join(missing[:5])}")
        headers = {s: read_header(folder / s) for s in shards}
        for name, shard in weight_map.items():
            if name not in headers[shard][0]:
                raise CorruptFileError(f"{index}: {name!r} is listed in {shard}, which does not hold it")
    else:
        raise ModelNotFoundError(f"{folder}: neither {SINGLE_FILE} nor {SHARD_INDEX}; the table-only path reads "
                                 "safetensors checkpoints")
    return Checkpoint(folder, weight_map, shards, headers)


# --- when the whole model will not fit ------------------------------------------------------------------------------
def available_memory() -> int:
    """Bytes this process can still take: MemAvailable, lowered by an address-space or data limit if one is set."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    for limit in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
        soft, _ = resource.getrlimit(limit)
        if soft != resource.RLIM_INFINITY:
            avail = min(avail, max(0, soft - _used(limit)))
    return int(avail)


def _used(limit: int) -> int:
    # what counts against the limit now: the address space (VmSize) or the data segment (VmData)
    key = "VmSize:" if limit == resource.RLIMIT_AS else "VmData:"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# The full path holds the float32 model plus the planner's working set (measured <= 2.5x the float32 table): a
# model is loaded whole only if that fits in what is available with this margin for the interpreter and libraries.
PLANNER_TABLE_FACTOR = 2.5
MARGIN_BYTES = 1 << 30


def full_load_bytes(ckpt: Checkpoint, table_numel: int) -> int:
    """Peak bytes the full path is expected to take: the float32 model + the planner's working set + a margin."""
    return ckpt.float32_bytes() + int(PLANNER_TABLE_FACTOR * 4 * table_numel) + MARGIN_BYTES


def table_numel(folder: Path, ckpt: Checkpoint) -> int:
    """Values in the model's input embedding, from config.json and the checkpoint (nothing loaded)."""
    from embfactor.surgery.factorize import find_embedding_and_head

    model, _ = meta_model(Path(folder), torch.float32)
    site = find_embedding_and_head(model)
    return int(np.prod(ckpt.info(checkpoint_key(ckpt, site.embedding_module, model))["shape"]))


def output_weight_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the weight files of an output folder (one file or shards)."""
    return open_checkpoint(folder).bytes_on_disk()


# --- writing safetensors a tensor at a time --------------------------------------------------------------------------
@dataclass
class Entry:
    """One tensor of an output shard: copied from a source file's byte range, or written from memory."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    source: tuple[Path, int] | None = None  # (file, absolute offset) to copy nbytes from
    tensor: torch.Tensor | None = None


def write_safetensors(path: Path, entries: Sequence[Entry], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file a tensor at a time (bytes copied in chunks, never a whole shard in memory).

    Returns the bytes of tensor data written.
    """
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for e in entries:
            if e.source is not None:
                with open(e.source[0], "rb") as src:
                    src.seek(e.source[1])
                    left = e.nbytes
                    while left:
                        chunk = src.read(min(COPY_CHUNK, left))
                        if not chunk:
                            raise CorruptFileError(f"{e.source[0]}: truncated (tensor {e.name!r})")
                        out.write(chunk)
                        left -= len(chunk)
            else:
                t = e.tensor.detach().contiguous().cpu()
                out.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        out.flush()
        os.fsync(out.fileno())
    return offset


def format_entries(tensors: dict[str, torch.Tensor]) -> list[Entry]:
    """Entries of in-memory tensors (the format's), each stored once (shared storage written under one name)."""
    out, seen = [], set()
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        if t.dtype not in TORCH_TO_ST:
            raise ConfigError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        out.append(Entry(name, TORCH_TO_ST[t.dtype], tuple(t.shape), t.numel() * t.element_size(), tensor=t))
    return out


def copy_checkpoint(ckpt: Checkpoint, tmp: Path, *, drop: Iterable[str], add: dict[str, torch.Tensor],
                    add_to: str, metadata: dict[str, str]) -> dict[str, str]:
    """Write ``ckpt``'s shards into ``tmp`` (same names) without ``drop`` and with ``add`` in shard ``add_to``.

    Returns the output's weight map. A sharded source gets an index with the new total size.
    """
    drop = set(drop)
    weight_map, total = {}, 0
    for shard in ckpt.shards:
        header, start = ckpt.headers[shard]
        entries = []
        for name, info in header.items():
            if name == "__metadata__" or name in drop:
                continue
            a, b = info["data_offsets"]
            entries.append(Entry(name, info["dtype"], tuple(info["shape"]), b - a, source=(ckpt.folder / shard, start + a)))
        if shard == add_to:
            entries += format_entries(add)
        total += write_safetensors(tmp / shard, entries, metadata)
        weight_map.update({e.name: shard for e in entries})
    if ckpt.sharded:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / SHARD_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


# --- the model's structure without its weights -----------------------------------------------------------------------
def meta_model(folder: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """(model on the meta device, its config) built from ``folder``'s config.json as ``load_model`` would pick it."""
    import transformers
    from transformers import AutoConfig, AutoModel

    from embfactor.surgery.hfconfig import check_model_config
    from embfactor.surgery.st_folder import sentence_transformers_files

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad config
        raise CorruptFileError(f"{folder / 'config.json'}: cannot be read as a transformers config ({e})") from None
    check_model_config(config, folder / "config.json")
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if not isinstance(cls, type) or sentence_transformers_files(folder):
        cls = AutoModel
    with torch.device("meta"):
        model = cls.from_config(config, dtype=dtype) if cls is AutoModel else cls._from_config(config, dtype=dtype)
    return model, config


def checkpoint_key(ckpt: Checkpoint, module_fqn: str, model: Any) -> str:
    """The checkpoint's name for ``module_fqn``'s weight (with or without the model's base prefix)."""
    name = f"{module_fqn}.weight"
    prefix = getattr(model, "base_model_prefix", "") or ""
    for cand in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
        if cand in ckpt.weight_map:
            return cand
    raise CorruptFileError(f"{ckpt.folder}: no tensor {name!r} (the embedding of {type(model).__name__}) in the "
                           f"checkpoint; it holds e.g. {', '.join(list(ckpt.weight_map)[:4])}")


def _renamed(tensors: dict[str, torch.Tensor], model_key: str, ckpt_key: str) -> dict[str, torch.Tensor]:
    """The format's tensors named as the checkpoint names the embedding (with or without the base model's prefix)."""
    if ckpt_key.endswith(model_key):  # the checkpoint's names carry a prefix the model's lack (or none)
        p = ckpt_key[: len(ckpt_key) - len(model_key)]
        return {p + k: v for k, v in tensors.items()}
    p = model_key[: len(model_key) - len(ckpt_key)]
    return {k.removeprefix(p): v for k, v in tensors.items()}


# --- the pipeline ----------------------------------------------------------------------------------------------------
@dataclass
class TableSource:
    """What the table-only path reads: the checkpoint, the model's structure on the meta device with the real table
    in its embedding (a tied head sharing it), the table's name in the checkpoint, and the tokenizer."""

    ckpt: Checkpoint
    model: Any
    site: Any
    key: str
    tokenizer: Any

    @property
    def table(self) -> torch.Tensor:
        return self.site.embedding.weight


def open_table(folder: Path) -> TableSource:
    """The table of the checkpoint in ``folder`` memory-mapped into its model's meta structure (nothing else read)."""
    from transformers import AutoTokenizer

    from embfactor.surgery.factorize import find_embedding_and_head

    ckpt = open_checkpoint(folder)
    # the model's own dtype: that of most of its floating tensors on disk (bf16 stays bf16)
    floats = [ST_DTYPES[i["dtype"]][1] for i in map(ckpt.info, ckpt.weight_map) if i["dtype"] in ST_DTYPES]
    floats = [d for d in floats if d.is_floating_point]
    model, _ = meta_model(folder, max(set(floats), key=floats.count) if floats else torch.float32)
    site = find_embedding_and_head(model)
    key = checkpoint_key(ckpt, site.embedding_module, model)
    E = ckpt.tensor(key)
    if tuple(E.shape) != (site.embedding.num_embeddings, site.embedding.embedding_dim):
        raise CorruptFileError(f"{folder}: {key} is {tuple(E.shape)}, config.json says "
                               f"{(site.embedding.num_embeddings, site.embedding.embedding_dim)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - tokenizers raise many types
        raise ModelNotFoundError(f"{folder}: no usable tokenizer for the token counts ({e})") from None
    site.embedding.weight = torch.nn.Parameter(E, requires_grad=False)
    if site.tied:
        site.head.weight = site.embedding.weight
    return TableSource(ckpt, model, site, key, tokenizer)


def write_output(src: TableSource, output: str | os.PathLike) -> None:
    """Save ``src.model`` (its format installed) to ``output``: its shards copied around the format's tensors."""
    from embfactor import __version__
    from embfactor.surgery import get_meta, save_compressed

    own = {k: v for k, v in src.model.state_dict().items() if not v.is_meta}
    drop = {src.key}
    if src.site.tied and src.site.head_module:  # a tied head stored under its own name too is the same table
        drop |= {k for k in src.ckpt.weight_map if k == f"{src.site.head_module}.weight"}
    add = _renamed(own, f"{src.site.embedding_module}.weight", src.key)

    def write_weights(tmp: Path, guards: dict[str, torch.Tensor]) -> None:
        # the table's dense name as the checkpoint spells it, and the note (the tied head's name was dropped above)
        table = f"{src.site.embedding_module}.weight"
        note = {k: v for k, v in guards.items() if is_guard(k)}
        add_all = {**add, **_renamed({table: guards[table]}, table, src.key), **note}
        copy_checkpoint(src.ckpt, tmp, drop=drop, add=add_all, add_to=src.ckpt.weight_map[src.key],
                        metadata={"format": "pt", "embfactor_version": __version__})

    get_meta(src.model).report["bytes_before"] = src.ckpt.bytes_on_disk()
    save_compressed(src.model, output, tokenizer=src.tokenizer, inputs=(src.ckpt.folder,), weights=write_weights,
                    extra={"source_model": str(src.ckpt.folder)}, modules_from=src.ckpt.folder)


def compress_table_only(
    folder: str | os.PathLike,
    config: Any,
    output: str | os.PathLike,
    *,
    texts: Sequence[str] | None = None,
    reason: str = "--table-only",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Plan and write the embedding of the checkpoint in ``folder`` without loading the model (see module doc).

    Args:
        folder: a Hugging Face folder with safetensors weights (one file or shards) and a tokenizer.
        config: a FactorizationConfig asking the planner (``size``).
        output: the output folder (written atomically; an existing one only if it is an embfactor output).
        texts: calibration text for the token counts (default: the bundled Wikipedia extract's training part).
        reason: why this path was taken, recorded in the report.

    Returns:
        The planner's report dict, with ``path``, ``path_reason``, ``check``, ``kind`` and ``stage_seconds``.

    Example:
        >>> r = compress_table_only("llama-8b", FactorizationConfig(size="8x"), "out/llama-8b-8x")  # doctest: +SKIP
        >>> r["path"], r["check"]                                                                    # doctest: +SKIP
        ('table-only', 'proxy')
    """
    import dataclasses

    from embfactor.data.frequency import token_counts
    from embfactor.decomposition import budget_bytes
    from embfactor.models import kind_of
    from embfactor.plan import (
        AUTO, formats_from_options, apply_plan_, calibration_reach, calibration_split, plan_table,
    )

    t0 = time.perf_counter()
    src = open_table(Path(folder))
    stages = {"open": time.perf_counter() - t0}
    E = src.table
    vocab, d = E.shape
    if texts is None:
        from embfactor.data import wiki_split

        texts = wiki_split("train")
    t = time.perf_counter()
    counts = token_counts(src.tokenizer, calibration_split(texts)[0], vocab_size=vocab)
    stages["counting"] = time.perf_counter() - t
    plan, module, plan_stages = plan_table(E, budget_bytes(config.size, vocab, d), counts, check=0,
                                           padding_idx=src.site.embedding.padding_idx, seed=config.seed,
                                           progress=progress, formats=formats_from_options(config.method_options, d))
    stages.update(plan_stages)
    t = time.perf_counter()
    report = apply_plan_(src.model, module, plan, dataclasses.replace(config, method=AUTO),
                         seconds=time.perf_counter() - t0)
    stages["error"] = time.perf_counter() - t
    if progress:
        progress("writing")
    t = time.perf_counter()
    write_output(src, output)
    stages["save"] = time.perf_counter() - t
    report.update(kind=kind_of(src.model), path="table-only", path_reason=reason, check="proxy",
                  calibration=calibration_reach(counts),
                  check_note="table-only: the plan was chosen by the proxy (row errors weighted by token counts); "
                  "no model was loaded to score plans on or to verify the written folder against",
                  stage_seconds={k: round(v, 2) for k, v in stages.items()}, seconds=time.perf_counter() - t0)
    return report


__all__ = [
    "Checkpoint",
    "available_memory",
    "compress_table_only",
    "copy_checkpoint",
    "full_load_bytes",
    "open_checkpoint",
    "write_safetensors",
]
