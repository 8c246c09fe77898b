"""CodebookEmbedding: a table stored as PQ/RVQ codes + small codebooks; rows and tied-head logits without the table.

Forward gathers the ids' codes, then one codebook row per (stage, sub-space), sums the stages and concatenates the
sub-spaces: n × S × M × sub_dim floats for n ids, never vocab × d. The tied head computes logits from lookup tables
(the asymmetric distance computation of PQ search): for a hidden vector h, LUT[s, m, k] = h_m · B_sm[k] (S × M × K
numbers) and logits_v = Σ_{s,m} LUT[s, m, codes[v, s, m]], a gather-sum over the codes in chunks of rows.

Codebooks (and row scales) are ``nn.Parameter``s, so healing trains them; codes are integer buffers (frozen).
Built from :class:`embfactor.decomposition.codebook.CodebookFactors` (methods ``pq`` and ``rvq``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from embfactor.decomposition.codebook import (
    CODEBOOK_DTYPES,
    CodebookFactors,
    code_dtype,
    codes_as_long,
    dequantize_codebooks,
    float_dtype,
    int8_codebooks,
)
from embfactor.errors import ConfigError
from embfactor.formats.base import QUANTIZED_TABLE_HEALING, RowFormat, check_format_args, register_format

# vocabulary rows per chunk of the LUT head: the int64 copy of a chunk's codes is 8·S·M bytes per row
# (4.7 MB at SmolLM2's M = 144), and the (B × chunk) logits block stays small.
_HEAD_CHUNK = 4096
# batch rows up to which the LUT kernels run (a C·K·B float table: 1.5 MB at SmolLM2's sub 3 and B = 8); above,
# rows are decoded _GEMM_CHUNK at a time and multiplied by GEMM
_LUT_MAX_BATCH = 16
_GEMM_CHUNK = 4096


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


@register_format("codebook", factors=CodebookFactors)
class CodebookEmbedding(RowFormat):
    """An embedding table stored as codes (vocab × S × M small integers) and codebooks (S × M × K × sub_dim).

    Args:
        num_embeddings, embedding_dim, padding_idx: as ``nn.Embedding``.
        K: codebook size (uint8 codes up to 256, int16 above); sub_dim: columns per sub-vector (the last
            sub-space is zero-padded when it does not divide d); stages: residual stages (1 = PQ).
        rotation: the codes quantize E·R for a stored orthogonal R (d × d buffer).
        row_scale: rows are scaled by a stored per-row scale (trainable).
        codebook_dtype: storage of codebooks, rotation and scales ("float16" default); "int8": int8 codebooks
            (a frozen integer parameter, as int-k tables' integers) times trainable fp16 column scales
            (``codebook_scale``), the rest fp16.
        zero_padding_row: the padding row reads as exact zeros (as nn.Embedding's), whatever its codes.
        dtype: dtype of the rows returned (float32 by default).

    Example:
        >>> from embfactor.decomposition.codebook import product_quantize
        >>> emb = CodebookEmbedding.from_factors(product_quantize(torch.randn(500, 16), sub_dim=4, K=16))
        >>> emb(torch.tensor([[1, 2]])).shape, emb.num_bytes()
        (torch.Size([1, 2, 16]), 2512)
    """

    heal_settings: ClassVar[dict[str, Any]] = QUANTIZED_TABLE_HEALING

    def __init__(
        self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *, K: int = 256,
        sub_dim: int = 4, stages: int = 1, rotation: bool = False, row_scale: bool = False,
        codebook_dtype: str = "float16", zero_padding_row: bool = False,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        padding_idx = check_format_args(num_embeddings, embedding_dim, padding_idx, K=K, sub_dim=sub_dim, stages=stages)
        if codebook_dtype not in CODEBOOK_DTYPES:
            raise ConfigError(f"codebook_dtype must be one of {tuple(CODEBOOK_DTYPES)}, got {codebook_dtype!r}")
        if K > 65536:
            raise ConfigError(f"K must be at most 65,536, got {K}")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.K, self.sub_dim, self.stages = K, sub_dim, stages
        self.M = -(-embedding_dim // sub_dim)
        self.codebook_dtype = codebook_dtype
        self.zero_padding_row = bool(zero_padding_row and padding_idx is not None)
        self.out_dtype = dtype or torch.float32
        # an empty parameter of the output dtype, registered first: transformers reads a model's dtype from its first
        # floating parameter (save_pretrained writes it to config.json, from_pretrained then loads the whole model in
        # it), and the embedding comes first; without this the fp16 codebooks/scales would make it float16
        self.dtype_anchor = nn.Parameter(torch.empty(0, dtype=self.out_dtype, device=device), requires_grad=False)
        cdt = float_dtype(codebook_dtype)
        self.register_buffer("codes", torch.zeros(num_embeddings, stages, self.M, dtype=code_dtype(K), device=device))
        int8 = codebook_dtype == "int8"
        self.codebooks = nn.Parameter(
            torch.zeros(stages, self.M, K, sub_dim, dtype=CODEBOOK_DTYPES[codebook_dtype], device=device),
            requires_grad=not int8,
        )
        self.codebook_scale = (
            nn.Parameter(torch.ones(stages, self.M, 1, sub_dim, dtype=cdt, device=device)) if int8 else None
        )
        self.register_buffer(
            "rotation", torch.eye(embedding_dim, dtype=cdt, device=device) if rotation else None
        )
        self.row_scale = nn.Parameter(torch.ones(num_embeddings, dtype=cdt, device=device)) if row_scale else None

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_factors(
        cls, f: CodebookFactors, padding_idx: int | None = None, *, zero_padding_row: bool = True,
        dtype: torch.dtype | None = None, **_: Any,
    ) -> CodebookEmbedding:
        """Hold a CodebookFactors (copies its tensors); ``zero_padding_row`` makes the padding row read as zeros."""
        vocab, d = f.shape
        cb_name = _dtype_name(f.codebooks.dtype)  # int8 codebooks carry their column scales
        emb = cls(vocab, d, padding_idx, K=f.K, sub_dim=f.sub_dim, stages=f.stages, rotation=f.rotation is not None,
                  row_scale=f.row_scale is not None, codebook_dtype=cb_name, zero_padding_row=zero_padding_row,
                  device="meta", dtype=dtype or (f.U.dtype if f.U.is_floating_point() else None))
        # built on the meta device (shapes only), then the factor tensors are adopted: no zero-filled vocab-sized
        # buffers allocated just to be overwritten
        emb.codes = f.codes.clone()
        emb.codebooks = nn.Parameter(f.codebooks.clone(), requires_grad=f.codebooks.is_floating_point())
        emb.codebook_scale = None if f.codebook_scale is None else nn.Parameter(f.codebook_scale.clone())
        emb.rotation = None if f.rotation is None else f.rotation.clone()
        emb.row_scale = None if f.row_scale is None else nn.Parameter(f.row_scale.clone())
        emb.dtype_anchor = nn.Parameter(torch.empty(0, dtype=emb.out_dtype), requires_grad=False)
        emb.factors_meta = {"method": f.method, **f.meta}
        return emb

    def format_config(self) -> dict[str, Any]:
        return {"K": self.K, "sub_dim": self.sub_dim, "stages": self.stages, "rotation": self.rotation is not None,
                "row_scale": self.row_scale is not None, "codebook_dtype": self.codebook_dtype,
                "zero_padding_row": self.zero_padding_row}

    # --- rows ---------------------------------------------------------------------------------------------
    def books(self) -> torch.Tensor:
        """The codebooks as stored (float) or as int8 values times their column scales (float32, differentiable
        in the scales): S × M × K × sub_dim, a few hundred KB."""
        return dequantize_codebooks(self.codebooks, self.codebook_scale)

    def for_training_(self) -> None:
        """int8 codebooks train as float32 values (their column scales folded in and dropped until storage)."""
        if self.codebook_scale is None:
            return
        with torch.no_grad():
            books = self.books().float()
        self.codebooks.requires_grad_(False)
        self.codebooks.data = books
        self.codebooks.requires_grad_(True)
        self.codebook_scale = None

    def for_storage_(self) -> None:
        """Trained float codebooks of an int8 table back to int8 values × fp16 column scales."""
        if self.codebook_dtype != "int8" or not self.codebooks.is_floating_point():
            return
        q, scale = int8_codebooks(self.codebooks.detach())
        self.codebooks.requires_grad_(False)
        self.codebooks.data = q
        self.codebook_scale = nn.Parameter(scale.to(self.codebooks.device))

    def _trains_books(self) -> bool:
        return torch.is_grad_enabled() and (
            self.codebooks.requires_grad or (self.codebook_scale is not None and self.codebook_scale.requires_grad)
        )

    def _offsets(self) -> torch.Tensor:
        return torch.arange(self.stages * self.M, device=self.codes.device).view(self.stages, self.M) * self.K

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[0]
        out = None
        books = self.books()
        # the fused C loop (None while compiling or tracing, e.g. ONNX export: the gather below is what a graph holds)
        if not self._trains_books() and self.out_dtype == torch.float32:
            from embfactor.formats._lut_kernel import pq_gather

            out = pq_gather(self.codes, ids, books)  # fused C loop (inference); None without a compiler
        if out is None:
            idx = codes_as_long(self.codes.index_select(0, ids)) + self._offsets()  # n × S × M
            flat = books.reshape(-1, self.sub_dim)
            rows = F.embedding(idx.view(n, -1), flat).to(self.out_dtype).view(n, self.stages, self.M * self.sub_dim)
            out = rows.sum(1) if self.stages > 1 else rows[:, 0]
        if self.M * self.sub_dim != self.embedding_dim:
            out = out[:, : self.embedding_dim]
        if self.rotation is not None:
            out = out @ self.rotation.to(self.out_dtype).T
        if self.row_scale is not None:
            out = out * self.row_scale.index_select(0, ids).to(self.out_dtype)[:, None]
        if self.zero_padding_row:
            out = out.masked_fill((ids == self.padding_idx)[:, None], 0.0)
        return out

    # --- tied head: logits from lookup tables -------------------------------------------------------------
    def lookup_tables(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B × d) hidden -> (B × S × M × K) tables LUT[b, s, m, k] = h_bm · B_sm[k] (rotation applied to h)."""
        h = hidden.float()
        if self.rotation is not None:
            h = h @ self.rotation.float()
        pad = self.M * self.sub_dim - self.embedding_dim
        if pad:
            h = F.pad(h, (0, pad))
        # one multiply-add over (B × S × M × K) per sub-vector column: einsum's M tiny batched GEMMs, or a sum over a
        # last dim of 3, ran 5-20x slower than this at batch 1
        hv = h.view(h.shape[0], 1, self.M, self.sub_dim, 1)
        books = self.books().float()
        lut = books[None, ..., 0] * hv[..., 0, :]
        for j in range(1, self.sub_dim):
            term = books[None, ..., j] * hv[..., j, :]
            lut = lut + term if lut.requires_grad else lut.add_(term)
        return lut

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., d) -> (..., vocab) logits Σ_{s,m} LUT[s, m, codes[v, s, m]], a chunk of vocabulary at a time.

        Inference with uint8 codes on CPU: up to ``_LUT_MAX_BATCH`` rows, a fused C loop over the codes with the
        lookup tables in cache (:mod:`embfactor.formats._lut_kernel`; codes read once); more rows (prefill), the
        rows are decoded a chunk at a time (the fused gather kernel) and multiplied by GEMM, as the LUT's work grows
        with the batch and a GEMM's does not per byte read. Otherwise (training, no compiler, int16 codes) a flat
        gather from the (S·M·K) table summed per row, or ``embedding_bag(mode="sum")`` for several rows.
        """
        lead = hidden.shape[:-1]
        h = hidden.reshape(-1, self.embedding_dim)
        B = h.shape[0]
        if not self._differentiable(h):
            out = torch.empty(B, self.num_embeddings, dtype=torch.float32, device=h.device)
            if self._project_kernel(h, out, None):
                return self._finish(out, hidden, lead)
        lut = self.lookup_tables(h).reshape(B, -1)  # B × (S·M·K)
        offs = self._offsets().view(1, -1)
        outs = []
        table = lut.T.contiguous() if B > 1 else lut.view(-1)
        for s in range(0, self.num_embeddings, _HEAD_CHUNK):
            idx = codes_as_long(self.codes[s : s + _HEAD_CHUNK]).view(-1, self.stages * self.M) + offs
            if B == 1:
                outs.append(table[idx].sum(-1).unsqueeze(0))
            else:
                outs.append(F.embedding_bag(idx, table, mode="sum").T)
        return self._finish(torch.cat(outs, dim=-1), hidden, lead)

    def _differentiable(self, h: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (h.requires_grad or self._trains_books())

    def _project_kernel(self, h: torch.Tensor, out: torch.Tensor, cols: torch.Tensor | None) -> bool:
        """The C kernels' logits (before row scales and the padding row) into ``out``; False if they do not apply."""
        from embfactor.formats._lut_kernel import lut_kernel, lut_sum, lut_sum_batch

        B = h.shape[0]
        if lut_kernel() is None or self.codes.dtype != torch.uint8 or h.device.type != "cpu":
            return False
        if B > _LUT_MAX_BATCH:
            for s in range(0, self.num_embeddings, _GEMM_CHUNK):
                e = min(s + _GEMM_CHUNK, self.num_embeddings)
                rows = self._decoded_rows(s, e)
                # bf16 activations: a bf16 GEMM (AVX512-BF16 runs it at 2-3x the fp32 rate)
                logits = torch.mm(h, rows.to(h.dtype).T) if h.dtype == torch.bfloat16 else torch.mm(h.float(), rows.T)
                if cols is None:
                    out[:, s:e] = logits
                else:
                    out.index_copy_(1, cols[s:e], logits.to(out.dtype))
            return True
        codes = self.codes.view(self.num_embeddings, -1)
        lut = self._kernel_lookup_tables(h)
        if B == 1:
            return lut_sum(codes, lut.reshape(-1, self.K), out=out[0], cols=cols) is not None
        return lut_sum_batch(codes, lut.reshape(B, -1, self.K).permute(1, 2, 0), out, cols)

    def _kernel_lookup_tables(self, h: torch.Tensor) -> torch.Tensor:
        """:meth:`lookup_tables` at inference, built by the C kernel from float32 codebooks kept between calls
        (a batch-1 head is then the LUT build and the LUT sum, no parallel PyTorch op: at 2 threads the OpenMP
        barriers of the reference's ~6 small ops cost more than the sum over the codes; issue 30)."""
        from embfactor.formats._lut_kernel import lut_build

        x = h.float()
        if self.rotation is not None:
            x = x @ self.rotation.float()
        pad = self.M * self.sub_dim - self.embedding_dim
        if pad:
            x = F.pad(x, (0, pad))
        lut = lut_build(self._inference_books(), x, self.M)
        if lut is None:
            return self.lookup_tables(h)
        return lut.view(h.shape[0], self.stages, self.M, self.K)

    def _inference_books(self) -> torch.Tensor:
        """The codebooks as float32 (G × K × sub, contiguous), recomputed only when a stored tensor changed."""
        # the key holds the stored tensors themselves: their memory cannot be reused by a new tensor while cached
        tensors = tuple(t.detach() for t in (self.codebooks, self.codebook_scale) if t is not None)
        key = tuple((t.data_ptr(), t._version, t.dtype, t.shape) for t in tensors)
        cached = getattr(self, "_books_cache", None)
        if cached is None or cached[1] != key:
            with torch.no_grad():
                books = self.books().float().reshape(-1, self.K, self.sub_dim).contiguous()
            cached = self._books_cache = (tensors, key, books)
        return cached[2]

    def _decoded_rows(self, s: int, e: int) -> torch.Tensor:
        """Rows [s, e) in float32, rotated, without row scales (``_finish`` applies them to the logits)."""
        from embfactor.formats._lut_kernel import pq_gather

        rows = pq_gather(self.codes, torch.arange(s, e), self.books())[:, : self.embedding_dim]
        return rows @ self.rotation.float().T if self.rotation is not None else rows

    def project_into(self, hidden: torch.Tensor, out: torch.Tensor, cols: torch.Tensor | None = None) -> None:
        """Logits into ``out`` at column v or ``cols[v]``: at inference the C kernels write the scattered columns
        themselves; otherwise :meth:`project` then a copy."""
        h = hidden.reshape(-1, self.embedding_dim)
        kernel = out.dtype == torch.float32 and self.row_scale is None and not self._differentiable(h)
        if kernel and self._project_kernel(h, out, cols):
            if self.zero_padding_row:
                out[:, self.padding_idx if cols is None else int(cols[self.padding_idx])] = 0.0
            return
        super().project_into(hidden, out, cols)

    def _finish(self, logits: torch.Tensor, hidden: torch.Tensor, lead: torch.Size) -> torch.Tensor:
        if self.row_scale is not None:
            logits = logits * self.row_scale.float()
        if self.zero_padding_row:
            logits[:, self.padding_idx] = 0.0
        return logits.to(hidden.dtype).view(*lead, self.num_embeddings)

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, K={self.K}, sub_dim={self.sub_dim}, stages={self.stages}"
        if self.rotation is not None:
            s += ", rotation=True"
        if self.row_scale is not None:
            s += ", row_scale=True"
        if self.codebook_scale is not None:
            s += ", codebook_dtype=int8"
        return s + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")
