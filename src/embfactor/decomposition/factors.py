"""The Factors dataclass: E ≈ U·V, with the metadata of how it was computed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from embfactor.errors import InvalidInputError

# rows per block of relative_error: a 2048 × d float32 difference and its float64 copy (~7 MB at d=384)
_BLOCK_ROWS = 2048


@dataclass
class Factors:
    """A rank-r factorization E ≈ U·V.

    Attributes:
        U: (vocab × r) left factor.
        V: (r × d) right factor.
        method: the registered method that produced it.
        singular_values: the r leading singular values of E when the method knows them, else None.
        meta: method-specific facts (iterations, seconds, ...), JSON-serializable.

    Example:
        >>> f = Factors(torch.ones(4, 1), torch.ones(1, 3))
        >>> f.reconstruct().shape, f.rank, f.num_params
        (torch.Size([4, 3]), 1, 7)
    """

    U: torch.Tensor
    V: torch.Tensor
    method: str = ""
    singular_values: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.U.ndim != 2 or self.V.ndim != 2 or self.U.shape[1] != self.V.shape[0]:
            raise InvalidInputError(
                f"factors must be U (vocab × r) and V (r × d), got U {tuple(self.U.shape)} and V {tuple(self.V.shape)}"
            )

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the reconstructed matrix (vocab, d)."""
        return int(self.U.shape[0]), int(self.V.shape[1])

    @property
    def num_params(self) -> int:
        return self.U.numel() + self.V.numel()

    def reconstruct(self) -> torch.Tensor:
        """The dense (vocab × d) product U·V."""
        return self.U @ self.V

    def to(self, dtype: torch.dtype) -> Factors:
        return Factors(self.U.to(dtype), self.V.to(dtype), self.method, self.singular_values, dict(self.meta))

    def relative_error(self, E: torch.Tensor) -> float:
        """‖E − U·V‖_F / ‖E‖_F, computed in row blocks so the full product is never held in memory."""
        return relative_error(E, self.U, self.V)


def relative_error(E: torch.Tensor, U: torch.Tensor, V: torch.Tensor, block_rows: int = _BLOCK_ROWS) -> float:
    """‖E − U·V‖_F / ‖E‖_F in float64 accumulation, block by block (0.0 for E = 0 reconstructed exactly).

    Only one row block of E − U·V (and its float64 copy) exists at a time, never the vocab × d product.
    """
    if E.shape != (U.shape[0], V.shape[1]):
        raise InvalidInputError(f"E has shape {tuple(E.shape)} but U·V has shape {(U.shape[0], V.shape[1])}")
    num = 0.0
    den = 0.0
    Vw = V.to(torch.float32 if E.dtype != torch.float64 else torch.float64)
    for start in range(0, E.shape[0], block_rows):
        e = E[start : start + block_rows].to(Vw.dtype)
        # addmm writes e − U_b·V into one new block (no separate product and difference temporaries)
        num += _sum_squares(torch.addmm(e, U[start : start + block_rows].to(Vw.dtype), Vw, alpha=-1))
        den += _sum_squares(e)
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return (num / den) ** 0.5


def _sum_squares(t: torch.Tensor) -> float:
    # Row norms in the block's own precision (torch's cascaded sums: ~1e-7 relative over a few thousand columns),
    # then the float64 sum over rows: no float64 copy of the block, which was 2 × 6 MB of heap at MiniLM's peak.
    return float(torch.linalg.vector_norm(t, dim=-1).double().square().sum())
