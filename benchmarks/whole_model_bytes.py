"""Whole-model bytes on disk, input -> output, for each way of storing the rest, with the written model's quality.

For each model: ``embfactor compress MODEL --size 8x`` once (the planner), then the rest stored three ways, each
written to a folder and loaded back the way users load it (``embfactor.load_model``):

- ``auto`` (the default): the source's precision (a GGUF source: bf16);
- ``--rest int8``: every other ``nn.Linear`` weight-only int8, one fp16 scale per output channel;
- ``--rest int4``: 4-bit per group of 32 inputs with an fp16 scale and minimum (llama.cpp's Q4_1 layout).

The three share one plan (the table does not depend on the rest: it is planned before the rest is stored), so the
columns differ by the rest only; ``store_rest_`` on the default's model is what ``compress --rest int8`` does after
the same plan. Quality of each written folder against the original: encoders ``embfactor evaluate OUT --task
similarity --reference MODEL`` (fidelity: mean cosine of pooled embeddings; Lee Spearman), decoders ``embfactor
evaluate OUT --task perplexity --reference MODEL --max-tokens 4096 --window 512 --stride 512``.

Run::

    python -m benchmarks.extra_models mpnet --dest DIR     # all-mpnet-base-v2 as a local folder (see split_zip.py)
    python -m benchmarks.whole_model_bytes [--mpnet DIR] [--keep DIR]
    python -m benchmarks.whole_model_bytes --quick         # a tiny random MPNet folder: checks the script runs

Writes ``benchmarks/results/whole_model_bytes.{json,md}`` (``whole_model_bytes_quick.*`` with --quick, into
``--output``). Bytes and quality do not depend on the machine's load; the seconds do (a shared machine).
"""

from __future__ import annotations

import argparse
import copy
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script from anywhere

from benchmarks.common import RESULTS_DIR, environment, header, write_result_files

RESTS = ("auto", "int8", "int4")
PERPLEXITY = {"max_tokens": 4096, "window": 512, "stride": 512}


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e7 else f"{n / 1e6:.3f} MB"


def measure(name: str, source: str, size: str, work: Path, *, quick: bool = False,
            shown: str | None = None, from_output: str | None = None) -> list[dict[str, Any]]:
    """Compress ``source`` once, store its rest each way, write, reload and score each folder against the source.

    ``shown``: how the commands in the results name the source (default: ``source``). ``from_output``: an
    ``embfactor compress SOURCE --size SIZE`` output written earlier (with any rest): its table is reused instead of
    planning again (the planner is deterministic; SmolLM2's plan takes minutes of CPU on a shared machine).
    """
    from embfactor.eval.size import weights_bytes_on_disk
    from embfactor.eval.tasks import evaluate
    from embfactor.models import load_model, source_path
    from embfactor.pipeline import compress
    from embfactor.surgery import save_compressed
    from embfactor.surgery.rest import store_rest_

    reference = load_model(source)
    task = "perplexity" if reference.kind == "decoder" else "similarity"
    opts = PERPLEXITY if task == "perplexity" else {}
    if quick and task == "perplexity":
        opts = {"max_tokens": 256, "window": 64, "stride": 64}
    t0 = time.perf_counter()
    src = source_path(source) or Path(source)
    if from_output is not None:
        lm = load_model(from_output)
        if lm.record.get("factorization", {}).get("size") != size or lm.record.get("source_model") != source:
            raise SystemExit(f"error: {from_output} is not an output of compress {source} --size {size}")
        table_bytes = lm.record["report"].get("embedding_bytes_after")
    else:
        lm = load_model(source)
        report = compress(lm, size=size, progress=False)  # in memory; the rest stored as the default (auto)
        table_bytes = report.factorization.to_dict().get("embedding_bytes_after")
    plan_seconds = time.perf_counter() - t0
    bytes_in = weights_bytes_on_disk(src)
    rows = []
    for rest in RESTS:
        model = lm.model if rest == "auto" else copy.deepcopy(lm.model)
        stored = store_rest_(model, rest, source=src)
        out = work / f"{name}-{size}-{rest}"
        save_compressed(model, out, tokenizer=lm.tokenizer, inputs=(src,), extra={"source_model": source})
        if model is not lm.model:
            del model
        written = load_model(out)
        q = evaluate(written, task, reference=reference, **opts)
        bytes_out = (out / "model.safetensors").stat().st_size
        row = {
            "model": name, "size": size, "rest": rest, "rest_dtype": stored["dtype"], "bytes_in": bytes_in,
            "bytes_out": bytes_out, "ratio": bytes_in / bytes_out, "larger": bytes_out > bytes_in,
            "embedding_bytes": table_bytes, "table_from": from_output and "an earlier compress output",
            "rest_bytes": stored["bytes"], "task": task, "plan_seconds": round(plan_seconds, 1),
            "command": f"embfactor compress {shown or source} --size {size}"
            + (f" --rest {rest}" if rest != "auto" else "")
            + f" --output OUT && embfactor evaluate OUT --task {task} --reference {shown or source}"
            + "".join(f" --{k.replace('_', '-')} {v}" for k, v in opts.items()),
        }
        keys = ("perplexity", "reference_perplexity", "kl", "top1_agreement") if task == "perplexity" else (
            "fidelity", "fidelity_min", "spearman", "reference_spearman")
        row.update({k: q.get(k) for k in keys})
        rows.append(row)
        print(_line(row), flush=True)
        del written
        gc.collect()
    return rows


