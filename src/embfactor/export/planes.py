"""An int-k table's integers as the file's ONNX initializers: 4-bit planes a tied head's MatMulNBits reads as they are.

ONNX Runtime folds constant subgraphs when it loads a file and keeps every folded intermediate until the end of the
pass: unpacking a vocabulary-sized k-bit table into the 4-bit blocks MatMulNBits wants would make the session hold
(and its allocator keep) several copies of the table. So an export writes int-k tables of 4, 5, 6 and 8 bits in that
layout directly (:func:`intk_planes`: the same number of bytes as the stored packing), the lookup decodes its rows
from the planes (:func:`intk_rows_from_planes`), and the head (:mod:`embfactor.export.head`) multiplies them.
"""

from __future__ import annotations

import torch
from torch import nn

from embfactor.formats.base import RowFormat
from embfactor.formats.intk import IntKEmbedding

_BLOCKS = (32, 16)  # MatMulNBits block sizes used, largest first (a power of 2 of at least 16)


def block_of(group: int) -> int | None:
    return next((b for b in _BLOCKS if group % b == 0), None)


PLANE_BITS = (4, 5, 6, 8)  # widths whose stored bytes are laid out as MatMulNBits blocks in the file
_CHUNK = 16384  # rows converted at a time (the unpacked int64 temporaries of a 262k-row table would be GBs)


def planes_ready(fmt: RowFormat) -> bool:
    """Whether the export writes this int-k table's integers as 4-bit planes (:func:`intk_planes`)."""
    return isinstance(fmt, IntKEmbedding) and fmt.bits in PLANE_BITS and block_of(fmt.group or fmt.embedding_dim) is not None


def intk_planes(fmt: IntKEmbedding) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The int-k table's stored integers u as the file's ONNX initializers: the same number of bytes, laid out so
    that the tied head's MatMulNBits reads them as they are (ONNX Runtime folds nothing vocabulary-sized):

      - ``low``: the low 4 bits of each u as MatMulNBits blocks (rows × blocks × block/2, low nibble first); for
        4 bits this is the stored packing itself;
      - ``high``: the rest: 8 bits, a second such plane; 5 and 6 bits, 1 and 2 bits a value packed 8 and 4 to a byte
        (value i at bit k·i); 4 bits, None.

    Example:
        >>> from embfactor.decomposition import decompose
        >>> from embfactor.formats.base import from_factors
        >>> emb = from_factors(decompose(torch.randn(10, 64), method="int", bits=5, group=32))
        >>> [t.shape for t in intk_planes(emb)]
        [torch.Size([10, 2, 16]), torch.Size([10, 8])]
    """
    from embfactor.quant import unpack_bits

    group = fmt.group or fmt.embedding_dim
    cols, block, bits = fmt.groups * group, block_of(group), fmt.bits
    lows, highs = [], []
    for start in range(0, fmt.num_embeddings, _CHUNK):
        u = unpack_bits(fmt.packed[start : start + _CHUNK], bits, cols)
        lows.append(_nibbles(u & 15).view(-1, cols // block, block // 2))
        hi = u >> 4
        if bits == 8:
            highs.append(_nibbles(hi).view(-1, cols // block, block // 2))
        elif bits > 4:
            k = bits - 4
            shifts = torch.arange(8 // k, dtype=torch.int32) * k
            highs.append((hi.view(len(u), -1, 8 // k).to(torch.int32) << shifts).sum(-1).to(torch.uint8))
    return torch.cat(lows), (torch.cat(highs) if highs else None)


def _nibbles(v: torch.Tensor) -> torch.Tensor:
    """(rows × cols) values in [0, 16) → (rows × cols/2) bytes, low nibble first."""
    return (v[:, 0::2] | (v[:, 1::2] << 4)).to(torch.uint8)


def intk_rows_from_planes(fmt: IntKEmbedding, ids: torch.Tensor) -> torch.Tensor:
    """Rows of ``fmt`` for 1-D ids from its export planes (``fmt.onnx_low`` / ``fmt.onnx_high``), in traceable ops:
    the lookup side of a table exported in the :func:`intk_planes` layout."""
    group = fmt.group or fmt.embedding_dim
    low = fmt.onnx_low.index_select(0, ids).flatten(1).long()
    u = torch.stack([low & 15, low >> 4], -1).flatten(1)
    if fmt.bits == 8:
        high = fmt.onnx_high.index_select(0, ids).flatten(1).long()
        u = u + 16 * torch.stack([high & 15, high >> 4], -1).flatten(1)
    elif fmt.bits > 4:
        k = fmt.bits - 4
        high = fmt.onnx_high.index_select(0, ids).long().unsqueeze(-1)
        shifts = torch.arange(8 // k, device=high.device) * k
        u = u + 16 * ((high >> shifts) & ((1 << k) - 1)).flatten(1)
    q = u.view(-1, fmt.groups, group).to(fmt.out_dtype)
    scale = fmt.scale.index_select(0, ids).to(fmt.out_dtype)[..., None]
    if fmt.lo is None:
        rows = (q - ((1 << (fmt.bits - 1)) - 1)) * scale
    else:
        rows = q * scale + fmt.lo.index_select(0, ids).to(fmt.out_dtype)[..., None]
    rows = rows.flatten(1)[:, : fmt.embedding_dim]
    if fmt.zero_padding_row:
        rows = rows.masked_fill((ids == fmt.padding_idx)[:, None], 0.0)
    return rows


def export_tensors(table: nn.Module) -> dict[str, torch.Tensor]:
    """The table's tensors as an ONNX export writes them, by state-dict name: int-k tables of 4, 5, 6 and 8 bits
    hold ``onnx_low`` / ``onnx_high`` (:func:`intk_planes`, the same bytes) instead of ``packed``; the rest as stored.

    Example:
        >>> from embfactor.decomposition import decompose
        >>> from embfactor.formats.base import from_factors
        >>> sorted(export_tensors(from_factors(decompose(torch.randn(10, 64), method="int", bits=8))))
        ['dtype_anchor', 'onnx_high', 'onnx_low', 'scale']
    """
    out = dict(table.state_dict())
    for name, m in table.named_modules():
        if planes_ready(m):
            prefix = f"{name}." if name else ""
            del out[f"{prefix}packed"]
            low, high = intk_planes(m)
            out[f"{prefix}onnx_low"] = low
            if high is not None:
                out[f"{prefix}onnx_high"] = high
    return out
