"""``embfactor export OUT --onnx``: write the compressed folder's model as ONNX (table still compressed) into OUT."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from embfactor.cli.common import check_outputs, emit, mb, table


def export_model(folder: str | Path, *, onnx: bool, int8_rest: bool = False) -> dict[str, Any]:
    """Validate the arguments and the folder, then :func:`embfactor.export.export_onnx` it.

    Example:
        >>> export_model("out/minilm-16x", onnx=True, int8_rest=True)["files"]   # doctest: +SKIP
        {'onnx/model.onnx': 49403454, 'onnx/model_qint8.onnx': 17667233}
    """
    from embfactor.errors import ConfigError, ModelNotFoundError
    from embfactor.export.onnx import ONNX_DIR, export_onnx, require_onnx

    if not onnx:
        raise ConfigError("choose what to export: --onnx (the only export format so far)")
    if not Path(folder).is_dir():
        raise ModelNotFoundError(f"{folder}: no such folder; give the output folder of `embfactor compress`")
    check_outputs(write_into=[("OUT", Path(folder) / ONNX_DIR)])
    require_onnx()
    return export_onnx(folder, int8_rest=int8_rest).to_dict()


def render(r: dict[str, Any]) -> str:
    rows = [[rel, mb(n), f"{r['check'][rel]['min_cosine']:.6f}" if rel in r["check"] else "-"]
            for rel, n in r["files"].items()]
    rows.append(["model.safetensors (for comparison)", mb(r["safetensors_bytes"]), ""])
    what = "pooled vectors" if r["kind"] == "encoder" else "last-position logits"
    inputs = [n for n in r["inputs"] if not n.startswith("past_key_values.")]
    if len(inputs) < len(r["inputs"]):  # a decoder's cache: one pair per layer
        inputs.append(f"past_key_values.{{0..{(len(r['inputs']) - len(inputs)) // 2 - 1}}}.key/value")
    head = (f"{r['folder']}: {r['kind']} exported to ONNX (inputs {', '.join(inputs)}; output {r['output']}), "
            f"the table still compressed")
    return f"{head}\n" + table(rows, ["file", "size", f"cosine to PyTorch ({what})"]) + f"\nwall time: {r['seconds']:.1f} s"


def run(args: argparse.Namespace) -> int:
    check_outputs(files=[("--json", args.json)])
    r = export_model(args.folder, onnx=args.onnx, int8_rest=args.int8_rest)
    return emit(r, render, args.json)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a compressed folder's model as ONNX into it (onnx/model.onnx), the table still compressed",
    )
    p.add_argument("folder", metavar="OUT", help="an embfactor output folder (from compress or heal)")
    p.add_argument("--onnx", action="store_true",
                   help="write OUT/onnx/model.onnx (what SentenceTransformer(OUT, backend='onnx') loads)")
    p.add_argument("--int8-rest", action="store_true",
                   help="also write OUT/onnx/model_qint8.onnx: ONNX Runtime dynamic int8 of the other MatMuls")
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.set_defaults(func=run)
