"""ZeroRows (``zeros``): a table whose rows are all zero and which stores nothing.

The tier of a tiered format for rows that are dropped (a bucket of rank 0, tokens that never occur).
"""

from __future__ import annotations

from typing import Any

import torch

from embfactor.formats.base import RowFormat, check_format_args, register_format


@register_format("zeros")
class ZeroRows(RowFormat):
    """``num_embeddings`` rows of zeros in ``dtype``: 0 bytes, no parameters.

    Example:
        >>> z = ZeroRows(5, 3)
        >>> z(torch.tensor([1, 4])).abs().sum().item(), z.num_bytes()
        (0.0, 0)
    """

    def __init__(
        self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.padding_idx = check_format_args(num_embeddings, embedding_dim, padding_idx)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.dtype = dtype or torch.float32

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(ids.shape[0], self.embedding_dim, dtype=self.dtype, device=ids.device)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.new_zeros(*hidden.shape[:-1], self.num_embeddings)

    def num_bytes(self) -> int:
        return 0

    def format_config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def empty(
        cls, num_embeddings: int, embedding_dim: int, padding_idx: int | None, *,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> ZeroRows:
        return cls(num_embeddings, embedding_dim, padding_idx, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"
