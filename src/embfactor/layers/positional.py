"""Positional encodings and the full Transformer embedding layer (token embedding + positions + dropout)."""

from __future__ import annotations

import math

import torch
from torch import nn

from embfactor.errors import ConfigError, InvalidInputError
from embfactor.formats.lowrank import FactorizedEmbedding


def _check_length(seq_len: int, offset: int, max_len: int) -> None:
    if offset < 0 or seq_len + offset > max_len:
        raise InvalidInputError(
            f"positions {offset}..{offset + seq_len - 1} exceed max_len={max_len}; build the encoding with a larger max_len"
        )


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed sinusoidal encodings (Vaswani et al. 2017): PE[p, 2i] = sin(p/base^(2i/d)), PE[p, 2i+1] = cos(...).

    Adds the encoding to a (batch, seq, d) input; the table is a non-persistent buffer (rebuilt, not saved).

    Example:
        >>> pe = SinusoidalPositionalEncoding(128, 16)
        >>> pe(torch.zeros(2, 10, 16)).shape
        torch.Size([2, 10, 16])
    """

    def __init__(self, max_len: int, dim: int, *, base: float = 10000.0) -> None:
        super().__init__()
        if max_len < 1 or dim < 1:
            raise ConfigError(f"max_len and dim must be >= 1, got {max_len} and {dim}")
        self.max_len, self.dim, self.base = max_len, dim, base
        pos = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)
        freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(base) / dim))
        pe = torch.zeros(max_len, dim, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(pos * freq)
        pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
        self.register_buffer("pe", pe.float(), persistent=False)

    def encoding(self, seq_len: int, offset: int = 0) -> torch.Tensor:
        _check_length(seq_len, offset, self.max_len)
        return self.pe[offset : offset + seq_len]

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return x + self.encoding(x.shape[-2], offset).to(x.dtype)

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}, dim={self.dim}, base={self.base}"


class LearnedPositionalEncoding(nn.Module):
    """Trainable absolute position embeddings (BERT/GPT-2 style), added to a (batch, seq, d) input.

    Example:
        >>> LearnedPositionalEncoding(128, 16)(torch.zeros(1, 4, 16)).shape
        torch.Size([1, 4, 16])
    """

    def __init__(self, max_len: int, dim: int, *, init_std: float = 0.02) -> None:
        super().__init__()
        if max_len < 1 or dim < 1:
            raise ConfigError(f"max_len and dim must be >= 1, got {max_len} and {dim}")
        self.max_len, self.dim = max_len, dim
        self.embedding = nn.Embedding(max_len, dim)
        nn.init.normal_(self.embedding.weight, std=init_std)

    def encoding(self, seq_len: int, offset: int = 0) -> torch.Tensor:
        _check_length(seq_len, offset, self.max_len)
        return self.embedding.weight[offset : offset + seq_len]

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return x + self.encoding(x.shape[-2], offset).to(x.dtype)


class TransformerEmbedding(nn.Module):
    """Token embedding (dense or factorized) · scale + positional encoding, then dropout (and optional LayerNorm).

    Args:
        vocab_size, dim: table shape.
        rank: None for a dense nn.Embedding, else a FactorizedEmbedding of this rank.
        max_len: longest sequence.
        positional: ``"sinusoidal"``, ``"learned"`` or ``None``.
        dropout: dropout on the sum.
        scale: multiply token embeddings by this (``None`` = √dim, as in the original Transformer).
        layer_norm: apply LayerNorm after the sum (BERT style).
        token_embedding: a ready module to use instead of building one (e.g. a TTEmbedding).

    Example:
        >>> te = TransformerEmbedding(1000, 64, rank=16, max_len=128)
        >>> te(torch.randint(0, 1000, (2, 10))).shape
        torch.Size([2, 10, 64])
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        *,
        rank: int | None = None,
        max_len: int = 512,
        positional: str | None = "sinusoidal",
        dropout: float = 0.1,
        scale: float | None = None,
        layer_norm: bool = False,
        padding_idx: int | None = None,
        token_embedding: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if positional not in ("sinusoidal", "learned", None):
            raise ConfigError(f"positional must be 'sinusoidal', 'learned' or None, got {positional!r}")
        if not 0 <= dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        if token_embedding is not None:
            self.token = token_embedding
        elif rank is None:
            self.token = nn.Embedding(vocab_size, dim, padding_idx)
        else:
            self.token = FactorizedEmbedding(vocab_size, dim, rank, padding_idx)
        self.scale = math.sqrt(dim) if scale is None else scale
        if positional == "sinusoidal":
            self.position: nn.Module | None = SinusoidalPositionalEncoding(max_len, dim)
        elif positional == "learned":
            self.position = LearnedPositionalEncoding(max_len, dim)
        else:
            self.position = None
        self.norm = nn.LayerNorm(dim) if layer_norm else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        x = self.token(input_ids) * self.scale
        if self.position is not None:
            x = self.position(x, offset)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)
