"""Size–quality frontier of the codebook formats (pq, rvq) against dense int-k, unhealed, on the real models.

Each point replaces the model's input embedding (and its tied head) by the format ``compress --method M`` builds:
``embfactor.decompose(E, method=..., token_weights=...)`` then ``embfactor.formats.from_factors``, with token
weights (count + 1)^0.5 counted on the bundled Wikipedia extract (what ``compress`` uses for data-aware methods).
Bytes are what the format stores (codes, fp16 codebooks, packed integers, fp16 scales: all of it).

- MiniLM (encoder): fidelity (mean cosine of mean-pooled sentence embeddings to the original's, over the 50 Lee
  documents + 200 held-out Wikipedia passages) and Lee Spearman, via ``embfactor.eval.tasks.evaluate(...,
  "similarity")``.
- SmolLM2 (decoder, tied head: the bytes of the one shared table): perplexity and KL to the original on the
  held-out Wikipedia articles, via ``evaluate(..., "perplexity", max_tokens=...)``.

Run: ``python benchmarks/codebook_frontier.py --model minilm`` (~15 min on 2 busy cores), ``--model smollm2``
(~20 min), or ``--quick`` (tiny random models, seconds; what CI runs). Writes
``benchmarks/results/codebook_frontier_<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script from anywhere
from benchmarks.common import write_result_files  # noqa: E402

# (label, method, options): the int-k reference curve first, then the codebook points
INT_POINTS = [
    ("int8 per row", "int", {"bits": 8, "group": None}),
    ("int6 g32", "int", {"bits": 6, "group": 32}),
    ("int4 g32", "int", {"bits": 4, "group": 32}),
    ("int4 per row", "int", {"bits": 4, "group": None}),
    ("int3 g32", "int", {"bits": 3, "group": 32}),
    ("int2 g32", "int", {"bits": 2, "group": 32}),
]
CODEBOOK_POINTS = [
    ("rvq 4 x 8-dim", "rvq", {"sub_dim": 8, "stages": 4}),
    ("rvq 3 x 8-dim", "rvq", {"sub_dim": 8, "stages": 3}),
    ("pq 4-dim", "pq", {"sub_dim": 4}),
    ("rvq 2 x 8-dim", "rvq", {"sub_dim": 8, "stages": 2}),
    ("pq 5-dim", "pq", {"sub_dim": 5}),
    ("pq 6-dim", "pq", {"sub_dim": 6}),
    ("pq 8-dim", "pq", {"sub_dim": 8}),
]


def _tiny(kind: str):
    import tempfile

    from transformers import BertConfig, BertModel, BertTokenizerFast, LlamaConfig, LlamaForCausalLM

    from embfactor.models import LoadedModel

    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp())
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(97, 123)]
    words += [f"w{i}" for i in range(600 - len(words))]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    if kind == "encoder":
        cfg = BertConfig(vocab_size=600, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)
        return LoadedModel("tiny-bert", BertModel(cfg).eval(), tok, "encoder", folder)
    cfg = LlamaConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True)
    return LoadedModel("tiny-llama", LlamaForCausalLM(cfg).eval(), tok, "decoder", folder)


def run(model: str, quick: bool = False, max_tokens: int = 8192, points: list[str] | None = None) -> dict[str, Any]:
    from embfactor.data.frequency import token_weights
    from embfactor.decomposition import decompose
    from embfactor.eval.tasks import evaluate
    from embfactor.formats import from_factors
    from embfactor.models import LoadedModel, load_model
    from embfactor.surgery import apply_structure_, find_embedding_and_head

    if quick:
        ref = _tiny("encoder" if model == "minilm" else "decoder")
        opts: dict[str, Any] = (
            {"texts": ["a b c", "d e f", "a b d", "w5 w9 e"], "fidelity_texts": ["w1 w2", "w3 a"],
             "human": torch.tensor([[1.0, .2, .8, .1], [.2, 1.0, .5, .3], [.8, .5, 1.0, .6], [.1, .3, .6, 1.0]]).numpy()}
            if ref.kind == "encoder" else {"text": "a b c d e f g h " * 40, "max_tokens": 256, "window": 64,
                                           "stride": 64}
        )
        weights = torch.rand(600, generator=torch.Generator().manual_seed(0)) + 0.5
    else:
        ref = load_model(model)
        opts = {} if ref.kind == "encoder" else {"max_tokens": max_tokens}
        weights = None
    task = "similarity" if ref.kind == "encoder" else "perplexity"
    site = find_embedding_and_head(ref.model)
    emb_fqn, emb0, head_fqn, tied = site.embedding_module, site.embedding, site.head_module, site.tied
    E = emb0.weight.detach()
    vocab, d = E.shape
    if weights is None:
        weights = token_weights(ref.tokenizer, vocab_size=vocab)
    fp32 = vocab * d * 4
    cache: dict = {}
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    base = evaluate(ref, task, reference=ref, cache=cache, **opts) if ref.kind == "encoder" else \
        evaluate(ref, task, **opts)
    rows.append({"label": "original fp32", "method": "dense", "options": {}, "embedding_bytes": fp32,
                 "bytes_ratio": 1.0, **_metrics(base), "compress_seconds": 0.0,
                 "eval_seconds": round(time.perf_counter() - t0, 1)})
    print(json.dumps(rows[-1]), flush=True)
    for label, method, options in INT_POINTS + CODEBOOK_POINTS:
        if points and label not in points:
            continue
        if quick and method != "int":
            options = {**options, "K": 32}
        t0 = time.perf_counter()
        f = decompose(E, method=method, seed=0, **options,  # the options fix the size: no target
                      **({"token_weights": weights} if method != "int" else {}))
        seconds = time.perf_counter() - t0
        layer = from_factors(f, emb0.padding_idx, zero_padding_row=False)
        work = LoadedModel(ref.name, copy.deepcopy(ref.model), ref.tokenizer, ref.kind, ref.source)
        apply_structure_(work.model, embedding_module=emb_fqn, new_embedding=layer, tied_head=tied,
                         head_module=head_fqn)
        t1 = time.perf_counter()
        res = evaluate(work, task, reference=ref, cache=cache, **opts) if ref.kind == "encoder" else \
            evaluate(work, task, reference=ref, **opts)
        rows.append({
            "label": label, "method": method, "options": options, "embedding_bytes": layer.num_bytes(),
            "bytes_ratio": fp32 / layer.num_bytes(), **_metrics(res), "relative_error": f.meta["relative_error"],
            "compress_seconds": round(seconds, 1), "eval_seconds": round(time.perf_counter() - t1, 1),
        })
        print(json.dumps(rows[-1]), flush=True)
        del work, layer, f
    return {"model": ref.name, "kind": ref.kind, "vocab": vocab, "dim": d, "tied_head": tied, "fp32_bytes": fp32,
            "quick": quick, "max_tokens": None if ref.kind == "encoder" else opts.get("max_tokens"), "rows": rows,
            "torch_threads": torch.get_num_threads()}


def _metrics(res: dict[str, Any]) -> dict[str, Any]:
    keys = ("spearman", "fidelity", "perplexity", "kl", "top1_agreement")
    return {k: res[k] for k in keys if k in res}


def markdown(res: dict[str, Any]) -> str:
    enc = res["kind"] == "encoder"
    what = "tied table (input embedding and head share it)" if res["tied_head"] else "input embedding"
    lines = [
        f"# Codebook formats vs dense int-k: {res['model']} ({res['vocab']:,} x {res['dim']}, {what})",
        "",
        "No healing. Bytes = everything the format stores; x = fp32 bytes / stored bytes. pq/rvq: K = 256, "
        "frequency-weighted k-means (faiss), fp16 codebooks. int-k: symmetric, fp16 scales.",
        "" if enc else f"Perplexity/KL on the first {res['max_tokens']:,} tokens of the held-out Wikipedia articles.",
        "",
        "| point | embedding bytes | x fewer than fp32 | " + ("fidelity | Lee Spearman" if enc else "perplexity | KL")
        + " | rel. error | compress s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(res["rows"], key=lambda r: -r["embedding_bytes"]):
        q = (f"{r.get('fidelity', 1.0):.4f} | {r['spearman']:.4f}" if enc
             else f"{r['perplexity']:.2f} | {r.get('kl', 0.0):.4f}")
        err = f"{r['relative_error']:.3f}" if "relative_error" in r else "-"
        lines.append(f"| {r['label']} | {r['embedding_bytes']:,} | {r['bytes_ratio']:.1f} | {q} | {err} | "
                     f"{r['compress_seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    p.add_argument("--quick", action="store_true", help="tiny random model, seconds (for CI)")
    p.add_argument("--max-tokens", type=int, default=8192, help="perplexity tokens (decoders; default 8,192)")
    p.add_argument("--points", help="comma-separated labels to run (default: all)")
    args = p.parse_args(argv)
    pts = [s.strip() for s in args.points.split(",")] if args.points else None
    res = run(args.model, args.quick, args.max_tokens, pts)
    name = f"codebook_frontier_{args.model}" + ("_quick" if args.quick else "")
    write_result_files(RESULTS / name, res, markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
