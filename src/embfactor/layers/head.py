"""FactorizedLMHead: the one output head tied to an embedding stored in any format."""

from __future__ import annotations

import torch
from torch import nn

from embfactor.errors import ConfigError, InvalidTypeError
from embfactor.formats.base import RowFormat, is_row_format


class FactorizedLMHead(nn.Module):
    """Output projection tied to a factorized embedding: logits = (h·Vᵀ)·Uᵀ (+ bias).

    The head holds *no parameters of its own* besides the optional bias: it calls ``project`` of the embedding
    it is tied to, so both always use the same tensors and a state dict lists them once. With a
    FactorizedEmbedding this costs r·(d + vocab) multiply-adds per token instead of d·vocab. Any storage format
    (:class:`embfactor.formats.RowFormat`: block, tiered, quantized, tensor-train, ...) is tied the same way.

    Example:
        >>> from embfactor.formats import FactorizedEmbedding
        >>> emb = FactorizedEmbedding(1000, 64, rank=16)
        >>> head = FactorizedLMHead(emb)
        >>> head(torch.randn(2, 64)).shape
        torch.Size([2, 1000])
        >>> head.U is emb.U
        True
    """

    def __init__(self, embedding: RowFormat, bias: torch.Tensor | nn.Parameter | None = None) -> None:
        super().__init__()
        if not is_row_format(embedding):
            raise InvalidTypeError(
                f"FactorizedLMHead ties to an embfactor storage format (a RowFormat such as FactorizedEmbedding), "
                f"got {type(embedding).__name__}"
            )
        # Stored outside the module tree (a plain tuple), so the factors are not registered twice.
        self._tied = (embedding,)
        if bias is not None:
            if bias.shape != (embedding.num_embeddings,):
                raise ConfigError(f"bias must have shape ({embedding.num_embeddings},), got {tuple(bias.shape)}")
            bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach().clone())
        self.bias = bias

    @property
    def embedding(self) -> RowFormat:
        return self._tied[0]

    @property
    def U(self) -> nn.Parameter:
        """The tied low-rank embedding's U (AttributeError for formats without one)."""
        return self.embedding.U

    @property
    def V(self) -> nn.Parameter:
        """The tied low-rank embedding's V (AttributeError for formats without one)."""
        return self.embedding.V

    @property
    def in_features(self) -> int:
        return self.embedding.embedding_dim

    @property
    def out_features(self) -> int:
        return self.embedding.num_embeddings

    @property
    def weight(self) -> torch.Tensor:
        """The dense (vocab × d) weight, materialized on read."""
        return self.embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.embedding.project(hidden)
        return logits + self.bias if self.bias is not None else logits

    def extra_repr(self) -> str:
        e = self.embedding
        return f"in_features={e.embedding_dim}, out_features={e.num_embeddings}, tied to {type(e).__name__}, bias={self.bias is not None}"
