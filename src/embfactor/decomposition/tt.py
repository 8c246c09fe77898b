"""Tensor-train (TT) decomposition of an embedding matrix by TT-SVD (Oseledets 2011), registered as method ``tt``.

The (vocab × d) matrix, padded with zero rows to n_1⋯n_k rows, is reshaped to a 2k-way tensor and its modes are
paired as (n_1·m_1, …, n_k·m_k); k − 1 truncated SVDs of successive unfoldings give the cores. The cores feed a
:class:`embfactor.formats.TTEmbedding`, which computes rows without ever building the table; the shape maths
(tensorizations, exact TT ranks, parameter counts) lives here.

Rank argument of the registered method: ``rank`` r is read as a *parameter budget*, the r·(vocab + d) parameters a
rank-r U·V would have; the largest uniform TT rank whose cores fit in that budget is used, so ``compress --ratio 6
--method tt`` and ``--method svd`` are compared at the same size. Pass ``tt_rank=`` (e.g. ``--method-option
tt_rank=32``) to set the TT rank directly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from embfactor.decomposition._common import fix_signs
from embfactor.decomposition.factors import _BLOCK_ROWS, Factors
from embfactor.decomposition.registry import register_method
from embfactor.errors import ConfigError, InvalidInputError


@dataclass
class TTFactors(Factors):
    """A tensor-train factorization of a (vocab × d) matrix.

    ``U``/``V`` are empty placeholders (vocab × 0, 0 × d) so the matrix shape is known; the data is in ``cores``,
    each of shape (n_t, r_{t-1}, m_t, r_t) as in :class:`embfactor.formats.TTEmbedding`.

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

    def reconstruct(self) -> torch.Tensor:
        """The dense (vocab × d) table (costs vocab × d memory)."""
        return tt_rows(self.cores, torch.arange(self.shape[0], device=self.cores[0].device))

    def to(self, dtype: torch.dtype) -> TTFactors:
        return TTFactors(
            self.U.to(dtype), self.V.to(dtype), self.method, self.singular_values, dict(self.meta),
            cores=[c.to(dtype) for c in self.cores],
        )

    def relative_error(self, E: torch.Tensor) -> float:
        """‖E − T‖_F / ‖E‖_F, computed in row blocks from the cores."""
        if tuple(E.shape) != self.shape:
            raise InvalidInputError(f"E has shape {tuple(E.shape)} but the TT represents {self.shape}")
        num = den = 0.0
        with torch.no_grad():
            for start in range(0, E.shape[0], _BLOCK_ROWS):
                stop = min(start + _BLOCK_ROWS, E.shape[0])
                e = E[start:stop].double()
                rows = tt_rows(self.cores, torch.arange(start, stop, device=self.cores[0].device))
                num += float((e - rows.double()).pow(2).sum())
                den += float(e.pow(2).sum())
        if den == 0.0:
            return 0.0 if num == 0.0 else float("inf")
        return (num / den) ** 0.5


