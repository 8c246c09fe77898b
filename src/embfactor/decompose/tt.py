"""Tensor-train (TT) decomposition of an embedding matrix by TT-SVD (Oseledets 2011), registered as method ``tt``.

The (vocab × d) matrix, padded with zero rows to n_1⋯n_k rows, is reshaped to a 2k-way tensor and its modes are
paired as (n_1·m_1, …, n_k·m_k); k − 1 truncated SVDs of successive unfoldings give the cores. The cores feed a
:class:`embfactor.layers.TTEmbedding`, which computes rows without ever building the table.

Rank argument of the registered method: ``rank`` r is read as a *parameter budget*, the r·(vocab + d) parameters a
rank-r U·V would have; the largest uniform TT rank whose cores fit in that budget is used, so ``compress --ratio 6
--method tt`` and ``--method svd`` are compared at the same size. Pass ``tt_rank=`` (e.g. ``--method-option
tt_rank=32``) to set the TT rank directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
import torch

from embfactor.decompose._common import fix_signs
from embfactor.decompose.factors import _BLOCK_ROWS, Factors
from embfactor.decompose.registry import register_method
from embfactor.errors import ConfigError, InvalidInputError


@dataclass
class TTFactors(Factors):
    """A tensor-train factorization of a (vocab × d) matrix.

    ``U``/``V`` are empty placeholders (vocab × 0, 0 × d) so the matrix shape is known; the data is in ``cores``,
    each of shape (n_t, r_{t-1}, m_t, r_t) as in :class:`embfactor.layers.TTEmbedding`.

    Example:
        >>> f = tt_svd(torch.randn(100, 16), 4)
        >>> f.shape, f.tt_ranks, f.num_params
        ((100, 16), [4, 4], 272)
    """

    cores: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.cores:
            raise InvalidInputError("TTFactors needs at least two cores")

    @property
    def tt_ranks(self) -> list[int]:
        return [int(c.shape[3]) for c in self.cores[:-1]]

    @property
    def rank(self) -> int:
        """The largest TT rank (a TT has several; see ``tt_ranks``)."""
        return max(self.tt_ranks)

    @property
    def num_params(self) -> int:
        return sum(c.numel() for c in self.cores)

    def module(self, padding_idx: int | None = None, *, zero_padding_row: bool = False):
        from embfactor.layers.tt import TTEmbedding

        return TTEmbedding.from_cores(self.cores, self.shape[0], padding_idx, zero_padding_row=zero_padding_row)

    def reconstruct(self) -> torch.Tensor:
        """The dense (vocab × d) table (costs vocab × d memory)."""
        with torch.no_grad():
            return self.module().materialize()

    def to(self, dtype: torch.dtype) -> TTFactors:
        return TTFactors(
            self.U.to(dtype), self.V.to(dtype), self.method, self.singular_values, dict(self.meta),
            cores=[c.to(dtype) for c in self.cores],
        )

    def to_module(
        self, padding_idx: int | None = None, *, sparse: bool = False, zero_padding_row: bool = True, copy: bool = True
    ):
        """A TTEmbedding holding these cores.

        ``sparse`` is not supported by TT and ignored; the layer always holds its own copies, whatever ``copy`` says.
        """
        return self.module(padding_idx, zero_padding_row=zero_padding_row)

    def relative_error(self, E: torch.Tensor) -> float:
        """‖E − T‖_F / ‖E‖_F, computed in row blocks from the cores."""
        if tuple(E.shape) != self.shape:
            raise InvalidInputError(f"E has shape {tuple(E.shape)} but the TT represents {self.shape}")
        emb = self.module()
        num = den = 0.0
        with torch.no_grad():
            for start in range(0, E.shape[0], _BLOCK_ROWS):
                stop = min(start + _BLOCK_ROWS, E.shape[0])
                e = E[start:stop].double()
                num += float((e - emb.materialize(start, stop).double()).pow(2).sum())
                den += float(e.pow(2).sum())
        if den == 0.0:
            return 0.0 if num == 0.0 else float("inf")
        return (num / den) ** 0.5


def tt_svd(
    E: torch.Tensor,
    tt_rank: int | Sequence[int],
    *,
    num_cores: int = 3,
    vocab_shape: Sequence[int] | None = None,
    dim_shape: Sequence[int] | None = None,
) -> TTFactors:
    """TT-SVD of E (vocab × d): the quasi-optimal TT with the given ranks (clamped to the exact TT ranks).

    Args:
        E: the matrix (float32/float64).
        tt_rank: one TT rank for all bonds, or a list of num_cores − 1.
        num_cores, vocab_shape, dim_shape: the tensorization (automatic by default, see TTEmbedding).

    Returns:
        TTFactors whose cores reconstruct E exactly when the ranks are the exact TT ranks.

    Example:
        >>> E = torch.randn(60, 8)
        >>> f = tt_svd(E, 10**6)                        # full TT rank: exact
        >>> bool(torch.allclose(f.reconstruct(), E, atol=1e-5))
        True
    """
    from embfactor.layers.tt import resolve_tt_shapes

    vocab, d = int(E.shape[0]), int(E.shape[1])
    ns, ms, ranks = resolve_tt_shapes(
        vocab, d, tt_rank, num_cores=num_cores, vocab_shape=vocab_shape, dim_shape=dim_shape
    )
    k = len(ns)
    N = math.prod(ns)
    padded = torch.zeros(N, d, dtype=E.dtype, device=E.device)
    padded[:vocab] = E
    # (n_1..n_k, m_1..m_k) -> (n_1, m_1, n_2, m_2, ...): core t owns the mode pair (n_t, m_t)
    T = padded.reshape(*ns, *ms).permute(*[i for t in range(k) for i in (t, k + t)])
    C = T.reshape(ns[0] * ms[0], -1)
    cores: list[torch.Tensor] = []
    r_prev = 1
    for t in range(k - 1):
        Ut, S, Vh = torch.linalg.svd(C, full_matrices=False)
        r = min(ranks[t], S.numel())
        s = fix_signs(Ut[:, :r])  # deterministic gauge: largest entry of each left vector positive
        Ut, S, Vh = Ut[:, :r] * s, S[:r], Vh[:r] * s[:, None]
        cores.append(Ut.reshape(r_prev, ns[t], ms[t], r).permute(1, 0, 2, 3).contiguous())
        C = (S[:, None] * Vh).reshape(r * ns[t + 1] * ms[t + 1], -1)
        r_prev = r
    cores.append(C.reshape(r_prev, ns[-1], ms[-1], 1).permute(1, 0, 2, 3).contiguous())
    return TTFactors(
        E.new_empty(vocab, 0), E.new_empty(0, d), method="tt", cores=cores,
        meta={"tt_ranks": [int(c.shape[3]) for c in cores[:-1]], "vocab_shape": ns, "dim_shape": ms},
    )


def tt_rank_for_budget(
    vocab: int, d: int, budget: int, *, num_cores: int = 3, vocab_shape: Sequence[int] | None = None,
    dim_shape: Sequence[int] | None = None,
) -> int:
    """The largest uniform TT rank whose cores have at most ``budget`` parameters (at least 1).

    Example:
        >>> tt_rank_for_budget(30522, 384, 63 * (30522 + 384))     # the budget of a rank-63 U·V (6x)
        90
    """
    from embfactor.layers.tt import max_tt_ranks, resolve_tt_shapes, tt_num_params

    ns, ms, _ = resolve_tt_shapes(vocab, d, 1, num_cores=num_cores, vocab_shape=vocab_shape, dim_shape=dim_shape)
    best, lo, hi = 1, 1, max(max_tt_ranks(ns, ms))
    while lo <= hi:  # the parameter count grows monotonically with the (clamped) rank
        mid = (lo + hi) // 2
        if tt_num_params(ns, ms, resolve_tt_shapes(vocab, d, mid, vocab_shape=ns, dim_shape=ms)[2]) <= budget:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


@register_method("tt", description="tensor-train (TT-SVD); rank = parameter budget of a rank-r U·V, or tt_rank=")
def tt(
    E: torch.Tensor,
    rank: int,
    *,
    seed: int = 0,
    progress: bool = False,
    tt_rank: int | Sequence[int] | None = None,
    num_cores: int = 3,
    vocab_shape: Sequence[int] | None = None,
    dim_shape: Sequence[int] | None = None,
) -> TTFactors:
    """TT-SVD at the TT rank that matches the parameters of a rank-``rank`` U·V (or at ``tt_rank``).

    Example:
        >>> f = tt(torch.randn(200, 16), 4)
        >>> f.num_params <= 4 * (200 + 16)
        True
    """
    vocab, d = int(E.shape[0]), int(E.shape[1])
    if tt_rank is None:
        tt_rank = tt_rank_for_budget(
            vocab, d, rank * (vocab + d), num_cores=num_cores, vocab_shape=vocab_shape, dim_shape=dim_shape
        )
    elif isinstance(tt_rank, str):
        try:
            tt_rank = int(tt_rank)
        except ValueError:
            raise ConfigError(f"tt_rank must be a positive integer, got {tt_rank!r}") from None
    f = tt_svd(E, tt_rank, num_cores=num_cores, vocab_shape=vocab_shape, dim_shape=dim_shape)
    f.meta["budget_rank"] = rank
    return f


__all__ = ["TTFactors", "tt", "tt_rank_for_budget", "tt_svd"]
