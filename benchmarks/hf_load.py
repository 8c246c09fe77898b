"""Load-time cost of embfactor's transformers integration: from_pretrained of a compressed vs the original folder.

What is timed (in one process, after one untimed warm-up load of each, fastest and median of ``--repeats``):
  - ``AutoModel.from_pretrained(original)``: the dense model as saved (safetensors);
  - ``AutoModel.from_pretrained(compressed)``: the same model compressed by ``embfactor compress`` (the registered
    quantizer swaps the embedding on the meta device, transformers loads the factors);
  - ``embfactor.load(compressed)``: embfactor's loader (the same from_pretrained plus its checks);
  - the loader embfactor used before (build the model with random weights, swap, ``load_state_dict``), still used
    for folders written by embfactor 0.1.0;
  - ``SentenceTransformer(folder)`` of the original and the compressed folder (encoders only).

Run: ``python -m benchmarks.hf_load`` (MiniLM at 6x and SmolLM2 at 4x; SmolLM2's original is a GGUF file, so its
"original folder" is the dense model written once with save_pretrained) or ``--quick`` (a tiny random BERT).
Writes ``benchmarks/results/bench_hf_load.{json,md}`` (``_quick`` with --quick). Timings are never asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, header, markdown_table, time_call, write_results  # noqa: E402

torch.set_num_threads(1)


def _folders(quick: bool, work: Path) -> list[dict[str, Any]]:
    """[{name, original, compressed, kind}] with the folders written under ``work``."""
    import embfactor as ef
    from embfactor.pipeline import compress
    from embfactor.models import load_model, minilm_path

    if quick:
        from transformers import BertConfig, BertModel, BertTokenizerFast

        torch.manual_seed(0)
        model = BertModel(BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=64))
        original = work / "tiny"
        model.save_pretrained(original)
        (original / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                                      + [f"w{i}" for i in range(995)]) + "\n")
        BertTokenizerFast(vocab_file=str(original / "vocab.txt")).save_pretrained(original)
        compress(str(original), ef.FactorizationConfig(ratio=6), work / "tiny-r6", progress=False)
        return [{"name": "tiny BERT 1,000 x 64 at 6x", "original": original, "compressed": work / "tiny-r6",
                 "kind": "encoder"}]
    compress("minilm", ef.FactorizationConfig(ratio=6), work / "minilm-r6", progress=False)
    compress("smollm2", ef.FactorizationConfig(ratio=4, method="block"), work / "smollm2-b4", progress=False)
    lm = load_model("smollm2")
    lm.model.save_pretrained(work / "smollm2-dense")  # the dense model as a safetensors folder, for the baseline
    del lm
    return [
        {"name": "all-MiniLM-L6-v2 at 6x (svd/eig, rank 63)", "original": minilm_path(),
         "compressed": work / "minilm-r6", "kind": "encoder"},
        {"name": "SmolLM2-135M at 4x (block, tied head)", "original": work / "smollm2-dense",
         "compressed": work / "smollm2-b4", "kind": "decoder"},
    ]


def run(quick: bool = False, repeats: int = 5) -> dict[str, Any]:
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import embfactor as ef
    from embfactor.surgery.io import _load_without_quantization_config, read_record

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    work = Path(tempfile.mkdtemp(prefix="embfactor-hf-load-"))
    rows = []
    try:
        for case in _folders(quick, work):
            cls = AutoModelForCausalLM if case["kind"] == "decoder" else AutoModel
            orig, comp = str(case["original"]), str(case["compressed"])
            record = read_record(comp)
            timings = {
                "from_pretrained original": time_call(lambda: cls.from_pretrained(orig), repeats=repeats),
                "from_pretrained compressed": time_call(lambda: cls.from_pretrained(comp), repeats=repeats),
                "embfactor.load compressed": time_call(lambda: ef.load_compressed(comp), repeats=repeats),
                "previous embfactor loader": time_call(
                    lambda: _load_without_quantization_config(Path(comp), record, "cpu"), repeats=repeats),
            }
            if case["kind"] == "encoder":
                from sentence_transformers import SentenceTransformer

                timings["SentenceTransformer original"] = time_call(
                    lambda: SentenceTransformer(orig, device="cpu"), repeats=repeats)
                timings["SentenceTransformer compressed"] = time_call(
                    lambda: SentenceTransformer(comp, device="cpu"), repeats=repeats)
            base = timings["from_pretrained original"]["min"]
            for what, t in timings.items():
                rows.append({"model": case["name"], "load": what, "min_s": t["min"], "median_s": t["median"],
                             "vs_original": t["min"] / base if "SentenceTransformer" not in what else
                             t["min"] / timings["SentenceTransformer original"]["min"]})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"quick": quick, "repeats": repeats, "environment": environment(), "rows": rows}


def render(res: dict[str, Any], command: str) -> str:
    table = markdown_table(
        [[r["model"], r["load"], f"{r['min_s']:.3f}", f"{r['median_s']:.3f}", f"{r['vs_original']:.2f}x"]
         for r in res["rows"]],
        ["model", "load", "fastest (s)", "median (s)", "vs the original's load"],
    )
    return header("from_pretrained of a compressed folder vs the original", res["environment"], None, command) + (
        "\nSingle torch thread, after one untimed warm-up load each. `vs the original's load` divides by the "
        "original folder's from_pretrained (SentenceTransformer rows: by the original SentenceTransformer load).\n\n"
        + table + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny random BERT (seconds, for CI)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    res = run(args.quick, args.repeats)
    res["seconds"] = time.perf_counter() - t0
    command = "python -m benchmarks.hf_load" + (" --quick" if args.quick else "")
    files = write_results("hf_load", res, render(res, command), args.output)  # "_quick" added for --quick
    print(render(res, command))
    print(json.dumps(files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
