"""Truncated SVD through the Gram matrix (eigendecomposition of Eᵀ·E), registered as ``eig``."""

from __future__ import annotations

import numpy as np
import torch

from embfactor.decomposition._common import GRAM_BLOCK_ROWS, from_svd, gram
from embfactor.decomposition.factors import Factors
from embfactor.decomposition.registry import register_method
from embfactor.errors import ConfigError


@register_method("eig", description="eigendecomposition of the d×d Gram matrix (blockwise, float64 sums), then U = E·V")
def eig(
    E: torch.Tensor,
    rank: int,
    *,
    seed: int = 0,
    progress: bool = False,
    split: str = "symmetric",
    gram_precision: str = "auto",
) -> Factors:
    """Truncated SVD through the Gram matrix: eigh(Eᵀ·E) (d×d, float64), then U = E·V·S⁻¹.

    One pass over E for the Gram product and one for U: fast when vocab ≫ d. The singular values are
    recomputed from the U pass as σᵢ = ‖E·vᵢ‖ rather than √λᵢ: accurate even when the eigenvalues carry
    rounding noise, and U's columns come out exactly normalized. U·V = E·Vs·Vsᵀ is the
    projection of E on the leading right singular subspace, so the product does not depend on S at all.

    Args:
        gram_precision: ``"auto"`` (default) multiplies float32 row blocks in float32 with float64 sums
            across blocks (3-4× faster than float64 blocks, measured in ``benchmarks/decompose.py``; the
            error vs the optimum is unchanged to ~1e-6) and float64 inputs in float64; ``"float64"`` forces the
            float64 reference path; ``"float32"`` the fast one.

    Example:
        >>> f = eig(torch.randn(50, 8), 3)
        >>> f.rank
        3
    """
    if gram_precision not in ("auto", "float32", "float64"):
        raise ConfigError(f"gram_precision must be 'auto', 'float32' or 'float64', got {gram_precision!r}")
    transpose = E.shape[0] < E.shape[1]
    A = E.T if transpose else E
    precision = "float32" if gram_precision in ("auto", "float32") and A.dtype != torch.float64 else "float64"
    # float32 blocks are views of E (no copy), so larger blocks cost no memory and run closer to GEMM peak
    block = 32768 if precision == "float32" else GRAM_BLOCK_ROWS
    # float64 eigh even on the fast path: a float32 one saves ~5 ms at d = 384 but loses the small singular values
    # of a steep spectrum (tests/test_fast_paths.py)
    Vs = _top_eigenvectors(gram(A, block, precision=precision), rank).to(A.dtype)
    AV = A @ Vs  # vocab × r in the working precision: the only large temporary
    # U·V = A·Vs·Vsᵀ does not depend on S, so its rounding never reaches the reconstruction
    S = _column_norms(AV)
    order = torch.argsort(S, descending=True, stable=True)
    if not torch.equal(order, torch.arange(rank)):
        AV, Vs, S = AV[:, order], Vs[:, order], S[order]
    # Tiny singular values are clamped so the division stays finite (their columns of A·Vs are ~0 anyway).
    S_safe = S.clamp_min(float(S[0]) * 1e-12 if S[0] > 0 else 1e-30)
    Us = AV.div_(S_safe.to(A.dtype))
    if transpose:
        Us, Vs = Vs, Us
    return from_svd(
        Us, S.to(A.dtype), Vs, method="eig", split=split, meta={"transposed": transpose}, inplace=not transpose
    )


# LAPACK's syevr for only the top r eigenpairs beats the full syevd once d is large and r ≤ d/8 (single thread:
# d = 4,096, r = 512: 14.7 vs 22.1 s; d = 768, r = 96: 88 vs 116 ms); at r ≥ d/4 computing every vector is faster.
# Below d = 2,048 the saving (≤ 30 ms) is smaller than importing scipy.linalg (~0.35 s) in a fresh process.
SUBSET_EIGH_MIN_DIM = 2048
SUBSET_EIGH_MAX_SHARE = 1 / 8


def _top_eigenvectors(G: torch.Tensor, rank: int) -> torch.Tensor:
    """The eigenvectors of the symmetric G for its ``rank`` largest eigenvalues, as d × rank columns, largest first."""
    d = G.shape[0]
    if G.device.type == "cpu" and d >= SUBSET_EIGH_MIN_DIM and rank <= d * SUBSET_EIGH_MAX_SHARE:
        try:
            import scipy.linalg
        except ImportError:  # scipy is an optional extra: the full eigh below gives the same vectors
            pass
        else:
            _, vecs = scipy.linalg.eigh(G.numpy(), subset_by_index=[d - rank, d - 1], driver="evr")
            return torch.from_numpy(np.ascontiguousarray(vecs[:, ::-1]))
    _, vecs = torch.linalg.eigh(G)
    return vecs[:, d - rank :].flip(1)


def _column_norms(X: torch.Tensor) -> torch.Tensor:
    """‖X[:, j]‖ as float64, for a tall row-major X in float32 or float64.

    A column reduction of a row-major block is a strided pass in torch (4.9 ms for 30,522 × 48); NumPy's einsum
    walks the rows once (0.5 ms). Summing in the working precision keeps the pass free of a float64 copy.
    """
    if X.device.type == "cpu" and not X.requires_grad:
        x = X.numpy()
        return torch.from_numpy(np.sqrt(np.einsum("ij,ij->j", x, x))).double()
    return torch.linalg.vector_norm(X, dim=0).double()
