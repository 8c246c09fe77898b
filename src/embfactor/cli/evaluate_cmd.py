"""``embfactor evaluate``: task metrics of a model, optionally against the original (fidelity, KL, overlap)."""

from __future__ import annotations

import argparse
from typing import Any

from embfactor.cli.common import add_model_arg, check_outputs, emit, fmt, table

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
    from embfactor.pipeline.evaluate import evaluate

    r = evaluate(
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
    return emit(r, render, args.json)


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
