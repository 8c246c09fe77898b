"""IntKEmbedding: a dense table stored as packed k-bit integers per group with fp16 scales (dense int-k).

Gather unpacks and dequantizes only the gathered rows; the tied head dequantizes a chunk of rows at a time
(never a float copy of the whole table). Scales (and minima) are ``nn.Parameter``s so healing can train them;
the packed integers are a frozen uint8 buffer. Built from :class:`embfactor.decomposition.intk.IntFactors` (``int``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from embfactor.decomposition.intk import GROUPS, IntFactors
from embfactor.errors import ConfigError
from embfactor.formats.base import QUANTIZED_TABLE_HEALING, RowFormat, check_format_args, register_format
from embfactor.quant import check_kbits, dequantize_groups, packed_width

# rows per chunk of the head: a 8,192 × d float32 block (18.9 MB at d = 576)
_HEAD_CHUNK = 8192


@register_format("intk", factors=IntFactors)
class IntKEmbedding(RowFormat):
    """A (vocab × d) table as packed k-bit integers per group of ``group`` columns (None: per row) + fp16 scales.

    Example:
        >>> from embfactor.decomposition.intk import int_quantize
        >>> emb = IntKEmbedding.from_factors(int_quantize(torch.randn(100, 64), bits=4, group=32))
        >>> emb(torch.tensor([3, 4])).shape, emb.num_bytes()
        (torch.Size([2, 64]), 3600)
    """

    heal_settings: ClassVar[dict[str, Any]] = QUANTIZED_TABLE_HEALING

    def __init__(
        self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *, bits: int = 4,
        group: int | None = 32, symmetric: bool = True, zero_padding_row: bool = False,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        padding_idx = check_format_args(num_embeddings, embedding_dim, padding_idx)
        self.bits = check_kbits(bits)
        if group not in GROUPS:
            raise ConfigError(f"group must be one of {GROUPS} (None: per row), got {group!r}")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.group, self.symmetric = group, bool(symmetric)
        self.zero_padding_row = bool(zero_padding_row and padding_idx is not None)
        self.out_dtype = dtype or torch.float32
        # an empty parameter of the output dtype, registered first: transformers reads a model's dtype from its first
        # floating parameter (save_pretrained writes it to config.json, from_pretrained then loads the whole model in
        # it), and the embedding comes first; without this the fp16 codebooks/scales would make it float16
        self.dtype_anchor = nn.Parameter(torch.empty(0, dtype=self.out_dtype, device=device), requires_grad=False)
        g = group or embedding_dim
        self.groups = -(-embedding_dim // g)
        kw: dict[str, Any] = {"device": device}
        self.register_buffer("packed", torch.zeros(num_embeddings, packed_width(self.groups * g, bits),
                                                   dtype=torch.uint8, **kw))
        self.scale = nn.Parameter(torch.ones(num_embeddings, self.groups, dtype=torch.float16, **kw))
        self.lo = None if symmetric else nn.Parameter(torch.zeros(num_embeddings, self.groups, dtype=torch.float16,
                                                                  **kw))

    @classmethod
    def from_factors(
        cls, f: IntFactors, padding_idx: int | None = None, *, zero_padding_row: bool = True,
        dtype: torch.dtype | None = None, **_: Any,
    ) -> IntKEmbedding:
        """Hold an IntFactors (its tensors are copied)."""
        vocab, d = f.shape
        emb = cls(vocab, d, padding_idx, bits=f.bits, group=f.group, symmetric=f.symmetric,
                  zero_padding_row=zero_padding_row, device="meta",
                  dtype=dtype or (f.U.dtype if f.U.is_floating_point() else None))
        emb.packed = f.packed.clone()
        emb.scale = nn.Parameter(f.scale.clone())
        emb.lo = None if f.lo is None else nn.Parameter(f.lo.clone())
        emb.dtype_anchor = nn.Parameter(torch.empty(0, dtype=emb.out_dtype), requires_grad=False)
        emb.factors_meta = {"method": f.method, **f.meta}
        return emb

    def format_config(self) -> dict[str, Any]:
        return {"bits": self.bits, "group": self.group, "symmetric": self.symmetric,
                "zero_padding_row": self.zero_padding_row}

    def _rows(self, packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor | None) -> torch.Tensor:
        return dequantize_groups(packed, scale, lo, bits=self.bits, cols=self.embedding_dim, group=self.group,
                                 dtype=self.out_dtype)

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        lo = None if self.lo is None else self.lo.index_select(0, ids)
        out = self._rows(self.packed.index_select(0, ids), self.scale.index_select(0, ids), lo)
        if self.zero_padding_row:
            out = out.masked_fill((ids == self.padding_idx)[:, None], 0.0)
        return out

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden · tableᵀ with the table dequantized a chunk of rows at a time (never all of it)."""
        outs = []
        for s in range(0, self.num_embeddings, _HEAD_CHUNK):
            sl = slice(s, s + _HEAD_CHUNK)
            rows = self._rows(self.packed[sl], self.scale[sl], None if self.lo is None else self.lo[sl])
            outs.append(F.linear(hidden, rows.to(hidden.dtype)))
        logits = torch.cat(outs, dim=-1)
        if self.zero_padding_row:
            logits[..., self.padding_idx] = 0.0
        return logits

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group={self.group}"
        s += "" if self.symmetric else ", symmetric=False"
        return s + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")
