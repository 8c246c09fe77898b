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
    # options any one of which fixes the stored size (the others have defaults): then no size target is needed
    size_options: tuple[str, ...] = ()
    # (vocab, d, options) -> the bytes the method stores with options that fix the size (fp32 bytes for U·V-like
    # formats such as tt): what a size target given alongside is checked against
    stored_bytes: Callable[[int, int, Mapping[str, Any]], int] | None = None

    def fixes_size(self, options: Mapping[str, Any]) -> bool:
        """True when ``options`` decide the stored size on their own (e.g. ``bits=`` for ``int``).

        Example:
            >>> get_method("int").fixes_size({"bits": 4}), get_method("int").fixes_size({"group": 32})
            (True, False)
        """
        return any(options.get(k) is not None for k in self.size_options)

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


def register_method(
    name: str, *, description: str = "", data_aware: bool = False, size_options: tuple[str, ...] = (),
    stored_bytes: Callable[[int, int, Mapping[str, Any]], int] | None = None,
) -> Callable:
    """Register a decomposition ``fn(E, rank, *, seed, progress, **options) -> Factors`` under ``name``.

    ``E`` arrives validated (2-D, finite, float32 or float64); the result is cast back to the input dtype by
    :func:`embfactor.decomposition.decompose`. A method whose options can fix the stored size on their own (``int``'s
    ``bits``, ``pq``'s ``sub_dim``) names them in ``size_options`` and gives ``stored_bytes(vocab, d, options)``:
    such options then need no size target, and a target given with them is checked against ``stored_bytes``.

    Example:
        >>> @register_method("mine")                                   # doctest: +SKIP
        ... def mine(E, rank, *, seed=0, progress=False): ...
    """

    def wrap(fn: Callable) -> Callable:
        if name in _METHODS and _METHODS[name].fn is not fn:
            raise ValueError(f"a decomposition method named {name!r} is already registered")
        if size_options and stored_bytes is None:
            raise ValueError(f"method {name!r}: size_options need a stored_bytes(vocab, d, options) function")
        _METHODS[name] = MethodInfo(name, fn, description or (fn.__doc__ or "").strip().split("\n")[0], data_aware,
                                    tuple(size_options), stored_bytes)
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


def fixes_size(method: str | None, options: Mapping[str, Any]) -> bool:
    """True when ``method``'s ``options`` decide the stored size, so that no size target is needed.

    Example:
        >>> fixes_size("int", {"bits": 4}), fixes_size("pq", {"K": 256}), fixes_size("svd", {}), fixes_size(None, {})
        (True, False, False, False)
    """
    return method is not None and method != "auto" and get_method(method).fixes_size(options)


def _described(method: str, options: Mapping[str, Any]) -> str:
    # the user's settings, not the data or budget the pipeline adds (token_weights is a vocab-long tensor)
    opts = ", ".join(f"{k}={v}" for k, v in options.items() if k not in ("budget_bytes", "token_weights"))
    return f"method {method!r} with {opts}"


def explicit_size(method: str | None, shape: tuple[int, int], options: Mapping[str, Any]) -> int | None:
    """The bytes ``method`` stores for a (vocab × d) table when ``options`` fix the size, else None.

    Example:
        >>> explicit_size("int", (30522, 384), {"bits": 4, "group": 32})    # = quant.grouped_bytes(30522, 384, 4, 32)
        6592752
    """
    if not fixes_size(method, options):
        return None
    info = get_method(method)
    return int(info.stored_bytes(int(shape[0]), int(shape[1]), options))


def check_explicit_size(
    method: str | None, shape: tuple[int, int], options: Mapping[str, Any], *, budget: float, target: str,
) -> int | None:
    """Refuse options that fix the size when they store more than the size target given with them allows.

    The explicit options win (they are what the method uses); a target is a byte budget, "at most this many
    bytes", as the byte planners of int/pq/rvq read it, so a setting within it agrees with it. Returns the bytes the
    options store (None when they do not fix the size).

    Args:
        budget: the target's byte budget: ``--size``'s bytes, fp32 bytes / ratio, or the fp32 bytes of a rank-r
            U·V for a rank (how int/pq/rvq read a rank).
        target: the target as the user gave it, for the message (e.g. ``"ratio=16"``).

    Example:
        >>> check_explicit_size("int", (100, 64), {"bits": 8}, budget=1000.0, target="size=1kB")
        Traceback (most recent call last):
        ...
        embfactor.errors.ConfigError: method 'int' with bits=8 stores 6,800 bytes for the 100 × 64 table (3.76x ...
    """
    nbytes = explicit_size(method, shape, options)
    if nbytes is None or nbytes <= budget + 1e-6:
        return nbytes
    vocab, d = int(shape[0]), int(shape[1])
    fp32 = vocab * d * 4
    raise ConfigError(
        f"{_described(str(method), options)} stores {nbytes:,} bytes for the {vocab} × {d} table "
        f"({fp32 / nbytes:.2f}x fewer than fp32), more than {target} allows ({budget:,.0f} bytes, "
        f"{fp32 / budget:.2f}x); those options fix the size on their own: drop {target.split('=')[0]}, or change "
        "the options"
    )


def refuse_spectrum_target(
    method: str | None, options: Mapping[str, Any], *, energy: float | None = None, max_error: float | None = None,
) -> None:
    """ConfigError for energy/max_error given with options that fix the size: those targets pick a rank from the
    spectrum, and fixed bytes leave nothing to pick. Needs no table: checked before a model is loaded.

    Example:
        >>> refuse_spectrum_target("int", {"bits": 4}, energy=0.9)
        Traceback (most recent call last):
        ...
        embfactor.errors.ConfigError: energy=0.9 picks a rank from the spectrum, but method 'int' with bits=4 fixes ...
    """
    if (energy is None and max_error is None) or not fixes_size(method, options):
        return
    what = f"energy={energy:g}" if energy is not None else f"max_error={max_error:g}"
    raise ConfigError(
        f"{what} picks a rank from the spectrum, but {_described(str(method), options)} fixes the stored size "
        "already; give one of them (a byte target, size=, ratio= or rank=, may go with those options: it is "
        "checked to allow their bytes)"
    )


def missing_target_message(method: str | None, *, cli: bool = False) -> str:
    """What to add when neither a size target nor options that fix the size were given (flags when ``cli``).

    Example:
        >>> missing_target_message("svd")[:61]
        'give exactly one of rank=, ratio=, energy=, max_error=, size='
    """
    if cli:
        head = "no size target: give one of --size (16x or 2.5MB), --rank, --ratio, --energy, --max-error"
        opt = "--method-option "
    else:
        head = "give exactly one of rank=, ratio=, energy=, max_error=, size= (got none)"
        opt = ""
    fixers = "; ".join(
        f"{i.name}: {' or '.join(opt + k + '=' for k in i.size_options)}" for i in method_infos() if i.size_options
    )
    if method is not None and method != "auto" and method in _METHODS and _METHODS[method].size_options:
        keys = " or ".join(opt + k + "=" for k in _METHODS[method].size_options)
        return f"{head}, or an option of method {method!r} that fixes the stored size on its own: {keys}"
    which = f"method {method!r}" if method is not None else "the default method"
    return f"{head}; {which} has no options that fix the size (methods that do, without a target: {fixers})"
