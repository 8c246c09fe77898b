"""A GGUF file's metadata and tensor table, read in a fraction of a second: ``gguf.GGUFReader``'s fields and tensors.

``gguf.GGUFReader`` makes a ``numpy.memmap`` view (with its ``__array_finalize__``) for every integer and string of
the metadata, several per vocabulary entry and merge: ~7 s for SmolLM2's 49,152 tokens, and a load read it three
times (the loader, the config, the tokenizer's config). :class:`GGUFFile` walks the same bytes with ``struct`` and
builds the same structure (:class:`GGUFField` with gguf's ``parts`` / ``data`` / ``types`` layout, tensors with
gguf's ``name`` / ``tensor_type`` / ``data``), so that transformers' own readers of a ``GGUFReader`` (``read_field``,
``load_gguf_checkpoint``) give the same values from it: :func:`gguf_reader_replaced` hands it to them.

Example:
    >>> f = GGUFFile(smollm2_path())   # doctest: +SKIP
    >>> f.fields["general.architecture"].contents(), f.tensors[0].name   # doctest: +SKIP
    ('llama', 'token_embd.weight')
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
import sys
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from embfactor.errors import CorruptFileError

# Dequantize this many float32 values at a time (16 MB): gguf's numpy dequantization makes a few temporaries of the
# size of its input, which for a whole 49,152×576 embedding would be several hundred MB.
CHUNK_ELEMENTS = 1 << 22
# Threads dequantizing the chunks of one tensor: the cores this process may run on (at most 4)
THREADS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)

# GGUFValueType: the fixed-size scalar types and their numpy dtypes (gguf's GGUFReader.gguf_scalar_to_np)
_SCALARS = {0: "u1", 1: "i1", 2: "u2", 3: "i2", 4: "u4", 5: "i4", 6: "f4", 7: "?", 10: "u8", 11: "i8", 12: "f8"}
_STRING, _ARRAY = 8, 9
_VERSIONS = (2, 3)
# ggml types stored as plain values (F16, F32, F64, I8, I16, I32, I64); every other type is read as bytes
_VALUE_DTYPES = {1: "f2", 0: "f4", 28: "f8", 24: "i1", 25: "i2", 26: "i4", 27: "i8"}


class GGUFField(NamedTuple):
    """One metadata key/value, laid out as ``gguf.ReaderField``: ``parts`` are numpy arrays (key length, key bytes,
    value type, then the value's pieces), ``data`` the indices of the parts that hold values, ``types`` the value
    type and, for an array, its element type."""

    offset: int
    name: str
    parts: list[np.ndarray]
    data: list[int]
    types: list[Any]

    def contents(self) -> Any:
        """The value as Python objects (a str, a number, or a list of them), like ``ReaderField.contents()``."""
        values = [_decode(self.parts[i], self.types[-1]) for i in self.data]
        return values if self.types[0] == _ARRAY else values[0]


class GGUFTensor(NamedTuple):
    """One tensor of the file, laid out as ``gguf.ReaderTensor`` (``data``: a read-only view of the mapped file, of
    float16/float32/... values for the plain types and of bytes (``uint8``, rows of blocks) for the quantized ones)."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: np.ndarray  # ggml order (fastest-moving dimension first), as in the file
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray


class GGUFFile:
    """The metadata (``fields``) and tensors (``tensors``) of the GGUF file at ``path``, like ``gguf.GGUFReader``.

    No tensor data is read: ``tensors[i].data`` are views of a memory map (``data``) of the file.

    Raises:
        ValueError: not a GGUF file, an unknown version or value type, or truncated (as ``GGUFReader`` does).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

        self._value_type = GGUFValueType
        self.data = np.memmap(path, mode="r")
        self._buf = memoryview(self.data)  # struct reads from it directly: no numpy view per value
        if bytes(self._buf[:4]) != b"GGUF":
            raise ValueError("GGUF magic invalid")
        (version,) = struct.unpack_from("<I", self._buf, 4)
        self._order = "<"
        if version & 0xFFFF == 0:  # written on a machine of the other byte order, as GGUFReader detects it
            self._order = ">" if sys.byteorder == "little" else "<"
            (version,) = struct.unpack_from(self._order + "I", self._buf, 4)
        if version not in _VERSIONS:
            raise ValueError(f"GGUF version {version} is not one this reader handles ({_VERSIONS})")
        tensor_count, kv_count = struct.unpack_from(self._order + "QQ", self._buf, 8)
        self.fields: OrderedDict[str, GGUFField] = OrderedDict()
        self.fields["GGUF.version"] = GGUFField(4, "GGUF.version", [self._array(4, "u4", 1)], [0], [GGUFValueType(4)])
        self.fields["GGUF.tensor_count"] = GGUFField(8, "GGUF.tensor_count", [self._array(8, "u8", 1)], [0],
                                                     [GGUFValueType(10)])
        self.fields["GGUF.kv_count"] = GGUFField(16, "GGUF.kv_count", [self._array(16, "u8", 1)], [0],
                                                 [GGUFValueType(10)])
        pos = 24
        for _ in range(kv_count):
            pos = self._read_field(pos)
        infos = []
        for _ in range(tensor_count):
            name, pos = self._string(pos)
            (n_dims,) = struct.unpack_from(self._order + "I", self._buf, pos)
            dims = self._array(pos + 4, "u8", n_dims)
            qtype, offset = struct.unpack_from(self._order + "IQ", self._buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            infos.append((name, dims, GGMLQuantizationType(qtype), offset))
        alignment = self.fields["general.alignment"].contents() if "general.alignment" in self.fields else 32
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError("Invalid alignment: must be a non-zero power of two")
        self.data_offset = start = -(-pos // alignment) * alignment
        self.tensors: list[GGUFTensor] = []
        names = set()
        for name, dims, qtype, offset in infos:
            if name in names:
                raise ValueError(f"Found duplicated tensor with name {name}")
            names.add(name)
            n_elements = int(np.prod(dims))
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            n_bytes = n_elements * type_size // block_size
            shape = tuple(int(d) for d in reversed(dims.tolist()))
            dtype = _VALUE_DTYPES.get(int(qtype))
            if dtype is None:
                if shape[-1] % block_size:
                    raise ValueError(f"tensor {name}: row size {shape[-1]} is not a multiple of {block_size}")
                shape, dtype = (*shape[:-1], shape[-1] // block_size * type_size), "u1"
            first = start + offset
            if first + n_bytes > len(self.data):
                raise ValueError(f"tensor {name} ends past the end of the file (truncated)")
            data = self.data[first : first + n_bytes].view(np.dtype(dtype).newbyteorder(self._order)).reshape(shape)
            self.tensors.append(GGUFTensor(name, qtype, dims, n_elements, n_bytes, first, data))
        del self._buf  # the memory map stays, through the tensors' views and ``data``

    def get_field(self, key: str) -> GGUFField | None:
        return self.fields.get(key)

    def _array(self, pos: int, dtype: str, count: int) -> np.ndarray:
        """``count`` values at ``pos``, as a small array of its own (a copy: it holds no reference to the map)."""
        size = np.dtype(dtype).itemsize * count
        if pos + size > len(self._buf):
            raise ValueError("the metadata ends past the end of the file (truncated)")
        return np.frombuffer(self._buf[pos : pos + size].tobytes(), dtype=np.dtype(dtype).newbyteorder(self._order))

    def _string(self, pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from(self._order + "Q", self._buf, pos)
        if pos + 8 + n > len(self._buf):
            raise ValueError("a metadata string ends past the end of the file (truncated)")
        return str(self._buf[pos + 8 : pos + 8 + n], "utf-8"), pos + 8 + n

    def _read_field(self, pos: int) -> int:
        start = pos
        (n,) = struct.unpack_from(self._order + "Q", self._buf, pos)
        key_parts = [self._array(pos, "u8", 1), self._array(pos + 8, "u1", n)]
        name = str(key_parts[1].tobytes(), "utf-8")
        (value_type,) = struct.unpack_from(self._order + "I", self._buf, pos + 8 + n)
        parts = [*key_parts, self._array(pos + 8 + n, "u4", 1)]
        pos, value_parts, data, types = self._value(pos + 12 + n, value_type)
        if name in self.fields:
            raise KeyError(f"Duplicate {name} already in list at offset {self.fields[name].offset}")
        self.fields[name] = GGUFField(start, name, parts + value_parts, [i + len(parts) for i in data], types)
        return pos

    def _value(self, pos: int, value_type: int) -> tuple[int, list[np.ndarray], list[int], list[Any]]:
        """(position after the value, its parts, the indices of its data parts, its types), as GGUFReader's
        ``_get_field_parts``; an array of scalars is read in one go, then split into one-element parts."""
        types = [self._value_type(value_type)]
        if value_type == _STRING:
            (n,) = struct.unpack_from(self._order + "Q", self._buf, pos)
            return pos + 8 + n, [self._array(pos, "u8", 1), self._array(pos + 8, "u1", n)], [1], types
        if value_type in _SCALARS:
            size = np.dtype(_SCALARS[value_type]).itemsize
            return pos + size, [self._array(pos, _SCALARS[value_type], 1)], [0], types
        if value_type != _ARRAY:
            raise ValueError(f"Unknown/unhandled field type {value_type}")
        (item_type,) = struct.unpack_from(self._order + "I", self._buf, pos)
        parts = [self._array(pos, "u4", 1), self._array(pos + 4, "u8", 1)]
        count = int(parts[1][0])
        pos += 12
        data: list[int] = []
        if item_type in _SCALARS:
            values = self._array(pos, _SCALARS[item_type], count)
            parts += [values[i : i + 1] for i in range(count)]
            if count:  # GGUFReader takes the element type from the first element
                types.append(self._value_type(item_type))
            return pos + values.nbytes, parts, list(range(2, 2 + count)), types
        if item_type == _STRING:
            return self._strings(pos, count, parts, types)
        for i in range(count):
            pos, item_parts, item_data, item_types = self._value(pos, item_type)
            if i == 0:
                types += item_types
            data += [j + len(parts) for j in item_data]
            parts += item_parts
        return pos, parts, data, types


    def _strings(self, pos: int, count: int, parts: list[np.ndarray], types: list[Any]) -> tuple:
        """An array of strings (a vocabulary, the merges): the lengths walked with struct, then each length and
        string a numpy view of one copy of the array's bytes (GGUFReader's layout, ~50× faster)."""
        unpack = struct.Struct(self._order + "Q").unpack_from
        spans, end = [], pos
        for _ in range(count):
            (n,) = unpack(self._buf, end)
            spans.append((end - pos, n))
            end += 8 + n
        if end > len(self._buf):
            raise ValueError("a metadata string array ends past the end of the file (truncated)")
        blob = self._buf[pos:end].tobytes()
        length, byte = np.dtype(self._order + "u8"), np.dtype(np.uint8)
        first = len(parts)
        for offset, n in spans:
            parts += (np.frombuffer(blob, length, 1, offset), np.frombuffer(blob, byte, n, offset + 8))
        if count:
            types.append(self._value_type(_STRING))
        return end, parts, list(range(first + 1, first + 2 * count, 2)), types


def _decode(part: np.ndarray, value_type: Any) -> Any:
    return str(part.tobytes(), "utf-8") if value_type == _STRING else part.tolist()[0]


@contextlib.contextmanager
def gguf_reader_replaced(opened: GGUFFile | None = None) -> Iterator[None]:
    """Make ``gguf.GGUFReader`` :class:`GGUFFile` for the duration, for the transformers functions that read a GGUF
    file's metadata through it (``load_gguf_checkpoint`` behind ``AutoConfig`` and ``AutoTokenizer``): the same
    fields, parsed in a fraction of the time. They only read ``fields`` and the tensors' names.

    Args:
        opened: a file already read, handed back (not read again) when its path is asked for.
    """
    import gguf

    def reader(path: str | os.PathLike, *args: Any, **kwargs: Any) -> GGUFFile:
        if opened is not None and os.path.samefile(path, opened.data.filename):
            return opened
        return GGUFFile(path)

    original = gguf.GGUFReader
    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def dequantize_tensor(tensor: Any, path: str | os.PathLike = "") -> np.ndarray:
    """One tensor of the file (:class:`~embfactor.gguf_file.GGUFTensor`, ``gguf.ReaderTensor``) in float32, as
    ``gguf.quants.dequantize`` gives it, a few rows at a time into one new array (:func:`dequantize_into`)."""
    out = np.empty(values_shape(tensor), dtype=np.float32)
    dequantize_into(tensor, out, path)
    return out


def dequantize_into(tensor: Any, out: np.ndarray, path: str | os.PathLike = "") -> None:
    """Write the tensor's float32 values into ``out`` (of its shape; any strides, e.g. a slice of a larger array).

    The values are ``gguf.quants.dequantize``'s: its per-type code (``dequantize_rows``) runs on a few rows at a
    time (blocks are independent, so the values are the same), straight on the chunk, without the 16-row groups and
    the copy its array-level function adds (2.7× faster on Q8_0), on up to :data:`THREADS` threads (numpy releases
    the GIL).

    Raises:
        CorruptFileError: the tensor's bytes cannot be dequantized to ``out``'s shape.
    """
    data = tensor.data
    try:
        if out.shape != values_shape(tensor):
            raise ValueError(f"{out.shape} values wanted, the tensor has {values_shape(tensor)}")
        if out.ndim > 2 and not out.flags.c_contiguous:  # a strided view: one matrix of it at a time
            for index in np.ndindex(*out.shape[:-2]):
                dequantize_into(tensor._replace(data=data[index]), out[index], path)
            return
        rows = data.reshape(-1, data.shape[-1]) if data.ndim != 1 else data.reshape(1, -1)
        flat = out if out.ndim == 2 else out.reshape(rows.shape[0], -1)  # a view (contiguous, or a strided matrix)
        rows_to_values = _rows_dequantizer(tensor.tensor_type)
        step = max(1, CHUNK_ELEMENTS // max(flat.shape[1], 1))

        def chunk(start: int) -> None:
            flat[start : start + step] = rows_to_values(rows[start : start + step])

        starts = range(0, rows.shape[0], step)
        if len(starts) > 1 and THREADS > 1:
            list(_pool().map(chunk, starts))
        else:
            for start in starts:
                chunk(start)
    except (ValueError, IndexError) as e:
        raise CorruptFileError(f"{path}: tensor {tensor.name!r} cannot be dequantized ({e})") from None


@functools.cache
def _rows_dequantizer(qtype: Any) -> Any:
    """rows of the type (bytes, or values for F32/F16) -> their float32 values, as ``gguf.quants.dequantize``."""
    from gguf import quants

    traits = getattr(quants, "_type_traits", {}).get(qtype)
    if traits is None or not hasattr(traits, "dequantize_rows"):  # F32, F16, or another gguf release
        return functools.partial(quants.dequantize, qtype=qtype)
    traits.init_grid()  # what quants.dequantize does first (the IQ types' grids)
    return traits.dequantize_rows


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(THREADS, thread_name_prefix="gguf-dequantize")


def values_shape(tensor: Any) -> tuple[int, ...]:
    """The tensor's shape in values (its ``data`` holds bytes, rows of blocks, for a quantized type)."""
    from gguf.constants import GGML_QUANT_SIZES

    shape = tuple(tensor.data.shape)
    if tensor.data.dtype != np.uint8:
        return shape
    block_size, type_size = GGML_QUANT_SIZES[tensor.tensor_type]
    return (*shape[:-1], shape[-1] // type_size * block_size)
