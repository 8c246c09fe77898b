"""Healing speed on MiniLM: optimizer steps per second by batch size, fp32 vs bfloat16 autocast, on this CPU.

The student is MiniLM with its embedding factorized at rank 96 (4× smaller table); only the factors train (the
default). Each case runs ``embfactor.train.heal.heal`` for a few steps on the bundled Wikipedia with a tiny
held-out slice, and its ``step_seconds`` (time inside optimizer steps, evaluation excluded) gives steps/s and
texts/s. Cases run interleaved in rounds (every case once per round) and the median over rounds is reported: the
machine is shared, so absolute figures are noisy; fp32 vs bf16 of the same batch size, measured side by side, is
the comparison that matters.

Run: ``python benchmarks/heal_speed.py`` (~5 min) or ``--quick`` (one small case). Writes
``benchmarks/results/bench_heal_speed.{json,md}`` (``_quick`` for a quick run).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script from anywhere
from benchmarks.common import environment, results_prefix, write_result_files  # noqa: E402


def run(batch_sizes: tuple[int, ...], steps: int, rounds: int, rank: int = 96) -> dict[str, Any]:
    import torch

    import embfactor as ef
    from embfactor.models import LoadedModel
    from embfactor.train.heal import bf16_supported, heal

    teacher = ef.load_model("minilm")
    dense = copy.deepcopy(teacher.model)
    ef.factorize_(dense, rank=rank, method="svd")
    cases = [(bs, bf16) for bs in batch_sizes for bf16 in (False, True)]
    samples: dict[tuple[int, bool], list[float]] = {c: [] for c in cases}
    for _ in range(rounds):
        for bs, bf16 in cases:
            student = LoadedModel("student", copy.deepcopy(dense), teacher.tokenizer, "encoder", Path("/nonexistent"))
            r = heal(student, teacher, steps=steps, batch_size=bs, bf16=bf16, eval_size=8, eval_every=10**6,
                     progress=False, warmup_steps=1)
            samples[(bs, bf16)].append(r["steps"] / r["step_seconds"])
            print(f"batch {bs} bf16={bf16}: {samples[(bs, bf16)][-1]:.3f} steps/s", file=sys.stderr, flush=True)
    rows = []
    for bs, bf16 in cases:
        sps = statistics.median(samples[(bs, bf16)])
        rows.append({"batch_size": bs, "precision": "bf16 autocast" if bf16 else "fp32", "steps_per_s": sps,
                     "texts_per_s": sps * bs, "samples": samples[(bs, bf16)]})
    return {"model": "minilm", "rank": rank, "steps": steps, "rounds": rounds, "max_length": 128,
            "torch_threads": torch.get_num_threads(), "bf16_supported": bf16_supported(),
            "environment": environment(), "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}


def markdown(res: dict[str, Any]) -> str:
    lines = [f"Healing speed, MiniLM factorized at rank {res['rank']} (factors only), {res['steps']} steps × "
             f"{res['rounds']} rounds, {res['torch_threads']} threads; bf16 detected: {res['bf16_supported']}", "",
             "| batch | precision | steps/s | texts/s |", "|--:|---|--:|--:|"]
    for r in res["rows"]:
        lines.append(f"| {r['batch_size']} | {r['precision']} | {r['steps_per_s']:.3f} | {r['texts_per_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one small case, for a smoke test")
    p.add_argument("--output", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32], help="batch sizes (default 8 16 32)")
    p.add_argument("--steps", type=int, default=5, help="steps per case (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    a = p.parse_args(argv)
    res = run((4,), 2, 1) if a.quick else run(tuple(a.batch_sizes), a.steps, a.rounds)
    md = markdown(res)
    print(md)
    write_result_files(results_prefix("heal_speed", a.quick, a.output), res, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
