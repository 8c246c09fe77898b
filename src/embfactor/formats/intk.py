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
from embfactor.formats import _lut_kernel
from embfactor.formats.base import QUANTIZED_TABLE_HEALING, RowFormat, check_format_args, register_format
from embfactor.quant import check_kbits, dequantize_groups, packed_width

# rows per chunk of the head: a 8,192 × d float32 block (18.9 MB at d = 576)
_HEAD_CHUNK = 8192
# batch sizes the fused C pass serves; above it a GEMM over dequantized blocks is faster
_FUSED_MAX_BATCH = 8


def _put(out: torch.Tensor, logits: torch.Tensor, s: int, e: int, cols: torch.Tensor | None) -> None:
    """Logits of rows [s, e) into ``out``: columns s..e, or their ``cols``."""
    if cols is None:
        out[:, s:e] = logits
    else:
        out.index_copy_(1, cols[s:e], logits.to(out.dtype))


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
        """hidden · tableᵀ from the packed integers, never a float copy of the whole table (see :meth:`project_into`)."""
        lead = hidden.shape[:-1]
        h = hidden.reshape(-1, self.embedding_dim)
        if self._differentiable(h):
            return self._project_torch(h).view(*lead, self.num_embeddings)
        out = torch.empty(h.shape[0], self.num_embeddings, dtype=torch.float32, device=h.device)
        self.project_into(h, out)
        return out.to(hidden.dtype).view(*lead, self.num_embeddings)

    def project_into(self, hidden: torch.Tensor, out: torch.Tensor, cols: torch.Tensor | None = None) -> None:
        """Logits written to ``out`` (B × n') at column v or ``cols[v]``.

        Inference on CPU with a C compiler (:mod:`embfactor.formats._lut_kernel`): up to ``_FUSED_MAX_BATCH`` vectors,
        one fused pass unpacks each row into L1 and multiplies it with every vector (the packed bytes are read once:
        at batch 1 the head is bound by memory bandwidth, and they are 4-6x fewer than the fp32 table's); larger
        batches (prefill) dequantize ``_HEAD_CHUNK`` rows at a time with the kernel and multiply them by GEMM (in
        bfloat16 when the activations are: the GEMM then runs 2-3x faster on CPUs with AVX512-BF16).
        Otherwise (training, no compiler) the rows are dequantized in PyTorch a chunk at a time. Nothing is cached.
        """
        h = hidden.reshape(-1, self.embedding_dim)
        if self._differentiable(h) or out.dtype != torch.float32:
            super().project_into(hidden, out, cols)
            return
        low = h.dtype == torch.bfloat16  # bf16 activations: bf16 GEMM at prefill sizes (AVX512-BF16: 2-3x fp32)
        hb, h = h, h.float()
        kw = {"bits": self.bits, "group": self.group}
        done = False
        if h.shape[0] <= _FUSED_MAX_BATCH:
            done = _lut_kernel.intk_project(self.packed, self.scale, self.lo, hidden=h, out=out, cols=cols, **kw)
        else:
            buf = torch.empty(min(_HEAD_CHUNK, self.num_embeddings), self.embedding_dim)
            for s in range(0, self.num_embeddings, _HEAD_CHUNK):
                e = min(s + _HEAD_CHUNK, self.num_embeddings)
                rows = buf[: e - s]
                done = _lut_kernel.intk_dequant(self.packed, self.scale, self.lo, d=self.embedding_dim, r0=s, r1=e,
                                                out=rows, **kw)
                if not done:
                    break
                _put(out, torch.mm(hb, rows.to(hb.dtype).T) if low else torch.mm(h, rows.T), s, e, cols)
        if not done:
            for s in range(0, self.num_embeddings, _HEAD_CHUNK):
                e = min(s + _HEAD_CHUNK, self.num_embeddings)
                _put(out, F.linear(h, self._rows(self.packed[s:e], self.scale[s:e],
                                                 None if self.lo is None else self.lo[s:e]).float()), s, e, cols)
        if self.zero_padding_row:
            out[:, self.padding_idx if cols is None else int(cols[self.padding_idx])] = 0.0

    def _differentiable(self, h: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (
            h.requires_grad or self.scale.requires_grad or (self.lo is not None and self.lo.requires_grad)
        )

    def _project_torch(self, h: torch.Tensor) -> torch.Tensor:
        """The autograd path (healing trains the scales): PyTorch dequantization a chunk of rows at a time."""
        outs = []
        for s in range(0, self.num_embeddings, _HEAD_CHUNK):
            sl = slice(s, s + _HEAD_CHUNK)
            rows = self._rows(self.packed[sl], self.scale[sl], None if self.lo is None else self.lo[sl])
            outs.append(F.linear(h, rows.to(h.dtype)))
        logits = torch.cat(outs, dim=-1)
        if self.zero_padding_row:
            logits = logits.index_fill(-1, torch.tensor([self.padding_idx], device=logits.device), 0.0)
        return logits

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group={self.group}"
        s += "" if self.symmetric else ", symmetric=False"
        return s + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")