def factorize_exact(n: int, k: int) -> list[int]:
    """The most balanced k integers (ascending) whose product is exactly n (1s allowed for awkward n).

    Example:
        >>> factorize_exact(384, 3)
        [6, 8, 8]
    """
    if n < 1 or k < 1:
        raise ConfigError(f"cannot factor {n} into {k} factors")
    best: list[int] | None = None

    def rec(rest: int, parts: list[int], lo: int) -> None:
        nonlocal best
        if len(parts) == k - 1:
            if rest >= lo:
                cand = [*parts, rest]
                if best is None or (max(cand), -min(cand)) < (max(best), -min(best)):
                    best = cand
            return
        f = lo
        while f ** (k - len(parts)) <= rest:
            if rest % f == 0:
                rec(rest // f, [*parts, f], f)
            f += 1

    rec(n, [], 1)
    assert best is not None  # n itself with 1s always qualifies
    return best


def factorize_padded(n: int, k: int) -> list[int]:
    """k balanced integers whose product is the smallest number ≥ n reachable near n^(1/k) (vocab padding).

    Example:
        >>> factorize_padded(30522, 3)
        [27, 29, 39]
    """
    if n < 1 or k < 1:
        raise ConfigError(f"cannot factor {n} into {k} factors")
    if k == 1:
        return [n]
    base = max(1, round(n ** (1.0 / k)))
    span = range(max(1, base - 4), base + 5)
    best: tuple[int, int, list[int]] | None = None

    def rec(parts: list[int]) -> None:
        nonlocal best
        if len(parts) == k - 1:
            last = -(-n // math.prod(parts))
            cand = sorted([*parts, last])
            key = (math.prod(cand), max(cand) - min(cand), cand)
            if best is None or key < best:
                best = key
            return
        for f in span:
            rec([*parts, f])

    rec([])
    assert best is not None
    return best[2]


def max_tt_ranks(vocab_shape: Sequence[int], dim_shape: Sequence[int]) -> list[int]:
    """The exact (full) TT ranks r_1..r_{k-1}: no larger rank can add anything."""
    modes = [n * m for n, m in zip(vocab_shape, dim_shape)]
    return [min(math.prod(modes[: t + 1]), math.prod(modes[t + 1 :])) for t in range(len(modes) - 1)]


def tt_num_params(vocab_shape: Sequence[int], dim_shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Parameters of the cores: Σ_t r_{t-1}·n_t·m_t·r_t."""
    r = [1, *ranks, 1]
    return sum(r[t] * n * m * r[t + 1] for t, (n, m) in enumerate(zip(vocab_shape, dim_shape)))


def resolve_tt_shapes(
    num_embeddings: int,
    embedding_dim: int,
    tt_rank: int | Sequence[int],
    *,
    num_cores: int = 3,
    vocab_shape: Sequence[int] | None = None,
    dim_shape: Sequence[int] | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """Validate/choose (vocab_shape, dim_shape, ranks); ranks above the exact TT ranks are clamped to them."""
    if isinstance(num_cores, bool) or not isinstance(num_cores, int) or num_cores < 2:
        raise ConfigError(f"num_cores must be an integer >= 2, got {num_cores!r}")
    if vocab_shape is None:
        vocab_shape = factorize_padded(num_embeddings, num_cores)
    if dim_shape is None:
        dim_shape = factorize_exact(embedding_dim, len(vocab_shape))
    vocab_shape, dim_shape = [int(v) for v in vocab_shape], [int(v) for v in dim_shape]
    if len(vocab_shape) != len(dim_shape) or len(vocab_shape) < 2:
        raise ConfigError(
            f"vocab_shape and dim_shape must have the same length >= 2, got {vocab_shape} and {dim_shape}"
        )
    if min(vocab_shape) < 1 or min(dim_shape) < 1:
        raise ConfigError(f"vocab_shape and dim_shape must be positive, got {vocab_shape} and {dim_shape}")
    if math.prod(vocab_shape) < num_embeddings:
        raise ConfigError(
            f"vocab_shape {vocab_shape} covers {math.prod(vocab_shape)} rows < num_embeddings={num_embeddings}"
        )
    if math.prod(dim_shape) != embedding_dim:
        raise ConfigError(f"dim_shape {dim_shape} multiplies to {math.prod(dim_shape)}, not embedding_dim={embedding_dim}")
    k = len(vocab_shape)
    if isinstance(tt_rank, (int,)) and not isinstance(tt_rank, bool):
        ranks = [tt_rank] * (k - 1)
    elif isinstance(tt_rank, (list, tuple)) and len(tt_rank) == k - 1:
        ranks = list(tt_rank)
    else:
        raise ConfigError(f"tt_rank must be a positive integer or a list of {k - 1} of them, got {tt_rank!r}")
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
        raise ConfigError(f"tt_rank must be >= 1, got {tt_rank!r}")
    ranks = [min(r, top) for r, top in zip(ranks, max_tt_ranks(vocab_shape, dim_shape))]
    return vocab_shape, dim_shape, ranks


def tt_rows(cores: Sequence[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` (1-D int64, each < ∏ n_t) of the matrix a TT represents: (len(ids) × ∏ m_t).

    The plain reference contraction, one (M × r) · (r × m·r') product per id and core; the TT format
    (:class:`embfactor.formats.TTEmbedding`) shares prefixes and is faster, and is tested against this.

    Example:
        >>> f = tt_svd(torch.randn(60, 8), 10**6)
        >>> rows = tt_rows(f.cores, torch.tensor([3, 7]))
        >>> rows.shape
        torch.Size([2, 8])
    """
    ns = [int(c.shape[0]) for c in cores]
    cur = None  # (U, M, r): the product of the cores so far for each id
    for t, core in enumerate(cores):
        digit = (ids // math.prod(ns[t + 1 :])) % ns[t]
        n, rp, m, rn = core.shape
        sl = core.index_select(0, digit)  # (U, r_prev, m, r)
        if cur is None:
            cur = sl.reshape(-1, m, rn)
        else:
            cur = torch.bmm(cur, sl.reshape(-1, rp, m * rn)).reshape(cur.shape[0], -1, rn)
    assert cur is not None
    return cur.reshape(ids.shape[0], -1)


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
    ns, ms, _ = resolve_tt_shapes(vocab, d, 1, num_cores=num_cores, vocab_shape=vocab_shape, dim_shape=dim_shape)
    best, lo, hi = 1, 1, max(max_tt_ranks(ns, ms))
    while lo <= hi:  # the parameter count grows monotonically with the (clamped) rank
        mid = (lo + hi) // 2
        if tt_num_params(ns, ms, resolve_tt_shapes(vocab, d, mid, vocab_shape=ns, dim_shape=ms)[2]) <= budget:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def _tt_rank_option(tt_rank: int | Sequence[int] | str) -> int | Sequence[int]:
    if isinstance(tt_rank, str):  # e.g. from a config written by hand
        try:
            return int(tt_rank)
        except ValueError:
            raise ConfigError(f"tt_rank must be a positive integer, got {tt_rank!r}") from None
    return tt_rank


def tt_stored_bytes(vocab: int, d: int, options: Mapping[str, Any]) -> int:
    """The fp32 bytes of the cores at an explicit ``tt_rank`` (4 × parameters, as a rank target's budget counts).

    Example:
        >>> tt_stored_bytes(200, 16, {"tt_rank": 4}) == 4 * tt(torch.randn(200, 16), 1, tt_rank=4).num_params
        True
    """
    shapes = resolve_tt_shapes(
        vocab, d, _tt_rank_option(options["tt_rank"]), num_cores=options.get("num_cores", 3),
        vocab_shape=options.get("vocab_shape"), dim_shape=options.get("dim_shape"),
    )
    return 4 * tt_num_params(*shapes)


@register_method("tt", description="tensor-train (TT-SVD); rank = parameter budget of a rank-r U·V, or tt_rank=",
                 size_options=("tt_rank",), stored_bytes=tt_stored_bytes)
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
    else:
        tt_rank = _tt_rank_option(tt_rank)
    f = tt_svd(E, tt_rank, num_cores=num_cores, vocab_shape=vocab_shape, dim_shape=dim_shape)
    f.meta["budget_rank"] = rank
    return f


__all__ = [
    "TTFactors",
    "factorize_exact",
    "factorize_padded",
    "max_tt_ranks",
    "resolve_tt_shapes",
    "tt",
    "tt_num_params",
    "tt_rank_for_budget",
    "tt_rows",
    "tt_svd",
]
