"""Probe (issue 22): MiniLM's table stored in the input embedding's Fisher metric F versus plain squared error.

F = :func:`embfactor.eval.head.input_fisher` on the planner's counted calibration text. For fixed tiers (the
``--size 16x`` / ``32x`` plans the planner chose) the table is built plainly, encoded in F (GPTQ-style error
feedback, ``hessian=``), in F + λ·tr(F)/d·I, and with PQ codebooks *trained* in F (k-means on sub-vectors
whitened by the sub-space's metric) and then encoded in F; each table is written into the model and scored with
``evaluate --task similarity``'s protocol (fidelity on held-out Wikipedia + Lee, fidelity_other on newsgroups).

    python benchmarks/input_metric_probe.py [--points 16x 32x] [--variants plain F ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from embfactor.decomposition.codebook import hessian_encode, int8_codebooks
from embfactor.plan.search import FormatChoice, Plan, Tier, build_plan, token_order, weights_for

POINTS = {  # the planner's tiers at these sizes (frontier_minilm_sweep.json), alpha of the chosen plan
    "16x": ([("pq", 3, 11688), ("pq", 6, 18834)], 0.5),
    "32x": ([("pq", 6, 8115), ("pq", 12, 22407)], 0.25),
}


def regularized(F: torch.Tensor, lam: float) -> torch.Tensor:
    d = F.shape[0]
    return F + lam * float(F.diagonal().sum()) / d * torch.eye(d, dtype=F.dtype)


def subspace_whiteners(F: torch.Tensor, M: int, sub: int, how: str) -> list[torch.Tensor]:
    """Per sub-space W_m with (x − c) W_m W_mᵀ (x − c)ᵀ the sub-space's error in the metric."""
    from embfactor.decomposition._common import inverse_cholesky

    if how == "cond":  # the metric hessian_encode chooses codewords in (the Schur complement: later columns adapt)
        U = inverse_cholesky(F, M * sub)
        return [torch.linalg.inv(U[m * sub:(m + 1) * sub, m * sub:(m + 1) * sub]) for m in range(M)]
    d = F.shape[0]
    Fp = torch.eye(M * sub, dtype=torch.float64)
    Fp[:d, :d] = F
    Fp += 0.01 * float(F.diagonal().mean()) * torch.eye(M * sub, dtype=torch.float64)
    return [torch.linalg.cholesky(Fp[m * sub:(m + 1) * sub, m * sub:(m + 1) * sub]).float() for m in range(M)]


