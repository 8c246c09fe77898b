"""Bytes-vs-quality frontier of quantized factors (U·V stored as per-row int8/int4) against plain int8/int4 rows.

For MiniLM (30,522 × 384) each point replaces the word embedding by (a) a rank-r factorization (eig, the exact
truncated SVD) stored in float32, int8 or int4 (``QuantizedFactorizedEmbedding``, exactly what ``compress
--quantize`` saves), or (b) the dense table with per-row int8/int4 (``embfactor.quant.fake_quantize_rows``), and
measures Lee Spearman and fidelity with ``embfactor.eval.tasks.evaluate(lm, "similarity", reference=original)``.
No healing: these are the raw factorizations (healing before quantization can only move the factor points up).

Run: ``python benchmarks/quant_frontier.py`` (~10 min on 2 shared cores) or ``--quick`` (a tiny random BERT, seconds).
Writes ``benchmarks/results/quant_frontier.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script from anywhere
from benchmarks.common import write_result_files  # noqa: E402


def _tiny_lm():
    import tempfile

    from transformers import BertConfig, BertModel, BertTokenizerFast

    from embfactor.models import LoadedModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    folder = Path(tempfile.mkdtemp())
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(97, 123)]
    words += [f"w{i}" for i in range(200 - len(words))]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    return LoadedModel("tiny-bert", BertModel(cfg).eval(), tok, "encoder", folder)


def run(
    quick: bool = False, ranks: list[int] | None = None, extra: list[str] | None = None, passages: int | None = None,
    heal_minutes: float = 0.0,
) -> dict[str, Any]:
    import copy

    from embfactor.decomposition import decompose
    from embfactor.eval.tasks import evaluate, input_embedding
    from embfactor.layers import FactorizedEmbedding, QuantizedFactorizedEmbedding
    from embfactor.models import LoadedModel, load_model
    from embfactor.quant import fake_quantize_rows, quantized_bytes
    from embfactor.surgery import fqn_of, replace_modules_
    from embfactor.surgery.quantize import dense_embedding_bytes

    if quick:
        ref = _tiny_lm()
        ranks = ranks or [4, 8]
        human = torch.tensor([[1.0, 0.2, 0.8, 0.1], [0.2, 1.0, 0.5, 0.3], [0.8, 0.5, 1.0, 0.6], [0.1, 0.3, 0.6, 1.0]])
        opts: dict[str, Any] = {"texts": ["a b c", "d e f", "a b d", "w5 w9 e"], "human": human.numpy(),
                                "fidelity_texts": ["w1 w2", "w3 a"]}
    else:
        ref = load_model("minilm")
        ranks = [16, 32, 48, 63, 96, 128, 192, 256] if ranks is None else ranks
        opts = {}
        if passages is not None:  # fewer fidelity passages: faster on a busy machine
            from embfactor.eval.similarity import wiki_passages

            opts["fidelity_texts"] = wiki_passages()[:passages]
    work = LoadedModel(ref.name, copy.deepcopy(ref.model), ref.tokenizer, ref.kind, ref.source)
    emb0 = input_embedding(ref.model)
    fqn = fqn_of(work.model, input_embedding(work.model))
    E = emb0.weight.detach()
    vocab, d = E.shape
    fp32 = dense_embedding_bytes(vocab, d)
    cache: dict = {}
    rows: list[dict[str, Any]] = []

    def point(label: str, kind: str, rank: int | None, bits: int, layer: nn.Module, nbytes: int) -> None:
        t0 = time.perf_counter()
        replace_modules_(work.model, {fqn: layer})
        res = evaluate(work, "similarity", reference=ref, cache=cache, **opts)
        row = {
            "label": label, "kind": kind, "rank": rank, "bits": bits, "embedding_bytes": nbytes,
            "bytes_ratio": fp32 / nbytes, "spearman": res["spearman"], "fidelity": res.get("fidelity"),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    point("original fp32", "dense", None, 32, nn.Embedding.from_pretrained(E.clone(), freeze=False,
          padding_idx=emb0.padding_idx), fp32)
    for bits in (8, 4):
        w = fake_quantize_rows(E, bits)
        point(f"dense int{bits}", "dense", None, bits, nn.Embedding.from_pretrained(w, freeze=False,
              padding_idx=emb0.padding_idx), quantized_bytes(vocab, d, bits))
    for r in ranks:
        f = decompose(E, rank=r, method="eig")
        fe = FactorizedEmbedding.from_tensors(f.U, f.V, emb0.padding_idx, zero_padding_row=False)
        point(f"svd r={r} fp32", "factorized", r, 32, fe, 4 * r * (vocab + d))
        for bits in (8, 4):
            q = QuantizedFactorizedEmbedding.from_factorized(fe, bits)
            point(f"svd r={r} int{bits}", "factorized", r, bits, q, q.num_bytes())
    for folder in extra or []:
        # an earlier compress output (e.g. a data-aware or healed factorization): its own U·V, then quantized
        student = load_model(folder)
        name = Path(folder).name
        if heal_minutes:
            from embfactor.train.heal import heal

            # healing first, quantization after (quantize_ stores whatever factors the model has)
            heal(student, ref, minutes=heal_minutes, progress=False)
            name += f" healed {heal_minutes:g} min"
        fe = input_embedding(student.model)
        if not isinstance(fe, FactorizedEmbedding):
            raise SystemExit(f"{folder}: the embedding is a {type(fe).__name__}, not a FactorizedEmbedding")
        point(f"{name} r={fe.rank} fp32", "factorized", fe.rank, 32, fe, 4 * fe.num_params)
        for bits in (8, 4):
            q = QuantizedFactorizedEmbedding.from_factorized(fe, bits)
            point(f"{name} r={fe.rank} int{bits}", "factorized", fe.rank, bits, q, q.num_bytes())
    orig = rows[0]
    bar = {"spearman_min": orig["spearman"] * 0.99, "fidelity_min": 0.98}
    return {
        "model": ref.name, "vocab": vocab, "dim": d, "fp32_bytes": fp32, "quality_bar": bar, "rows": rows,
        "heal_minutes": heal_minutes, "fidelity_passages": passages,
    }


def markdown(res: dict[str, Any]) -> str:
    lines = [
        f"# Quantized factors vs plain per-row quantization: {res['model']} ({res['vocab']} x {res['dim']})",
        "",
        (f"--from models healed {res['heal_minutes']:g} min (distillation), then quantized; the rest unhealed. "
         if res.get("heal_minutes") else "No healing. ")
        + "Bar of the quality issue: Spearman >= "
        f"{res['quality_bar']['spearman_min']:.4f} (original -1%), fidelity >= 0.98.",
        "",
        "| point | embedding bytes | x fewer than fp32 | Lee Spearman | fidelity |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in sorted(res["rows"], key=lambda r: -r["embedding_bytes"]):
        fid = "-" if r["fidelity"] is None else f"{r['fidelity']:.4f}"
        lines.append(
            f"| {r['label']} | {r['embedding_bytes']:,} | {r['bytes_ratio']:.1f} | {r['spearman']:.4f} | {fid} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random model, seconds (for CI)")
    p.add_argument("--ranks", help="comma-separated ranks (default 16..256; 'none' for only --from)")
    p.add_argument("--from", dest="extra", nargs="+", metavar="FOLDER",
                   help="also evaluate these compressed (factorized) outputs, in float32, int8 and int4")
    p.add_argument("--heal-minutes", type=float, default=0.0, help="heal each --from model this long first")
    p.add_argument("--passages", type=int, default=None, help="fidelity passages to use (default: all 200)")
    p.add_argument("--name", default=None, help="results file name (default quant_frontier)")
    args = p.parse_args(argv)
    ranks = None if args.ranks is None else [int(x) for x in args.ranks.split(",") if x.strip() and x != "none"]
    res = run(args.quick, ranks, args.extra, args.passages, args.heal_minutes)
    name = args.name or ("quant_frontier_quick" if args.quick else "quant_frontier")
    write_result_files(RESULTS / name, res, markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
