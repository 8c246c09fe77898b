"""Deployment (issue 29): a compressed decoder's ONNX file beside its anchors, one row per model × file.

For a compressed folder (default: SmolLM2 ``--size 8x --rest int4``) this exports and measures:
  - ``embfactor``: ``embfactor export --onnx`` of the folder (table compressed in the graph, Linears as MatMulNBits
    from the stored int4 values);
  - ``dense table``: the same model with its table decoded into a plain fp32 table (tied head reading it), rest the
    same int4 MatMulNBits: the "same model exported without compression" of the tokens/s and RSS targets;
  - ``runtime 4-bit``: the original model exported with the same KV-cache layout, then ONNX Runtime's own
    ``MatMulNBitsQuantizer`` (4 bits, blocks of 32, asymmetric), the table left as the runtime stores it (fp32: the
    tied head reads it through a Transpose, which the quantizer does not touch);
  - the safetensors folder itself (bytes; PyTorch perplexity and ``generate``).
Columns: bytes; greedy 64 tokens equal to PyTorch ``generate`` of the folder; perplexity on embfactor's held-out
protocol (:mod:`embfactor.eval.perplexity`: same tokens, windows, scoring) in ONNX Runtime vs the PyTorch folder;
tokens/s at batch 1 for 64 new tokens (prefill included) and ONNX Runtime session RSS, each measured in a fresh
subprocess that imports only onnxruntime and numpy (no torch), with the runtime's default graph optimizations and
again with constant folding disabled (a folded tied head is the whole decoded table in memory). Columns are a dict per
row, so the transformers.js (Node, Chromium) measurements add keys to the same rows.

``--quick``: a tiny random decoder (seconds), for ``make bench-quick``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR, environment, header, markdown_table, publish

NEW_TOKENS = 64
PROMPT = "The history of the city begins"

# run by a fresh interpreter: ONNX Runtime and numpy only (asserted), one session, greedy decoding with the cache
PROBE = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort

def rss_mb(field="VmRSS:"):
    # VmHWM (the peak) belongs to this process's memory map; ru_maxrss would carry the parent's peak across exec
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
path, ids, new, threads, fold, suppress = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \
    sys.argv[5] == "1", json.loads(sys.argv[6])
base = rss_mb()
opts = ort.SessionOptions()
opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
t = time.perf_counter()
sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"],
                            disabled_optimizers=[] if fold else ["ConstantFolding"])
load_s, loaded = time.perf_counter() - t, rss_mb()
names = [i.name for i in sess.get_inputs()]
present = [o.name for o in sess.get_outputs()][1:]
out = cur = np.array([ids], dtype=np.int64)
past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in sess.get_inputs()
        if i.name.startswith("past_key_values.")}
t = time.perf_counter()
for _ in range(new):
    feeds = {"input_ids": cur, "attention_mask": np.ones_like(out), **past}
    if "position_ids" in names:
        feeds["position_ids"] = np.arange(out.shape[1] - cur.shape[1], out.shape[1])[None]
    res = sess.run(None, feeds)
    logits = res[0][:, -1]
    logits[:, [s for s in suppress if s < logits.shape[-1]]] = -np.inf
    cur = logits.argmax(-1)[:, None].astype(np.int64)
    out = np.concatenate([out, cur], axis=1)
    past = {n.replace("present.", "past_key_values."): v for n, v in zip(present, res[1:])}
gen_s = time.perf_counter() - t
peak = rss_mb("VmHWM:")
print(json.dumps({"torch_imported": "torch" in sys.modules, "tokens": out[0].tolist(), "load_s": load_s,
                  "generate_s": gen_s, "tokens_per_s": new / gen_s, "rss_base_mb": base,
                  "session_rss_mb": loaded - base, "peak_rss_mb": peak - base}))
"""


