"""Exact truncated SVD (LAPACK gesdd on the whole matrix), registered as ``svd``."""

from __future__ import annotations

import torch

from embfactor.decomposition._common import from_svd
from embfactor.decomposition.factors import Factors
from embfactor.decomposition.registry import register_method


@register_method("svd", description="exact truncated SVD (LAPACK gesdd on the whole matrix)")
def svd(E: torch.Tensor, rank: int, *, seed: int = 0, progress: bool = False, split: str = "symmetric") -> Factors:
    """Exact truncated SVD: the Eckart–Young optimum for the rank.

    Example:
        >>> f = svd(torch.randn(50, 8), 3)
        >>> f.U.shape, f.V.shape
        (torch.Size([50, 3]), torch.Size([3, 8]))
    """
    Us, S, Vh = torch.linalg.svd(E, full_matrices=False)
    return from_svd(Us[:, :rank], S[:rank], Vh[:rank].T, method="svd", split=split)
