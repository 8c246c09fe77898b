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
    available_methods, get_method, method_infos, register_method, takes_budget,
)

__all__ = [
    "Factors",
    "available_methods",
    "budget_bytes",
    "decompose",
    "default_method",
    "get_method",
    "max_rank",
    "method_infos",
    "optimal_relative_error",
    "parse_size",
    "rank_for_bytes",
    "rank_for_ratio",
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
        rank, ratio, energy, max_error: exactly one rank target (see :func:`resolve_rank`).
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
    sv = spectrum(E) if (energy is not None or max_error is not None) else None
    r = resolve_rank(tuple(E.shape), rank=rank, ratio=ratio, energy=energy, max_error=max_error, singular_values=sv)
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
