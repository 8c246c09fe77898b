"""``--rest auto`` of a GGUF (issue 30): the same compressed table with its other weights stored in bf16 (the old
default) and in the GGUF's own precision (the new default: Q4_1 Linears as int4, 5-8-bit as int8), both scored
against the original on held-out text (KL, top-1 agreement, perplexity ratio), with their bytes on disk.

Run: ``python -m benchmarks.rest_auto FOLDER`` where FOLDER is ``compress smollm2 --size 8x --rest bf16`` output
(``--windows N``: held-out 256-token windows, default 16). Writes ``benchmarks/results/rest_auto.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script from anywhere
from benchmarks.common import RESULTS_DIR, markdown_table, write_result_files


def run(folder: str, model: str = "smollm2", windows: int = 16) -> dict[str, Any]:
    from embfactor.layers.intk_linear import REST_SETTINGS, IntKLinear
    from embfactor.models import load_model, source_path
    from embfactor.pipeline.verify import Verifier
    from embfactor.surgery.replace import replace_modules_
    from embfactor.surgery.rest import gguf_linear_kinds, linears_to_store, rest_bytes

    original = load_model(model)
    verifier = Verifier(original, samples=windows)
    del original
    small = load_model(folder)
    rows = {"bf16 rest (old default)": {**verifier.score(small), "rest_bytes": rest_bytes(small.model)}}
    kinds = gguf_linear_kinds(source_path(model), small.model)
    linears = {k: m for k, m in linears_to_store(small.model).items() if k in kinds}
    replace_modules_(small.model, {k: IntKLinear.from_linear(m, **REST_SETTINGS[kinds[k]]) for k, m in linears.items()})
    ints = sum(m.num_bytes() for m in small.model.modules() if isinstance(m, IntKLinear))
    floats = rows["bf16 rest (old default)"]["rest_bytes"] - 2 * sum(m.weight.numel() for m in linears.values())
    label = "GGUF precision (auto: " + ", ".join(sorted(set(kinds.values()))) + " Linears)"
    rows[label] = {**verifier.score(small), "rest_bytes": floats + ints}
    return {"model": model, "folder": folder, "windows": windows, "what": verifier.what, "rows": rows,
            "kl_difference": rows[label]["kl"] - rows["bf16 rest (old default)"]["kl"]}


def markdown(r: dict[str, Any]) -> str:
    table = [[k, f"{v['kl']:.4f}", f"{v['top1_agreement']:.4f}", f"{v['perplexity_ratio']:.4f}",
              f"{v['rest_bytes'] / 1e6:.1f}"] for k, v in r["rows"].items()]
    return (f"# --rest auto of a GGUF: {r['model']} ({r['folder']}), {r['what']}\n\n"
            + markdown_table(table, ["rest", "KL", "top-1", "perplexity ratio", "rest MB"])
            + f"\n\nKL difference (auto - bf16): {r['kl_difference']:+.4f} (target: within 0.002)\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--windows", type=int, default=16)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    r = run(a.folder, a.model, a.windows)
    md = markdown(r)
    write_result_files(RESULTS_DIR / "rest_auto", r, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
