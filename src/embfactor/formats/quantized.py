"""QuantizedFactorizedEmbedding: E = U·V with U and V stored as per-row int8 (or packed int4) plus float32 scales.

The forward gathers the *integer* rows of U for the ids, dequantizes only those rows, and multiplies by the
dequantized V (r × d, small; rebuilt on each call so nothing large is cached). Memory at run time is the integer
storage plus one (tokens × r) float block. Built by :func:`embfactor.surgery.quantize_` from a factorized model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from embfactor.errors import ConfigError, InvalidTypeError
from embfactor.formats.base import RowFormat, check_format_args, register_format
from embfactor.quant import BITS, dequantize_rows, quantize_rows

_PROJECT_CHUNK = 16384


def parse_bits(bits: int | str) -> int:
    """8, 4, "int8" or "int4" -> 8 or 4 (anything else is a ConfigError naming the valid choices)."""
    if isinstance(bits, str) and bits.lower() in ("int8", "int4", "8", "4"):
        bits = int(bits.lower().removeprefix("int"))
    if isinstance(bits, bool) or bits not in BITS:
        raise ConfigError(f"bits must be 8 or 4 (int8 or int4), got {bits!r}")
    return int(bits)


def _packed_cols(cols: int, bits: int) -> int:
    return cols if bits == 8 else (cols + 1) // 2


@register_format("quantized")
class QuantizedFactorizedEmbedding(RowFormat):
    """A factorized embedding U·V whose factors are stored as per-row symmetric integers (int8 or packed int4).

    Storage: U_q (vocab × r int8, or vocab × ⌈r/2⌉ uint8 for int4), U_scale (vocab float32), V_q, V_scale (per row
    of V). Inference only: the factors are buffers, not parameters (dequantize with ``to_factorized()`` to train).

    Args:
        num_embeddings, embedding_dim, rank: table and factor sizes.
        padding_idx: recorded for nn.Embedding compatibility; a zero padding row of U stays exactly zero.
        bits: 8 or 4.
        dtype: output dtype (float32 by default).

    Example:
        >>> from embfactor.layers import FactorizedEmbedding
        >>> q = QuantizedFactorizedEmbedding.from_factorized(FactorizedEmbedding(1000, 64, rank=16), bits=8)
        >>> q(torch.tensor([[1, 2, 3]])).shape, q.num_bytes()
        (torch.Size([1, 3, 64]), 21088)
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int,
        padding_idx: int | None = None,
        *,
        bits: int | str = 8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        padding_idx = check_format_args(num_embeddings, embedding_dim, padding_idx, rank=rank)
        self.bits = parse_bits(bits)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.rank = rank
        self.padding_idx = padding_idx
        self.out_dtype = dtype or torch.float32
        qdt = torch.int8 if self.bits == 8 else torch.uint8
        self.register_buffer("U_q", torch.zeros(num_embeddings, _packed_cols(rank, self.bits), dtype=qdt, device=device))
        self.register_buffer("U_scale", torch.ones(num_embeddings, dtype=torch.float32, device=device))
        self.register_buffer("V_q", torch.zeros(rank, _packed_cols(embedding_dim, self.bits), dtype=qdt, device=device))
        self.register_buffer("V_scale", torch.ones(rank, dtype=torch.float32, device=device))

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_factors(
        cls, f: Any, padding_idx: int | None = None, *, bits: int | str = 8, dtype: torch.dtype | None = None,
        **_: Any,
    ) -> QuantizedFactorizedEmbedding:
        """Quantize a decomposition's U and V (the shared keywords ``zero_padding_row``/``copy``/``sparse`` do
        not apply: a zero padding row of U stays exactly zero, and integers are always a new tensor)."""
        return cls.from_tensors(f.U, f.V, padding_idx, bits=bits, dtype=dtype)

    @classmethod
    def from_tensors(
        cls, U: torch.Tensor, V: torch.Tensor, padding_idx: int | None = None, *, bits: int | str = 8,
        dtype: torch.dtype | None = None,
    ) -> QuantizedFactorizedEmbedding:
        """Quantize U (vocab × r) and V (r × d) row by row."""
        if U.ndim != 2 or V.ndim != 2 or U.shape[1] != V.shape[0]:
            raise ConfigError(f"need U (vocab × r) and V (r × d), got {tuple(U.shape)} and {tuple(V.shape)}")
        emb = cls(
            int(U.shape[0]), int(V.shape[1]), int(U.shape[1]), padding_idx, bits=bits, device=U.device,
            dtype=dtype or (U.dtype if U.is_floating_point() else None),
        )
        uq, us = quantize_rows(U, emb.bits)
        vq, vs = quantize_rows(V, emb.bits)
        emb.U_q.copy_(uq)
        emb.U_scale.copy_(us)
        emb.V_q.copy_(vq)
        emb.V_scale.copy_(vs)
        return emb

    @classmethod
    def from_factorized(cls, layer: nn.Module, bits: int | str = 8) -> QuantizedFactorizedEmbedding:
        """Quantize a FactorizedEmbedding (its U and V)."""
        from embfactor.formats.lowrank import FactorizedEmbedding

        if not isinstance(layer, FactorizedEmbedding):
            raise InvalidTypeError(
                f"only a FactorizedEmbedding (U·V) can be quantized this way, got {type(layer).__name__}"
            )
        return cls.from_tensors(layer.U.detach(), layer.V.detach(), layer.padding_idx, bits=bits, dtype=layer.U.dtype)

    @classmethod
    def empty(
        cls, num_embeddings: int, embedding_dim: int, padding_idx: int | None, *, rank: int, bits: int = 8,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> QuantizedFactorizedEmbedding:
        """Right shapes, values to be loaded (used when rebuilding a saved model)."""
        return cls(num_embeddings, embedding_dim, rank, padding_idx, bits=bits, device=device, dtype=dtype)

    def format_config(self) -> dict[str, Any]:
        return {"rank": self.rank, "bits": self.bits}

    # --- dequantization -----------------------------------------------------------------------------------
    def dequantized_V(self) -> torch.Tensor:
        """V (r × d) in float32."""
        return dequantize_rows(self.V_q, self.V_scale, bits=self.bits, cols=self.embedding_dim)

    def dequantized_U(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows start..stop−1 of U in float32 (default: all)."""
        sl = slice(start, stop)
        return dequantize_rows(self.U_q[sl], self.U_scale[sl], bits=self.bits, cols=self.rank)

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        # only the asked rows of U are dequantized; V (r × d) is small and rebuilt on each call
        rows = dequantize_rows(
            self.U_q.index_select(0, ids), self.U_scale.index_select(0, ids), bits=self.bits, cols=self.rank
        )
        return (rows @ self.dequantized_V()).to(self.out_dtype)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden · (U·V)ᵀ = (hidden·Vᵀ)·Uᵀ, with U dequantized a chunk of rows at a time."""
        low = F.linear(hidden.float(), self.dequantized_V())
        outs = [
            F.linear(low, self.dequantized_U(s, s + _PROJECT_CHUNK))
            for s in range(0, self.num_embeddings, _PROJECT_CHUNK)
        ]
        return torch.cat(outs, dim=-1).to(hidden.dtype)

    def dense(self) -> torch.Tensor:
        """The dense dequantized table U·V."""
        return (self.dequantized_U() @ self.dequantized_V()).to(self.out_dtype)

    def to_factorized(self):
        """A trainable FactorizedEmbedding holding the dequantized factors."""
        from embfactor.formats.lowrank import FactorizedEmbedding

        return FactorizedEmbedding.from_tensors(
            self.dequantized_U().to(self.out_dtype), self.dequantized_V().to(self.out_dtype), self.padding_idx,
            zero_padding_row=False,
        )

    # --- sizes --------------------------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        """Logical entries of the factors (vocab·r + r·d), whatever their storage width."""
        return self.num_embeddings * self.rank + self.rank * self.embedding_dim

    def num_bytes(self) -> int:
        """Bytes of the stored factors: the integers plus the float32 scales."""
        return sum(b.numel() * b.element_size() for b in (self.U_q, self.U_scale, self.V_q, self.V_scale))

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}, bits={self.bits}"
        return s + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")
