"""Shared pieces of the CLI commands: tables, JSON output, model and rank-target arguments."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from embfactor.fileio import atomic_write_json


def fmt(v: Any) -> str:
    """Human formatting for table cells: thousands separators, 4 significant decimals, bytes in MB."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str] | None = None) -> str:
    """A plain aligned text table (first column left-aligned, others right-aligned)."""
    cells = [[fmt(c) for c in r] for r in rows]
    if headers:
        cells.insert(0, list(headers))
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = []
    for k, r in enumerate(cells):
        parts = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(parts).rstrip())
        if headers and k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.2f} MB"


def check_outputs(
    *,
    folder: str | os.PathLike | None = None,
    files: Sequence[tuple[str, str | os.PathLike | None]] = (),
    inputs: Sequence[str | os.PathLike | None] = (),
    write_into: Sequence[tuple[str, str | os.PathLike | None]] = (),
) -> None:
    """The one check of every command that writes, run before anything is loaded or computed.

    Refuses an output folder or file that cannot be written (no permission, /proc, under a file, a name too long),
    that is, contains or lies inside an input model (``inputs``: model names or paths), or an existing folder holding
    files embfactor did not write.

    Args:
        folder: the ``--output`` folder, if the command writes one.
        files: ``(flag, path)`` pairs such as ``("--json", args.json)``; None paths are skipped.
        write_into: ``(flag, path)`` pairs of folders files are written into (not replaced): checked to be writable.
        inputs: the models the command reads (built-in names are mapped to their installed folders).

    Example:
        >>> check_outputs(folder="out/m6", files=[("--json", "r.json")], inputs=["minilm"])   # doctest: +SKIP
    """
    from embfactor.errors import InvalidInputError
    from embfactor.fileio import check_not_an_input, check_output_dir, check_output_file, check_writable, resolved
    from embfactor.models import source_path

    sources = tuple(source_path(m) for m in inputs)
    out = check_output_dir(folder, inputs=sources) if folder is not None else None
    for flag, path in files:
        if path is None or path == "":
            continue
        target = check_output_file(path, inputs=sources, flag=flag)
        if out is not None and target == out:
            raise InvalidInputError(f"{flag} {path} is the --output folder; give a file name outside it")
    for flag, path in write_into:
        if path is None or path == "":
            continue
        target = resolved(path)
        check_not_an_input(target, sources, what=flag)
        if target.exists() and not target.is_dir():
            raise InvalidInputError(f"{flag} {path} exists and is not a folder")
        check_writable(target / "x", folder=False, flag=flag)


def write_json(path: str | os.PathLike | None, obj: Any) -> None:
    if path:
        atomic_write_json(path, obj)
        print(f"wrote {path}", file=sys.stderr)


def emit(report: Any, render: Any, path: str | os.PathLike | None) -> int:
    """A command's ending: its report rendered on stdout, written as JSON to ``path`` (``--json``); exit code 0."""
    print(render(report))
    write_json(path, report)
    return 0


def add_model_arg(p: argparse.ArgumentParser, *, default: str | None = "minilm") -> None:
    """The MODEL positional argument; optional with ``default``, required with ``default=None`` (the help says which)."""
    kinds = "a local Hugging Face folder, a .gguf file (causal LM), or an embfactor output folder"
    p.add_argument(
        "model",
        nargs="?" if default else None,
        default=default,
        metavar="MODEL",
        help=f"'minilm', 'smollm2', {kinds}" + (f" (default: {default})" if default else ""),
    )


def add_target_args(p: argparse.ArgumentParser, *, required: bool = True, size: bool = False) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    if size:
        g.add_argument(
            "--size", metavar="SIZE",
            help="byte target of the embedding: '16x' (x fewer bytes than fp32) or '2.5MB'; the method's settings "
            "(rank, sub-vector width, stages, bits) are picked to fit",
        )
    g.add_argument("--rank", type=int, help="rank r of the factors (1 <= r < min(vocab, d))")
    g.add_argument("--ratio", type=float, help="embedding parameters before/after (> 1)")
    g.add_argument("--energy", type=float, help="share of the squared singular values to keep, in (0, 1]")
    g.add_argument("--max-error", type=float, help="relative Frobenius error budget ||E-UV||/||E||, in (0, 1)")


def add_method_arg(p: argparse.ArgumentParser, *, options: bool = False) -> None:
    p.add_argument("--method", default=None, help="decomposition method (default: best for the shape); see 'inspect --methods'")
    if options:
        p.add_argument(
            "--method-option", action="append", default=[], metavar="KEY=VALUE",
            help="a method option, repeatable: e.g. sub_dim=4, K=256, stages=3, rotation=random (pq/rvq); bits=4, "
            "group=32, symmetric=false (int); power_iters=6 (rsvd); tt_rank=16 (tt). Options that fix the stored "
            "size (int: bits; pq: sub_dim or M; rvq: stages, sub_dim or M; tt: tt_rank) need no --size/--ratio/"
            "--rank; one given with them must allow their bytes",
        )
    p.add_argument("--seed", type=int, default=0, help="seed for randomized methods (default 0)")


def add_verify_args(p: argparse.ArgumentParser) -> None:
    """``--verify N`` / ``--no-verify``: the check of the written model (``args.verify``: None, N or 0)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--verify", type=int, metavar="N", default=None,
        help="after saving, load the written folder with from_pretrained and score it against the original on N "
        "held-out samples: passages for encoders (default 64), 256-token windows for decoders (default 2); the "
        "command fails, writing nothing, when it is far worse than the model that was compressed",
    )
    g.add_argument("--no-verify", dest="verify", action="store_const", const=0, help="skip that check")


def verified_figures(v: dict[str, Any]) -> str:
    """The verified record in words: ``written model, reloaded with BertModel.from_pretrained: fidelity 0.9990 ...``.

    The in-memory model's figure is shown only where it differs at the printed precision.
    """
    m, p = v["measured"], v.get("predicted") or {}
    if v["metric"] == "fidelity":
        text = f"fidelity {m['fidelity']:.4f} to the original (mean cosine, {v['text']})"
        mem = f"{p['fidelity']:.4f}" if p else None
        differs = mem is not None and mem != f"{m['fidelity']:.4f}"
    else:
        text = (f"KL {m['kl']:.4f} nats to the original, top-1 agreement {m['top1_agreement']:.3f}, perplexity "
                f"x{m['perplexity_ratio']:.3f} ({v['text']})")
        mem = f"KL {p['kl']:.4f}" if p else None
        differs = mem is not None and mem != f"KL {m['kl']:.4f}"
    return f"written model, reloaded with {v['loaded_with']}: {text}" + (f"; in memory {mem}" if differs else "")


def file_size(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None


def parse_method_options(items: Sequence[str]) -> dict[str, Any]:
    """``["K=256", "rotation=random", "group=none"]`` -> {"K": 256, "rotation": "random", "group": None}.

    Values are read as JSON where they parse (numbers, true/false, null) and as strings otherwise; ``none`` is None.

    Example:
        >>> parse_method_options(["sub_dim=4", "symmetric=false", "group=none", "rotation=opq"])
        {'sub_dim': 4, 'symmetric': False, 'group': None, 'rotation': 'opq'}
    """
    import json

    from embfactor.errors import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"--method-option takes KEY=VALUE (e.g. sub_dim=4), got {item!r}")
        v = value.strip()
        if v.lower() in ("none", "null"):
            out[key.strip()] = None
            continue
        try:
            out[key.strip()] = json.loads(v.lower() if v.lower() in ("true", "false") else v)
        except json.JSONDecodeError:
            out[key.strip()] = v
    return out
