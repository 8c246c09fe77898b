"""Evaluation tasks by name: ``evaluate(lm, "similarity" | "perplexity" | "classification" | "reconstruction")``.

Each task is a function ``fn(lm, *, reference=None, progress=False, **opts) -> dict`` registered with the model
kinds it applies to. :func:`evaluate` checks the task name, the model kind and (with a reference) that model and
reference share one vocabulary before any work is done.
"""

from __future__ import annotations

from typing import Any

from embfactor.errors import ConfigError, InvalidInputError, InvalidTypeError, UnknownMethodError, a_or_an
from embfactor.eval.registry import _TASKS, TaskInfo, input_embedding, register_task

__all__ = ["TaskInfo", "available_tasks", "check_same_vocabulary", "evaluate", "get_task", "input_embedding",
           "register_task", "task_infos"]


def _ensure_builtin_tasks() -> None:
    # importing the modules registers their tasks
    import embfactor.eval.classification  # noqa: F401
    import embfactor.eval.perplexity  # noqa: F401
    import embfactor.eval.reconstruction  # noqa: F401
    import embfactor.eval.similarity  # noqa: F401


def get_task(name: str) -> TaskInfo:
    """The registered task ``name``; an unknown name raises UnknownMethodError listing the valid ones."""
    _ensure_builtin_tasks()
    try:
        return _TASKS[name]
    except KeyError:
        raise UnknownMethodError(f"unknown evaluation task {name!r}; valid tasks: {', '.join(sorted(_TASKS))}") from None


def available_tasks() -> list[str]:
    """Names of all registered evaluation tasks, sorted."""
    _ensure_builtin_tasks()
    return sorted(_TASKS)


def task_infos() -> list[TaskInfo]:
    _ensure_builtin_tasks()
    return [_TASKS[n] for n in sorted(_TASKS)]


def check_same_vocabulary(lm, reference) -> None:
    """Raise InvalidInputError unless ``lm`` and ``reference`` have the same kind, vocabulary and embedding shape.

    Comparing against a reference only means something when token i is the same string in both models.
    """
    if lm.kind != reference.kind:
        raise InvalidInputError(
            f"model {lm.name!r} is {a_or_an(lm.kind)} but reference {reference.name!r} is {a_or_an(reference.kind)}; "
            "give the original model the compressed one was made from"
        )
    e1, e2 = input_embedding(lm.model), input_embedding(reference.model)
    s1 = (int(e1.num_embeddings), int(e1.embedding_dim))
    s2 = (int(e2.num_embeddings), int(e2.embedding_dim))
    if s1 != s2:
        raise InvalidInputError(
            f"mismatched vocabularies: model {lm.name!r} has a {s1[0]}×{s1[1]} embedding, reference "
            f"{reference.name!r} has {s2[0]}×{s2[1]}; give the original model the compressed one was made from"
        )
    if lm.tokenizer is not reference.tokenizer and lm.tokenizer.get_vocab() != reference.tokenizer.get_vocab():
        v1, v2 = lm.tokenizer.get_vocab(), reference.tokenizer.get_vocab()
        diff = sorted(set(v1.items()) ^ set(v2.items()))[:3]
        raise InvalidInputError(
            f"mismatched vocabularies: the tokenizers of {lm.name!r} ({len(v1)} tokens) and {reference.name!r} "
            f"({len(v2)} tokens) differ (e.g. {diff}); give the original model the compressed one was made from"
        )


def evaluate(lm, task: str, *, reference=None, progress: bool = False, **opts: Any) -> dict[str, Any]:
    """Run evaluation ``task`` on ``lm`` (optionally against ``reference``, the original model).

    Args:
        lm: an :class:`embfactor.models.LoadedModel` (model + tokenizer + kind).
        task: ``"similarity"`` (encoders: Lee Spearman/Pearson, fidelity), ``"perplexity"`` (decoders: perplexity,
            KL and top-1 agreement vs the reference), ``"classification"`` (logistic-regression probe accuracy),
            ``"reconstruction"`` (relative error and nearest-neighbour overlap of the input embedding).
        reference: the original model as a LoadedModel; enables fidelity / KL / reconstruction metrics.
        progress: show progress bars.
        **opts: task options (see each task's function: ``similarity``, ``perplexity``, ``classification``,
            ``reconstruction`` in ``embfactor.eval.*``), e.g. ``max_tokens=32768`` or ``labels_file="my.csv"``.

    Returns:
        A flat dict of JSON-serializable numbers and settings, always with ``task``, ``model`` and ``metric``
        (the name of the headline number).

    Raises:
        UnknownMethodError: unknown task (the message lists the valid ones).
        InvalidInputError: task not applicable to the model kind, or model and reference vocabularies differ.
        ConfigError: an option the task does not have.

    Example:
        >>> lm = load_model("minilm")                                                 # doctest: +SKIP
        >>> evaluate(lm, "similarity")["spearman"]                                   # doctest: +SKIP
        0.508...
    """
    info = get_task(task)
    if not hasattr(lm, "model") or not hasattr(lm, "tokenizer"):
        raise InvalidTypeError(f"evaluate needs an embfactor.models.LoadedModel, got {type(lm).__name__}")
    if lm.kind not in info.kinds:
        raise InvalidInputError(
            f"task {task!r} applies to {' and '.join(k + 's' for k in info.kinds)}, but {lm.name!r} is {a_or_an(lm.kind)}; "
            f"tasks for {a_or_an(lm.kind)}: {', '.join(t.name for t in task_infos() if lm.kind in t.kinds)}"
        )
    import inspect

    accepted = set(inspect.signature(info.fn).parameters) - {"lm", "reference", "progress"}
    unknown = sorted(set(opts) - accepted)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for task {task!r}; its options: {', '.join(sorted(accepted))}"
        )
    if reference is not None:
        check_same_vocabulary(lm, reference)
    out = info.fn(lm, reference=reference, progress=progress, **opts)
    return {"task": task, "model": lm.name, "kind": lm.kind, "metric": info.metric, **out}
