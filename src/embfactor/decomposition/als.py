"""Alternating least squares: fix U, solve V; fix V, solve U, each in closed form (ridge-regularized)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from embfactor.decomposition._common import canonicalize
from embfactor.decomposition.factors import Factors
from embfactor.decomposition.registry import register_method
from embfactor.errors import ConfigError


def _ridge_solve(A: torch.Tensor, B: torch.Tensor, reg: float) -> torch.Tensor:
    """Solve (A + reg·tr(A)/r·I) X = B for a small symmetric r×r A, in float64."""
    r = A.shape[0]
    lam = reg * float(A.diagonal().mean()) if reg > 0 else 0.0
    A64 = A.double() + lam * torch.eye(r, dtype=torch.float64)
    return torch.linalg.solve(A64, B.double())


@register_method("als", description="alternating least squares with closed-form ridge updates")
def als(
    E: torch.Tensor,
    rank: int,
    *,
    seed: int = 0,
    progress: bool = False,
    max_iter: int = 300,
    tol: float = 1e-7,
    reg: float = 1e-9,
    split: str = "symmetric",
) -> Factors:
    """Alternating least squares for min ‖E − U·V‖²_F.

    Starting from a seeded random V, repeat: U = E·Vᵀ(V·Vᵀ + λI)⁻¹ (fix V, solve U), then
    V = (UᵀU + λI)⁻¹·Uᵀ·E (fix U, solve V). λ is ``reg`` times the mean diagonal of the Gram matrix, so it is
    scale-free. Stops when the relative decrease of the squared error falls below ``tol`` or after ``max_iter``.
    The result is rewritten in canonical SVD form (same product, deterministic gauge).

    Example:
        >>> f = als(torch.randn(100, 12), 4, seed=0)
        >>> f.meta["iterations"] > 0
        True
    """
    if max_iter < 1 or tol < 0 or reg < 0:
        raise ConfigError(f"need max_iter >= 1, tol >= 0, reg >= 0; got {max_iter}, {tol}, {reg}")
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(rank, E.shape[1], generator=gen, dtype=E.dtype)
    norm2 = float(E.double().pow(2).sum()) if E.numel() < 50_000_000 else float(sum(
        float(b.double().pow(2).sum()) for b in E.split(65536)
    ))
    prev = float("inf")
    err2 = prev
    it = 0
    bar = tqdm(range(max_iter), desc="als", disable=not progress, leave=False)
    for it in bar:
        U = _ridge_solve(V @ V.T, (E @ V.T).T, reg).T.to(E.dtype)  # fix V, solve U
        UtE = U.T @ E
        UtU = U.T @ U
        V = _ridge_solve(UtU, UtE, reg).to(E.dtype)  # fix U, solve V
        # ‖E − UV‖² = ‖E‖² − 2⟨UᵀE, V⟩ + ⟨UᵀU, VVᵀ⟩, without forming U·V
        err2 = max(norm2 - 2 * float((UtE * V).double().sum()) + float((UtU.double() * (V @ V.T).double()).sum()), 0.0)
        bar.set_postfix(rel_err=f"{(err2 / norm2) ** 0.5 if norm2 else 0:.4f}")
        if (it > 0 and prev - err2 <= tol * prev) or err2 <= 1e-14 * norm2:
            break
        prev = err2
    return canonicalize(U, V, method="als", split=split, meta={"iterations": it + 1})
