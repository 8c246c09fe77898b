"""Block-wise factorization (``block``): tokens bucketed by frequency, each bucket with its own rank (GroupReduce).

How the budget maps: the ``rank`` r passed in (from ``rank=``/``ratio=``/... exactly as for ``svd``) stands for the
parameter budget of a plain factorization, r·(vocab + d). The buckets' ranks r_b are then chosen so that
Σ_b r_b·(n_b + d) ≤ r·(vocab + d): ``ratio=6`` gives the same number of parameters (within one rank's worth, a bit
less) as ``svd`` at ``ratio=6``. Ranks are allocated greedily by weighted error reduction per parameter: the next
singular direction goes to the bucket where σ²_{b,k+1} / (n_b + d) is largest, with σ the singular values of
diag(√w_b)·E_b. Each bucket is then factorized by weighted SVD (``wsvd``).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

import torch

from embfactor.decomposition.factors import Factors
from embfactor.decomposition.registry import register_method
from embfactor.decomposition.wsvd import check_token_weights, weighted_error, weighted_gram
from embfactor.errors import ConfigError


@dataclass
class BlockFactors(Factors):
    """Factors of a bucketed embedding: bucket b is U_b (n_b × r_b) · V_b (r_b × d).

    ``U``/``V`` hold the equivalent plain factorization (U block-sparse, vocab × Σr_b; V the stacked V_b), so
    ``reconstruct()`` and ``relative_error()`` work as for any Factors; ``embfactor.formats.from_factors`` builds
    the compact :class:`~embfactor.formats.block.BlockFactorizedEmbedding` (Σ r_b·(n_b + d) parameters).
    """

    blocks: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    position: torch.Tensor | None = None  # token id -> position in the bucket-concatenated order

    @property
    def num_params(self) -> int:
        return sum(U.numel() + V.numel() for U, V in self.blocks)

    @property
    def ranks(self) -> list[int]:
        return [int(U.shape[1]) for U, _ in self.blocks]

    @property
    def sizes(self) -> list[int]:
        return [int(U.shape[0]) for U, _ in self.blocks]

    def to(self, dtype: torch.dtype) -> BlockFactors:
        return BlockFactors(
            self.U.to(dtype), self.V.to(dtype), self.method, self.singular_values, dict(self.meta),
            blocks=[(U.to(dtype), V.to(dtype)) for U, V in self.blocks], position=self.position,
        )


def bucket_sizes(w_sorted: torch.Tensor, n_buckets: int, d: int) -> list[int]:
    """Bucket boundaries at equal shares of the total weight, over tokens sorted by descending weight.

    Every bucket but the last is made at least ``d`` rows (so that its rank can reach d) and empty buckets
    are merged away.
    """
    n = w_sorted.numel()
    cum = w_sorted.cumsum(0) / w_sorted.sum()
    cuts = [int(torch.searchsorted(cum, k / n_buckets).item()) + 1 for k in range(1, n_buckets)]
    sizes, prev = [], 0
    for c in cuts + [n]:
        c = min(max(c, prev + min(d, n - prev)), n)
        if c > prev:
            sizes.append(c - prev)
            prev = c
    if prev < n:
        sizes[-1] += n - prev
    return sizes


def allocate_ranks(
    spectra: list[torch.Tensor], sizes: list[int], d: int, budget: int, min_rank: int = 1
) -> list[int]:
    """Greedy ranks per bucket: best weighted error reduction per parameter, Σ r_b (n_b + d) ≤ budget."""
    caps = [min(n, d, s.numel()) for n, s in zip(sizes, spectra)]
    ranks = [min(min_rank, c) for c in caps]
    used = sum(r * (n + d) for r, n in zip(ranks, sizes))
    if used > budget:
        raise ConfigError(
            f"the parameter budget {budget:,} is too small for {len(sizes)} buckets with rank ≥ {min_rank}; "
            "use fewer buckets (n_buckets=), min_rank=0 or a larger rank"
        )
    heap = [(-float(spectra[b][ranks[b]]) / (sizes[b] + d), b) for b in range(len(sizes)) if ranks[b] < caps[b]]
    heapq.heapify(heap)
    while heap:
        _, b = heapq.heappop(heap)
        cost = sizes[b] + d
        if used + cost > budget:
            continue  # does not fit; a cheaper bucket still might
        ranks[b] += 1
        used += cost
        if ranks[b] < caps[b]:
            heapq.heappush(heap, (-float(spectra[b][ranks[b]]) / cost, b))
    return ranks


@register_method(
    "block",
    description="frequency buckets, each with its own rank (GroupReduce-style), weighted SVD per bucket",
    data_aware=True,
)
def block(
    E: torch.Tensor,
    rank: int,
    *,
    seed: int = 0,
    progress: bool = False,
    token_weights: Any = None,
    n_buckets: int = 4,
    min_rank: int | None = None,
) -> BlockFactors:
    """Block-wise weighted factorization within the parameter budget of a rank-``rank`` plain factorization.

    Args:
        token_weights: one non-negative weight per row (required): sorts tokens into buckets and weights errors.
        n_buckets: number of frequency buckets (equal shares of the total token weight).
        min_rank: smallest rank of any bucket; default ``rank // 4``. Rare tokens are most of the vocabulary and
            still occur in real text: with a rank of 1-5 their embeddings collapse and sentence similarity suffers
            (measured on MiniLM/Lee: Spearman 0.347 with min_rank=1, 0.474 with 16, at rank 63).

    Example:
        >>> w = torch.rand(200) ** 4
        >>> f = block(torch.randn(200, 16), 4, token_weights=w)
        >>> f.num_params <= 4 * (200 + 16)
        True
    """
    if min_rank is None:
        min_rank = max(1, rank // 4)
    for name, v, lo in (("n_buckets", n_buckets, 1), ("min_rank", min_rank, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"{name} must be an integer ≥ {lo}, got {v!r}")
    vocab, d = E.shape
    w = check_token_weights(token_weights, vocab, "block")
    order = torch.argsort(w, descending=True, stable=True)  # position -> token id
    position = torch.empty_like(order)
    position[order] = torch.arange(vocab)
    sizes = bucket_sizes(w[order], n_buckets, d)
    budget = rank * (vocab + d)
    spectra, bases, start = [], [], 0
    for n in sizes:
        idx = order[start : start + n]
        evals, evecs = torch.linalg.eigh(weighted_gram(E[idx], w[idx]))
        spectra.append(evals.flip(0).clamp_min(0))
        bases.append(evecs.flip(1))
        start += n
    ranks = allocate_ranks(spectra, sizes, d, budget, min_rank)
    blocks, start = [], 0
    total = sum(ranks)
    U_full = torch.zeros(vocab, total, dtype=E.dtype)
    V_full = torch.zeros(total, d, dtype=E.dtype)
    col = 0
    for n, r, Q in zip(sizes, ranks, bases):
        idx = order[start : start + n]
        Qr = Q[:, :r].to(E.dtype)
        Ub, Vb = (E[idx] @ Qr).contiguous(), Qr.T.contiguous()
        blocks.append((Ub, Vb))
        U_full[idx, col : col + r] = Ub
        V_full[col : col + r] = Vb
        start += n
        col += r
    meta = {
        "sizes": sizes,
        "ranks": ranks,
        "budget_rank": rank,
        "budget_params": budget,
        "weighted_relative_error": weighted_error(E, U_full, V_full, w),
    }
    return BlockFactors(U_full, V_full, method="block", meta=meta, blocks=blocks, position=position)
