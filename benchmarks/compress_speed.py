"""Speed of ``compress MODEL --size 8x`` with the defaults (issue 30): stage times, wall time and peak RSS per model,
with the chosen plan and the written model's verified quality beside them, so a faster run can be checked to choose
the same plan at the same quality.

Each model runs in a fresh Python process (:func:`benchmarks.common.run_isolated`: its peak RSS is its own).

Run: ``python -m benchmarks.compress_speed`` (MiniLM and SmolLM2, several minutes each on 2 idle cores; ``--only
minilm``, ``--size 16x``) or ``--quick`` (a tiny random BERT with MiniLM's tokenizer and three candidate formats, about a minute: what
``make bench-quick`` runs). Writes ``benchmarks/results/bench_compress_speed[_quick].{json,md}`` (``--output`` another
folder). Timings of a shared machine are not comparable across runs: compare runs made one after the other on an idle
machine (the results record the load average at the start).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script from anywhere
from benchmarks.common import emit, environment, header, markdown_table, publish, results_prefix, run_isolated

MODELS = ("minilm", "smollm2")


def tiny_model(folder: Path) -> Path:
    """A random 2-layer BERT (hidden 32) with MiniLM's tokenizer, saved to ``folder``: the planner's whole path in
    seconds."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from embfactor.models import minilm_path

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# the tiny model's candidates (the default eleven took minutes of k-means on its 30,522 rows)
QUICK_FORMATS = ["int8 g32", "int4 g32", "pq sub4 K256 int8cb"]


def case(model: str, size: str) -> None:
    """One ``compress`` in this process; emits its figures (run by :func:`run_isolated`)."""
    from embfactor.pipeline import compress

    options = {}
    with tempfile.TemporaryDirectory() as tmp:
        if model == "tiny":
            model, options = str(tiny_model(Path(tmp) / "tiny")), {"formats": QUICK_FORMATS}
        t = time.perf_counter()
        r = compress(model, output=Path(tmp) / "out", size=size, method_options=options, progress=False).to_dict()
        wall = time.perf_counter() - t
    plan = r.get("plan") or {}
    emit({"model": Path(model).name, "size": size, "wall_s": wall, "stage_seconds": r.get("stage_seconds", {}),
          "plan": " + ".join(f"{t['label']} [{t['rows']}]" for t in plan.get("tiers", [])),
          "verified": (r.get("verified") or {}).get("measured"), "bytes": r["bytes"]})


def run(models: tuple[str, ...], size: str, timeout: float) -> list[dict[str, Any]]:
    rows = []
    for m in models:
        got = run_isolated("benchmarks.compress_speed", "case", {"model": m, "size": size}, timeout=timeout)
        rows += got
        print(got, flush=True)
    return rows


def render(rows: list[dict[str, Any]], env: dict[str, Any], command: str) -> str:
    stages = sorted({k for r in rows for k in r.get("stage_seconds", {})})
    table = []
    for r in rows:
        if r.get("status") != "ok":
            table.append([r.get("model", "?"), r.get("status"), *["-"] * (len(stages) + 3)])
            continue
        v = r.get("verified") or {}
        quality = (f"fidelity {v['fidelity']:.4f}" if "fidelity" in v else
                   f"KL {v['kl']:.4f}, ppl x{v['perplexity_ratio']:.3f}" if "kl" in v else "-")
        table.append([r["model"], f"{r['wall_s']:.1f}", *[r["stage_seconds"].get(s, "-") for s in stages],
                      f"{r['peak_rss_mb']:,.0f}", quality, r["plan"]])
    return (header("compress --size: stage times, wall, peak RSS, plan and quality", env, None, command) + "\n"
            + markdown_table(table, ["model", "wall s", *[f"{s} s" for s in stages], "peak RSS MB", "verified",
                                     "plan"]) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny random model only (seconds; make bench-quick)")
    p.add_argument("--only", nargs="+", choices=MODELS, help="these models only")
    p.add_argument("--size", default="8x")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per model")
    p.add_argument("--output", help="results folder (default benchmarks/results)")
    a = p.parse_args(argv)
    models = ("tiny",) if a.quick else tuple(a.only or MODELS)
    rows = run(models, a.size, a.timeout)
    env = environment()
    command = "python -m benchmarks.compress_speed" + (" --quick" if a.quick else "")
    publish(results_prefix("compress_speed", a.quick, a.output), {"quick": a.quick, "environment": env, "rows": rows},
            render(rows, env, command))
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
