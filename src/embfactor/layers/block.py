"""BlockFactorizedEmbedding: tokens in frequency buckets, each bucket with its own factors U_b·V_b and rank r_b."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from embfactor.errors import ConfigError, InvalidInputError
from embfactor.layers.embedding import check_token_ids
from embfactor.layers.registry import check_layer_args, register_layer


@register_layer("block")
class BlockFactorizedEmbedding(nn.Module):
    """An embedding whose rows are split into buckets (e.g. by token frequency); bucket b is U_b (n_b × r_b) · V_b.

    ``position`` (a buffer) maps each token id to its row in the bucket-concatenated order: bucket 0 holds
    positions [0, n_0), bucket 1 the next n_1, and so on. Forward gathers each token's row of its bucket's U_b
    and multiplies by V_b; the vocab × d table is never built. GroupReduce-style: frequent tokens get a larger
    rank than rare ones for the same parameter budget.

    Args:
        num_embeddings: vocabulary size.
        embedding_dim: d.
        sizes: rows per bucket (sum = num_embeddings).
        ranks: rank per bucket (each 0 ≤ r_b ≤ min(n_b, d); a bucket of rank 0 embeds to zero).
        padding_idx: this token embeds to zero and gets no gradient.
        position: token id → position (a permutation of range(vocab)); identity when None.
        zero_padding: False keeps a pretrained non-zero padding row (its approximation), as nn.Embedding would.

    Example:
        >>> emb = BlockFactorizedEmbedding(100, 16, sizes=[10, 90], ranks=[8, 2])
        >>> emb(torch.tensor([[0, 50]])).shape, emb.num_params
        (torch.Size([1, 2, 16]), 492)
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        sizes: Sequence[int],
        ranks: Sequence[int],
        padding_idx: int | None = None,
        position: torch.Tensor | None = None,
        zero_padding: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        sizes, ranks = [int(s) for s in sizes], [int(r) for r in ranks]
        if len(sizes) != len(ranks) or not sizes:
            raise ConfigError(f"sizes and ranks need one entry per bucket, got {len(sizes)} sizes, {len(ranks)} ranks")
        if sum(sizes) != num_embeddings or min(sizes) < 1:
            raise ConfigError(f"bucket sizes {sizes} must be positive and sum to num_embeddings={num_embeddings}")
        for n, r in zip(sizes, ranks):
            if r < 0 or r > min(n, embedding_dim):
                raise ConfigError(f"bucket rank {r} must be within [0, min(bucket size {n}, d {embedding_dim})]")
        padding_idx = check_layer_args(num_embeddings, embedding_dim, padding_idx)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.sizes, self.ranks, self.zero_padding = sizes, ranks, bool(zero_padding)
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.U = nn.ParameterList([nn.Parameter(torch.zeros(n, r, **kw)) for n, r in zip(sizes, ranks)])
        self.V = nn.ParameterList([nn.Parameter(torch.zeros(r, embedding_dim, **kw)) for r in ranks])
        if position is None:
            position = torch.arange(num_embeddings)
        position = torch.as_tensor(position, dtype=torch.int64, device=device)
        if position.shape != (num_embeddings,) or not torch.equal(
            torch.sort(position.cpu()).values, torch.arange(num_embeddings)
        ):
            raise InvalidInputError("position must be a permutation of range(num_embeddings)")
        self.register_buffer("position", position)
        self.register_buffer("starts", torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()]), persistent=False)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def rank(self) -> int:
        """The equal-budget rank: parameters / (vocab + d), as a plain factorization would count them."""
        return round(self.num_params / (self.num_embeddings + self.embedding_dim))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        check_token_ids(input, self.num_embeddings)
        ids = input.long()
        pos = self.position[ids].reshape(-1)
        out = None
        for b, (U, V) in enumerate(zip(self.U, self.V)):
            lo, hi = int(self.starts[b]), int(self.starts[b + 1])
            sel = ((pos >= lo) & (pos < hi)).nonzero().squeeze(1)
            if out is None:
                out = torch.zeros(pos.numel(), self.embedding_dim, dtype=self.V[0].dtype, device=pos.device)
            if sel.numel() == 0 or U.shape[1] == 0:
                continue
            out = out.index_copy(0, sel, F.embedding(pos[sel] - lo, U) @ V)
        out = out.reshape(*ids.shape, self.embedding_dim)
        if self.padding_idx is not None and self.zero_padding:
            out = out * (ids != self.padding_idx).unsqueeze(-1).to(out.dtype)
        return out

    @property
    def weight(self) -> torch.Tensor:
        """The dense table (vocab × d), materialized on each read."""
        sorted_rows = torch.cat([U @ V for U, V in zip(self.U, self.V)], 0)
        table = sorted_rows.index_select(0, self.position)
        if self.padding_idx is not None and self.zero_padding:
            table = table.clone()
            table[self.padding_idx] = 0
        return table

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden · tableᵀ as Σ over buckets of (hidden·V_bᵀ)·U_bᵀ, then un-permuted to token order."""
        parts = [F.linear(F.linear(hidden, V), U) for U, V in zip(self.U, self.V)]
        logits = torch.cat(parts, -1).index_select(-1, self.position)
        if self.padding_idx is not None and self.zero_padding:
            logits = logits.index_fill(-1, torch.tensor([self.padding_idx], device=logits.device), 0.0)
        return logits

    def layer_config(self) -> dict[str, Any]:
        return {"sizes": list(self.sizes), "ranks": list(self.ranks), "zero_padding": self.zero_padding}

    @classmethod
    def empty(
        cls, num_embeddings: int, embedding_dim: int, padding_idx: int | None, *, sizes: Sequence[int],
        ranks: Sequence[int], zero_padding: bool = True, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> BlockFactorizedEmbedding:
        """Right shapes, values (and the token order buffer) to be loaded from a state dict."""
        return cls(num_embeddings, embedding_dim, sizes=sizes, ranks=ranks, padding_idx=padding_idx,
                   zero_padding=zero_padding, device=device, dtype=dtype)

    @classmethod
    def from_blocks(
        cls,
        blocks: Sequence[tuple[torch.Tensor, torch.Tensor]],
        position: torch.Tensor,
        padding_idx: int | None = None,
        *,
        zero_padding: bool = True,
    ) -> BlockFactorizedEmbedding:
        """Wrap per-bucket factors [(U_b, V_b), ...] (copied) with the token → position permutation."""
        U0, V0 = blocks[0]
        emb = cls(
            int(position.numel()), int(V0.shape[1]), sizes=[U.shape[0] for U, _ in blocks],
            ranks=[U.shape[1] for U, _ in blocks], padding_idx=padding_idx, position=position,
            zero_padding=zero_padding, device=U0.device, dtype=U0.dtype,
        )
        with torch.no_grad():
            for b, (U, V) in enumerate(blocks):
                emb.U[b].copy_(U)
                emb.V[b].copy_(V.to(U.dtype))
        return emb

    def to_dense(self) -> nn.Embedding:
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx,
                           device=self.position.device, dtype=self.V[0].dtype)
        with torch.no_grad():
            emb.weight.copy_(self.weight)
        return emb

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, sizes={self.sizes}, ranks={self.ranks}"
        return s + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")
