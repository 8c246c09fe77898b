"""The size-quality frontier of an encoder through the real CLI, with defaults: ``embfactor compress`` + ``evaluate``.

Unlike ``frontier.py`` (fake-quantized plan strings), every point here is what a user gets: each ``compress`` runs
in its own process under ``/usr/bin/time -v`` (wall time and peak RSS of the whole command), the output folder is
scored exactly as ``embfactor evaluate OUT --task similarity --reference MODEL`` scores it (the 50 Lee documents +
200 held-out passages; the reference's embeddings are computed once), and one JSON line per point is appended to
``benchmarks/results/frontier.jsonl`` with both commands. Points: ``8x`` (the planner, ``--size 8x``) or
``int4g32`` (dense int-k: ``--method int --method-option bits=4 --method-option group=32``).

Run (pin it: the machine is shared)::

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 taskset -c 1 python -m benchmarks.cli_frontier \\
        ~/.cache/embfactor/models/all-mpnet-base-v2 --name all-mpnet-base-v2 int4g32 int3g32 8x 12x 16x 24x 32x

``--render FILE.md`` writes the markdown table of one model's CLI points from the .jsonl. ``--quick``: a tiny
random model (seconds), nothing appended.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "src"))

_INT = re.compile(r"^int(\d)g(\d+)$")
_SIZE = re.compile(r"^\d+(\.\d+)?x$")


def compress_args(point: str) -> list[str]:
    """The ``embfactor compress`` flags of a point: ``16x`` -> ``--size 16x``; ``int4g32`` -> dense int-k."""
    m = _INT.match(point)
    if m:
        # explicit bits and group fix the size: no --size/--ratio target is needed
        return ["--method", "int", "--method-option", f"bits={m[1]}", "--method-option", f"group={m[2]}"]
    if _SIZE.match(point):
        return ["--size", point]
    raise SystemExit(f"unknown point {point!r}: give a size like 16x or a dense int-k like int4g32")


def _time_v(stderr: str) -> dict[str, float]:
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    out: dict[str, float] = {}
    if wall:
        secs = 0.0
        for part in wall[1].split(":"):
            secs = secs * 60 + float(part)
        out["compress_wall_s"] = round(secs, 1)
    if rss:
        out["compress_peak_rss_mb"] = round(int(rss[1]) / 1024, 1)
    return out


def run_compress(model: str, point: str, out: Path) -> dict[str, Any]:
    """Run ``embfactor compress`` in a child process (under ``/usr/bin/time -v`` when present); its JSON report."""
    report = out.with_suffix(".json")
    cmd = [sys.executable, "-m", "embfactor.cli.main", "compress", model, *compress_args(point), "--output", str(out),
           "--json", str(report), "--quiet"]
    timed = ["/usr/bin/time", "-v", *cmd] if Path("/usr/bin/time").is_file() else cmd
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    r = subprocess.run(timed, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"compress {point} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return {**json.loads(report.read_text()), **_time_v(r.stderr)}


def weighted_error(E, Eh, counts) -> float:
    """sqrt(Σ w·|e − ê|² / Σ w·|e|²), w = (count + 1)^0.5 (frontier.py's ``werr``)."""
    w = (counts.double() + 1) ** 0.5
    err = ((E.double() - Eh.double()) ** 2).sum(1)
    return float((w * err).sum() / (w * (E.double() ** 2).sum(1)).sum()) ** 0.5


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", help="a model folder (or name) embfactor loads")
    p.add_argument("points", nargs="*", help="sizes (16x) and dense int-k references (int4g32)")
    p.add_argument("--name", help="the model's name in the results (default: the folder's name)")
    p.add_argument("--note", default="")
    p.add_argument("--out", default=str(RESULTS / "frontier.jsonl"))
    p.add_argument("--keep", type=Path, default=None, help="keep the compressed folders here")
    p.add_argument("--render", type=Path, default=None, help="only write this markdown from the .jsonl")
    p.add_argument("--quick", action="store_true", help="a tiny random model: checks the script runs")
    args = p.parse_intermixed_args(argv)  # points may follow options
    if args.render:
        render(Path(args.out), args.render, args.name)
        return 0
    import torch

    from embfactor.data import wiki_split
    from embfactor.data.frequency import token_counts
    from embfactor.eval.similarity import similarity
    from embfactor.models import load_model

    torch.set_num_threads(1)
    scratch = Path(tempfile.mkdtemp(prefix="cli-frontier-"))
    try:
        if args.quick:
            sys.path.insert(0, str(ROOT))
            from tests.test_mpnet import _mpnet_st_folder

            args.model = str(_mpnet_st_folder(scratch / "tiny-mpnet"))
            args.points = args.points or ["int4g32", "4x"]
        if not args.model or not args.points:
            p.error("give a model and at least one point (or --quick)")
        name = args.name or Path(args.model).name
        ref = load_model(args.model)
        E = ref.model.get_input_embeddings().weight.detach().clone()
        counts = token_counts(ref.tokenizer, wiki_split("train"), vocab_size=E.shape[0])
        cache: dict = {}
        base = similarity(ref)
        print(f"{name}: original Lee Spearman {base['spearman']:.4f}", flush=True)
        for point in args.points:
            out = (args.keep or scratch) / f"{name}-{point}"
            rep = run_compress(args.model, point, out)
            lm = load_model(out)
            q = similarity(lm, reference=ref, cache=cache)
            Eh = lm.model.get_input_embeddings().dense().detach()
            plan = rep.get("plan") or {}
            tiers = [{"format": t.get("label", t["format"]), "rows": t["rows"], "bytes": t["bytes"],
                      "mass": t.get("token_mass", 0.0)} for t in plan.get("tiers", [])]
            if not tiers:
                cfg = rep.get("format_config") or {}
                tiers = [{"format": f"{rep.get('format')} " + ", ".join(f"{k}={v}" for k, v in cfg.items()
                                                                        if k != "zero_padding_row"),
                          "rows": int(E.shape[0]), "bytes": rep["embedding_bytes_after"], "mass": 1.0}]
            model_arg = args.model if not args.quick else "MODEL"
            row = {
                "model": name, "plan": point if _INT.match(point) else f"--size {point}",
                "alpha": plan.get("alpha"), "ratio": rep["bytes_ratio"], "bytes": rep["embedding_bytes_after"],
                "werr": weighted_error(E, Eh, counts), "fidelity": q["fidelity"], "spearman": q["spearman"],
                "fidelity_min": q["fidelity_min"], "reference_spearman": q["reference_spearman"], "tiers": tiers,
                "plan_score": plan.get("score"), "compress_wall_s": rep.get("compress_wall_s"),
                "compress_peak_rss_mb": rep.get("compress_peak_rss_mb"), "build_s": round(rep["seconds"], 1),
                "eval_s": None, "source": "cli",
                "command": f"embfactor compress {model_arg} {' '.join(compress_args(point))} --output OUT && "
                           f"embfactor evaluate OUT --task similarity --reference {model_arg}",
                "note": args.note, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
            }
            print(f"{point:8s} x{row['ratio']:6.2f} fid {row['fidelity']:.4f} sp {row['spearman']:.4f} "
                  f"werr {row['werr']:.4f} wall {row['compress_wall_s']}s rss {row['compress_peak_rss_mb']} MB "
                  f"{' + '.join(t['format'] + ' [' + str(t['rows']) + ']' for t in tiers)}", flush=True)
            if not args.quick:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
            del lm
            if args.keep is None:
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def render(src: Path, dst: Path, name: str | None) -> None:
    """A markdown table of the CLI points (``source: cli``) of model ``name`` in ``src``, last run of each point."""
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("source") == "cli" and (name is None or r["model"] == name)]
    latest = {(r["model"], r["plan"]): r for r in rows}
    out = [f"# CLI frontier, defaults: {', '.join(dict.fromkeys(r['model'] for r in latest.values()))}", "",
           "Written by `python -m benchmarks.cli_frontier --render` from `frontier.jsonl` (rows with source `cli`).",
           "Fidelity = mean cosine to the original over the 50 Lee documents + 200 held-out Wikipedia passages; "
           "Spearman = Lee documents vs human scores. Wall time and peak RSS: the whole `compress` process "
           "(`/usr/bin/time -v`, one core, shared machine: timings are noisy). No healing.", ""]
    for model in dict.fromkeys(m for m, _ in latest):
        mine = sorted((r for (m, _), r in latest.items() if m == model), key=lambda r: r["ratio"])
        out += [f"## {model} (original Lee Spearman {mine[0]['reference_spearman']:.4f})", "",
                "| point | x fewer bytes than fp32 | fidelity | Lee Spearman | weighted rel. error | plan chosen | "
                "compress wall s | peak RSS MB | command |",
                "|---|---:|---:|---:|---:|---|---:|---:|---|"]
        for r in mine:
            tiers = " + ".join(f"{t['format']} [{t['rows']:,}]" for t in r["tiers"])
            out.append(f"| `{r['plan']}` | {r['ratio']:.2f} | {r['fidelity']:.4f} | {r['spearman']:.4f} | "
                       f"{r['werr']:.4f} | {tiers} | {r['compress_wall_s']} | {r['compress_peak_rss_mb']} | "
                       f"`{r['command']}` |")
        out.append("")
    dst.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
