"""``embfactor sweep``: quality against embedding bytes over methods × ratios, with a plot and a JSON table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from embfactor.cli.common import add_model_arg, check_outputs, fmt, table
from embfactor.errors import InvalidInputError


def check_sweep_outputs(plot: str | None, json_path: str | None, model: str | None = None) -> None:
    """Refuse output paths that cannot be written (a folder, a non-.png plot, the model itself) before any work."""
    if plot is not None and Path(plot).suffix.lower() != ".png":
        raise InvalidInputError(f"--plot {plot}: the plot is written as PNG; give a file name ending in .png")
    check_outputs(files=[("--plot", plot), ("--json", json_path)], inputs=[model])


def run_sweep(
    model: str,
    *,
    plot: str | None = None,
    json_path: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run :func:`embfactor.pipeline.sweep.sweep`, then write the PNG and JSON (both atomically, only on success).

    Example:
        >>> run_sweep("minilm", ratios="2,4,6,8,12", methods="svd", plot="sweep.png")    # doctest: +SKIP
    """
    from embfactor.fileio import atomic_write_bytes, atomic_write_json
    from embfactor.pipeline.sweep import plot_sweep, sweep

    check_sweep_outputs(plot, json_path, model)
    result = sweep(model, **kwargs)
    png = plot_sweep(result) if plot else None  # render before writing anything: no partial outputs
    if png is not None:
        atomic_write_bytes(plot, png)
        result["plot"] = str(plot)
    if json_path:
        atomic_write_json(json_path, result)
    return result


def render(r: dict[str, Any]) -> str:
    metric, agree = r["metric"], r["agreement_metric"]
    extra = {"perplexity": "top1_agreement", "similarity": "fidelity_other"}.get(r["task"])
    cols = [metric] + [c for c in (agree, extra) if c and c != metric]
    headers = ["point", "rank", "ratio", "emb bytes", *cols, "rel. error", "seconds"]
    rows = []
    for p in r["reference"]:
        rows.append([p["label"], "-", f"{r['dense_embedding_bytes'] / p['embedding_bytes']:.2f}x", _mb(p["embedding_bytes"]),
                     *[p.get(c) for c in cols], "-", p.get("seconds")])
    for p in r.get("int_k_curve") or []:
        rows.append([f"dense {p['label']}", "-", f"{p['bytes_ratio']:.2f}x", _mb(p["embedding_bytes"]),
                     *[p.get(c) for c in cols], "-", p.get("seconds")])
    for p in r["points"]:
        rows.append([p["label"], p["rank"] if p.get("rank") and p.get("method") not in ("pq", "rvq", "int") else "-", f"{p['bytes_ratio']:.2f}x", _mb(p["embedding_bytes"]),
                     *[p.get(c) for c in cols], p.get("relative_error"), p.get("seconds")])
    better = "lower" if r["lower_is_better"] else "higher"
    head = (f"{r['model']}: sweep of task {r['task']} ({metric}, {better} is better); "
            f"dense embedding {r['vocab_size']:,} x {r['hidden_size']} = {_mb(r['dense_embedding_bytes'])}")
    notes = [f"not reachable: {p['method']} at {p['size']}: {p['reason']}" for p in r.get("skipped") or []]
    return "\n".join([head, table(rows, headers), *notes, f"total {fmt(r['seconds'])} s"])


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def run(args: argparse.Namespace) -> int:
    task_options = {}
    if args.max_tokens is not None:
        task_options["max_tokens"] = args.max_tokens
    r = run_sweep(
        args.model,
        plot=args.plot,
        json_path=args.json,
        ratios=args.ratios,
        sizes=args.sizes,
        methods=args.methods,
        task=args.task,
        heal_minutes=args.heal_minutes,
        quantize=args.quantize,
        skip_missing=args.skip_missing,
        seed=args.seed,
        progress=not args.quiet,
        task_options=task_options,
    )
    print(render(r))
    for f in (args.plot, args.json):
        if f:
            print(f"wrote {f}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="quality vs embedding bytes over methods and ratios (JSON table + PNG plot)")
    add_model_arg(p)
    p.add_argument("--ratios", default="2,4,6,8,12", help="comma-separated embedding compression ratios (default 2,4,6,8,12)")
    p.add_argument(
        "--sizes", default=None,
        help="comma-separated byte targets instead of ratios, e.g. 8x,12x,16x,24x,32x (x fewer embedding bytes than "
        "fp32): every method stores the table within each (auto = the byte-budget planner, int = dense int-k)",
    )
    p.add_argument("--methods", default="svd", help="comma-separated decomposition methods (default svd), e.g. svd,wsvd,block; "
                   "auto (the planner); other tools' formats as reference points: gguf-q8_0, gguf-q5_0, gguf-q4_0, "
                   "torchao-int8, torchao-int4")
    p.add_argument("--task", help="similarity (default for encoders), perplexity (default for decoders), classification, reconstruction")
    p.add_argument("--heal-minutes", type=float, default=0.0, help="minutes of distillation healing per point (default 0)")
    p.add_argument("--quantize", default="none", help="factor storage to evaluate: comma-separated none,int8,int4 (default none)")
    p.add_argument("--skip-missing", action="store_true", help="skip unregistered methods with a warning instead of failing")
    p.add_argument("--max-tokens", type=int, help="perplexity: token budget per evaluation (default 16384)")
    p.add_argument("--seed", type=int, default=0, help="decomposition seed (default 0)")
    p.add_argument("--plot", metavar="FILE.png", help="write the quality-vs-bytes plot to this PNG")
    p.add_argument("--json", help="write the table as JSON to this file")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
