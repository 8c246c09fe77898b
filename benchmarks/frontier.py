"""Size-quality frontier probes on the real models: tiered plans (frequency tiers × storage formats) at equal bytes.

Each PLAN is a string of tiers joined by ``+``; tokens are ordered by their count in the training part of the bundled
Wikipedia extract (the model's own tokenizer), most frequent first; each tier is ``FORMAT@EXTENT`` where EXTENT is
a row count (``8000``), a share of the vocabulary (``v0.25``) or a cumulative share of the token mass (``m0.8``);
the last tier takes the rest and has no ``@``. FORMAT:

- ``int<bits>g<group>`` (``int4g32``; ``a`` suffix = asymmetric, ``int4g32a``): dense int-k per group, fp16 scales;
- ``pq<sub>[k<K>]`` (``pq4``, ``pq6k4096``): frequency-weighted PQ (faiss k-means), fp16 codebooks;
- ``rvq<sub>x<stages>[k<K>]``: residual stages of weighted PQ;
- ``prq<sub>x<stages>[b<beam>]``: faiss ProductResidualQuantizer with beam search (trained on a weighted sample);
- ``plsq<sub>x<stages>``: faiss ProductLocalSearchQuantizer (LSQ++), trained on a weighted sample;
- other tools' formats (``embfactor.pipeline.references``): ``gguf-q8_0``, ``gguf-q5_0``, ``gguf-q4_0`` (llama.cpp's
  block types by the gguf package's quantizers), ``torchao-int8``, ``torchao-int4`` (torchao, if installed), at the
  bytes the tool stores: external references at the same protocol as the plans.

Byte counts: integers + fp16 scales/codebooks + the tier map (one byte per row, none for one tier; rows of
2026-11-30 before 18:36 UTC counted ⌈log2 tiers⌉ bits).
Quality: MiniLM (encoder) = fidelity (mean cosine of pooled sentence embeddings to the original) and Lee Spearman,
``embfactor.eval.similarity`` (``--passages N`` held-out passages; the README protocol is 200);
SmolLM2 (decoder, tied head) = perplexity and KL to the original on held-out Wikipedia, windows of 512 tokens
(``--tokens``, 4,096 = 8 windows is the frontier-probe protocol).

Run: ``python benchmarks/frontier.py minilm 'pq4' 'int4g32@m0.5+pq5'`` or ``--quick`` (a tiny random model,
seconds). Each result line is appended to ``benchmarks/results/frontier.jsonl`` with the command that reproduces it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script from anywhere


# --- formats (fake-quantized: the table the model would read, and the bytes it would store) -------------------
def _int_rows(E: torch.Tensor, bits: int, group: int, symmetric: bool) -> tuple[torch.Tensor, float]:
    n, d = E.shape
    pad = (-d) % group
    X = torch.nn.functional.pad(E.float(), (0, pad)).view(n, -1, group)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        s = (X.abs().amax(-1, keepdim=True) / qmax).half().float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        out = torch.round(X / s).clamp(-qmax, qmax) * s
        per_group = 2
    else:
        qmax = 2**bits - 1
        lo = X.amin(-1, keepdim=True).half().float()
        s = ((X.amax(-1, keepdim=True) - lo) / qmax).half().float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        out = torch.round((X - lo) / s).clamp(0, qmax) * s + lo
        per_group = 4
    nb = n * (math.ceil((d + pad) * bits / 8) + (d + pad) // group * per_group)
    return out.view(n, -1)[:, :d], nb


def _weighted_sample(w: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = w / w.sum()
    return rng.choice(len(p), size=n, replace=True, p=p)


def _pq_rows(E: torch.Tensor, w: np.ndarray, sub: int, K: int, stages: int, *, seed: int = 0, niter: int = 10,
             max_points: int = 64) -> tuple[torch.Tensor, float]:
    import faiss

    X = E.float().numpy()
    n, d = X.shape
    M = -(-d // sub)
    K = min(K, n)
    resid = np.ascontiguousarray(np.pad(X, ((0, 0), (0, M * sub - d))))
    out = np.zeros_like(resid)
    # train on at most K*max_points rows: the heaviest half by weight + a uniform sample of the rest, re-weighted
    cap = K * max_points
    if n > cap:
        top = np.argsort(-w, kind="stable")[: cap // 2]
        rest = np.setdiff1d(np.arange(n), top)
        pick = np.random.default_rng(seed).choice(rest, cap - top.size, replace=False)
        tr = np.concatenate([top, pick])
        tw = w[tr].astype(np.float32).copy()
        tw[top.size:] *= rest.size / pick.size
    else:
        tr, tw = np.arange(n), w.astype(np.float32)
    for s in range(stages):
        for m in range(M):
            cols = slice(m * sub, (m + 1) * sub)
            xs = np.ascontiguousarray(resid[:, cols])
            km = faiss.Kmeans(sub, K, niter=niter, seed=seed + 1000 * s + m, verbose=False,
                              min_points_per_centroid=1, max_points_per_centroid=1 << 30)
            km.train(np.ascontiguousarray(xs[tr]), weights=np.ascontiguousarray(tw))
            cent = torch.from_numpy(km.centroids.reshape(K, sub)).half().float().numpy()
            index = faiss.IndexFlatL2(sub)
            index.add(cent)
            _, idx = index.search(xs, 1)
            q = cent[idx[:, 0]]
            out[:, cols] += q
            resid[:, cols] -= q
    code_b = math.ceil(math.log2(K)) / 8
    nb = n * stages * M * code_b + stages * M * K * sub * 2
    return torch.from_numpy(out[:, :d]), nb


def _faiss_additive(E: torch.Tensor, w: np.ndarray, sub: int, stages: int, kind: str, beam: int = 1,
                    seed: int = 0) -> tuple[torch.Tensor, float]:
    import faiss

    X = np.ascontiguousarray(E.float().numpy())
    n, d = X.shape
    if d % sub:
        raise ValueError(f"{kind} needs sub={sub} to divide d={d}")
    ns = d // sub
    xt = np.ascontiguousarray(X[_weighted_sample(w, min(4 * n, 256 * 64), seed)])
    if kind == "prq":
        q = faiss.ProductResidualQuantizer(d, ns, stages, 8)
        for i in range(ns):
            faiss.downcast_AdditiveQuantizer(q.subquantizer(i)).max_beam_size = beam
    else:
        q = faiss.ProductLocalSearchQuantizer(d, ns, stages, 8)
    q.train(xt)
    out = q.decode(q.compute_codes(X))
    nb = n * ns * stages + ns * stages * 256 * sub * 2
    return torch.from_numpy(out).half().float(), nb


_FMT = re.compile(
    r"^(?:int(?P<bits>\d)g(?P<group>\d+)(?P<asym>a?)"
    r"|pq(?P<pq>\d+)(?:k(?P<pqk>\d+))?"
    r"|rvq(?P<rvq>\d+)x(?P<rvqs>\d+)(?:k(?P<rvqk>\d+))?"
    r"|prq(?P<prq>\d+)x(?P<prqs>\d+)(?:b(?P<beam>\d+))?"
    r"|plsq(?P<lsq>\d+)x(?P<lsqs>\d+))$"
)


def build_format(spec: str, E: torch.Tensor, w: np.ndarray, seed: int = 0) -> tuple[torch.Tensor, float]:
    """(reconstructed rows, stored bytes) of rows ``E`` in format ``spec`` (see the module docstring)."""
    from embfactor.pipeline.references import external_table, is_external

    if is_external(spec):
        table, nbytes, _ = external_table(spec, E)
        return table, nbytes
    m = _FMT.match(spec)
    if m is None:
        raise ValueError(f"unknown format {spec!r}")
    g = m.groupdict()
    if g["bits"]:
        return _int_rows(E, int(g["bits"]), int(g["group"]), symmetric=not g["asym"])
    if g["pq"]:
        return _pq_rows(E, w, int(g["pq"]), int(g["pqk"] or 256), 1, seed=seed)
    if g["rvq"]:
        return _pq_rows(E, w, int(g["rvq"]), int(g["rvqk"] or 256), int(g["rvqs"]), seed=seed)
    if g["prq"]:
        return _faiss_additive(E, w, int(g["prq"]), int(g["prqs"]), "prq", int(g["beam"] or 1), seed)
    return _faiss_additive(E, w, int(g["lsq"]), int(g["lsqs"]), "plsq", seed=seed)


def split_plan(plan: str, counts: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """[(format, token ids)] of a plan string, tokens ordered by count (ties by id)."""
    n = counts.numel()
    order = torch.from_numpy(np.lexsort((np.arange(n), -counts.numpy())))
    cum = torch.cumsum(counts[order], 0) / counts.sum()
    out, start = [], 0
    parts = plan.split("+")
    for i, part in enumerate(parts):
        fmt, _, extent = part.partition("@")
        if i == len(parts) - 1:
            stop = n
        elif extent.startswith("m"):
            stop = int(torch.searchsorted(cum, float(extent[1:]))) + 1
        elif extent.startswith("v"):
            stop = start + round(float(extent[1:]) * n)
        else:
            stop = start + int(extent)
        stop = min(max(stop, start), n)
        out.append((fmt, order[start:stop]))
        start = stop
    return [(f, ids) for f, ids in out if ids.numel()]


def apply_plan(E: torch.Tensor, counts: torch.Tensor, plan: str, alpha: float, seed: int = 0):
    """(reconstructed table, stored bytes, per-tier info) of ``plan`` with k-means weights (count + 1)^alpha."""
    w = ((counts.double() + 1) ** alpha).numpy()
    Eh = torch.empty_like(E)
    total, tiers = 0.0, []
    parts = split_plan(plan, counts)
    for fmt, ids in parts:
        R, nb = build_format(fmt, E[ids], w[ids.numpy()], seed)
        Eh[ids] = R.to(E.dtype)
        total += nb
        tiers.append({"format": fmt, "rows": int(ids.numel()), "bytes": int(nb),
                      "mass": float(counts[ids].sum() / counts.sum())})
    if len(parts) > 1:
        total += E.shape[0]  # the tiered format's token -> tier map: one byte per token
    return Eh, total, tiers


def weighted_error(E: torch.Tensor, Eh: torch.Tensor, w: torch.Tensor) -> float:
    """sqrt(Σ w·|e − ê|² / Σ w·|e|²)."""
    err = ((E - Eh).double() ** 2).sum(1)
    return float((w * err).sum() / (w * (E.double() ** 2).sum(1)).sum()) ** 0.5


# --- models and quality ------------------------------------------------------------------------------------------
def _tiny(kind: str):
    from benchmarks.quant_frontier import _tiny_lm

    return _tiny_lm()


def evaluate_table(lm, ref, Eh: torch.Tensor, args: argparse.Namespace, cache: dict) -> dict[str, Any]:
    """Copy ``Eh`` into the working model's (tied) table and measure quality against ``ref``."""
    with torch.no_grad():
        lm.model.get_input_embeddings().weight.copy_(Eh)
    if lm.kind == "decoder":
        from embfactor.eval.perplexity import perplexity

        r = perplexity(lm, reference=ref, window=args.window, stride=args.window, max_tokens=args.tokens)
        return {k: r[k] for k in ("perplexity", "reference_perplexity", "kl", "top1_agreement")}
    from embfactor.eval.similarity import similarity, wiki_passages

    opts: dict[str, Any] = {}
    if args.quick:
        opts = {"texts": ["a b c", "d e f", "a b d", "w5 w9 e"], "fidelity_texts": ["w1 w2", "w3 a"],
                "other_texts": ["w5 w1", "e d"],
                "human": np.array([[1, .2, .8, .1], [.2, 1, .5, .3], [.8, .5, 1, .6], [.1, .3, .6, 1.0]])}
    elif args.passages != 200:
        opts["fidelity_texts"] = wiki_passages()[: args.passages]
    r = similarity(lm, reference=ref, cache=cache, **opts)
    return {k: r[k] for k in ("fidelity", "spearman", "fidelity_min", "fidelity_other")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default="minilm")
    p.add_argument("plans", nargs="*", help="plans (see the module docstring); default: a few reference points")
    p.add_argument("--alpha", type=float, default=0.5, help="k-means weights (count + 1)^alpha")
    p.add_argument("--passages", type=int, default=200, help="held-out passages for MiniLM fidelity")
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens for decoder perplexity")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a tiny random model: checks the script runs (seconds)")
    p.add_argument("--note", default="")
    p.add_argument("--out", default=str(RESULTS / "frontier.jsonl"))
    p.add_argument("--render", action="store_true", help="only rewrite results/frontier.md from the .jsonl")
    args = p.parse_args(argv)
    if args.render:
        render(Path(args.out), RESULTS / "frontier.md")
        return 0
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    from embfactor.pipeline.sweep import clone_model

    if args.quick:
        ref = _tiny("encoder")
        args.plans = args.plans or ["int4g32", "int8g32@v0.2+pq4k16", "gguf-q4_0"]
        counts = torch.arange(ref.model.get_input_embeddings().num_embeddings, 0, -1).double()
    else:
        from embfactor.data import wiki_split
        from embfactor.data.frequency import token_counts
        from embfactor.models import load_model

        ref = load_model(args.model)
        vocab = ref.model.get_input_embeddings().num_embeddings
        counts = token_counts(ref.tokenizer, wiki_split("train"), vocab_size=vocab)
        args.plans = args.plans or ["int4g32", "pq4"]
    lm = clone_model(ref)
    E = ref.model.get_input_embeddings().weight.detach().clone()
    fp32 = E.numel() * 4
    w05 = (counts + 1) ** 0.5
    cache: dict = {}
    cmd = "python benchmarks/frontier.py " + " ".join(a if re.fullmatch(r"[\w.@+=/-]+", a) else repr(a)
                                                       for a in (argv if argv is not None else sys.argv[1:]))
    for plan in args.plans:
        t0 = time.perf_counter()
        Eh, nb, tiers = apply_plan(E, counts, plan, args.alpha)
        t1 = time.perf_counter()
        q = evaluate_table(lm, ref, Eh, args, cache)
        row = {"model": ref.name, "plan": plan, "alpha": args.alpha, "ratio": fp32 / nb, "bytes": int(nb),
               "werr": weighted_error(E, Eh, w05), **q, "tiers": tiers, "build_s": round(t1 - t0, 1),
               "eval_s": round(time.perf_counter() - t1, 1), "command": cmd, "note": args.note,
               "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")}
        if ref.kind == "decoder" or "perplexity" in q:
            qs = f"ppl {q['perplexity']:.3f} (ref {q['reference_perplexity']:.3f}) kl {q['kl']:.4f}"
        else:
            qs = f"fid {q['fidelity']:.4f} sp {q['spearman']:.4f}"
        print(f"{plan:42s} a={args.alpha:<4} x{fp32 / nb:6.2f} werr {row['werr']:.4f} {qs} "
              f"({row['build_s']:.0f}+{row['eval_s']:.0f}s)", flush=True)
        if not args.quick:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    return 0


