"""Exact truncated SVD and its Gram-matrix twin (eigendecomposition of Eᵀ·E)."""

from __future__ import annotations

import torch

from embfactor.decompose._common import from_svd, gram
from embfactor.decompose.factors import Factors
from embfactor.decompose.registry import register_method


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


@register_method("eig", description="eigendecomposition of the d×d Gram matrix in float64, then U = E·V")
def eig(E: torch.Tensor, rank: int, *, seed: int = 0, progress: bool = False, split: str = "symmetric") -> Factors:
    """Truncated SVD through the Gram matrix: eigh(Eᵀ·E) in float64 (d×d), then U = E·V·S⁻¹.

    One pass over E for the Gram product and one for U: fast when vocab ≫ d. Singular values below
    ~1e-8·σ_max lose accuracy (they are square roots of eigenvalues), which does not matter for the product:
    U·V = E·Vs·Vsᵀ is the projection of E on the leading right singular subspace.

    Example:
        >>> f = eig(torch.randn(50, 8), 3)
        >>> f.rank
        3
    """
    transpose = E.shape[0] < E.shape[1]
    A = E.T if transpose else E
    evals, evecs = torch.linalg.eigh(gram(A))
    top = torch.arange(evals.numel() - 1, evals.numel() - 1 - rank, -1)
    S = evals[top].clamp_min(0).sqrt()
    Vs = evecs[:, top]
    # Us = A·Vs / S, computed in the working precision; tiny singular values are clamped so the
    # division stays finite (their columns of A·Vs are ~0 anyway).
    S_safe = S.clamp_min(S[0] * 1e-12 if S[0] > 0 else 1e-30)
    Us = (A @ Vs.to(A.dtype)) / S_safe.to(A.dtype)
    if transpose:
        Us, Vs = Vs.to(A.dtype), Us
    return from_svd(Us, S.to(A.dtype), Vs.to(A.dtype), method="eig", split=split, meta={"transposed": transpose})