def _line(r: dict[str, Any]) -> str:
    q = (f"ppl {r['perplexity']:.3f} (original {r['reference_perplexity']:.3f}), KL {r['kl']:.4f}"
         if r["task"] == "perplexity" else f"fidelity {r['fidelity']:.4f}, Spearman {r['spearman']:.4f}")
    grew = "LARGER" if r["larger"] else f"{r['ratio']:.2f}x smaller"
    return f"{r['model']:8s} {r['size']} rest {r['rest']:4s}: {_mb(r['bytes_in'])} -> {_mb(r['bytes_out'])} ({grew}); {q}"


def render(res: dict[str, Any], command: str) -> str:
    lines = [header("Whole-model bytes on disk, input -> output, and the written model's quality",
                    res["environment"], None, command), "",
             ("Input: the source's weights files (a GGUF file, or the folder's safetensors); output: the written "
              "model.safetensors. `auto` keeps the source's precision (GGUF: bf16). Quality is measured on the folder "
             "as written and reloaded, against the original (encoders: fidelity = mean cosine of pooled embeddings "
             "on held-out Wikipedia passages, Lee Spearman; decoders: perplexity on 4,096 held-out tokens, "
             "windows of 512, KL and top-1 agreement vs the original). Measured on a shared machine: bytes and "
             "quality do not depend on its load."), "",
             "| model | rest | input | output | output / input | rest bytes | quality vs original |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        if r["task"] == "perplexity":
            q = (f"ppl {r['perplexity']:.3f} (orig. {r['reference_perplexity']:.3f}), KL {r['kl']:.4f}"
                 + (f", top-1 {r['top1_agreement']:.3f}" if r.get("top1_agreement") is not None else ""))
        else:
            q = f"fidelity {r['fidelity']:.4f}, Spearman {r['spearman']:.4f}" + (
                f" (orig. {r['reference_spearman']:.4f})" if r.get("reference_spearman") is not None else "")
        grew = " **larger**" if r["larger"] else ""
        rest_bytes = _mb(r["rest_bytes"]) if r.get("rest_bytes") is not None else "-"
        lines.append(f"| {r['model']} --size {r['size']} | {r['rest']} ({r['rest_dtype']}) | "
                     f"{_mb(r['bytes_in'])} | {_mb(r['bytes_out'])} | "
                     f"{r['bytes_out'] / r['bytes_in']:.2f}{grew} | {rest_bytes} | {q} |")
    lines += ["", "Commands, one per row:", ""] + [f"- `{r['command']}`" for r in res["rows"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny random MPNet folder (seconds, for CI)")
    p.add_argument("--mpnet", help="all-mpnet-base-v2 folder (python -m benchmarks.extra_models mpnet --dest DIR)")
    p.add_argument("--models", nargs="+", default=["minilm", "smollm2", "mpnet"], help="which models to run")
    p.add_argument("--size", default="8x", help="compress --size (default 8x)")
    p.add_argument("--keep", type=Path, help="keep the written folders here (default: a temporary folder)")
    p.add_argument("--output", default=str(RESULTS_DIR), help="folder of the results files")
    p.add_argument("--from-output", help="with one model: its `compress --size SIZE` output written earlier, whose "
                   "table is reused instead of planning again")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="only write the results of these runs' JSON files (one model each, run side by side) as one")
    args = p.parse_args(argv)
    command = "python -m benchmarks.whole_model_bytes" + (" --quick" if args.quick else " --mpnet MPNET_DIR")
    if args.merge:
        import json

        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        res = {"quick": False, "environment": runs[0]["environment"], "rows": [r for run in runs for r in run["rows"]]}
        return _write(res, command, Path(args.output))
    import torch

    torch.manual_seed(0)
    work = args.keep or Path(tempfile.mkdtemp(prefix="whole-model-bytes-"))
    rows: list[dict[str, Any]] = []
    try:
        if args.quick:
            from tests.test_mpnet import _mpnet_st_folder

            rows += measure("tiny-mpnet", str(_mpnet_st_folder(work / "tiny-mpnet")), "4x", work, quick=True)
        else:
            sources = {"minilm": "minilm", "smollm2": "smollm2", "mpnet": args.mpnet}
            for name in args.models:
                if sources.get(name) is None:
                    p.error(f"--models {name}: give --mpnet DIR (python -m benchmarks.extra_models mpnet --dest DIR)")
                rows += measure(name, sources[name], args.size, work, shown="MPNET_DIR" if name == "mpnet" else None,
                                from_output=args.from_output if len(args.models) == 1 else None)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return _write({"quick": args.quick, "environment": environment(), "rows": rows}, command, Path(args.output))


def _write(res: dict[str, Any], command: str, output: Path) -> int:
    files = write_result_files(output / ("whole_model_bytes" + ("_quick" if res["quick"] else "")), res,
                               render(res, command))
    print(f"wrote {files['markdown']} and {files['json']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
