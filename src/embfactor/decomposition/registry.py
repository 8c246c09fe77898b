"""Registry of decomposition methods, looked up by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from embfactor.errors import ConfigError, UnknownMethodError

# keyword arguments every method takes from decompose() itself, not from the user's method options
_COMMON = ("seed", "progress")


@dataclass(frozen=True)
class MethodInfo:
    name: str
    fn: Callable
    description: str
    data_aware: bool  # needs token weights or other data beyond E

    @property
    def options(self) -> list[str]:
        """The method's own keyword options (beyond E, rank, seed and progress), from its signature."""
        params = inspect.signature(self.fn).parameters.values()
        return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _COMMON]

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise ConfigError naming any option the method does not take, and the ones it does, before any work.

        Example:
            >>> get_method("svd").check_options({"power_iters": 2})
            Traceback (most recent call last):
            ...
            embfactor.errors.ConfigError: unknown option(s) power_iters for method 'svd'; its options: split
        """
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)} for method {self.name!r}; "
                f"its options: {', '.join(self.options) or 'none'}"
            )


_METHODS: dict[str, MethodInfo] = {}


def register_method(name: str, *, description: str = "", data_aware: bool = False) -> Callable:
    """Register a decomposition ``fn(E, rank, *, seed, progress, **options) -> Factors`` under ``name``.

    ``E`` arrives validated (2-D, finite, float32 or float64); the result is cast back to the input dtype by
    :func:`embfactor.decomposition.decompose`.

    Example:
        >>> @register_method("mine")                                   # doctest: +SKIP
        ... def mine(E, rank, *, seed=0, progress=False): ...
    """

    def wrap(fn: Callable) -> Callable:
        if name in _METHODS and _METHODS[name].fn is not fn:
            raise ValueError(f"a decomposition method named {name!r} is already registered")
        _METHODS[name] = MethodInfo(name, fn, description or (fn.__doc__ or "").strip().split("\n")[0], data_aware)
        return fn

    return wrap


def get_method(name: str) -> MethodInfo:
    _ensure_builtin_methods()
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown decomposition method {name!r}; valid methods: {', '.join(sorted(_METHODS))}"
        ) from None


def available_methods() -> list[str]:
    """Names of all registered decomposition methods, sorted."""
    _ensure_builtin_methods()
    return sorted(_METHODS)


def method_infos() -> list[MethodInfo]:
    _ensure_builtin_methods()
    return [_METHODS[n] for n in sorted(_METHODS)]


def _ensure_builtin_methods() -> None:
    # Importing the package registers the built-in methods (svd, rsvd, eig, als, gd and later ones).
    import embfactor.decomposition  # noqa: F401


def takes_budget(name: str) -> bool:
    """True when method ``name`` chooses its own settings for a byte budget (it accepts ``budget_bytes=``)."""
    import inspect

    return "budget_bytes" in inspect.signature(get_method(name).fn).parameters
