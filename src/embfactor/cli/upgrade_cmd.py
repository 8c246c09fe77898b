"""``embfactor upgrade FOLDER -o OUT``: rewrite an earlier embfactor output so it is safe to share.

Folders written before embfactor 0.1.0 carried a ``quantization_config`` (or, earlier still, the guard tensors,
the shipped loader and the model card) load with embfactor as they always did, but code that never imports
embfactor reads them with a random table. ``upgrade`` writes the same model again, with everything a folder gets
today (:mod:`embfactor.surgery.share`, :mod:`embfactor.surgery.card`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from embfactor.cli.common import check_outputs, emit


def upgrade(folder: str | Path, output: str | Path) -> dict[str, Any]:
    """Rewrite ``folder`` (an embfactor output of any version) into ``output``.

    Example:
        >>> upgrade("old/minilm-8x", "out/minilm-8x")["output"]   # doctest: +SKIP
        'out/minilm-8x'
    """
    from embfactor.pipeline.upgrade import upgrade_folder
    from embfactor.surgery.io import read_record

    read_record(folder)  # an embfactor output, complete, of a version this embfactor reads: checked before any load
    out = upgrade_folder(folder, output)
    return {"folder": str(folder), "output": str(out), "files": sorted(p.name for p in Path(out).iterdir())}


def render(r: dict[str, Any]) -> str:
    return (f"{r['folder']} rewritten to {r['output']}: the same model, with guard tensors (a load without embfactor "
            "fails instead of drawing a random table), embfactor_remote.py (trust_remote_code=True) and README.md")


def run(args: argparse.Namespace) -> int:
    check_outputs(folder=args.output, files=[("--json", args.json)], inputs=[args.folder])
    return emit(upgrade(args.folder, args.output), render, args.json)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("upgrade", help="rewrite an earlier embfactor output folder so it is safe to share")
    p.add_argument("folder", metavar="FOLDER", help="an embfactor output folder (any earlier version)")
    p.add_argument("-o", "--output", required=True, help="folder to write (a new one, or an earlier embfactor output)")
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.set_defaults(func=run)
