"""The registry of evaluation tasks: each task module registers its function here (:func:`register_task`), and
:mod:`embfactor.eval.tasks` looks them up. Task modules import this module only, never ``tasks``, so the registry
and its built-in tasks do not import each other."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from embfactor.errors import InvalidInputError


@dataclass(frozen=True)
class TaskInfo:
    name: str
    fn: Callable[..., dict[str, Any]]
    kinds: tuple[str, ...]  # model kinds ("encoder", "decoder") the task applies to
    description: str
    metric: str  # the headline quality number (higher is better unless lower_is_better)
    lower_is_better: bool = False


_TASKS: dict[str, TaskInfo] = {}


def register_task(
    name: str, *, kinds: tuple[str, ...], description: str, metric: str, lower_is_better: bool = False
) -> Callable:
    """Register an evaluation task ``fn(lm, *, reference=None, progress=False, **opts) -> dict`` under ``name``.

    Example:
        >>> @register_task("mine", kinds=("encoder",), description="...", metric="score")   # doctest: +SKIP
        ... def mine(lm, *, reference=None, progress=False): ...
    """

    def wrap(fn: Callable) -> Callable:
        if name in _TASKS and _TASKS[name].fn is not fn:
            raise ValueError(f"an evaluation task named {name!r} is already registered")
        _TASKS[name] = TaskInfo(name, fn, tuple(kinds), description, metric, lower_is_better)
        return fn

    return wrap


def input_embedding(model):
    """The model's input embedding module (any registered layer type or nn.Embedding)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        raise InvalidInputError(f"{type(model).__name__} has no get_input_embeddings(); cannot evaluate its embedding")
    return emb
