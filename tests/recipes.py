"""Recipes for the shared suite (tests/test_formats.py): how each registered method and format is exercised.

The suite runs over *every* registered decomposition (``available_methods()``) and storage format
(``available_formats()``). Most need nothing here:

- a decomposition gets the default recipe: ``ef.decompose(E, rank=r, method=name)`` for r = 1, 2, 4, 8, 16,
  exact at rank 4 on a rank-4 matrix; data-aware methods get skewed token weights;
- a format registered with ``register_format(name, factors=SomeFactors)`` is built by ``formats.from_factors``
  from the method that produces ``SomeFactors`` (found by running each method once).

Anything else is one line in ``METHODS`` or ``FORMATS`` below, e.g.::

    METHODS["pq"] = MethodRecipe(settings=({"rank": 2}, {"rank": 8}), exact=None, bad=(({"m": 0}, ConfigError, "m must"),))
    FORMATS["int"] = FormatRecipe(lambda E, pad: IntTable.from_dense(E, bits=8, padding_idx=pad))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from embfactor.errors import ConfigError, InvalidInputError
from embfactor.formats import (
    FactorizedEmbedding,
    QuantizedFactorizedEmbedding,
    RowFormat,
    TieredFormat,
    TTEmbedding,
    ZeroRows,
)

Bad = tuple[dict[str, Any], type[Exception], str]  # (options, error type, regex the message matches)


@dataclass(frozen=True)
class MethodRecipe:
    """How the shared suite calls a decomposition.

    Attributes:
        settings: keyword arguments of ``ef.decompose`` from the smallest to the largest (error must not grow).
        exact: a setting that reconstructs a rank-4 matrix to 1e-5; None when the method is never exact.
        options: extra keyword arguments for every call.
        bad: option sets that must raise the documented error.
        tol: slack allowed by the monotonicity check (iterative methods).
    """

    settings: tuple[dict[str, Any], ...] = tuple({"rank": r} for r in (1, 2, 4, 8, 16))
    exact: dict[str, Any] | None = field(default_factory=lambda: {"rank": 4})
    options: dict[str, Any] = field(default_factory=dict)
    bad: tuple[Bad, ...] = ()
    tol: float = 1e-6


@dataclass(frozen=True)
class FormatRecipe:
    """How the shared suite builds a format: ``build(E, padding_idx)`` returns a format holding (about) E."""

    build: Callable[[torch.Tensor, int | None], RowFormat]


METHODS: dict[str, MethodRecipe] = {
    "svd": MethodRecipe(bad=(({"split": "diagonal"}, InvalidInputError, "split must be one of"),)),
    "rsvd": MethodRecipe(bad=(({"power_iters": -1}, ConfigError, "power_iters"),)),
    "als": MethodRecipe(options={"max_iter": 60}, tol=1e-4),
    # gradient descent approaches the optimum, never exactly; from its spectral start a few steps suffice here
    "gd": MethodRecipe(exact=None, options={"steps": 20}, tol=1e-3),
    "eig": MethodRecipe(bad=(({"gram_precision": "float16"}, ConfigError, "gram_precision"),)),
    "tt": MethodRecipe(exact={"tt_rank": 10**6}, bad=(({"num_cores": 1}, ConfigError, "num_cores must be an integer >= 2"),)),
    # codebooks and int-k: explicit settings, which decide the size (no rank/ratio target needed);
    # exact when K ≥ vocab (every row its own centroid) with float32 codebooks
    "pq": MethodRecipe(
        settings=tuple({"sub_dim": sd, "K": k} for sd, k in ((8, 16), (4, 16), (2, 16), (2, 64))),
        exact={"sub_dim": 4, "K": 256, "codebook_dtype": "float32"},
        bad=(({"sub_dim": 0}, ConfigError, "sub_dim must be an integer in"),
             ({"rotation": "spin"}, ConfigError, "rotation must be one of")),
        tol=1e-3,
    ),
    "rvq": MethodRecipe(
        settings=tuple({"sub_dim": 8, "K": 16, "stages": s} for s in (1, 2, 3, 4)),
        exact={"stages": 1, "sub_dim": 24, "K": 256, "codebook_dtype": "float32"},
        bad=(({"stages": 0}, ConfigError, "stages must be an integer in"),),
        tol=1e-3,
    ),
    "int": MethodRecipe(
        settings=tuple({"bits": b, "group": 16} for b in (2, 3, 4, 8)),
        exact=None,  # integers: never exact (int8's error is the rounding, < 1%)
        bad=(({"bits": 7}, ConfigError, r"bits must be one of \(2, 3, 4, 5, 6, 8\)"),
             ({"bits": 4, "group": 48}, ConfigError, "group must be one of")),
    ),
    "block": MethodRecipe(settings=tuple({"rank": r} for r in (2, 4, 8, 16)), exact={"rank": 16}, bad=(({"n_buckets": 0}, ConfigError, "n_buckets must be an integer"),), tol=1e-4),
}


def _lowrank(E: torch.Tensor, pad: int | None) -> FactorizedEmbedding:
    import embfactor as ef

    return FactorizedEmbedding.from_factors(ef.decompose(E, rank=4, method="svd"), pad)


def _tiered(E: torch.Tensor, pad: int | None) -> TieredFormat:
    # four tiers in four formats over a shuffled partition of the rows
    import embfactor as ef

    n, d = E.shape
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    position = torch.empty_like(order)
    position[order] = torch.arange(n)
    a, b, c = n // 4, n // 2, 3 * n // 4
    tiers = [
        FactorizedEmbedding.from_factors(ef.decompose(E[order[:a]], rank=4, method="svd")),
        QuantizedFactorizedEmbedding.from_factors(ef.decompose(E[order[a:b]], rank=3, method="svd"), bits=4),
        TTEmbedding.from_factors(ef.decompose(E[order[b:c]], rank=3, method="tt")),
        ZeroRows(n - c, d),
    ]
    return TieredFormat(tiers, position, pad)


FORMATS: dict[str, FormatRecipe] = {
    "quantized": FormatRecipe(
        lambda E, pad: QuantizedFactorizedEmbedding.from_factors(_lowrank(E, pad), pad, bits=8)
    ),
    "tiered": FormatRecipe(_tiered),
    "zeros": FormatRecipe(lambda E, pad: ZeroRows(E.shape[0], E.shape[1], pad)),
}
