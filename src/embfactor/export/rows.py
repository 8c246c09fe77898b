"""A storage format's rows for any ids, in ops a trace records as a graph that serves every input (opset 18).

See :mod:`embfactor.export.graph` for what each format becomes.
"""

from __future__ import annotations

import torch

from embfactor.export.planes import intk_rows_from_planes
from embfactor.formats.base import RowFormat
from embfactor.formats.tiered import TieredFormat
from embfactor.formats.zeros import ZeroRows


def export_rows(fmt: RowFormat, ids: torch.Tensor) -> torch.Tensor:
    """Rows of ``fmt`` for 1-D int64 ``ids``, computed from traceable ops (see the module docstring).

    Example:
        >>> from embfactor.formats import FactorizedEmbedding
        >>> emb = FactorizedEmbedding(50, 8, rank=4)
        >>> torch.equal(export_rows(emb, torch.tensor([3, 7])), emb.gather(torch.tensor([3, 7])))
        True
    """
    if isinstance(fmt, TieredFormat):
        return _tiered_rows(fmt, ids)
    if isinstance(fmt, ZeroRows):
        return ids.unsqueeze(-1).expand(-1, fmt.embedding_dim).to(fmt.dtype) * 0
    if hasattr(fmt, "onnx_low"):  # an int-k table written as 4-bit planes (see traceable_tables)
        return intk_rows_from_planes(fmt, ids)
    # every other built-in format's gather is already a chain of Gather / arithmetic on the ids' rows (the codebook
    # format skips its fused C loop while tracing)
    return fmt.gather(ids)


def _tiered_rows(fmt: TieredFormat, ids: torch.Tensor) -> torch.Tensor:
    # the token -> row map from what the format stores (one byte per token with compact_index), computed in the graph
    positions = fmt._positions_from_tiers() if fmt.compact_index else fmt.position
    pos = positions.index_select(0, ids)
    out: torch.Tensor | None = None
    for t, child in enumerate(fmt.tiers):
        lo, n = int(fmt.starts[t]), child.num_embeddings
        if isinstance(child, ZeroRows):
            continue
        rows = export_rows(child, (pos - lo).clamp(0, n - 1))
        inside = ((pos >= lo) & (pos < lo + n)).unsqueeze(-1)
        # a scalar zero, not zeros_like(rows): a tied head's rows have a static vocab × d shape, which the tracer
        # would write into the file as a dense constant
        out = torch.where(inside, rows, torch.zeros((), dtype=rows.dtype) if out is None else out.to(rows.dtype))
    if out is None:  # every tier is zeros
        out = export_rows(fmt.tiers[0], ids)
    return fmt._mask_padding(out, ids)
