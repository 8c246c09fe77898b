"""Decompositions of a trained embedding matrix E ≈ U·V, registered by name: pure tensor maths, no nn.Module.

``embfactor.decomposition`` is the package; ``embfactor.decompose`` (this package's :func:`decompose`) the function.

Example:
    >>> import torch, embfactor as ef
    >>> f = ef.decompose(torch.randn(1000, 64), rank=16, method="svd", seed=0)
    >>> f.U.shape, f.V.shape
    (torch.Size([1000, 16]), torch.Size([16, 64]))
"""

from __future__ import annotations

import time
from typing import Any

import torch

# each module registers the method it is named after
from embfactor.decomposition import als, block, eig, gd, rsvd, svd, tt, wsvd  # noqa: F401
from embfactor.decomposition import codebook, intk  # noqa: F401 - pq, rvq (codebooks) and int (dense int-k)
from embfactor.decomposition._common import as_matrix, optimal_relative_error, spectrum, working_dtype
from embfactor.decomposition.factors import Factors, relative_error
from embfactor.decomposition.rank import (
    budget_bytes, max_rank, parse_size, rank_for_bytes, rank_for_ratio, resolve_rank, validate_target,
)
from embfactor.decomposition.registry import (
    available_methods, check_explicit_size, explicit_size, fixes_size, get_method, method_infos,
    missing_target_message, refuse_spectrum_target, register_method, takes_budget,
)

__all__ = [
    "Factors",
    "available_methods",
    "budget_bytes",
    "check_explicit_size",
    "explicit_size",
    "explicit_size_rank",
    "fixes_size",
    "decompose",
    "default_method",
    "get_method",
    "max_rank",
    "method_infos",
    "missing_target_message",
    "optimal_relative_error",
    "parse_size",
    "rank_for_bytes",
    "rank_for_ratio",
    "refuse_spectrum_target",
    "register_method",
    "relative_error",
    "resolve_rank",
    "spectrum",
    "takes_budget",
    "validate_target",
]


def default_method(shape: tuple[int, int], rank: int | None = None) -> str:
    """The best method for a matrix shape, as measured by ``benchmarks/decompose.py`` (``python -m benchmarks.decompose``).

    When vocab ≫ d the Gram route (``eig``: one blockwise Gram pass through BLAS syrk, one float64 eigh,
    one product for U) is exact and the fastest method at every rank: n·d² + 2·n·d·r FLOPs in two passes over E,
    against 12 passes of 2·n·d·(r+10) for sklearn's TruncatedSVD. Measured (single-thread CPU time, ranks d/8,
    d/4, d/2): MiniLM 30,522×384 0.12–0.22 s vs sklearn 0.63–1.82 s; SmolLM2 49,152×576 0.37–0.82 s vs
    1.75–6.0 s; 250,002×768 2.8–7.0 s; always at the optimum error, and within ~2× of the machine's FLOP lower
    bound. The rank does not change the choice (only the U pass depends on it). For near-square matrices the
    Gram matrix squares the condition number, so the direct LAPACK ``svd`` is used there. Randomized methods
    (``rsvd``) are slower than ``eig`` on embedding shapes and not exact.
    """
    vocab, d = shape
    return "eig" if max(vocab, d) >= 4 * min(vocab, d) else "svd"


