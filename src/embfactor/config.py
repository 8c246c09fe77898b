"""FactorizationConfig: what to factorize and how, validated on creation and saved as versioned JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from embfactor.errors import ConfigError, CorruptFileError

CONFIG_FORMAT_VERSION = 1

_TARGETS = ("rank", "ratio", "energy", "max_error")


def validate_target(
    rank: int | None = None,
    ratio: float | None = None,
    energy: float | None = None,
    max_error: float | None = None,
) -> None:
    """Check that exactly one rank target is given and that it is in range.

    The upper bound of ``rank`` depends on the matrix and is checked by :func:`embfactor.decompose.resolve_rank`.

    Raises:
        ConfigError: none or several targets, or a value outside its allowed range.
    """
    given = {k: v for k, v in zip(_TARGETS, (rank, ratio, energy, max_error)) if v is not None}
    if len(given) != 1:
        raise ConfigError(
            f"give exactly one of rank=, ratio=, energy=, max_error= (got {', '.join(given) or 'none'})"
        )
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


@dataclass
class FactorizationConfig:
    """How to factorize a model's token embedding.

    Args:
        method: a registered decomposition name (``embfactor.available_methods()``); ``None`` picks the best
            default for the matrix shape.
        rank, ratio, energy, max_error: exactly one rank target (see :func:`embfactor.decompose.resolve_rank`).
        seed: seed for randomized methods; results are deterministic given it.
        method_options: extra keyword arguments passed to the method (e.g. ``{"power_iters": 6}`` for rsvd).
        factorize_head: when the output head is tied to the input embedding, share the factors with it.

    Example:
        >>> FactorizationConfig(ratio=6, method="svd").rank is None
        True
    """

    method: str | None = None
    rank: int | None = None
    ratio: float | None = None
    energy: float | None = None
    max_error: float | None = None
    seed: int = 0
    method_options: dict[str, Any] = field(default_factory=dict)
    factorize_head: bool = True

    def __post_init__(self) -> None:
        validate_target(self.rank, self.ratio, self.energy, self.max_error)
        if self.method is not None:
            from embfactor.decompose.registry import get_method

            get_method(self.method)  # raises UnknownMethodError listing valid names
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.method_options, dict):
            raise ConfigError(f"method_options must be a dict, got {type(self.method_options).__name__}")

    def to_dict(self) -> dict[str, Any]:
        from embfactor import __version__

        d = dataclasses.asdict(self)
        d["format_version"] = CONFIG_FORMAT_VERSION
        d["embfactor_version"] = __version__
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> FactorizationConfig:
        if not isinstance(d, dict):
            raise CorruptFileError(f"{source}: expected a JSON object, got {type(d).__name__}")
        version = d.get("format_version")
        if version != CONFIG_FORMAT_VERSION:
            raise CorruptFileError(
                f"{source}: format_version {version!r} is not supported (this embfactor reads {CONFIG_FORMAT_VERSION})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {"format_version", "embfactor_version"}
        if unknown:
            raise CorruptFileError(f"{source}: unknown fields {sorted(unknown)}; known fields are {sorted(names)}")
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except ConfigError as e:
            raise CorruptFileError(f"{source}: {e}") from e
