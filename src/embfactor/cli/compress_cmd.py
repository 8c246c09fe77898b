"""``embfactor compress``: factorize a model's embedding (and tied head), save it, print before/after.

The work is :func:`embfactor.pipeline.compress`; this file parses the flags and renders its report.
"""

from __future__ import annotations

import argparse
from typing import Any

from embfactor.cli.common import (
    add_method_arg, add_model_arg, add_target_args, add_verify_args, check_outputs, emit, mb, parse_method_options,
    table, verified_figures,
)
from embfactor.config import REST_CHOICES, FactorizationConfig
from embfactor.errors import ConfigError


def model_bytes_line(r: dict[str, Any]) -> str:
    """The report's first line: the whole model's weights on disk, input -> output, and plainly when it grew."""
    b = r["bytes"]
    line = f"model on disk: {mb(b['input'])} -> {mb(b['output'])}"
    if b["output"] is None:
        return line + " (not saved)"
    if b["larger"]:
        return line + f": LARGER than the input (+{b['output'] / b['input'] - 1:.0%}); {_larger_hint(r)}"
    return line + f" ({b['ratio']:.2f}x smaller)"


def _larger_hint(r: dict[str, Any]) -> str:
    rest = r.get("rest") or {}
    if rest.get("linear") is None:
        return "store the other weights as integers with --rest int8 (or --rest int4)"
    return "the source is stored in fewer bits per weight than --rest " + rest["linear"]


def summary(r: dict[str, Any]) -> list[str]:
    """The lines a user wants first: the model's bytes on disk, the embedding's bytes, the written model's quality."""
    lines = [model_bytes_line(r)]
    if r.get("embedding_bytes_after"):
        lines.append(f"embedding: {mb(r['embedding_bytes_before'])} -> {mb(r['embedding_bytes_after'])} "
                     f"({r['bytes_ratio']:.2f}x fewer bytes than fp32)")
    v = r.get("verified")
    if v:
        lines.append(verified_figures(v))
    if r.get("size_choice"):
        from embfactor.decomposition.choice import describe_choice

        lines.append(describe_choice(r["size_choice"]))
    return lines


