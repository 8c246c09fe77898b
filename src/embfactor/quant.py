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
        >>> q, s = quantize_rows(torch.tensor([[1.0, -2.0, 0.5]]))
        >>> dequantize_rows(q, s, bits=8, cols=3)
        tensor([[ 0.9921, -2.0000,  0.4961]])
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
    lo = (p & 0xF).to(torch.int8)
    hi = (p >> 4).to(torch.int8)
    lo = torch.where(lo > 7, lo - 16, lo)
    hi = torch.where(hi > 7, hi - 16, hi)
    out = torch.stack([lo, hi], dim=-1).flatten(-2)
    return out[..., :cols]


def quantized_bytes(rows: int, cols: int, bits: int) -> int:
    """Storage of a quantized (rows × cols) table: the integers plus one float32 scale per row."""
    per_row = cols if bits == 8 else (cols + 1) // 2
    return rows * per_row + rows * 4


def fake_quantize_rows(t: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize and dequantize (same shape and dtype): what a model sees when a table is stored quantized."""
    q, s = quantize_rows(t, bits)
    return dequantize_rows(q, s, bits=bits, cols=t.shape[1], dtype=t.dtype)
