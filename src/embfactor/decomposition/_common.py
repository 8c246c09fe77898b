"""Shared helpers of the decomposition methods: input checks, Gram products, canonical factors."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from embfactor.errors import InvalidInputError, InvalidTypeError

# float64 row blocks of the Gram pass: 2048 × d × 8 bytes (6 MB at d=384, 9 MB at d=576) is the pass's only
# temporary; 8192-row blocks cost 25-38 MB and showed in the peak memory of `embfactor compress`
GRAM_BLOCK_ROWS = 2048
SPLITS = ("symmetric", "left", "right")


def as_matrix(E: Any, *, name: str = "E") -> torch.Tensor:
    """Validate a user matrix: a 2-D, non-empty, finite floating tensor (NumPy arrays are accepted)."""
    if isinstance(E, np.ndarray):
        E = torch.from_numpy(E)
    if not isinstance(E, torch.Tensor):
        raise InvalidTypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(E).__name__}")
    if E.ndim != 2:
        raise InvalidInputError(f"{name} must be a 2-D (vocab × d) matrix, got shape {tuple(E.shape)}")
    if E.shape[0] < 1 or E.shape[1] < 1:
        raise InvalidInputError(f"{name} is empty: shape {tuple(E.shape)}")
    if not E.is_floating_point():
        raise InvalidTypeError(f"{name} must be a floating-point tensor, got dtype {E.dtype}")
    if not _all_finite(E):
        bad = (~torch.isfinite(E)).nonzero()[0].tolist()
        raise InvalidInputError(
            f"{name} contains NaN or Inf (first at row {bad[0]}, column {bad[1]}); clean the weights before factorizing"
        )
    return E


def _all_finite(E: torch.Tensor) -> bool:
    # One reduction pass, no temporaries: min/max propagate NaN and show ±Inf. isfinite() on row blocks made bool
    # masks and ran 10× slower (65 vs 6 ms on MiniLM's table); it now only locates the first bad entry.
    if E.numel() == 0:
        return True
    lo, hi = torch.aminmax(E.detach())
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half and bfloat16 inputs are decomposed in float32; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gram(E: torch.Tensor, block_rows: int = GRAM_BLOCK_ROWS, *, precision: str = "float64") -> torch.Tensor:
    """Eᵀ·E as float64, accumulated over row blocks so no float64 copy of E is ever held.

    Args:
        precision: ``"float64"`` converts each row block and multiplies in float64 (the reference);
            ``"float32"`` multiplies float32 blocks into one preallocated d×d buffer and sums the blocks in
            float64. The second is 3-4× faster on CPU (float64 GEMM runs at half the float32 rate and the
            per-block conversion is a memory pass); each entry then carries ~1e-7 relative rounding noise.
            A float64 E is always multiplied in float64.
    """
    if precision not in ("float64", "float32"):
        raise InvalidInputError(f"precision must be 'float64' or 'float32', got {precision!r}")
    d = E.shape[1]
    G = torch.zeros(d, d, dtype=torch.float64)
    if precision == "float32" and E.dtype != torch.float64:
        use_numpy = E.device.type == "cpu"
        buf = torch.empty(d, d, dtype=torch.float32)
        for start in range(0, E.shape[0], block_rows):
            blk = E[start : start + block_rows].detach().to(torch.float32)
            if use_numpy:
                # NumPy dispatches a.T @ a to BLAS syrk (half the FLOPs of a general GEMM): measured 1.5× faster
                # than torch.mm for the Gram pass on CPU (benchmarks/decompose.py)
                a = blk.numpy()
                G += torch.from_numpy(a.T @ a)
            else:
                torch.mm(blk.T, blk, out=buf)
                G += buf
        return G
    buf = None
    for start in range(0, E.shape[0], block_rows):
        blk = E[start : start + block_rows]
        if blk.dtype != torch.float64:
            # one reused float64 buffer: converting into a fresh block each pass held two blocks at once
            if buf is None:
                buf = torch.empty(min(block_rows, E.shape[0]), d, dtype=torch.float64, device=E.device)
            blk = buf[: blk.shape[0]].copy_(blk)
        G.addmm_(blk.T, blk)
    return G


def spectrum(E: torch.Tensor) -> torch.Tensor:
    """All min(vocab, d) singular values of E, descending, in float64."""
    E = as_matrix(E)
    if E.shape[0] >= E.shape[1]:
        ev = torch.linalg.eigvalsh(gram(E))
    else:
        ev = torch.linalg.eigvalsh(gram(E.T))
    return ev.clamp_min(0).flip(0).sqrt()


def optimal_relative_error(sv: torch.Tensor, rank: int) -> float:
    """The Eckart–Young optimum ‖E − E_r‖_F/‖E‖_F from the singular values of E."""
    e = sv.double().pow(2)
    total = float(e.sum())
    if total == 0.0:
        return 0.0
    return max(float(e[rank:].sum()) / total, 0.0) ** 0.5


def fix_signs(Vs: torch.Tensor) -> torch.Tensor:
    """Sign per column of ``Vs`` (d × r) that makes each column's largest-magnitude entry positive."""
    idx = Vs.abs().argmax(dim=0)
    s = torch.sign(Vs.gather(0, idx.unsqueeze(0)).squeeze(0))
    s[s == 0] = 1
    return s