def render(r: dict[str, Any]) -> str:
    rows = [
        ["embedding parameters", r["embedding_params_before"], r["embedding_params_after"]],
        ["model parameters", r["model_params_before"], r["model_params_after"]],
        ["embedding compression", "1.00x", f"{r['ratio']:.2f}x"],
        ["model compression", "1.00x", f"{r['model_params_before'] / r['model_params_after']:.2f}x"],
        ["bytes on disk", mb(r["bytes_before"]), mb(r["bytes_after"])],
        ["relative error ||E-Ê||/||E||", 0.0, r["relative_error"]],
    ]
    fp32 = r["vocab_size"] * r["hidden_size"] * 4
    if r.get("embedding_bytes_after"):
        rows.insert(3, ["embedding bytes (x fewer than fp32)", f"{mb(r['embedding_bytes_before'])} "
                        f"({fp32 / r['embedding_bytes_before']:.2f}x)",
                        f"{mb(r['embedding_bytes_after'])} ({r['bytes_ratio']:.2f}x)"])
        if r.get("head_bytes_after"):
            rows.insert(4, ["untied head bytes (kept dense)", "-", mb(r["head_bytes_after"])])
    plan = r.get("plan")
    if plan:
        shape = f"{len(plan['tiers'])} tier(s) by token frequency"
    elif r.get("format") not in ("codebook", "intk"):  # formats with a rank (low rank, block, ...)
        rows.append([f"optimum for rank {r['rank']} (truncated SVD)", "-", r["optimal_relative_error"]])
        shape = f"rank {r['rank']}"
    else:
        cfg = r.get("format_config") or {}
        shape = f"{r['format']} " + ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "zero_padding_row")
    head = (
        f"{r['model']}: {r['vocab_size']:,} x {r['hidden_size']} embedding -> {shape} "
        f"({r['method']}), tied head: {'yes' if r['tied_head'] else 'no'}"
    )
    q = r.get("quantization")
    if q:
        what = "fp16 codebooks" if q["bits"] == 16 else f"int{q['bits']} factors"
        rows.append(
            [f"embedding bytes ({what})", mb(q["fp32_embedding_bytes"]),
             f"{mb(q['embedding_bytes'])} ({q['bytes_ratio']:.1f}x)"]
        )
    tail = f"wall time: {r['seconds']:.1f} s (decomposition {r['decompose_seconds']:.2f} s); saved to {r['output']}"
    rest = r.get("rest")
    if rest:
        what = f"{rest['linear']} Linears + {rest['dtype']}" if rest.get("linear") else rest["dtype"]
        rows.append([f"other weights ({what})", "-", mb(rest["bytes"])])
    parts = [*summary(r), "", head, table(rows, ["", "before", "after"])]
    if (r.get("calibration") or {}).get("note"):
        tail += f"\nnote: {r['calibration']['note']}"
    source = r.get("calibration_source") or {}
    if source.get("calibration") == "self":
        reach, how = source["rows_reached"], "cached" if source["self_cached"] else f"drawn in {source['self_seconds']} s"
        tail += (f"\ncalibration: the given text + {source['self_tokens']:,} tokens the model wrote ({how}); rows "
                 f"reached: given {reach['given']:,}, self {reach['self']:,}, both {reach['both']:,}")
    if r.get("path") == "table-only":
        tail += f"\ntable-only path ({r['path_reason']}): {r['check_note']}"
    if plan:
        from embfactor.plan import describe_checks, describe_plan

        parts += ["plan (tiers by token frequency):", table(describe_plan(plan), PLAN_COLUMNS),
                  "candidate plans checked on the model (calibration text; higher is better):",
                  table(describe_checks(plan), CHECK_COLUMNS)]
        if r.get("stage_seconds"):
            parts.append("seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in r["stage_seconds"].items()))
    return "\n".join([*parts, tail])


PLAN_COLUMNS = ["tier", "format", "rows", "token mass", "bytes"]
CHECK_COLUMNS = ["plan", "alpha", "bytes", "proxy error", "score"]


def run(args: argparse.Namespace) -> int:
    check_outputs(folder=args.output, files=[("--json", args.json)], inputs=[args.model])
    from embfactor.decomposition import fixes_size, missing_target_message  # torch: not at parser build time

    options = parse_method_options(args.method_option)
    targets = (args.rank, args.ratio, args.energy, args.max_error, args.size)
    if all(t is None for t in targets) and args.method != "auto" and not fixes_size(args.method, options):
        # the target is optional for options that fix the size (--method int --method-option bits=4); say in flags
        # what to add (FactorizationConfig would say it in keywords), before the model is loaded
        raise ConfigError(missing_target_message(args.method, cli=True))
    config = FactorizationConfig(
        method=args.method, rank=args.rank, ratio=args.ratio, energy=args.energy, max_error=args.max_error,
        size=args.size, seed=args.seed, method_options=options,
    )
    from embfactor.pipeline import compress

    r = compress(
        args.model, config, args.output, progress=not args.quiet, quantize=args.quantize, text_files=args.text,
        table_only=True if args.table_only else None,
        verify=args.verify, rest=args.rest, calibration=args.calibration, calibration_tokens=args.calibration_tokens,
    ).to_dict()
    return emit(r, render, args.json)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="factorize a model's embedding and save the compressed model")
    add_model_arg(p)
    add_target_args(p, required=False, size=True)  # optional: method options can fix the size
    add_method_arg(p, options=True)
    p.add_argument("--output", "-o", required=True, help="output folder (a new folder or an earlier embfactor output)")
    p.add_argument(
        "--text", nargs="+", metavar="FILE",
        help="text files to count token frequencies on for data-aware methods (wsvd, block); "
        "default: the bundled Wikipedia extract",
    )
    p.add_argument(
        "--calibration", choices=["bundled", "self"], default="bundled",
        help="the planner's calibration text: bundled (default: --text, or the bundled Wikipedia extract) or self "
        "(a decoder's own samples added to it, drawn once per model and cached)",
    )
    p.add_argument(
        "--calibration-tokens", type=int, metavar="N",
        help="with --calibration self: the tokens the model writes (default 8192); a cached larger draw serves a "
        "smaller N as its first samples",
    )
    p.add_argument(
        "--quantize", choices=["int8", "int4"],
        help="store the factors U and V as per-row int8 or int4 (with float32 scales), dequantized on gather; "
        "with pq/rvq: store the codebooks in fp16",
    )
    p.add_argument(
        "--rest", choices=REST_CHOICES, default="auto",
        help="how the weights besides the embedding are stored: auto (default) keeps the source's precision (a bf16 "
        "folder stays bf16; a GGUF source: its 4-bit Linears as int4, 5-8-bit ones as int8, the rest bf16), bf16/fp16/fp32, or int8 (every other Linear weight-only, one "
        "scale per output channel) / int4 (per group of 32 inputs, fp16 scale + minimum), dequantized on the fly",
    )
    add_verify_args(p)
    p.add_argument(
        "--table-only", action="store_true",
        help="read only the embedding of a safetensors folder and copy its other tensors unchanged, shard by shard "
        "(the planner, plans chosen by its proxy: no model is loaded); chosen by itself when the float32 model "
        "would not fit in memory",
    )
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