def explicit_size_rank(
    shape: tuple[int, int],
    method: str,
    options: dict[str, Any],
    *,
    rank: int | None = None,
    ratio: float | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    size: str | float | None = None,
) -> int:
    """The rank argument for a method whose ``options`` fix the stored size (``int`` with ``bits=``, ...).

    Without a target: the equal-budget rank of the bytes the options store (what the report and the saved record
    call the rank of byte formats). With ``size``, ``rank``/``ratio`` (or ``budget_bytes`` among the options): that
    target's rank (a size's: the largest rank whose fp32 U·V fits its bytes), after checking that its byte budget
    allows the options' bytes (:func:`check_explicit_size`); the options win, a budget too small for them is an
    error naming both. ``energy``/``max_error`` are refused: they pick a rank from the spectrum, which fixed bytes
    leave nothing to pick.

    Example:
        >>> explicit_size_rank((100, 64), "int", {"bits": 4})        # 3,600 bytes = the fp32 bytes of rank 5
        5
        >>> explicit_size_rank((100, 64), "int", {"bits": 4}, size="4x")   # 6,400 bytes allow them: rank 9
        9
    """
    vocab, d = int(shape[0]), int(shape[1])
    shape = (vocab, d)
    nbytes = explicit_size(method, shape, options)
    refuse_spectrum_target(method, options, energy=energy, max_error=max_error)
    if size is not None:
        size_budget = budget_bytes(size, vocab, d)
        check_explicit_size(method, shape, options, budget=size_budget, target=f"size={size}")
        return max(1, min(int(size_budget // (4 * (vocab + d))), max_rank(vocab, d)))
    targets = {k: v for k, v in (("rank", rank), ("ratio", ratio)) if v is not None}
    budget = options.get("budget_bytes")
    if targets:
        r = resolve_rank((vocab, d), rank=rank, ratio=ratio)
        if budget is None:
            # a ratio is read as bytes (fp32 bytes / stored bytes >= ratio), not through its floored rank: int4 g32
            # (7.11x) agrees with ratio=7 on any shape; a rank as the fp32 bytes of a rank-r U·V
            budget = 4.0 * vocab * d / ratio if ratio is not None else 4.0 * r * (vocab + d)
        k, v = next(iter(targets.items()))
        check_explicit_size(method, shape, options, budget=budget, target=f"{k}={v:g}")  # ratio 16.0 -> 16
        return r
    if budget is not None:
        check_explicit_size(method, shape, options, budget=budget, target=f"budget_bytes={budget:,.0f}")
    return max(1, min(nbytes // (4 * (vocab + d)), max_rank(vocab, d)))


def decompose(
    E: torch.Tensor,
    rank: int | None = None,
    *,
    ratio: float | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    method: str | None = None,
    seed: int = 0,
    progress: bool = False,
    **options: Any,
) -> Factors:
    """Factorize E (vocab × d) as U (vocab × r) · V (r × d).

    Args:
        E: the embedding matrix; float16/bfloat16 are decomposed in float32 and the factors cast back.
        rank, ratio, energy, max_error: exactly one rank target (see :func:`resolve_rank`); none when ``options``
            fix the size (``bits=`` for int, ``sub_dim=`` for pq, ...): see :func:`explicit_size_rank`.
        method: a registered name (``available_methods()``); None picks :func:`default_method` for the shape.
        seed: seed of randomized methods; results are deterministic given it.
        progress: show a progress bar for iterative methods.
        **options: method-specific options, e.g. ``power_iters=6`` for ``rsvd``, ``split="left"``.

    Returns:
        Factors with ``meta["seconds"]`` and ``meta["relative_error"]`` filled in.

    Raises:
        ConfigError: bad rank target; UnknownMethodError: unknown method; InvalidInputError: NaN/Inf or bad shape.

    Example:
        >>> f = decompose(torch.randn(300, 32), ratio=4)
        >>> f.rank, f.method
        (7, 'eig')
    """
    E = as_matrix(E)
    info = get_method(method) if method is not None else None
    if info is not None and info.fixes_size(options):
        r = explicit_size_rank(tuple(E.shape), method, options, rank=rank, ratio=ratio, energy=energy,
                               max_error=max_error)
    else:
        sv = spectrum(E) if (energy is not None or max_error is not None) else None
        r = resolve_rank(
            tuple(E.shape), rank=rank, ratio=ratio, energy=energy, max_error=max_error, singular_values=sv
        )
    if info is None:
        info = get_method(default_method(tuple(E.shape), r))
    info.check_options(options)
    work = E.to(working_dtype(E.dtype))
    t0 = time.perf_counter()
    f = info.fn(work, r, seed=seed, progress=progress, **options)
    seconds = time.perf_counter() - t0
    f.meta.setdefault("seconds", seconds)
    if type(f).relative_error is Factors.relative_error:
        # in small row blocks (see relative_error): the vocab × d product is never held
        f.meta["relative_error"] = relative_error(work, f.U, f.V)
    else:
        f.meta["relative_error"] = f.relative_error(work)
    if f.U.dtype != E.dtype:
        f = f.to(E.dtype)
    return f
