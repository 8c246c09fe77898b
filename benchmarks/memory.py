"""Memory benchmark: peak RSS of ``embfactor compress`` on each bundled model vs the model's float32 size.

Each command runs as its own process and its peak RSS comes from the kernel (``os.wait4`` rusage), so
everything counts: Python, torch, transformers, the loaded model, the decomposition and the save. A second
process that only loads the model gives the baseline, so the decomposition's own cost is the difference.

Run: ``python -m benchmarks.memory`` (minilm and smollm2, ~2 min) or ``--quick`` (a tiny random BERT).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, environment, header, markdown_table, write_results

FULL_MODELS = {"minilm": ["--ratio", "6"], "smollm2": ["--ratio", "4"]}

# `import transformers` is lazy: the model machinery (transformers.modeling_utils, which pulls in torch._dynamo,
# sympy and scipy: ~130 MB of modules) is imported by the first from_pretrained, whatever the model's size. It is
# part of the fixed runtime cost, so the baseline imports it too; the model-specific module (modeling_bert, ...)
# still counts as model memory.
IMPORTS_ONLY = (
    "import torch, transformers, transformers.modeling_utils, embfactor.models, embfactor.surgery, "
    "embfactor.pipeline"
)
LOAD_ONLY = (
    "import sys; from embfactor.models import load_model; lm = load_model(sys.argv[1]); "
    "print(sum(p.numel() for p in lm.model.parameters()))"
)


def _run_measured(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run ``cmd``; return wall seconds, peak RSS in MB (ru_maxrss of that child), exit code and stdout."""
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=str(ROOT))
        deadline = time.monotonic() + timeout
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                _, status, ru = os.wait4(proc.pid, 0)
                return {"status": "timeout", "seconds": time.perf_counter() - t0}
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    peak = ru.ru_maxrss / 1024 if sys.platform != "darwin" else ru.ru_maxrss / 2**20
    res = {"status": "ok" if proc.returncode == 0 else "error", "seconds": time.perf_counter() - t0,
           "peak_rss_mb": peak, "stdout": stdout.strip()[-2000:]}
    if proc.returncode != 0:
        res["error"] = stderr.strip()[-400:]
    return res


def _tiny_model_dir(folder: Path) -> Path:
    """A saved tiny random BERT with a WordPiece tokenizer (quick mode: no bundled model needed)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=2000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=64, pad_token_id=0)
    path = folder / "tiny-bert"
    BertModel(cfg).save_pretrained(path)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(1995)]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    return path


def run(*, quick: bool = False, output: str | Path | None = None, progress: bool = True,
        timeout: float = 600.0, models: list[str] | None = None) -> dict[str, Any]:
    """Run the memory suite; write ``bench_memory.json``/``.md`` (``bench_memory_quick.*`` when quick); return the data.

    Args:
        models: a subset of the bundled models (default: all of :data:`FULL_MODELS`).
    """
    env = environment()
    rows = []
    with tempfile.TemporaryDirectory(prefix="embfactor-bench-mem-") as tmp:
        todo = {str(_tiny_model_dir(Path(tmp))): ["--ratio", "4"]} if quick else FULL_MODELS
        if models and not quick:
            todo = {k: v for k, v in todo.items() if k in models}
        for model, target in todo.items():
            label = "tiny-bert (random)" if quick else model
            imports = _run_measured([sys.executable, "-c", IMPORTS_ONLY], timeout)
            base = _run_measured([sys.executable, "-c", LOAD_ONLY, model], timeout)
            n_params = int(base["stdout"].splitlines()[-1]) if base["status"] == "ok" else None
            out_dir = Path(tmp) / f"out-{len(rows)}"
            cmd = [sys.executable, "-m", "embfactor.cli.main", "compress", model, *target, "--output", str(out_dir),
                   "--quiet"]
            comp = _run_measured(cmd, timeout)
            fp32_mb = n_params * 4 / 2**20 if n_params else None
            row = {"model": label, "target": " ".join(target), "params": n_params, "fp32_mb": fp32_mb,
                   "imports_peak_rss_mb": imports.get("peak_rss_mb"), "load_peak_rss_mb": base.get("peak_rss_mb"),
                   "compress_peak_rss_mb": comp.get("peak_rss_mb"),
                   "compress_seconds": comp.get("seconds"), "status": comp["status"]}
            if comp["status"] != "ok":
                row["error"] = comp.get("error", comp["status"])
            if fp32_mb and comp.get("peak_rss_mb") and base.get("peak_rss_mb"):
                row["peak_over_fp32"] = comp["peak_rss_mb"] / fp32_mb
                row["extra_over_load_mb"] = comp["peak_rss_mb"] - base["peak_rss_mb"]
                row["extra_over_fp32"] = row["extra_over_load_mb"] / fp32_mb
            if fp32_mb and comp.get("peak_rss_mb") and imports.get("peak_rss_mb"):
                # the target's measure: memory attributable to the model (load + decompose + save), without the
                # fixed cost of the Python/torch/transformers runtime
                row["model_memory_mb"] = comp["peak_rss_mb"] - imports["peak_rss_mb"]
                row["model_memory_over_fp32"] = row["model_memory_mb"] / fp32_mb
            rows.append(row)
            if progress:
                print(f"[memory] {label}: load {base.get('peak_rss_mb', 0):.0f} MB, compress "
                      f"{comp.get('peak_rss_mb', 0) or 0:.0f} MB, fp32 {fp32_mb or 0:.0f} MB ({comp['status']})",
                      flush=True)
    data = {"suite": "memory", "quick": quick, "environment": env, "rows": rows}
    md = render(data)
    data["files"] = write_results("memory", data, md, output)
    return data


def render(data: dict[str, Any]) -> str:
    cmd = "python -m benchmarks.memory" + (" --quick" if data["quick"] else "")
    parts = [header("Memory: peak RSS of `embfactor compress`", data["environment"], None, cmd)]
    parts.append(
        "Peak RSS of the whole process (kernel rusage). `imports only` = a process that imports torch, transformers "
        "with its model machinery (`transformers.modeling_utils`, which any from_pretrained imports) and embfactor: "
        "the fixed runtime cost; `model memory` = compress − imports only, compared with the model's float32 size "
        "(target ≤ 1.5×); `load only` = a process that just loads the model; `extra over load` = "
        "compress − load only, the cost of decomposing and saving.\n"
    )
    parts.append(markdown_table(
        [[r["model"], r["target"], r["params"], r["fp32_mb"], r.get("imports_peak_rss_mb"), r["load_peak_rss_mb"],
          r["compress_peak_rss_mb"], r.get("model_memory_mb"), r.get("model_memory_over_fp32"),
          r.get("extra_over_load_mb"), r["compress_seconds"]] for r in data["rows"]],
        ["model", "target", "parameters", "fp32 MB", "imports only MB", "load only MB", "compress MB",
         "model memory MB", "model memory / fp32", "extra over load MB", "seconds"]))
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--output", default=None)
    p.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(FULL_MODELS)}")
    a = p.parse_args(argv)
    run(quick=a.quick, output=a.output, models=a.models.split(",") if a.models else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