def metric_pq_rows(E: torch.Tensor, sub: int, w: torch.Tensor, F: torch.Tensor, how: str, seed: int = 0
                   ) -> torch.Tensor:
    """Rows of a PQ (K = 256, int8 codebooks) trained on whitened sub-vectors and encoded in F."""
    from embfactor.decomposition.codebook import _kmeans, _map_subspaces, _training_sample

    n, d = E.shape
    M = -(-d // sub)
    X = torch.nn.functional.pad(E.float(), (0, M * sub - d))
    Ws = subspace_whiteners(F, M, sub, how)
    rng = np.random.default_rng(seed)
    idx, tw = _training_sample(n, w.numpy().astype(np.float32), 256 * 64, rng)
    Xt = X[torch.from_numpy(idx)]

    def fit(m: int) -> np.ndarray:
        x = (Xt[:, m * sub:(m + 1) * sub] @ Ws[m]).numpy()
        c = torch.from_numpy(_kmeans(np.ascontiguousarray(x), tw, min(256, n), niter=10, seed=seed + m))
        return (c @ torch.linalg.inv(Ws[m])).numpy()

    books = torch.from_numpy(np.stack(_map_subspaces(fit, list(range(M)), None)))
    q, s = int8_codebooks(books[None])
    books = (q.float() * s.float())[0]
    codes = hessian_encode(X, books, F)
    return torch.cat([books[m][codes[:, m]] for m in range(M)], 1)[:, :d]


def build(E, tiers, alpha, order, counts, variant: str, F: torch.Tensor) -> torch.Tensor:
    plan_tiers, start = [], 0
    for method, sub, rows in tiers:
        plan_tiers.append(Tier(start, start + rows, FormatChoice(method, {"sub_dim": sub, "K": 256,
                                                                            "codebook_dtype": "int8"})))
        start += rows
    plan = Plan(plan_tiers, 0, alpha=alpha)
    if variant == "plain":
        return build_plan(E, plan, order, counts).gather(torch.arange(E.shape[0])).float()
    if variant.startswith("F+"):
        return build_plan(E, plan, order, counts, hessian=regularized(F, float(variant[2:]))).gather(
            torch.arange(E.shape[0])).float()
    if variant == "F":
        return build_plan(E, plan, order, counts, hessian=F).gather(torch.arange(E.shape[0])).float()
    if variant.startswith("trainR-"):  # trained and encoded in F + λ·tr(F)/d·I
        return build(E, tiers, alpha, order, counts, "trainF-cond", regularized(F, float(variant[7:])))
    if variant.startswith("trainF-"):  # codebooks trained in the metric (marginal or conditional), encoded in F
        how = variant.split("-", 1)[1]
        out = torch.empty_like(E)
        w = weights_for(counts, alpha)
        for t in plan.tiers:
            ids = order[t.start:t.stop].sort().values
            out[ids] = metric_pq_rows(E[ids], t.fmt.opts["sub_dim"], w[ids], F, how)
        return out
    raise ValueError(variant)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", nargs="+", default=["16x", "32x"])
    ap.add_argument("--variants", nargs="+", default=["plain", "F", "F+0.1", "trainF-cond"])
    ap.add_argument("--probes", type=int, default=4)
    ap.add_argument("--passages", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/input_metric_probe.jsonl")
    args = ap.parse_args()
    from embfactor import load_model
    from embfactor.data import wiki_split
    from embfactor.data.frequency import token_counts
    from embfactor.eval.head import input_fisher
    from embfactor.eval.similarity import similarity
    from embfactor.plan.calibration import calibration_split

    lm, ref = load_model("minilm"), load_model("minilm")
    weight = lm.model.get_input_embeddings().weight
    E = weight.detach().clone().float()
    count_texts, _ = calibration_split(wiki_split("train"))
    counts = token_counts(lm.tokenizer, count_texts, vocab_size=E.shape[0])
    order = token_order(counts)
    t = time.perf_counter()
    F = input_fisher(lm, count_texts, passages=args.passages, probes=args.probes)
    print(f"F: {time.perf_counter() - t:.1f} s", flush=True)
    ev = torch.linalg.eigvalsh(F)
    one = torch.ones(E.shape[1], dtype=torch.float64) / E.shape[1] ** 0.5
    print(f"F eigenvalues: max {ev[-1]:.3g} median {ev[len(ev) // 2]:.3g} min {ev[0]:.3g}; "
          f"1-vector {float(one @ F @ one):.3g}; mean diag {float(F.diagonal().mean()):.3g}", flush=True)
    torch.save(F, "/tmp/metric/F_minilm.pt")
    cache: dict = {}
    for point in args.points:
        tiers, alpha = POINTS[point]
        for v in args.variants:
            t = time.perf_counter()
            table = build(E, tiers, alpha, order, counts, v, F)
            built = time.perf_counter() - t
            diff = (table - E).double()
            with torch.no_grad():
                weight.data = table
            r = similarity(lm, reference=ref, cache=cache)
            with torch.no_grad():
                weight.data = E
            w = weights_for(counts, alpha)
            row = {"point": point, "variant": v, "fidelity": r["fidelity"], "fidelity_other": r["fidelity_other"],
                   "spearman": r["spearman"], "sq_error": float((w * (diff ** 2).sum(1)).sum()),
                   "F_error": float((w * ((diff @ F) * diff).sum(1)).sum()), "build_s": round(built, 1)}
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
