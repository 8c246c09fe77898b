"""``embfactor evaluate``: task metrics of a model, optionally against the original (fidelity, KL, overlap)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from embfactor.cli.common import add_model_arg, check_outputs, fmt, table, write_json

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


def evaluate_model(
    model: str,
    task: str,
    *,
    reference: str | None = None,
    progress: bool = True,
    **opts: Any,
) -> dict[str, Any]:
    """Load ``model`` (and ``reference``) and run evaluation ``task``; return the result dict.

    A compressed model evaluated on ``reconstruction`` without a reference is compared with the model recorded as
    its source in embfactor.json.

    Example:
        >>> evaluate_model("out/minilm-r6", "similarity", reference="minilm")["fidelity"]    # doctest: +SKIP
    """
    from embfactor.errors import ConfigError, InvalidInputError
    from embfactor.eval.tasks import get_task
    from embfactor.models import load_model

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
    lm = load_model(model)
    if lm.kind not in info.kinds:  # before loading a (slow) reference
        from embfactor.eval.tasks import evaluate

        evaluate(lm, task)
    if reference is None and task == "reconstruction":
        reference = lm.record.get("source_model") if lm.compressed else None
        if reference is None:
            raise InvalidInputError("the reconstruction task needs the original model: give --reference ORIGINAL")
        print(f"comparing with the source model recorded in {lm.source}: {reference}", file=sys.stderr)
    ref = load_model(reference) if reference is not None else None
    from embfactor.eval.tasks import evaluate

    r = evaluate(lm, task, reference=ref, progress=progress, **opts)
    r.update(model=str(model), reference=None if reference is None else str(reference))
    r["wall_seconds"] = time.perf_counter() - t0
    return r


# rows shown first, in this order; anything else numeric follows
_ORDER = (
    "spearman", "pearson", "fidelity", "fidelity_docs", "fidelity_passages", "fidelity_min", "fidelity_other",
    "fidelity_other_min",
    "perplexity", "reference_perplexity", "kl", "top1_agreement", "nll",
    "accuracy", "accuracy_std", "reference_accuracy", "reference_accuracy_std", "accuracy_delta",
    "relative_error", "overlap_weighted", "overlap_uniform", "weighted_mass",
)
_HIDDEN = {"task", "model", "kind", "metric", "reference", "wall_seconds", "seconds"}


def render(r: dict[str, Any]) -> str:
    """The metrics as a table; with a reference, its own score of each metric it has stands beside the model's."""
    keys = [k for k in _ORDER if k in r] + sorted(k for k in r if k not in _ORDER and k not in _HIDDEN)
    paired = {k: f"reference_{k}" for k in keys if f"reference_{k}" in r}
    shown = [k for k in keys if k not in paired.values()]
    rows = []
    for k in shown:
        v = r[k]
        if isinstance(v, list):
            v = ", ".join(fmt(x) for x in v)
        row = [k + (" *" if k == r.get("metric") else ""), v]
        if paired:
            row.append(r[paired[k]] if k in paired else "")
        rows.append(row)
    head = f"{r['model']} ({r['kind']}): task {r['task']}" + (f", reference {r['reference']}" if r.get("reference") else "")
    tail = f"* headline metric; wall time {r['wall_seconds']:.1f} s"
    headers = ["metric", "model", "reference"] if paired else ["metric", "value"]
    return "\n".join([head, table(rows, headers), tail])


def run(args: argparse.Namespace) -> int:
    check_outputs(files=[("--json", args.json)], inputs=[args.model, args.reference])
    r = evaluate_model(
        args.model,
        args.task,
        reference=args.reference,
        progress=not args.quiet,
        labels_file=args.labels,
        folds=args.folds,
        max_tokens=args.max_tokens,
        window=args.window,
        stride=args.stride,
        bf16=True if args.bf16 else None,
        queries=args.queries,
    )
    print(render(r))
    write_json(args.json, r)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="task metrics of a model (similarity, perplexity, classification, reconstruction), optionally vs the original",
    )
    add_model_arg(p, default=None)
    p.add_argument(
        "--task", required=True,
        help="similarity (encoders: Lee Spearman/Pearson, fidelity), perplexity (decoders: perplexity, KL, top-1), "
        "classification (probe accuracy), reconstruction (error, neighbour overlap)",
    )
    p.add_argument("--reference", metavar="ORIGINAL", help="the original model, for fidelity / KL / reconstruction")
    p.add_argument("--labels", metavar="FILE", help="classification: your CSV/JSONL with text,label (default: polarity)")
    p.add_argument("--folds", type=int, help="classification: stratified folds (default 5)")
    p.add_argument("--max-tokens", type=int, help="perplexity: token budget (default 16384)")
    p.add_argument("--window", type=int, help="perplexity: window length in tokens (default 256)")
    p.add_argument("--stride", type=int, help="perplexity: window step in tokens (default 256)")
    p.add_argument("--bf16", action="store_true", help="perplexity: bfloat16 autocast (faster, less exact)")
    p.add_argument("--queries", type=int, help="reconstruction: query tokens per neighbour average (default 2048)")
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
