"""Per-row symmetric integer quantization of tables (int8, int4), the storage format for quantized factors.

Each row r of a (n × m) table is stored as integers q[r] in [-(2^(b-1)-1), 2^(b-1)-1] and one float32 scale
s[r] = max|row| / (2^(b-1)-1); the row is read back as q[r]·s[r]. int4 values are packed two per byte.
The round-trip error of every entry is at most s[r]/2.
"""

from __future__ import annotations

import torch

from embfactor.errors import ConfigError

BITS = (8, 4)


def _qmax(bits: int) -> int:
    if bits not in BITS:
        raise ConfigError(f"bits must be one of {BITS}, got {bits!r}")
    return 2 ** (bits - 1) - 1


def quantize_rows(t: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of a 2-D float tensor symmetrically.

    Returns:
        (q, scale): q is int8 (n × m) for 8 bits, or uint8 (n × ceil(m/2)) with two 4-bit values per byte;
        scale is float32 (n,).

    Example:
        >>> q, s = quantize_rows(torch.tensor([[0.9, -2.0, 0.5]]))
        >>> dequantize_rows(q, s, bits=8, cols=3)
        tensor([[ 0.8976, -2.0000,  0.5039]])
    """
    qmax = _qmax(bits)
    if t.ndim != 2:
        raise ConfigError(f"quantize_rows needs a 2-D tensor, got shape {tuple(t.shape)}")
    t32 = t.detach().float()
    scale = t32.abs().amax(dim=1) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(t32 / scale[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    if bits == 4:
        q = pack_int4(q)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, *, bits: int, cols: int, dtype=torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_rows` (``cols`` = the original number of columns, needed for int4)."""
    _qmax(bits)
    vals = unpack_int4(q, cols) if bits == 4 else q
    return vals.to(dtype) * scale.to(dtype)[..., None]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in [-7, 7] two per byte (low nibble first); odd widths are padded with 0."""
    if q.shape[-1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor, cols: int) -> torch.Tensor:
    """Unpack bytes made by :func:`pack_int4` back to int8 values, keeping the first ``cols`` columns."""
    # sign extension in int32: an exported graph's Where on int8 has no kernel in onnxruntime-node 1.30 / -web 1.31
    # (what transformers.js 4.3 runs), while int32 has one everywhere
    lo = (p & 0xF).to(torch.int32)
    hi = (p >> 4).to(torch.int32)
    lo = torch.where(lo > 7, lo - 16, lo)
    hi = torch.where(hi > 7, hi - 16, hi)
    out = torch.stack([lo, hi], dim=-1).flatten(-2)
    return out[..., :cols].to(torch.int8)


def quantized_bytes(rows: int, cols: int, bits: int) -> int:
    """Storage of a quantized (rows × cols) table: the integers plus one float32 scale per row."""
    per_row = cols if bits == 8 else (cols + 1) // 2
    return rows * per_row + rows * 4


def fake_quantize_rows(t: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize and dequantize (same shape and dtype): what a model sees when a table is stored quantized."""
    q, s = quantize_rows(t, bits)
    return dequantize_rows(q, s, bits=bits, cols=t.shape[1], dtype=t.dtype)


# --- dense int-k (k = 2..8) per row or per group of columns, bits really packed --------------------------------
# The layout of llama.cpp's block types, without their super-blocks: a row of d values is cut into groups of
# ``group`` columns; each group stores its integers (k bits each, 8 values in k bytes) and an fp16 scale (plus an
# fp16 minimum when asymmetric). A row is self-contained, so gathering ids dequantizes only those rows.

KBITS = (2, 3, 4, 5, 6, 8)


def check_kbits(bits: int) -> int:
    """Validate a dense int-k width (2, 3, 4, 5, 6 or 8)."""
    if isinstance(bits, bool) or bits not in KBITS:
        raise ConfigError(f"bits must be one of {KBITS}, got {bits!r}")
    return int(bits)


def packed_width(cols: int, bits: int) -> int:
    """Bytes that ``cols`` k-bit values take in :func:`pack_bits` (padded to a multiple of 8 values below 8 bits)."""
    return cols if bits == 8 else (cols + 7) // 8 * bits


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integers in [0, 2**bits) along the last dim: every 8 values become ``bits`` bytes.

    Example:
        >>> p = pack_bits(torch.tensor([[1, 2, 3, 0, 1, 2, 3, 0]]), 2)
        >>> p.shape, unpack_bits(p, 2, 8).tolist()
        (torch.Size([1, 2]), [[1, 2, 3, 0, 1, 2, 3, 0]])
    """
    check_kbits(bits)
    if bits == 8:
        return q.to(torch.uint8)
    cols = q.shape[-1]
    pad = (-cols) % 8
    v = torch.nn.functional.pad(q.to(torch.int64), (0, pad)).view(*q.shape[:-1], -1, 8)
    # 8 values of k bits fit one int64 word (8·k ≤ 48 bits); its low k bytes are the packed bytes
    word = (v << (torch.arange(8, device=q.device) * bits)).sum(-1)
    out = torch.stack([(word >> (8 * j)) & 0xFF for j in range(bits)], dim=-1)
    return out.to(torch.uint8).view(*q.shape[:-1], -1)


def unpack_bits(p: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: (..., packed bytes) uint8 -> (..., cols) uint8 values."""
    check_kbits(bits)
    if bits == 8:
        return p[..., :cols]
    b = p.view(*p.shape[:-1], -1, bits).to(torch.int64)
    word = (b << (torch.arange(bits, device=p.device) * 8)).sum(-1, keepdim=True)
    v = (word >> (torch.arange(8, device=p.device) * bits)) & ((1 << bits) - 1)
    return v.view(*p.shape[:-1], -1)[..., :cols].to(torch.uint8)


def _grouped(t: torch.Tensor, group: int) -> torch.Tensor:
    pad = (-t.shape[1]) % group
    return torch.nn.functional.pad(t, (0, pad)).view(t.shape[0], -1, group)


def quantize_groups(
    t: torch.Tensor, bits: int, group: int | None = None, *, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize a (n × m) table to k-bit integers per group of ``group`` columns (None: one group per row).

    Symmetric: x ≈ (q − qmax)·s with q − qmax in [−qmax, qmax], qmax = 2^(k−1) − 1, s = absmax / qmax.
    Asymmetric: x ≈ lo + q·s with q in [0, 2^k − 1], s = (max − min) / (2^k − 1), lo = the group's min.
    Scales and minima are fp16, and the integers are computed against the fp16-rounded values, so that what
    is stored is exactly what is read back. Columns are padded with zeros to a multiple of ``group``.

    Returns:
        (packed, scale, lo): packed uint8 (n × packed_width(m_padded, bits)), scale fp16 (n × groups),
        lo fp16 (n × groups) or None when symmetric.

    Example:
        >>> p, s, lo = quantize_groups(torch.randn(3, 64), 4, 32)
        >>> p.shape, s.shape, lo
        (torch.Size([3, 32]), torch.Size([3, 2]), None)
    """
    check_kbits(bits)
    if t.ndim != 2:
        raise ConfigError(f"quantize_groups needs a 2-D tensor, got shape {tuple(t.shape)}")
    if t.shape[0] <= QUANT_BLOCK_ROWS:
        return _quantize_block(t, bits, group, symmetric)
    parts = [_quantize_block(t[s:s + QUANT_BLOCK_ROWS], bits, group, symmetric)
             for s in range(0, t.shape[0], QUANT_BLOCK_ROWS)]
    lo = None if symmetric else torch.cat([p[2] for p in parts])
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), lo


# Rows quantized at once. Rows are independent, and one pass over a whole table holds several temporaries of its
# size (float groups, rounded values, the int64 words of pack_bits): a 250,037 × 384 table (multilingual-e5-small's)
# to int6 g32 in one pass peaked 2.8 GB above the table (the planner's whole peak); in blocks of 4,096 rows
# 0.3 GB (int6) to 0.5 GB (int4), and 3-5x less CPU time (measured with a random table of that shape, one thread).
QUANT_BLOCK_ROWS = 4096


def _quantize_block(
    t: torch.Tensor, bits: int, group: int | None, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = _grouped(t.detach().float(), group or t.shape[1])
    levels = (1 << bits) - 1
    tiny = torch.finfo(torch.float16).tiny
    if symmetric:
        qmax = (1 << (bits - 1)) - 1
        scale = (g.abs().amax(-1) / qmax).clamp_min(tiny).half()
        q = torch.round(g / scale.float()[..., None]).clamp_(-qmax, qmax) + qmax
        lo = None
    else:
        mn, mx = g.amin(-1), g.amax(-1)
        lo = mn.half()
        scale = ((mx - lo.float()) / levels).clamp_min(tiny).half()
        q = torch.round((g - lo.float()[..., None]) / scale.float()[..., None]).clamp_(0, levels)
    packed = pack_bits(q.view(t.shape[0], -1).to(torch.uint8), bits)
    return packed, scale, lo


def dequantize_groups(
    packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor | None, *, bits: int, cols: int,
    group: int | None = None, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_groups` for any rows of it: (n × cols) in ``dtype`` (``group`` as quantized)."""
    groups = scale.shape[-1]
    g = group or cols
    q = unpack_bits(packed, bits, groups * g).view(*packed.shape[:-1], groups, g).to(dtype)
    if lo is None:
        out = (q - ((1 << (bits - 1)) - 1)) * scale.to(dtype)[..., None]
    else:
        out = q * scale.to(dtype)[..., None] + lo.to(dtype)[..., None]
    return out.view(*packed.shape[:-1], groups * g)[..., :cols]


def grouped_bytes(rows: int, cols: int, bits: int, group: int | None = None, *, symmetric: bool = True) -> int:
    """Stored bytes of :func:`quantize_groups`: packed integers + fp16 scales (+ fp16 minima if asymmetric).

    Example:
        >>> 384 * 30522 * 4 / grouped_bytes(30522, 384, 4, 32)     # MiniLM int4 per group of 32: 7.1x
        7.111111111111111
    """
    check_kbits(bits)
    g = group or cols
    groups = -(-cols // g)
    return rows * (packed_width(groups * g, bits) + groups * 2 * (1 if symmetric else 2))
