"""evaluate: run an evaluation task on a model by name, optionally against the original."""

from __future__ import annotations

import sys
import time
from typing import Any

# Task options the CLI exposes, with the task they belong to (others are rejected with a clear message).
_OPTION_TASKS = {
    "labels_file": ("classification",),
    "folds": ("classification",),
    "max_tokens": ("perplexity",),
    "window": ("perplexity",),
    "stride": ("perplexity",),
    "bf16": ("perplexity",),
    "queries": ("reconstruction",),
}

# Smallest values of the numeric task options (the tasks' own checks, repeated before the model loads).
_MINIMUM = {"folds": 2, "max_tokens": 2, "window": 2, "stride": 1, "queries": 1}


def evaluate(
    model: str | Any,
    task: str,
    *,
    reference: str | Any | None = None,
    progress: bool = True,
    **opts: Any,
) -> dict[str, Any]:
    """Load ``model`` (and ``reference``) and run evaluation ``task``; return the result dict.

    A compressed model evaluated on ``reconstruction`` without a reference is compared with the model recorded as
    its source in embfactor.json.

    Args:
        model: a name (``minilm``), a folder, a .gguf file, or a LoadedModel.
        task: ``similarity`` (encoders), ``perplexity`` (decoders), ``classification`` or ``reconstruction``.
        reference: the original model (name, folder or LoadedModel): adds fidelity / KL / top-1 agreement.
        opts: the task's options (``max_tokens``, ``window``, ``stride``, ``bf16``, ``labels_file``, ``folds``,
            ``queries``).

    Example:
        >>> import embfactor as ef
        >>> ef.evaluate("out/minilm-8x", "similarity", reference="minilm")["fidelity"]    # doctest: +SKIP
        0.999...
    """
    from embfactor.errors import ConfigError, InvalidInputError
    from embfactor.eval.tasks import get_task
    from embfactor.models import LoadedModel, load_model

    info = get_task(task)  # unknown task: fail before loading anything
    for k, v in opts.items():
        if v is not None and task not in _OPTION_TASKS.get(k, (task,)):
            flag = "--labels" if k == "labels_file" else "--" + k.replace("_", "-")
            raise InvalidInputError(f"{flag} applies to the {' / '.join(_OPTION_TASKS[k])} task, not {task!r}")
    opts = {k: v for k, v in opts.items() if v is not None}
    for k, low in _MINIMUM.items():  # the ranges a task checks too, here before the (slow) model load
        if k in opts and opts[k] < low:
            raise ConfigError(f"--{k.replace('_', '-')} must be at least {low}, got {opts[k]}")
    if "window" in opts and "stride" in opts and opts["stride"] > opts["window"]:
        raise ConfigError(f"--stride {opts['stride']} must not exceed --window {opts['window']}")
    if "labels_file" in opts:  # a bad labels file fails before the model loads
        from embfactor.data import read_labelled

        read_labelled(opts["labels_file"])
    t0 = time.perf_counter()
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    if lm.kind not in info.kinds:  # before loading a (slow) reference
        from embfactor.eval.tasks import evaluate

        evaluate(lm, task)
    if reference is None and task == "reconstruction":
        reference = lm.record.get("source_model") if lm.compressed else None
        if reference is None:
            raise InvalidInputError("the reconstruction task needs the original model: give --reference ORIGINAL")
        print(f"comparing with the source model recorded in {lm.source}: {reference}", file=sys.stderr)
    ref = reference if reference is None or isinstance(reference, LoadedModel) else load_model(reference)
    from embfactor.eval.tasks import evaluate

    r = evaluate(lm, task, reference=ref, progress=progress, **opts)
    r.update(model=_name(model), reference=None if reference is None else _name(reference))
    r["wall_seconds"] = time.perf_counter() - t0
    return r


def _name(model: Any) -> str:
    return str(getattr(model, "name", model))


__all__ = ["evaluate"]