def from_svd(
    Us: torch.Tensor,
    S: torch.Tensor,
    Vs: torch.Tensor,
    *,
    method: str,
    split: str = "symmetric",
    meta: dict[str, Any] | None = None,
    inplace: bool = False,
) -> "Factors":  # noqa: F821 - imported lazily to keep this module import-light
    """Build canonical Factors from a thin SVD E ≈ Us·diag(S)·Vsᵀ (Us: vocab×r, Vs: d×r).

    Signs are fixed so that each right singular vector's largest entry is positive: the same input gives the
    same factors whatever LAPACK or random start produced them. ``inplace=True`` lets the function scale ``Us``
    in place (the caller's own temporary), which saves two vocab × r copies at peak.
    """
    from embfactor.decomposition.factors import Factors

    if split not in SPLITS:
        raise InvalidInputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    s = fix_signs(Vs)
    S = S.to(Us.dtype)
    if inplace and split != "right" and Us.is_contiguous():
        # the caller's own vocab × r temporary: scale it in place instead of making two more copies
        Us = Us.mul_(s * (S.clamp_min(0).sqrt() if split == "symmetric" else S))
        Vs = Vs * s
        V = (Vs * S.clamp_min(0).sqrt()).T if split == "symmetric" else Vs.T
        return Factors(Us, V.contiguous(), method=method, singular_values=S.double(), meta=dict(meta or {}))
    Us = Us * s
    Vs = Vs * s
    if split == "symmetric":
        root = S.clamp_min(0).sqrt()
        U, V = Us * root, (Vs * root).T
    elif split == "left":
        U, V = Us * S, Vs.T
    else:
        U, V = Us, (Vs * S).T
    return Factors(U.contiguous(), V.contiguous(), method=method, singular_values=S.double(), meta=dict(meta or {}))


def canonicalize(U: torch.Tensor, V: torch.Tensor, *, method: str, split: str, meta: dict[str, Any]) -> "Factors":  # noqa: F821
    """Rewrite any U·V as its canonical SVD form (QR of U, SVD of the small R·V): same product, fixed gauge."""
    Q, R = torch.linalg.qr(U)
    Ur, S, Vh = torch.linalg.svd(R @ V, full_matrices=False)
    return from_svd(Q @ Ur, S, Vh.T, method=method, split=split, meta=meta)


HESSIAN_DAMP = 0.01  # of H's mean diagonal, added to its diagonal: GPTQ's default, and what the probes measured


