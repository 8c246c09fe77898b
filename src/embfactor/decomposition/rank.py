"""Choosing the rank: by rank, by target compression ratio, by energy share, or by an error budget."""

from __future__ import annotations

import math
from typing import Any

import torch

from embfactor.errors import ConfigError, InvalidInputError

_TARGETS = ("rank", "ratio", "energy", "max_error", "size")

_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_size(size: str | float) -> tuple[str, float]:
    """A byte target: "16x" (× fewer embedding bytes than fp32) -> ("x", 16.0); "2.5MB" / "900kB" / "123456"
    -> ("bytes", 2500000.0). Units: B, kB, MB, GB (powers of 1000) and KiB, MiB, GiB.

    Example:
        >>> parse_size("16x"), parse_size("2.5MB"), parse_size("512KiB")
        (('x', 16.0), ('bytes', 2500000.0), ('bytes', 524288.0))
    """
    import re

    text = str(size).strip().lower().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(x|b|kb|mb|gb|kib|mib|gib)?", text)
    if m is None:
        raise ConfigError(
            f"size must be a ratio like '16x' (x fewer embedding bytes than fp32) or bytes like '2.5MB', "
            f"'900kB', '123456'; got {size!r}"
        )
    value, unit = float(m.group(1)), m.group(2) or "b"
    if unit == "x":
        if not (value > 1 and math.isfinite(value)):
            raise ConfigError(f"size ratio must be > 1 (x fewer bytes than the fp32 table), got {size!r}")
        return "x", value
    if value * _UNITS[unit] < 1:
        raise ConfigError(f"size must be at least 1 byte, got {size!r}")
    return "bytes", value * _UNITS[unit]


def budget_bytes(size: str | float, vocab: int, d: int) -> float:
    """The embedding byte budget a ``size`` target means for a (vocab × d) table (ratios are against fp32).

    Example:
        >>> budget_bytes("16x", 30522, 384)
        2930112.0
    """
    kind, value = parse_size(size)
    return vocab * d * 4 / value if kind == "x" else value


def rank_for_bytes(vocab: int, d: int, budget: float, bytes_per_value: int = 4) -> int:
    """Largest rank whose factors U (vocab × r) and V (r × d) fit ``budget`` bytes; ConfigError if none does."""
    r = min(math.floor(budget / (bytes_per_value * (vocab + d)) + 1e-9), max_rank(vocab, d))
    if r < 1:
        raise ConfigError(
            f"a byte budget of {budget:,.0f} is below one rank of factors ({bytes_per_value * (vocab + d):,} bytes "
            f"for a {vocab} × {d} table); give a larger --size or a codebook method (pq, rvq)"
        )
    return r


def validate_target(
    rank: int | None = None,
    ratio: float | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    size: str | None = None,
) -> None:
    """Check that exactly one rank target is given and that it is in range.

    The upper bound of ``rank`` depends on the matrix and is checked by :func:`resolve_rank`.

    Raises:
        ConfigError: none or several targets, or a value outside its allowed range.
    """
    given = {k: v for k, v in zip(_TARGETS, (rank, ratio, energy, max_error, size)) if v is not None}
    if len(given) != 1:
        raise ConfigError(
            f"give exactly one of rank=, ratio=, energy=, max_error=, size= (got {', '.join(given) or 'none'})"
        )
    if size is not None:
        parse_size(size)
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise ConfigError(f"rank must be an integer >= 1, got {rank!r}")
        if rank <= 0:
            raise ConfigError(f"rank must be >= 1 and < min(vocab, d), got rank={rank}")
    if ratio is not None and not (_is_number(ratio) and ratio > 1 and math.isfinite(ratio)):
        raise ConfigError(f"ratio must be a finite number > 1 (embedding params before/after), got ratio={ratio!r}")
    if energy is not None and not (_is_number(energy) and 0 < energy <= 1):
        raise ConfigError(f"energy must be in (0, 1] (share of the squared spectrum kept), got energy={energy!r}")
    if max_error is not None and not (_is_number(max_error) and 0 < max_error < 1):
        raise ConfigError(
            f"max_error must be in (0, 1) (relative Frobenius error ||E-UV||/||E||), got max_error={max_error!r}"
        )


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def max_rank(vocab: int, d: int) -> int:
    """Largest rank that is allowed: min(vocab, d) − 1 (rank min(vocab, d) would not factorize anything)."""
    return min(vocab, d) - 1


def rank_for_ratio(vocab: int, d: int, ratio: float) -> int:
    """Largest r with vocab·d / (r·(vocab + d)) ≥ ratio."""
    r = math.floor(vocab * d / (ratio * (vocab + d)) + 1e-9)
    if r < 1:
        raise ConfigError(
            f"ratio={ratio} is too large for a {vocab}×{d} matrix: the largest reachable ratio is "
            f"{vocab * d / (vocab + d):.2f} (rank 1)"
        )
    return r


def resolve_rank(
    shape: tuple[int, int],
    *,
    rank: int | None = None,
    ratio: float | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    singular_values: torch.Tensor | None = None,
) -> int:
    """Turn one rank target into a rank.

    Args:
        shape: (vocab, d) of the matrix.
        rank: the rank itself, 1 ≤ rank < min(vocab, d).
        ratio: embedding parameters before/after, > 1: the largest rank that reaches it.
        energy: share of Σσ² to keep, in (0, 1]: the smallest rank that keeps it.
        max_error: relative Frobenius error budget, in (0, 1): the smallest rank whose optimal error is within it.
        singular_values: the spectrum of E (needed for energy and max_error).

    Raises:
        ConfigError: no or several targets, a value out of range, or a target that needs the full rank.

    Example:
        >>> resolve_rank((30522, 384), ratio=6)
        63
    """
    validate_target(rank, ratio, energy, max_error)
    vocab, d = int(shape[0]), int(shape[1])
    top = max_rank(vocab, d)
    if top < 1:
        raise ConfigError(f"a {vocab}×{d} matrix cannot be factorized: min(vocab, d) must be >= 2")
    if rank is not None:
        if rank > top:
            raise ConfigError(f"rank must be >= 1 and < min(vocab, d)={top + 1}, got rank={rank}")
        return rank
    if ratio is not None:
        return rank_for_ratio(vocab, d, ratio)
    if singular_values is None:
        raise ConfigError("energy= and max_error= need the singular values of E")
    e = singular_values.double().pow(2)
    total = float(e.sum())
    if total == 0.0:
        raise InvalidInputError("E is all zeros: energy= and max_error= are undefined; use rank= or ratio=")
    kept = torch.cumsum(e, 0) / total
    if energy is not None:
        # smallest r whose kept share reaches energy (with a rounding allowance for energy=1 on low-rank E)
        r = int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=torch.float64)).item()) + 1
        what = f"energy={energy}"
    else:
        err = (1.0 - kept).clamp_min(0).sqrt()
        below = (err <= max_error + 1e-12).nonzero()
        r = int(below[0].item()) + 1 if below.numel() else e.numel()
        what = f"max_error={max_error}"
    if r > top:
        best = float(kept[top - 1])
        raise ConfigError(
            f"{what} needs rank {r} = min(vocab, d), which does not compress; the most a rank-{top} factorization "
            f"reaches is energy {best:.6f} / relative error {max(1 - best, 0) ** 0.5:.6f}"
        )
    return r