def probe(path: Path, ids: list[int], *, new: int, threads: int, fold: bool, suppress: list[int]) -> dict[str, Any]:
    """One fresh subprocess: load ``path`` in ONNX Runtime, generate ``new`` tokens greedily, report time and RSS."""
    res = subprocess.run([sys.executable, "-c", PROBE, str(path), json.dumps(ids), str(new), str(threads),
                          "1" if fold else "0", json.dumps(suppress)], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def dense_table_model(model: Any) -> Any:
    """The model with its compressed table decoded into a plain fp32 ``nn.Embedding`` (a tied head reads its weight);
    everything else (the int4 Linears) is the same module."""
    import torch
    from torch import nn

    fmt = model.get_input_embeddings()
    with torch.no_grad():
        table = fmt.dense().float()
    emb = nn.Embedding(*table.shape)
    emb.weight = nn.Parameter(table, requires_grad=False)
    tied = getattr(model.config, "tie_word_embeddings", False)
    model.set_input_embeddings(emb)
    if tied:
        head = nn.Linear(table.shape[1], table.shape[0], bias=False)
        head.weight = emb.weight
        model.set_output_embeddings(head)
    return model


def export_plain(model: Any, path: Path) -> None:
    """The decoder layout of :mod:`embfactor.export.decoder` for any model, written as one file."""
    from embfactor.export.decoder import cache_layout, export_decoder_graph
    from embfactor.export.onnx import fold_weight_transposes, short_names

    proto = export_decoder_graph(model, cache_layout(model))
    fold_weight_transposes(proto, [])
    short_names(proto)
    _save(proto, path)


def _save(proto: Any, path: Path) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    if proto.ByteSize() < 2**31 - 2**20:
        path.write_bytes(proto.SerializeToString())
    else:  # a float32 model over 2 GB needs external data
        onnx.save(proto, str(path), save_as_external_data=True, location=path.name + ".data")


def runtime_4bit(original: Any, path: Path, tmp: Path) -> None:
    """The original model exported, then ONNX Runtime's MatMulNBitsQuantizer (4 bits, block 32, asymmetric)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    fp32 = tmp / "original-fp32" / "model.onnx"
    export_plain(original, fp32)
    q = MatMulNBitsQuantizer(onnx.load(str(fp32)), block_size=32, is_symmetric=False)
    q.process()
    shutil.rmtree(fp32.parent, ignore_errors=True)
    _save(q.model.model, path)


def onnx_perplexity(path: Path, tokenizer: Any, *, max_tokens: int, window: int, stride: int,
                    threads: int) -> dict[str, Any]:
    """embfactor's perplexity protocol (tokens, windows, scored positions) with the logits from ONNX Runtime."""
    import numpy as np

    from embfactor.eval.perplexity import heldout_text, token_ids, windows
    from embfactor.export.decoder import empty_past, step_feeds
    from embfactor.export.onnx import session

    sess = session(path, threads=threads)
    ids = token_ids(tokenizer, heldout_text(), max_tokens).numpy()
    nll, n = 0.0, 0
    for begin, end, first in windows(len(ids), window, stride):
        x = ids[None, begin:end]
        logits = sess.run(None, step_feeds(sess, x, np.ones_like(x), empty_past(sess, 1)))[0][0].astype(np.float64)
        pred = logits[first - begin - 1: end - begin - 1]
        target = ids[first:end]
        mx = pred.max(-1, keepdims=True)
        logz = (mx[:, 0] + np.log(np.exp(pred - mx).sum(-1)))
        nll += float((logz - pred[np.arange(len(target)), target]).sum())
        n += len(target)
    return {"perplexity": math.exp(nll / n), "tokens": n}


def folder_bytes(folder: Path) -> int:
    """Bytes of the folder's own files (weights, config, tokenizer), not what export added."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name != "generation_config.json")


def quick_folder(tmp: Path) -> tuple[Path, Any]:
    """A tiny random tied decoder (vocabulary from the held-out text), int4 table and ``--rest int4``, saved with a
    tokenizer; returns the folder and the original model."""
    import re
    from collections import Counter

    import torch
    from transformers import BertTokenizerFast, LlamaConfig, LlamaForCausalLM

    import embfactor as ef
    from embfactor.eval.perplexity import heldout_text
    from embfactor.surgery.rest import store_rest_

    words = [w for w, _ in Counter(re.findall(r"\w+", heldout_text().lower())).most_common(1019)]
    (tmp / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizerFast(vocab=str(tmp / "vocab.txt"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=3, bos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    original = copy.deepcopy(model)
    ef.factorize_(model, method="int", bits=4, group=32)
    store_rest_(model, "int4")
    ef.save_compressed(model, tmp / "tiny-int4", tokenizer=tok)
    return tmp / "tiny-int4", original


def run(folder: Path, source: Any, *, name: str, tmp: Path, threads: int, max_tokens: int, window: int,
        stride: int, new: int, js: bool = True) -> dict[str, Any]:
    import torch

    from embfactor.eval.perplexity import perplexity
    from embfactor.export import export_onnx
    from embfactor.models import load_model

    t0 = time.perf_counter()
    report = export_onnx(folder)
    export_s = time.perf_counter() - t0
    lm = load_model(folder)
    eos = lm.model.generation_config.eos_token_id
    suppress = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    prompt = lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = lm.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 pad_token_id=lm.tokenizer.pad_token_id or 0)[0].tolist()
    torch_ppl = perplexity(lm, max_tokens=max_tokens, window=window, stride=stride)["perplexity"]
    table_fp32 = lm.model.get_input_embeddings().num_embeddings * lm.model.get_input_embeddings().embedding_dim * 4

    files = {"embfactor": folder / "onnx" / "model.onnx"}
    files["dense table"] = tmp / "dense" / "model.onnx"
    export_plain(dense_table_model(lm.model), files["dense table"])
    del lm
    # the original's export does not depend on the folder: kept in the benchmark cache for a named source
    from benchmarks.common import CACHE_DIR

    cached = isinstance(source, str)
    files["runtime 4-bit"] = (CACHE_DIR / f"{source}-onnx-runtime-4bit" if cached else tmp / "rt4") / "model.onnx"
    if not files["runtime 4-bit"].is_file():
        original = load_model(source).model if cached else source
        runtime_4bit(original, files["runtime 4-bit"], tmp)
        del original

    st = (folder / "model.safetensors").stat().st_size
    tok = load_model(folder).tokenizer
    rows = [{"model": name, "file": "safetensors folder (PyTorch)", "bytes": folder_bytes(folder),
             "model.safetensors bytes": st, "perplexity": torch_ppl, "greedy = PyTorch": True}]
    for label, path in files.items():
        size = sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))
        row: dict[str, Any] = {"model": name, "file": f"ONNX, {label}", "bytes": size, "vs model.safetensors": size / st}
        row["perplexity"] = onnx_perplexity(path, tok, max_tokens=max_tokens, window=window, stride=stride,
                                            threads=threads)["perplexity"]
        row["ppl vs PyTorch folder"] = row["perplexity"] / torch_ppl - 1
        for fold in (True, False):
            p = probe(path, prompt, new=new, threads=threads, fold=fold, suppress=suppress)
            key = "" if fold else " (no folding)"
            assert not p["torch_imported"]
            row[f"greedy = PyTorch{key}"] = p["tokens"] == want
            row[f"tokens/s{key}"] = p["tokens_per_s"]
            row[f"session RSS MB{key}"] = p["session_rss_mb"]
            row[f"peak RSS MB{key}"] = p["peak_rss_mb"]
        rows.append(row)
    if js:  # the same file in transformers.js: Node and the example page in Chromium (greedy tokens, tokens/s)
        from benchmarks.deploy_js import decoder_js_columns

        rows[1].update(decoder_js_columns(folder, prompt, want))
    ours, dense = rows[1], rows[2]
    targets = {
        "file_mb": ours["bytes"] / 1e6,
        "file_le_85mb": ours["bytes"] <= 85e6,
        "file_lt_runtime_4bit": ours["bytes"] < rows[3]["bytes"],
        "file_le_model_safetensors": ours["bytes"] <= st,
        "file_le_folder": ours["bytes"] <= rows[0]["bytes"],
        "greedy_equal": ours["greedy = PyTorch"],
        "ppl_within_0.5pct": abs(ours["ppl vs PyTorch folder"]) <= 0.005,
        "tokens_per_s_vs_dense": ours["tokens/s"] / dense["tokens/s"],
        "rss_target_mb": dense["session RSS MB"] - 0.8 * table_fp32 / 2**20,
        "rss_mb": ours["session RSS MB"],
        "rss_mb_no_folding": ours["session RSS MB (no folding)"],
        "table_fp32_mb": table_fp32 / 2**20,
    }
    return {"model": name, "folder": str(folder), "export_seconds": export_s, "export_check": report.check,
            "rows": rows, "targets": targets, "new_tokens": new, "threads": threads}


COLUMNS = ["model", "file", "bytes", "vs model.safetensors", "greedy = PyTorch", "perplexity",
           "ppl vs PyTorch folder", "tokens/s", "session RSS MB", "peak RSS MB", "tokens/s (no folding)",
           "session RSS MB (no folding)", "greedy = PyTorch (no folding)"]


def render(results: list[dict[str, Any]], env: dict[str, Any], command: str, quick: bool) -> str:
    out = [header("Deployment: compressed decoder in ONNX Runtime (issue 29)", env, None, command)]
    out.append(
        "One row per file. Tokens/s: batch 1, greedy, 64 new tokens after the prompt (prefill included), ONNX Runtime "
        "CPU in a fresh process importing only onnxruntime and numpy; session RSS = the process's RSS after the "
        "session loaded minus before; peak = max RSS during generation minus before. 'no folding': the same file "
        "with ONNX Runtime's ConstantFolding optimizer disabled. Perplexity: embfactor's held-out protocol. "
        "Timings and RSS on a shared 2-core machine are indicative.\n"
    )
    for r in results:
        cols = [c for c in COLUMNS if any(c in row for row in r["rows"])]
        extra = sorted({k for row in r["rows"] for k in row} - set(cols))
        cols += extra  # keys later measurements add (transformers.js, Chromium)
        out.append(markdown_table([[row.get(c, "") for c in cols] for row in r["rows"]], cols))
        out.append("")
        out.append("Targets: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in r["targets"].items()))
        out.append("")
    if quick:
        out.append("(--quick: a tiny random decoder; the figures only show that the pipeline runs.)")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--folder", help="a compressed decoder folder (default: SmolLM2 --size 8x --rest int4, compressed "
                   "into the benchmark cache if absent)")
    p.add_argument("--source", default="smollm2", help="the model the folder was compressed from")
    p.add_argument("--quick", action="store_true", help="a tiny random decoder, seconds")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--max-tokens", type=int, default=None, help="perplexity tokens (default: the protocol's 16,384)")
    p.add_argument("--output", default=str(RESULTS_DIR / "deploy"), help="results prefix (.md, .json)")
    p.add_argument("--no-js", action="store_true", help="skip transformers.js (Node, Chromium)")
    args = p.parse_args(argv)

    from benchmarks.common import CACHE_DIR
    from embfactor.eval.perplexity import MAX_TOKENS, STRIDE, WINDOW

    tmp = Path(tempfile.mkdtemp(prefix="embfactor-deploy-"))
    try:
        if args.quick:
            folder, source = quick_folder(tmp)
            name, max_tokens, window, new = "tiny random llama (quick)", args.max_tokens or 1024, 128, 16
            args.output += "_quick"
        else:
            name, max_tokens, window, new = "SmolLM2-135M 8x, rest int4", args.max_tokens or MAX_TOKENS, WINDOW, 64
            folder = Path(args.folder) if args.folder else CACHE_DIR / "smollm2-8x-int4"
            source = args.source
            if not (folder / "embfactor.json").is_file():
                from embfactor.cli.main import main as cli

                cli(["compress", args.source, "--size", "8x", "--rest", "int4", "--output", str(folder), "-q"])
        results = [run(folder, source, name=name, tmp=tmp, threads=args.threads, max_tokens=max_tokens,
                       window=window, stride=window if args.quick else STRIDE, new=new, js=not args.no_js)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    command = "python -m benchmarks.deploy " + " ".join(argv if argv is not None else sys.argv[1:])
    md = render(results, environment(), command, args.quick)
    publish(args.output, {"quick": args.quick, "results": results}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
