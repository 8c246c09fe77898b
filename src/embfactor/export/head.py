"""A tied head's logits in ONNX from the stored integers: ONNX Runtime's 4-bit block MatMul, never a float table.

A tied head multiplies the hidden state by the whole table. Decoding the table inside the graph and multiplying
(:func:`embfactor.export.rows.export_rows` of every id) is exact, but ONNX Runtime folds that decode when it loads
the file: the session then holds the table in float32 (113 MB for SmolLM2) and its load peaks at gigabytes. Here each
tier of the table becomes ``com.microsoft.MatMulNBits`` over integers the graph derives from what the file stores,
with small nodes that ONNX Runtime folds into the 4-bit blocks MatMulNBits prepacks (half a byte per weight):

  - int-k rows (k ≤ 4): one 4-bit plane ``u = q + offset``, scales as stored (``w = (u − 8)·s + c``);
  - int-k rows (4 < k ≤ 8) and int8 codebooks (PQ, RVQ): two planes, ``u = 16·a + b`` with ``a, b`` 4-bit, so
    ``w = 16·s·(a − 8) + s·(b − 8) + c`` is two MatMulNBits (both exact: the blocks hold the stored integers);
  - ``c``, a per-(row, group) constant (the asymmetric minimum, or what the offset leaves), is the input's group sums
    times a small group × rows matrix; a codebook's per-column scales and rotation are applied to the input;
  - other tiers (float codebooks, low rank, block) decode their own rows (folded, that tier's rows only); zero tiers
    give zeros.

The tiers' logits are concatenated in row order and gathered into token order by the position map. ONNX Runtime's
4-bit kernel computes in float32 (``accuracy_level`` 0), so the logits equal PyTorch's to float rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from embfactor.export.nbits import NBITS_DOMAIN, group_sums, set_last_dim
from embfactor.export.planes import block_of
from embfactor.export.rows import export_rows
from embfactor.formats.base import RowFormat
from embfactor.formats.codebook import CodebookEmbedding
from embfactor.formats.intk import IntKEmbedding
from embfactor.formats.tiered import TieredFormat
from embfactor.formats.zeros import ZeroRows


def nbits_head_ready(fmt: RowFormat) -> bool:
    """Whether :func:`head_logits` computes ``fmt``'s logits with MatMulNBits (else its rows are decoded)."""
    if isinstance(fmt, IntKEmbedding):
        return block_of(fmt.group or fmt.embedding_dim) is not None
    if isinstance(fmt, CodebookEmbedding):
        return fmt.codebook_scale is not None and not fmt.codebooks.is_floating_point()
    return False


