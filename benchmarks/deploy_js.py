"""Issue 29's encoder row: one ONNX file, its bytes and its fidelity in ONNX Runtime, transformers.js Node and Chromium.

For a compressed encoder folder (all-MiniLM-L6-v2 ``--size 8x --rest int8`` for the target) and the model it came
from, in one run:
  - bytes: the original model exported by the same exporter (``export_graph``, fp32, the "original ONNX" anchor),
    the folder's ``onnx/model.onnx`` (written by ``embfactor export FOLDER --onnx`` if absent), its model.safetensors;
  - fidelity: mean cosine of sentence embeddings (mean pooling, normalized) to the original PyTorch model's, for the
    compressed PyTorch model, ONNX Runtime in Python, transformers.js in Node (js/run.mjs) and the page of
    examples/browser in headless Chromium (ONNX Runtime Web, wasm); and each runtime's largest difference to ONNX
    Runtime Python's vectors;
  - what the browser downloaded (model folder, transformers.js + ONNX Runtime Web) and load / run times (indicative:
    a shared 2-core machine).
Texts: Lee documents + held-out Wikipedia passages of at most 256 tokens (every runtime then sees the same tokens:
transformers.js truncates at the tokenizer's 512, sentence-transformers at 256).

Run: ``python benchmarks/deploy_js.py --case minilm-8x-int8=minilm:out/minilm-8x-int8`` (NAME=REFERENCE:FOLDER;
``--compress`` makes ``out/minilm-8x-int8`` first: about 6 minutes); ``--quick``: MiniLM int4 g32 + int8 rest in a
temporary folder, 20 texts. The functions :func:`measure_encoder` and :func:`encoder_row` are what
``benchmarks/deploy.py`` (issue 29's table) folds in; :func:`decoder_js_columns` adds transformers.js Node and
Chromium to its decoder rows (greedy tokens equal to PyTorch's, tokens/s).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script from anywhere

from benchmarks.common import RESULTS_DIR, environment, header, markdown_table, publish

TARGET_MB = 18.0
TARGET_FIDELITY = 0.993
TOLERANCE = 1e-4


def texts_within(tokenizer: Any, texts: list[str], n: int, max_tokens: int = 256) -> list[str]:
    """The first ``n`` of ``texts`` that tokenize to at most ``max_tokens`` tokens."""
    return [t for t in texts if len(tokenizer(t)["input_ids"]) <= max_tokens][:n]


def _fidelity(got: Any, want: Any) -> dict[str, float]:
    import numpy as np

    got = np.asarray(got, dtype=np.float64)
    got = got / np.linalg.norm(got, axis=1, keepdims=True)
    cos = (got * want).sum(1)
    return {"fidelity": float(cos.mean()), "fidelity_min": float(cos.min())}


def measure_encoder(reference: str, folder: str | Path, texts: list[str], *, browser: bool = True) -> dict[str, Any]:
    """Bytes and fidelity of ``folder``'s ONNX file in every runtime (see the module docstring); a runtime that
    cannot run here (no Node packages or Chromium) is reported with what is missing."""
    import numpy as np
    import torch

    from benchmarks.onnx_export import onnx_embeddings
    from embfactor.eval.embed import sentence_embeddings
    from embfactor.export import export_onnx
    from embfactor.export.onnx import export_graph, input_names, session
    from embfactor.export.transformers_js import missing, run_browser, run_node
    from embfactor.models import load_model

    folder = Path(folder)
    ref = load_model(reference)
    with torch.no_grad():
        want = sentence_embeddings(ref.model, ref.tokenizer, texts).double().numpy()
    with tempfile.TemporaryDirectory(prefix="embfactor-deploy-js-") as tmp:
        original = Path(tmp) / "original.onnx"
        original.write_bytes(export_graph(ref.model, input_names(ref.model, ref.tokenizer, ref.kind),
                                          ref.kind).SerializeToString())
        original_bytes = original.stat().st_size
    del ref
    if not (folder / "onnx" / "model.onnx").is_file():
        export_onnx(folder)
    comp = load_model(folder)
    with torch.no_grad():
        comp_vecs = sentence_embeddings(comp.model, comp.tokenizer, texts).double().numpy()
    ort_vecs = onnx_embeddings(session(folder / "onnx" / "model.onnx", threads=2), comp.tokenizer, texts)
    runtimes: dict[str, dict[str, Any]] = {"PyTorch (compressed folder)": _fidelity(comp_vecs, want),
                                           "ONNX Runtime Python": _fidelity(ort_vecs, want)}
    runners = {"transformers.js Node": (run_node, False)}
    if browser:
        runners["Chromium (transformers.js, wasm)"] = (run_browser, True)
    for name, (run, needs_browser) in runners.items():
        why = missing(browser=needs_browser)
        if why:
            if os.environ.get("EMBFACTOR_REQUIRE_BROWSER") == "1":
                raise SystemExit(f"EMBFACTOR_REQUIRE_BROWSER=1 but {name} cannot run: missing {why}")
            runtimes[name] = {"missing": why}
            continue
        r = run(folder, "feature-extraction", texts)
        got = np.asarray(r["embeddings"])
        runtimes[name] = {**_fidelity(got, want), "max_abs_diff_to_ort": float(np.abs(got - ort_vecs).max()),
                          "run_ms": r["run_ms"], "load_ms": r.get("load_ms"), "bytes": r.get("bytes")}
    onnx_bytes = (folder / "onnx" / "model.onnx").stat().st_size
    return {"reference": reference, "folder": str(folder), "texts": len(texts), "original_onnx_bytes": original_bytes,
            "onnx_bytes": onnx_bytes, "safetensors_bytes": (folder / "model.safetensors").stat().st_size,
            "runtimes": runtimes}


def decoder_js_columns(folder: str | Path, prompt_ids: list[int], want: list[int], *,
                       browser: bool = True) -> dict[str, Any]:
    """transformers.js columns for benchmarks/deploy.py's decoder row of ``folder`` (exported with a KV cache).

    ``prompt_ids`` is the prompt as PyTorch ``generate`` got it and ``want`` its greedy output (prompt included);
    transformers.js generates ``len(want) - len(prompt_ids)`` tokens greedily (EOS suppressed, like
    ``min_new_tokens``) from the same ids in Node and in the page in Chromium. Returns ``greedy = PyTorch (...)``,
    ``tokens/s (...)`` (prefill included; indicative) and the page's downloaded MB, or ``missing (...)`` where a runtime
    cannot run here.

    Example:
        >>> row.update(decoder_js_columns(folder, prompt, want))   # doctest: +SKIP
    """
    from embfactor.export.transformers_js import missing, run_browser, run_node

    new = len(want) - len(prompt_ids)
    cols: dict[str, Any] = {}
    runners = {"transformers.js Node": (run_node, False)}
    if browser:
        runners["Chromium"] = (run_browser, True)
    for name, (run, needs_browser) in runners.items():
        why = missing(browser=needs_browser)
        if why:
            if os.environ.get("EMBFACTOR_REQUIRE_BROWSER") == "1":
                raise SystemExit(f"EMBFACTOR_REQUIRE_BROWSER=1 but {name} cannot run: missing {why}")
            cols[f"missing ({name})"] = why
            continue
        r = run(folder, "text-generation", input_ids=[list(prompt_ids)], max_new_tokens=new, timeout=1200)
        cols[f"greedy = PyTorch ({name})"] = r["sequences"][0] == list(want)
        cols[f"tokens/s ({name})"] = new / (r["run_ms"] / 1e3)
        if r.get("bytes"):
            cols["Chromium downloaded MB (folder + runtime)"] = (f"{r['bytes']['model_total'] / 1e6:.2f} + "
                                                                f"{r['bytes']['runtime_total'] / 1e6:.2f}")
    return cols


def encoder_row(name: str, m: dict[str, Any]) -> dict[str, Any]:
    """Issue 29's table row for :func:`measure_encoder`'s result, each number beside its target."""
    ort = m["runtimes"]["ONNX Runtime Python"]["fidelity"]
    measured = {k: v for k, v in m["runtimes"].items() if "fidelity" in v}
    spread = max(abs(v["fidelity"] - ort) for v in measured.values() if v is not m["runtimes"]["PyTorch (compressed "
                                                                                              "folder)"])
    return {
        "model": name, "file": "one ONNX file (onnx/model.onnx)",
        "bytes": f"{m['onnx_bytes'] / 1e6:.2f} MB (target <= {TARGET_MB:g} MB; original ONNX "
                 f"{m['original_onnx_bytes'] / 1e6:.2f} MB)",
        "quality": f"fidelity {ort:.4f} in ORT Python (target >= {TARGET_FIDELITY}); runtimes within "
                   f"{spread:.1e} of it (target {TOLERANCE:g})",
        "runs in": ", ".join(k for k in measured if not k.startswith("PyTorch")),
        "met": m["onnx_bytes"] / 1e6 <= TARGET_MB and ort >= TARGET_FIDELITY and spread <= TOLERANCE
        and len(measured) == len(m["runtimes"]),
    }


def render(results: list[tuple[str, dict[str, Any]]], env: dict[str, Any], command: str) -> str:
    out = [header("Deployment of an encoder: ONNX Runtime, transformers.js Node and Chromium", env, None, command)]
    out.append("Fidelity: mean cosine of sentence embeddings (mean pooling, normalized) to the original PyTorch "
               "model's. Times are indicative (a shared 2-core machine; wasm runs one thread).\n")
    out.append(markdown_table([[v for k, v in encoder_row(n, m).items()] for n, m in results],
                              ["model", "file", "bytes", "quality", "runs in", "target met"]))
    out.append("")
    rows = []
    for n, m in results:
        for k, v in m["runtimes"].items():
            if "missing" in v:
                rows.append([n, k, "-", "-", "-", f"not run: missing {v['missing']}"])
                continue
            b = v.get("bytes") or {}
            extra = f"downloaded {b['model_total'] / 1e6:.2f} MB model + {b['runtime_total'] / 1e6:.2f} MB runtime" \
                if b else (f"load {v['load_ms'] / 1e3:.1f} s" if v.get("load_ms") else "")
            diff = v.get("max_abs_diff_to_ort")
            rows.append([n, k, f"{v['fidelity']:.5f}", f"{v['fidelity_min']:.4f}", "-" if diff is None else f"{diff:.1e}",
                         extra])
    out.append(markdown_table(rows, ["case", "runtime", "fidelity", "min cosine", "max abs diff to ORT", "notes"]))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", action="append", default=[], metavar="NAME=REFERENCE:FOLDER")
    p.add_argument("--compress", action="store_true",
                   help="first compress minilm --size 8x --rest int8 into out/minilm-8x-int8 (the target's case)")
    p.add_argument("--quick", action="store_true", help="MiniLM int4 g32 + int8 rest in a temporary folder, 20 texts")
    p.add_argument("--texts", type=int, default=250)
    p.add_argument("--no-browser", action="store_true", help="skip Chromium")
    p.add_argument("--output", default=str(RESULTS_DIR / "deploy_js"), help="results prefix (.md, .json)")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from embfactor.cli.main import main as cli
    from embfactor.data import lee_documents
    from embfactor.eval.similarity import wiki_passages

    cases, tmp = [], None
    if args.quick:
        tmp = Path(tempfile.mkdtemp(prefix="embfactor-deploy-js-quick-"))
        cli(["compress", "minilm", "--size", "7x", "--method", "int", "--method-option", "bits=4", "--method-option",
             "group=32", "--rest", "int8", "--output", str(tmp / "minilm-int4"), "-q"])
        cases.append(("minilm int4 g32 + int8 rest (quick)", "minilm", tmp / "minilm-int4"))
        args.output, args.texts = args.output + "_quick", 20
    if args.compress:
        if not Path("out/minilm-8x-int8/model.safetensors").is_file():
            cli(["compress", "minilm", "--size", "8x", "--rest", "int8", "--output", "out/minilm-8x-int8", "-q"])
        args.case.append("minilm --size 8x --rest int8=minilm:out/minilm-8x-int8")
    for c in args.case:
        name, _, rest = c.partition("=")
        reference, _, folder = rest.rpartition(":")
        cases.append((name, reference, Path(folder).expanduser()))
    if not cases:
        p.error("give --case NAME=REFERENCE:FOLDER, --compress or --quick")
    try:
        results = []
        for name, reference, folder in cases:
            # the folder's tokenizer is the reference's (compress copies it)
            texts = texts_within(AutoTokenizer.from_pretrained(folder), lee_documents() + wiki_passages(), args.texts)
            results.append((name, measure_encoder(reference, folder, texts, browser=not args.no_browser)))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    command = "python benchmarks/deploy_js.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    md = render(results, environment(), command)
    publish(args.output, {"quick": args.quick, "results": [
        {"case": n, **m, "row": encoder_row(n, m)} for n, m in results]}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
