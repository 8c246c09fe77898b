"""SharedEmbedding: a second input embedding reading a table stored once (T5's and BART's encoder/decoder tables)."""

from __future__ import annotations

import torch
from torch import nn

from embfactor.errors import InvalidTypeError
from embfactor.formats.base import EmbedScale, RowFormat, is_row_format, scale_rows


class SharedEmbedding(nn.Module):
    """An input embedding that reads another module's stored table, with its own ``embed_scale``.

    Encoder-decoder models keep one table under several names (T5: ``shared``, ``encoder.embed_tokens``,
    ``decoder.embed_tokens``; BART/M2M100 the same under ``model.``), each a module of its own that shares the weight
    tensor and may scale its lookup (BART's ``BartScaledWordEmbedding``). After compression one storage format holds
    the table; every other name gets a SharedEmbedding on it. Like :class:`embfactor.layers.FactorizedLMHead` it holds
    *no tensors of its own* (the format is kept outside the module tree), so a state dict lists the table once and
    every reader always uses the same tensors.

    Example:
        >>> from embfactor.formats import FactorizedEmbedding
        >>> table = FactorizedEmbedding(100, 8, rank=4)
        >>> enc = SharedEmbedding(table, embed_scale=2.0)
        >>> torch.allclose(enc(torch.tensor([3])), 2 * table(torch.tensor([3])))
        True
    """

    def __init__(self, table: RowFormat, embed_scale: EmbedScale = None) -> None:
        super().__init__()
        if not is_row_format(table):
            raise InvalidTypeError(f"SharedEmbedding reads an embfactor storage format (RowFormat), got {type(table).__name__}")
        self._table = (table,)  # a tuple, not a submodule: the table's tensors are registered once, by their owner
        self.embed_scale = embed_scale

    @property
    def table(self) -> RowFormat:
        return self._table[0]

    @property
    def num_embeddings(self) -> int:
        return self.table.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.table.embedding_dim

    @property
    def padding_idx(self) -> int | None:
        return self.table.padding_idx

    @property
    def weight(self) -> torch.Tensor:
        """The stored table, dense and unscaled (as the shared module's ``weight`` was), materialized on read."""
        return self.table.weight

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return scale_rows(self.table.lookup(input), self.embed_scale)

    def extra_repr(self) -> str:
        t = self.table
        return f"{t.num_embeddings}, {t.embedding_dim}, reads {type(t).__name__}, embed_scale={self.embed_scale}"