def render(src: Path, dst: Path) -> None:
    """Markdown tables (one per model) of every measured plan in ``src`` (JSON lines), best ratio first."""
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    out = ["# Frontier probes: tiered plans at equal bytes", "",
           "Written by `python benchmarks/frontier.py --render` from `frontier.jsonl`; each row names the command",
           "that reproduces it (`--passages`/`--tokens` as given there). No healing.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: -r["ratio"])
        dec = "perplexity" in mine[0]
        out += [f"## {model}", "",
                "| plan | alpha | x fewer bytes than fp32 | weighted rel. error | "
                + ("perplexity (original) | KL |" if dec else "fidelity | Lee Spearman | fidelity, newsgroups |")
                + " tiers (rows / token mass) | date | command |",
                "|---|---:|---:|---:|---:|---:|" + ("" if dec else "---:|") + "---|---|---|"]
        for r in mine:
            tiers = "; ".join(f"{t['format']} {t['rows']:,} / {100 * t['mass']:.1f}%" for t in r["tiers"])
            q = (f"{r['perplexity']:.2f} ({r['reference_perplexity']:.2f}) | {r['kl']:.4f}" if dec
                 else f"{r['fidelity']:.4f} | {r['spearman']:.4f} | "
                 + (f"{r['fidelity_other']:.4f}" if r.get("fidelity_other") is not None else "—"))
            out.append(f"| `{r['plan']}` | {r['alpha']} | {r['ratio']:.2f} | {r['werr']:.4f} | {q} | {tiers} | "
                       f"{r['date']} | `{r['command']}` |")
        out.append("")
    dst.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