def head_logits(fmt: RowFormat, hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` (..., d) → (..., vocab) logits of the table ``fmt``, written (when traced) as MatMulNBits over the
    stored integers where the format allows it (see the module docstring). In eager mode the same numbers.

    Example:
        >>> from embfactor.decomposition import decompose
        >>> from embfactor.formats.base import from_factors
        >>> emb = from_factors(decompose(torch.randn(64, 32), method="int", bits=5, group=32))
        >>> h = torch.randn(2, 32)
        >>> torch.allclose(head_logits(emb, h), h @ emb.gather(torch.arange(64)).T, atol=1e-5)
        True
    """
    if isinstance(fmt, TieredFormat):
        parts = [_tier_logits(child, hidden) for child in fmt.tiers]
        positions = fmt._positions_from_tiers() if fmt.compact_index else fmt.position
        logits = torch.cat(parts, -1).index_select(-1, positions)
        if fmt.padding_idx is not None and fmt.zero_padding:
            logits = logits * positions.ne(positions[fmt.padding_idx]).to(logits.dtype)
        return logits
    return _tier_logits(fmt, hidden)


def _tier_logits(fmt: RowFormat, hidden: torch.Tensor) -> torch.Tensor:
    if isinstance(fmt, ZeroRows):
        # zeros shaped by the input (a static vocab-wide zero tensor would be written into the file)
        return (hidden[..., :1] * 0).expand(*hidden.shape[:-1], fmt.num_embeddings)
    if not torch.jit.is_tracing():
        logits = fmt.project(hidden)
    elif nbits_head_ready(fmt):
        stored = _stored(fmt)
        logits = _NBitsLogits.apply(hidden, *stored.values(), fmt, tuple(stored))
    else:
        logits = hidden @ _all_rows(fmt).to(hidden.dtype).T
    if getattr(fmt, "zero_padding_row", False) and fmt.padding_idx is not None:
        ids = _all_ids(fmt)
        logits = logits * ids.ne(fmt.padding_idx).to(logits.dtype)
    return logits


def _stored(fmt: RowFormat) -> dict[str, torch.Tensor]:
    """The tensors the head's graph reads, by name (absent ones left out: a None among a Function's inputs breaks
    the tracer)."""
    if isinstance(fmt, IntKEmbedding):
        planes = hasattr(fmt, "onnx_low")  # the export's plane layout (graph.traceable_tables)
        found = {"stored": fmt.onnx_low if planes else fmt.packed, "high": getattr(fmt, "onnx_high", None),
                 "scale": fmt.scale, "lo": fmt.lo}
    else:
        found = {"codes": fmt.codes, "books": fmt.codebooks, "book_scale": fmt.codebook_scale,
                 "row_scale": fmt.row_scale, "rotation": fmt.rotation}
    return {k: v for k, v in found.items() if v is not None}


def _all_ids(fmt: RowFormat) -> torch.Tensor:
    # every id, derived from a stored tensor's shape rather than a constant: a traced constant arange would be
    # written into the file as a vocab-long int64 tensor
    first = next(t for t in (*fmt.parameters(), *fmt.buffers()) if t.numel() > 0)
    return torch.ones_like(first.reshape(-1)[:1], dtype=torch.long).expand(fmt.num_embeddings).cumsum(0) - 1


def _all_rows(fmt: RowFormat) -> torch.Tensor:
    return export_rows(fmt, _all_ids(fmt))


class _NBitsLogits(torch.autograd.Function):
    """PyTorch computes the format's own logits; the ONNX symbolic is MatMulNBits over the stored integers."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, *args: Any) -> torch.Tensor:
        # only traced, never run for numbers: the trace needs the output's shape and type (touching the module's
        # tensors here, with the export's plane buffers registered, fails inside the tracer)
        return hidden.new_zeros(*hidden.shape[:-1], args[-2].num_embeddings)

    @staticmethod
    def symbolic(g: Any, hidden: Any, *args: Any) -> Any:
        fmt, names = args[-2], args[-1]
        stored = dict(zip(names, args[:-2]))
        graph = _intk_graph if isinstance(fmt, IntKEmbedding) else _codebook_graph
        return set_last_dim(graph(g, hidden, fmt, **stored), hidden, fmt.num_embeddings)


# --- graph pieces (ONNX symbolic context) -----------------------------------------------------------------------
def _const(g: Any, value: Any, dtype: torch.dtype = torch.int64) -> Any:
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def _u8(g: Any, v: int) -> Any:
    return _const(g, v, torch.uint8)


def _shift(g: Any, x: Any, n: int, direction: str) -> Any:
    return g.op("BitShift", x, _u8(g, n), direction_s=direction) if n else x


def _unpack(g: Any, packed: Any, rows: int, bits: int, cols: int) -> Any:
    """(rows × packed bytes) uint8 → (rows × cols) uint8 values, in uint8 ops (what :func:`quant.unpack_bits`
    computes in int64: folded at load over a whole table, int64 temporaries cost 8 bytes a value)."""
    if bits == 8:
        return g.op("Slice", packed, _const(g, [0]), _const(g, [cols]), _const(g, [1]))
    words = g.op("Reshape", packed, _const(g, [rows, -1, bits]))  # 8 values in ``bits`` bytes, little-endian
    values = []
    for i in range(8):
        byte, r = divmod(i * bits, 8)
        v = _shift(g, g.op("Gather", words, _const(g, byte), axis_i=2), r, "RIGHT")
        if r + bits > 8:
            nxt = g.op("Gather", words, _const(g, byte + 1), axis_i=2)
            v = g.op("BitwiseOr", v, _shift(g, nxt, 8 - r, "LEFT"))
        if r + bits != 8:
            v = g.op("BitwiseAnd", v, _u8(g, (1 << bits) - 1))
        values.append(g.op("Unsqueeze", v, _const(g, [2])))
    return g.op("Reshape", g.op("Concat", *values, axis_i=2), _const(g, [rows, cols]))


def _pack_plane(g: Any, plane: Any, rows: int, cols: int, block: int) -> Any:
    """(rows × cols) uint8 values in [0, 16) → MatMulNBits' B: rows × blocks × block/2 bytes, low nibble first."""
    pairs = g.op("Reshape", plane, _const(g, [rows, cols // 2, 2]))
    even = g.op("Gather", pairs, _const(g, 0), axis_i=2)
    odd = g.op("Gather", pairs, _const(g, 1), axis_i=2)
    return g.op("Reshape", g.op("BitwiseOr", even, _shift(g, odd, 4, "LEFT")), _const(g, [rows, cols // block, block // 2]))


def _matmuls(g: Any, x: Any, planes: list[Any], scales: Any, cols: int, rows: int, block: int) -> Any:
    """Σ over planes of MatMulNBits(x·16^(planes−1−i), plane, scales): the high plane weighs 16× (the input is
    scaled, a few hundred floats, rather than a second copy of the scales)."""
    y = None
    for i, plane in enumerate(planes):
        weight = 16.0 ** (len(planes) - 1 - i)
        xi = x if weight == 1 else g.op("Mul", x, _const(g, weight, torch.float32))
        term = g.op(f"{NBITS_DOMAIN}::MatMulNBits", xi, plane, scales, K_i=cols, N_i=rows, bits_i=4, block_size_i=block)
        y = term if y is None else g.op("Add", y, term)
    return y


def _rank(x: Any) -> int:
    rank = x.type().dim()
    if rank is None:
        raise ValueError("the hidden state's rank is unknown to the exporter")
    return rank


def _pad_last(g: Any, x: Any, rank: int, width: int, to: int, value: Any = None) -> Any:
    """Zero-pad (or ``value``-pad) the last axis of the rank-``rank`` ``x`` from ``width`` to ``to`` columns."""
    if to == width:
        return x
    pads = [0] * (2 * rank)
    pads[2 * rank - 1] = to - width
    args = [x, _const(g, pads)] + ([value] if value is not None else [])
    return g.op("Pad", *args)


def _intk_graph(g: Any, x: Any, fmt: IntKEmbedding, *, stored: Any, scale: Any, high: Any = None,
                lo: Any = None) -> Any:
    """``stored``: the 4-bit low plane (:func:`intk_planes`), or, for 2 and 3 bits, the packed integers; ``high``: the
    high bits (8 bits: a second plane; 5 and 6: 1 and 2 bits a value, expanded at load by a 256-entry table)."""
    rows, d, bits = fmt.num_embeddings, fmt.embedding_dim, fmt.bits
    group = fmt.group or d
    cols = fmt.groups * group
    block = block_of(group)
    if hasattr(fmt, "onnx_low"):  # the export's plane layout
        planes = [stored] if bits == 4 else [high if bits == 8 else _expand_high(g, high, rows, bits - 4, cols, block),
                                             stored]
    else:  # 2 and 3 bits: unpacked at load into one plane (a table of a quarter or three eighths of a byte a value)
        planes = [_pack_plane(g, _unpack(g, stored, rows, bits, cols), rows, cols, block)]
    s = g.op("Cast", scale, to_i=1)  # float32
    if group > block:  # one scale per MatMulNBits block
        s = g.op("Reshape", g.op("Expand", g.op("Unsqueeze", s, _const(g, [2])), _const(g, [1, 1, group // block])),
                 _const(g, [rows, cols // block]))
    xp = _pad_last(g, x, _rank(x), d, cols)
    y = _matmuls(g, xp, planes, s, cols, rows, block)
    # stored u (= 16·a + b): w = (u − qmax)·s symmetric, u·s + lo asymmetric; the planes give (u − base)·s, base
    # = 136 for two planes (16·(a − 8) + (b − 8)), 8 for one; the rest is c = (base − qmax)·s, or base·s + lo
    base = 136 if len(planes) == 2 else 8
    k = base - ((1 << (bits - 1)) - 1 if fmt.symmetric else 0)
    c = g.op("Mul", g.op("Cast", scale, to_i=1), _const(g, float(k), torch.float32)) if k else None
    if lo is not None:
        lo32 = g.op("Cast", lo, to_i=1)
        c = lo32 if c is None else g.op("Add", c, lo32)
    if c is not None:
        y = g.op("Add", y, g.op("MatMul", group_sums(g, xp, fmt.groups, group), g.op("Transpose", c, perm_i=[1, 0])))
    return y


def _expand_high(g: Any, high: Any, rows: int, k: int, cols: int, block: int) -> Any:
    """The k-bit high parts (k = 1, 2; 8/k values a byte, value i at bit k·i) as a 4-bit plane, through a 256-entry
    table of the plane bytes each stored byte becomes (the only vocabulary-sized work at load: a few bytes a value)."""
    per = 8 // k  # values a byte
    table = torch.zeros(256, per // 2, dtype=torch.uint8)
    for v in range(256):
        vals = [(v >> (k * i)) & ((1 << k) - 1) for i in range(per)]
        table[v] = torch.tensor([vals[2 * j] | (vals[2 * j + 1] << 4) for j in range(per // 2)], dtype=torch.uint8)
    idx = g.op("Cast", high, to_i=6)  # rows × cols/per, int32
    out = g.op("Gather", g.op("Constant", value_t=table), idx, axis_i=0)  # rows × cols/per × per/2
    return g.op("Reshape", out, _const(g, [rows, cols // block, block // 2]))


def _codebook_graph(g: Any, x: Any, fmt: CodebookEmbedding, *, codes: Any, books: Any, book_scale: Any,
                    row_scale: Any = None, rotation: Any = None) -> Any:
    rows, d, S, M, K, sub = fmt.num_embeddings, fmt.embedding_dim, fmt.stages, fmt.M, fmt.K, fmt.sub_dim
    # a sub-space of odd width gets a zero column, so that each code's entry is whole bytes of the 4-bit planes and
    # the planes are gathered from small per-entry tables (no unpacking of a vocabulary-sized tensor at load)
    sub2 = sub + sub % 2
    width = M * sub2
    block = 32
    cols = -(-width // block) * block
    if rotation is not None:  # rows are decoded @ Rᵀ: h · (R·r) = (h @ R) · r
        x = g.op("MatMul", x, g.op("Cast", rotation, to_i=1))
    x = _spread(g, x, _rank(x), d, M, sub, sub2)
    xp = _pad_last(g, x, _rank(x), width, cols)  # columns past d (a padded last sub-space) are dropped: zero input
    rs = (g.op("Expand", _const(g, [1.0], torch.float32), _const(g, [rows])) if row_scale is None
          else g.op("Cast", row_scale, to_i=1))
    scales = g.op("Expand", g.op("Unsqueeze", rs, _const(g, [1])), _const(g, [rows, cols // block]))
    hi, lo = _entry_planes(fmt, sub2)  # S × (M·K) × sub2/2 bytes each
    offsets = _const(g, [m * K for m in range(M)], torch.int32)  # sub-space m's entries follow m·K others
    y = None
    for s in range(S):
        idx = g.op("Cast", g.op("Gather", codes, _const(g, s), axis_i=1), to_i=6)  # rows × M, int32
        if codes.type().scalarType() == "Short":  # int16 codes are stored shifted by −32,768
            idx = g.op("Add", idx, _const(g, 32768, torch.int32))
        idx = g.op("Add", idx, offsets)
        planes = []
        for table in (hi[s], lo[s]):
            b = g.op("Gather", g.op("Constant", value_t=table), idx, axis_i=0)  # rows × M × sub2/2
            if cols != width:
                b = _pad_last(g, g.op("Reshape", b, _const(g, [rows, width // 2])), 2, width // 2, cols // 2)
            planes.append(g.op("Reshape", b, _const(g, [rows, cols // block, block // 2])))
        col_scale = g.op("Cast", g.op("Gather", book_scale, _const(g, s), axis_i=0), to_i=1)  # M × 1 × sub
        col_scale = _pad_last(g, _spread(g, g.op("Reshape", col_scale, _const(g, [M * sub])), 1, M * sub, M, sub,
                                         sub2), 1, width, cols)
        xs = g.op("Mul", xp, col_scale)
        term = _matmuls(g, xs, planes, scales, cols, rows, block)
        # u − 128 = 16·(a − 8) + (b − 8) + 8: the + 8 is 8·row scale·Σ input
        total = g.op("ReduceSum", xs, _const(g, [-1]), keepdims_i=1)
        term = g.op("Add", term, g.op("Mul", total, g.op("Mul", rs, _const(g, 8.0, torch.float32))))
        y = term if y is None else g.op("Add", y, term)
    return y


def _spread(g: Any, x: Any, rank: int, width: int, M: int, sub: int, sub2: int) -> Any:
    """(..., width) → (..., M·sub2): the first ``M·sub`` columns (zero-padded) as M sub-spaces of ``sub2`` columns,
    each with ``sub2 − sub`` zero columns after it."""
    x = _pad_last(g, x, rank, width, M * sub)
    if sub2 == sub:
        return x
    lead = g.op("Slice", g.op("Shape", x), _const(g, [0]), _const(g, [-1]))
    x = g.op("Reshape", x, g.op("Concat", lead, _const(g, [M, sub]), axis_i=0))
    x = _pad_last(g, x, rank + 1, sub, sub2)
    return g.op("Reshape", x, g.op("Concat", lead, _const(g, [M * sub2]), axis_i=0))


def _entry_planes(fmt: CodebookEmbedding, sub2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per codebook entry, its 4-bit plane bytes: the high and the low nibbles of ``value + 128`` (int8 values;
    low nibble first in each byte), S × (M·K) × sub2/2 uint8 each (a few hundred KB)."""
    u = fmt.codebooks.detach().to(torch.int16) + 128  # S × M × K × sub, in [0, 255]
    if sub2 != u.shape[-1]:
        u = torch.nn.functional.pad(u, (0, sub2 - u.shape[-1]), value=128)
    u = u.reshape(fmt.stages, fmt.M * fmt.K, sub2 // 2, 2)

    def pack(nib: torch.Tensor) -> torch.Tensor:
        return (nib[..., 0] | (nib[..., 1] << 4)).to(torch.uint8)

    return pack(u >> 4), pack(u & 15)


def nbits_head_formats(table: nn.Module) -> list[str]:
    """Names of the formats (the table, or its tiers) whose head logits are MatMulNBits (for reports and tests)."""
    tiers = table.tiers if isinstance(table, TieredFormat) else [table]
    return [t.format_name for t in tiers if nbits_head_ready(t)]