def inverse_cholesky(H: torch.Tensor, cols: int, *, damp: float = HESSIAN_DAMP) -> torch.Tensor:
    """The upper Cholesky factor U of (H + damping)⁻¹, padded to ``cols`` columns: GPTQ's error-feedback matrix.

    Rounding column j with error e changes the head's output least when the columns not yet rounded absorb
    ``e / U[j, j] · U[j, j+1:]``. Padded columns (beyond H's size) get an identity block: they hold zeros.
    A column no input reaches (H[j, j] = 0) gets weight 1 so that H stays definite.

    Example:
        >>> inverse_cholesky(torch.eye(3), 4, damp=0.01).diagonal()
        tensor([0.9950, 0.9950, 0.9950, 0.9950])
    """
    from embfactor.errors import ConfigError

    d = H.shape[0]
    if H.ndim != 2 or H.shape[1] != d or d > cols:
        raise InvalidInputError(f"H must be a square matrix of at most {cols} columns, got shape {tuple(H.shape)}")
    if not 0 < damp < 1:
        raise ConfigError(f"damp must be in (0, 1) (a share of H's mean diagonal), got {damp!r}")
    key = (id(H), cols, damp)
    kept = _FACTORS.get(key)
    if kept is not None and kept[0] == H._version:
        return kept[1].clone()
    Hp = torch.eye(cols, dtype=torch.float64)
    Hp[:d, :d] = H.detach().double()
    diag = Hp.diagonal()
    diag[diag <= 0] = 1.0
    Hp += damp * float(diag.mean()) * torch.eye(cols, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hp)), upper=True).float()
    if not any(k[0] == id(H) for k in _FACTORS):
        weakref.finalize(H, _forget, id(H))  # kept while H lives, never for a later tensor at its address
    _FACTORS[key] = (H._version, U)
    return U.clone()


# inverse_cholesky's factors of live metrics, by (id(H), cols, damp): the planner rounds and encodes eleven formats
# in one metric, each block of rows calling it (23 factorizations of one H in `compress minilm --size 8x`, 8% of
# its planner on the shared machine); an entry goes when its H does, or when H is changed in place (its version).
_FACTORS: dict[tuple[int, int, float], tuple[int, torch.Tensor]] = {}


def _forget(h_id: int) -> None:
    for k in [k for k in _FACTORS if k[0] == h_id]:
        _FACTORS.pop(k, None)


def in_row_blocks(fn: Callable[[int, int], Any], n: int, block: int, *, workers: int | None = None) -> list[Any]:
    """``[fn(a, b) for each block [a, b) of n rows]``, the blocks run side by side on ``workers`` Python threads
    (default torch's thread count), each op on one torch thread.

    For row-independent loops of small ops (the column loops of :func:`~embfactor.decomposition.intk.hessian_round`
    and :func:`~embfactor.decomposition.codebook.hessian_encode`): one op on two OpenMP threads synchronizes both at
    its end, and these loops run thousands of ops on 4-16k-row vectors. Side by side in one process, on the shared
    2-core machine: hessian_round of 16,384 MiniLM rows took 14.5 s on two torch threads and 0.53 s on one;
    hessian_encode 13.8 s and 4.6 s (benchmarks/results/compress_profile.md). Blocks are at most ``block`` rows,
    as many as a multiple of ``workers``, so the threads get equal work; ``fn`` writes disjoint rows. Results do
    not depend on ``workers`` (each row is computed alone).
    """
    from concurrent.futures import ThreadPoolExecutor

    workers = max(1, workers or torch.get_num_threads())
    count = -(-n // max(1, block))
    count = -(-count // workers) * workers  # a multiple of the threads: equal work each
    size = max(1, -(-n // max(1, count)))
    spans = [(a, min(a + size, n)) for a in range(0, n, size)]
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # process-wide while the blocks run: each thread's ops stay on one core
    try:
        if workers == 1 or len(spans) <= 1:
            return [fn(a, b) for a, b in spans]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda s: fn(*s), spans))
    finally:
        torch.set_num_threads(before)
