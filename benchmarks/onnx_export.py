"""ONNX export: file sizes, fidelity and ONNX Runtime latency of the original vs the compressed (+ int8 rest) files.

For each compressed folder: the original model exported to ONNX by the same exporter (``export_graph``), the folder
exported by ``embfactor export OUT --onnx --int8-rest`` (``onnx/model.onnx``, ``onnx/model_qint8.onnx``), then
  - MB on disk of the three files, and of the folder's model.safetensors (same weights as model.onnx);
  - English fidelity: mean cosine of each file's sentence embeddings (ONNX Runtime, mean pooling) to the original
    PyTorch model's, on the 50 Lee documents + 200 held-out Wikipedia passages (what ``evaluate --task similarity``
    uses), and the compressed PyTorch model's for comparison;
  - latency: ONNX Runtime, 2 intra-op threads, batch 1 and batch 32 (passages of at most 128 tokens), the files
    timed in turns in one run (medians). The machine is shared with other jobs: compare ratios, not absolute times.

Run: ``python benchmarks/onnx_export.py --case minilm-8x=minilm:OUT8 --case e5-16x=~/.cache/.../e5:OUT16`` (NAME=
REFERENCE:FOLDER); ``--quick``: MiniLM compressed to int4 g32 in a temporary folder, 20 texts, 3 timing rounds.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script from anywhere

from benchmarks.common import RESULTS_DIR, environment, header, markdown_table, publish


def onnx_embeddings(sess: Any, tokenizer: Any, texts: list[str], batch: int = 32, max_length: int = 256) -> Any:
    """Mean-pooled, L2-normalized embeddings of ``texts`` from an ONNX Runtime session (numpy, input order)."""
    import numpy as np

    names = {i.name for i in sess.get_inputs()}
    out = []
    for s in range(0, len(texts), batch):
        enc = tokenizer(texts[s:s + batch], padding=True, truncation=True, max_length=max_length, return_tensors="np")
        feeds = {n: enc[n].astype(np.int64) for n in names if n in enc}
        feeds.update({n: np.zeros_like(enc["input_ids"], dtype=np.int64) for n in names - set(feeds)})
        hidden = sess.run(None, feeds)[0]
        mask = enc["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return np.concatenate(out)


def latency(sessions: dict[str, Any], tokenizer: Any, texts: list[str], batch: int, rounds: int) -> dict[str, float]:
    """Median seconds per run of each session on one batch, the sessions timed in turns (side by side)."""
    import numpy as np

    enc = tokenizer(texts[:batch], padding=True, truncation=True, max_length=128, return_tensors="np")
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for r in range(rounds + 1):
        for name, sess in sessions.items():
            names = {i.name for i in sess.get_inputs()}
            feeds = {n: (enc[n] if n in enc else np.zeros_like(enc["input_ids"])).astype(np.int64) for n in names}
            t = time.perf_counter()
            sess.run(None, feeds)
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def run_case(name: str, reference: str, folder: Path, *, texts: list[str], rounds: int) -> dict[str, Any]:
    import torch

    from embfactor.eval.embed import sentence_embeddings
    from embfactor.export import export_onnx
    from embfactor.export.onnx import export_graph, input_names, session
    from embfactor.models import load_model

    ref = load_model(reference)
    with torch.no_grad():
        want = sentence_embeddings(ref.model, ref.tokenizer, texts).numpy()
    names = input_names(ref.model, ref.tokenizer, ref.kind)
    tmp = Path(tempfile.mkdtemp(prefix="embfactor-onnx-bench-"))
    try:
        original = tmp / "original.onnx"
        original.write_bytes(export_graph(ref.model, names, ref.kind).SerializeToString())
        del ref
        report = export_onnx(folder, int8_rest=True)
        comp = load_model(folder)
        with torch.no_grad():
            comp_torch = sentence_embeddings(comp.model, comp.tokenizer, texts).numpy()
        files = {"original ONNX": original, "compressed ONNX": folder / "onnx" / "model.onnx",
                 "compressed + int8 rest": folder / "onnx" / "model_qint8.onnx"}
        sessions = {k: session(p, threads=2) for k, p in files.items()}
        rows: dict[str, dict[str, Any]] = {}
        for k, sess in sessions.items():
            got = onnx_embeddings(sess, comp.tokenizer, texts)
            rows[k] = {"mb": files[k].stat().st_size / 1e6, "fidelity": float((got * want).sum(1).mean()),
                       "fidelity_min": float((got * want).sum(1).min())}
        for b in (1, 32):
            for k, sec in latency(sessions, comp.tokenizer, texts, b, rounds).items():
                rows[k][f"ms_batch{b}"] = 1e3 * sec
        st = report.safetensors_bytes
        return {
            "case": name, "reference": reference, "folder": str(folder), "files": rows,
            "safetensors_mb": st / 1e6, "onnx_vs_safetensors": report.files["onnx/model.onnx"] / st,
            "fidelity_compressed_torch": float((comp_torch * want).sum(1).mean()),
            "embedding_bytes_ratio": (comp.record.get("report") or {}).get("bytes_ratio"),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def render(results: list[dict[str, Any]], env: dict[str, Any], command: str, n_texts: int) -> str:
    out = [header("ONNX export: original vs compressed (+ int8 rest) files", env, None, command)]
    out.append(
        f"Fidelity: mean cosine of each file's sentence embeddings (ONNX Runtime, mean pooling) to the original "
        f"PyTorch model's on {n_texts} English texts (Lee documents + held-out Wikipedia passages). Latency: ONNX "
        "Runtime CPU, 2 intra-op threads, medians, the three files timed in turns in one run on a machine shared with "
        "other jobs (compare the ratios, not the absolute times).\n"
    )
    rows = []
    for r in results:
        base = r["files"]["original ONNX"]
        for k, f in r["files"].items():
            rows.append([r["case"], k, f["mb"], f["fidelity"], f["fidelity_min"], f["ms_batch1"], f["ms_batch32"],
                         f["ms_batch1"] / base["ms_batch1"], f["ms_batch32"] / base["ms_batch32"]])
    out.append(markdown_table(rows, ["case", "file", "MB on disk", "fidelity (English)", "min cosine",
                                     "ms batch 1", "ms batch 32", "x original (b1)", "x original (b32)"]))
    out.append("")
    out.append(markdown_table(
        [[r["case"], r["safetensors_mb"], r["files"]["compressed ONNX"]["mb"], r["onnx_vs_safetensors"],
          r["fidelity_compressed_torch"]] for r in results],
        ["case", "model.safetensors MB", "model.onnx MB", "onnx / safetensors", "fidelity of the PyTorch model"]))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", action="append", default=[], metavar="NAME=REFERENCE:FOLDER",
                   help="a compressed folder and the model it was compressed from")
    p.add_argument("--quick", action="store_true", help="MiniLM int4 g32 in a temporary folder, 20 texts, 3 rounds")
    p.add_argument("--texts", type=int, default=250, help="fidelity texts (Lee documents first, then passages)")
    p.add_argument("--rounds", type=int, default=20, help="timing rounds per batch size")
    p.add_argument("--output", default=str(RESULTS_DIR / "onnx_export"), help="results prefix (.md, .json)")
    args = p.parse_args(argv)

    from embfactor.data import lee_documents
    from embfactor.eval.similarity import wiki_passages

    texts = (lee_documents() + wiki_passages())[: 20 if args.quick else args.texts]
    rounds = 3 if args.quick else args.rounds
    cases = []
    tmp = None
    if args.quick:
        from embfactor.cli.main import main as cli

        tmp = Path(tempfile.mkdtemp(prefix="embfactor-onnx-quick-"))
        cli(["compress", "minilm", "--size", "7x", "--method", "int", "--method-option", "bits=4",
             "--method-option", "group=32", "--output", str(tmp / "minilm-int4"), "-q"])
        cases.append(("minilm-int4 (quick)", "minilm", tmp / "minilm-int4"))
        args.output = args.output + "_quick"
    for c in args.case:
        name, _, rest = c.partition("=")
        reference, _, folder = rest.rpartition(":")
        cases.append((name, reference, Path(folder).expanduser()))
    if not cases:
        p.error("give --case NAME=REFERENCE:FOLDER (or --quick)")
    try:
        results = [run_case(n, r, f, texts=texts, rounds=rounds) for n, r, f in cases]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    command = "python benchmarks/onnx_export.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = render(results, environment(), command, len(texts))
    publish(args.output, {"quick": args.quick, "results": results}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
