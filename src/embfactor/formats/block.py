"""BlockFactorizedEmbedding (``block``): a tiered format whose tiers are low rank, one rank per frequency bucket.

Built from :class:`embfactor.decomposition.block.BlockFactors` (GroupReduce-style buckets). A bucket of rank 0
is a :class:`~embfactor.formats.zeros.ZeroRows` tier. Folders saved before tiers existed (state-dict keys
``U.<b>`` / ``V.<b>``) load unchanged: the keys are mapped to ``tiers.<b>.U`` / ``tiers.<b>.V`` on load.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from embfactor.decomposition.block import BlockFactors
from embfactor.errors import ConfigError
from embfactor.formats.base import RowFormat, check_format_args, register_format
from embfactor.formats.lowrank import FactorizedEmbedding
from embfactor.formats.tiered import TieredFormat
from embfactor.formats.zeros import ZeroRows

_OLD_KEY = re.compile(r"([UV])\.(\d+)$")


@register_format("block", factors=BlockFactors)
class BlockFactorizedEmbedding(TieredFormat):
    """Rows split into buckets (e.g. by token frequency); bucket b is U_b (n_b × r_b) · V_b.

    Args:
        num_embeddings: vocabulary size.
        embedding_dim: d.
        sizes: rows per bucket (sum = num_embeddings).
        ranks: rank per bucket (each 0 ≤ r_b ≤ min(n_b, d); a bucket of rank 0 embeds to zero).
        padding_idx: this token embeds to zero and gets no gradient.
        position: token id → position in the bucket-concatenated order; identity when None.
        zero_padding: False keeps a pretrained non-zero padding row (its approximation), as nn.Embedding would.

    Example:
        >>> emb = BlockFactorizedEmbedding(100, 16, sizes=[10, 90], ranks=[8, 2])
        >>> emb(torch.tensor([[0, 50]])).shape, emb.num_params
        (torch.Size([1, 2, 16]), 420)
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
        sizes, ranks = [int(s) for s in sizes], [int(r) for r in ranks]
        check_format_args(num_embeddings, embedding_dim, None)
        if len(sizes) != len(ranks) or not sizes:
            raise ConfigError(f"sizes and ranks need one entry per bucket, got {len(sizes)} sizes, {len(ranks)} ranks")
        if sum(sizes) != num_embeddings or min(sizes) < 1:
            raise ConfigError(f"bucket sizes {sizes} must be positive and sum to num_embeddings={num_embeddings}")
        for n, r in zip(sizes, ranks):
            if r < 0 or r > min(n, embedding_dim):
                raise ConfigError(f"bucket rank {r} must be within [0, min(bucket size {n}, d {embedding_dim})]")
        tiers: list[RowFormat] = [
            FactorizedEmbedding(n, embedding_dim, r, full_rank=True, device=device, dtype=dtype) if r > 0
            else ZeroRows(n, embedding_dim, device=device, dtype=dtype)
            for n, r in zip(sizes, ranks)
        ]
        super().__init__(tiers, position, padding_idx, zero_padding=zero_padding)
        self.ranks = ranks

    @property
    def rank(self) -> int:
        """The equal-budget rank: parameters / (vocab + d), as a plain factorization would count them."""
        return round(self.num_params / (self.num_embeddings + self.embedding_dim))

    def format_config(self) -> dict[str, Any]:
        return {"sizes": self.sizes, "ranks": list(self.ranks), "zero_padding": self.zero_padding}

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
    def from_factors(
        cls, f: BlockFactors, padding_idx: int | None = None, *, zero_padding_row: bool = True, **_: Any
    ) -> BlockFactorizedEmbedding:
        """The layer holding a block decomposition's buckets (``sparse``/``copy`` do not apply: factors are copied)."""
        return cls.from_blocks(f.blocks, f.position, padding_idx, zero_padding=zero_padding_row)

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
            for tier, (U, V) in zip(emb.tiers, blocks):
                if isinstance(tier, FactorizedEmbedding):
                    tier.U.copy_(U)
                    tier.V.copy_(V.to(U.dtype))
        return emb

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Folders saved before block became tiered hold U.<b> / V.<b>: rename them to this layout (a rank-0
        # bucket's empty n × 0 and 0 × d tensors have no counterpart in a ZeroRows tier and are dropped).
        for key in [k for k in state_dict if k.startswith(prefix)]:
            m = _OLD_KEY.fullmatch(key[len(prefix):])
            if m is None:
                continue
            value = state_dict.pop(key)
            b = int(m.group(2))
            if b < len(self.tiers) and isinstance(self.tiers[b], FactorizedEmbedding):
                state_dict[f"{prefix}tiers.{b}.{m.group(1)}"] = value
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, sizes={self.sizes}, ranks={self.ranks}"
        return s + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")
