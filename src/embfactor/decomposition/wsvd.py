"""Weighted low-rank factorization (``wsvd``): each token's row counts by its importance.

Minimizes Σ_i w_i ‖E_i − U_i·V‖² for row weights w ≥ 0 (token frequencies, see
:mod:`embfactor.data.frequency`). With row weights the problem has a closed form: scale the rows,
A = diag(√w)·E, and take the top-r right singular subspace Q_r of A (eigenvectors of Eᵀ·diag(w)·E);
then V = Q_rᵀ and U = E·Q_r (for a fixed V each row's best U_i is its own projection, whatever its weight).
Uniform weights give exactly the truncated SVD.
"""

from __future__ import annotations

from typing import Any

import torch

from embfactor.decomposition._common import GRAM_BLOCK_ROWS, canonicalize
from embfactor.decomposition.factors import Factors
from embfactor.decomposition.registry import register_method
from embfactor.errors import ConfigError, InvalidInputError

_HOW_TO_PASS = (
    "pass per-token weights: in Python token_weights=embfactor.data.frequency.token_weights(tokenizer, texts, "
    "vocab_size=E.shape[0]) to decompose()/factorize_(); on the command line `embfactor compress ... --method {m} "
    "[--text FILES]` counts them with the model's tokenizer (default corpus: the bundled Wikipedia extract)"
)


def check_token_weights(token_weights: Any, vocab: int, method: str) -> torch.Tensor:
    """Validate user token weights: a finite, non-negative vector with one entry per row and a positive sum."""
    if token_weights is None:
        raise ConfigError(f"method {method!r} is data-aware and needs token weights; " + _HOW_TO_PASS.format(m=method))
    w = torch.as_tensor(token_weights).detach().to("cpu", torch.float64).reshape(-1)
    if w.numel() != vocab:
        raise InvalidInputError(f"token_weights has {w.numel()} entries but the embedding has {vocab} rows")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise InvalidInputError("token_weights must be finite and non-negative")
    if float(w.sum()) <= 0:
        raise InvalidInputError("token_weights are all zero; at least one token needs a positive weight")
    return w / w.mean()


def weighted_gram(E: torch.Tensor, w: torch.Tensor, block_rows: int = GRAM_BLOCK_ROWS) -> torch.Tensor:
    """Eᵀ·diag(w)·E in float64, accumulated over row blocks."""
    d = E.shape[1]
    G = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, E.shape[0], block_rows):
        blk = E[start : start + block_rows].to(torch.float64)
        G.addmm_(blk.T * w[start : start + block_rows], blk)
    return G


def weighted_error(E: torch.Tensor, U: torch.Tensor, V: torch.Tensor, w: torch.Tensor) -> float:
    """Relative weighted error sqrt(Σ w_i‖E_i − U_i V‖² / Σ w_i‖E_i‖²)."""
    w = torch.as_tensor(w, dtype=torch.float64).reshape(-1)
    num = den = 0.0
    for start in range(0, E.shape[0], GRAM_BLOCK_ROWS):
        e = E[start : start + GRAM_BLOCK_ROWS].double()
        ws = w[start : start + GRAM_BLOCK_ROWS]
        diff = e - U[start : start + GRAM_BLOCK_ROWS].double() @ V.double()
        num += float((diff.pow(2).sum(1) * ws).sum())
        den += float((e.pow(2).sum(1) * ws).sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


def weighted_subspace(E: torch.Tensor, w: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-``rank`` right singular vectors (d × rank, float64) of diag(√w)·E."""
    evals, evecs = torch.linalg.eigh(weighted_gram(E, w))
    return evecs[:, torch.arange(evals.numel() - 1, evals.numel() - 1 - rank, -1)]


@register_method(
    "wsvd",
    description="weighted SVD: rows weighted by token frequency (closed form by row scaling, optional weighted ALS)",
    data_aware=True,
)
def wsvd(
    E: torch.Tensor,
    rank: int,
    *,
    seed: int = 0,
    progress: bool = False,
    token_weights: Any = None,
    n_iter: int = 0,
    ridge: float = 0.0,
    split: str = "symmetric",
) -> Factors:
    """Weighted truncated SVD: min Σ_i w_i ‖E_i − U_i·V‖².

    Args:
        token_weights: one non-negative weight per row (required); see :func:`embfactor.data.frequency.token_weights`.
        n_iter: extra rounds of weighted alternating least squares after the closed form. With pure row weights
            the closed form is already optimal, so this only matters together with ``ridge`` > 0.
        ridge: L2 penalty on U and V in the ALS rounds (regularizes rows of rarely seen tokens).

    Example:
        >>> w = torch.ones(50); w[:5] = 100.0
        >>> f = wsvd(torch.randn(50, 8), 3, token_weights=w)
        >>> f.U.shape
        torch.Size([50, 3])
    """
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise ConfigError(f"n_iter must be a non-negative integer, got {n_iter!r}")
    if not isinstance(ridge, (int, float)) or ridge < 0:
        raise ConfigError(f"ridge must be a non-negative number, got {ridge!r}")
    w = check_token_weights(token_weights, E.shape[0], "wsvd")
    Q = weighted_subspace(E, w, rank).to(E.dtype)
    U, V = E @ Q, Q.T.contiguous()
    history = []
    if n_iter:
        from tqdm.auto import tqdm

        wE = w.to(E.dtype).unsqueeze(1)
        eye = torch.eye(rank, dtype=E.dtype)
        for _ in tqdm(range(n_iter), desc="wsvd-als", disable=not progress, leave=False):
            # V step: weighted least squares over rows; U step: each row independently (its weight cancels).
            V = torch.linalg.solve(U.T @ (U * wE) + ridge * eye, (U * wE).T @ E)
            U = torch.linalg.solve(V @ V.T + ridge * eye, V @ E.T).T
            history.append(weighted_error(E, U, V, w))
    meta = {"weighted_relative_error": weighted_error(E, U, V, w), "n_iter": n_iter, "ridge": ridge}
    if history:
        meta["als_history"] = history
    return canonicalize(U, V, method="wsvd", split=split, meta=meta)
