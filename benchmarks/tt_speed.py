"""Forward speed of TTEmbedding vs nn.Embedding (and FactorizedEmbedding, and a naive per-token TT) on CPU.

Ids: 65,536 tokens (a batch of 128 × 512) from two distributions: ``uniform`` over the vocabulary (the worst case:
~26k distinct ids) and ``text`` (real MiniLM WordPiece tokens of the held-out Wikipedia extract: a Zipfian mix).
The naive TT baseline gathers every core slice per *token* and contracts them (no unique ids, no shared prefixes),
which is how t3nsor-style layers compute rows. The peer itself, tensorly-torch's ``tltorch.FactorizedEmbedding``
(block-TT, same tensorized shapes and TT rank, so the same parameter count), is measured too when installed
(``pip install tensorly-torch==0.5.0``, in the ``tt`` extra); it needs the padded vocabulary as its row count.

Timing: interleaved rounds (every layer once per round), median over rounds, ``torch.no_grad()`` for the forward;
forward+backward timed separately (what training pays). On a shared machine the absolute times are noisy; the
ratios against nn.Embedding measured in the same rounds are the meaningful numbers.

Run: ``python benchmarks/tt_speed.py`` (~2 min) or ``--quick`` (seconds). Writes ``benchmarks/results/tt_speed*.json|md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
NOTE = (
    "absolute times depend on the machine's load; the ratios to nn.Embedding, measured in the same rounds, "
    "are the result"
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script from anywhere
from benchmarks.common import write_result_files  # noqa: E402


class NaiveTT(nn.Module):
    """Per-token TT rows: gather each core's slice for every token, contract left to right (the peer approach)."""

    def __init__(self, tt: nn.Module) -> None:
        super().__init__()
        self.tt = tt

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        cur = None
        for t, core in enumerate(self.tt.cores):
            digit = (flat // self.tt._div[t]) % self.tt.vocab_shape[t]
            _, rp, m, rn = core.shape
            sl = core.index_select(0, digit)
            cur = sl.reshape(-1, m, rn) if cur is None else torch.bmm(cur, sl.reshape(-1, rp, m * rn)).reshape(
                flat.shape[0], -1, rn
            )
        return cur.reshape(*ids.shape, -1)


def tensorly_torch_peer(tt: nn.Module, rank: int) -> nn.Module | None:
    """tltorch.FactorizedEmbedding with the same tensorized shapes and TT rank as ``tt``, or None if not installed."""
    try:
        import tltorch
    except ImportError:
        print("[tt_speed] tensorly-torch not installed: its peer row is skipped", file=sys.stderr)
        return None
    import math

    return tltorch.FactorizedEmbedding(
        math.prod(tt.vocab_shape), math.prod(tt.dim_shape), auto_tensorize=False,
        tensorized_num_embeddings=tuple(tt.vocab_shape), tensorized_embedding_dim=tuple(tt.dim_shape),
        rank=rank, factorization="blocktt",
    )


def text_ids(n: int) -> torch.Tensor:
    """n real WordPiece ids (MiniLM's tokenizer) of the held-out Wikipedia extract, repeated if needed."""
    from transformers import AutoTokenizer

    from embfactor.data import wiki_split
    from embfactor.models import minilm_path

    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    ids: list[int] = []
    for text in wiki_split("heldout"):
        ids.extend(tok(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= n:
            break
    while len(ids) < n:
        ids = ids + ids
    return torch.tensor(ids[:n])


def bench(layers: dict[str, nn.Module], ids: torch.Tensor, rounds: int, backward: bool) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in layers}
    for _ in range(rounds + 1):  # the first round warms up
        for name, layer in layers.items():
            if backward:
                layer.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                layer(ids).sum().backward()
            else:
                with torch.no_grad():
                    t0 = time.perf_counter()
                    layer(ids)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def run(quick: bool = False) -> dict[str, Any]:
    from embfactor.layers import FactorizedEmbedding, TTEmbedding

    torch.manual_seed(0)
    if quick:
        vocab, d, n, ranks, rounds, dists = 2000, 64, 4096, [8], 3, ["uniform"]
    else:
        vocab, d, n, ranks, rounds, dists = 30522, 384, 65536, [16, 32, 64], 9, ["uniform", "text"]
    layers: dict[str, nn.Module] = {"nn.Embedding": nn.Embedding(vocab, d)}
    layers["FactorizedEmbedding r=63" if not quick else "FactorizedEmbedding r=8"] = FactorizedEmbedding(
        vocab, d, rank=63 if not quick else 8
    )
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in layers.items()}
    for r in ranks:
        tt = TTEmbedding(vocab, d, tt_rank=r)
        layers[f"TTEmbedding r={r}"] = tt
        params[f"TTEmbedding r={r}"] = tt.num_params
    naive_rank = ranks[0]
    layers[f"naive per-token TT r={naive_rank}"] = NaiveTT(layers[f"TTEmbedding r={naive_rank}"])
    params[f"naive per-token TT r={naive_rank}"] = params[f"TTEmbedding r={naive_rank}"]
    peer = tensorly_torch_peer(layers[f"TTEmbedding r={naive_rank}"], naive_rank)
    if peer is not None:
        name = f"tensorly-torch blocktt r={naive_rank}"
        layers[name] = peer
        params[name] = sum(p.numel() for p in peer.parameters())
    rows = []
    for dist in dists:
        ids = torch.randint(0, vocab, (n,)) if dist == "uniform" else text_ids(n)
        ids = ids.reshape(-1, 512) if n % 512 == 0 else ids
        uniq = int(torch.unique(ids).numel())
        for mode in ("forward", "forward+backward"):
            sel = layers if mode == "forward" else {k: v for k, v in layers.items() if not k.startswith("naive")}
            t = bench(sel, ids, rounds, backward=mode == "forward+backward")
            base = t["nn.Embedding"]
            for name, sec in t.items():
                rows.append({
                    "ids": dist, "unique_ids": uniq, "mode": mode, "layer": name, "params": params[name],
                    "ms": round(sec * 1000, 2), "x_nn_embedding": round(sec / base, 2),
                })
                print(json.dumps(rows[-1]), flush=True)
    return {
        "vocab": vocab, "dim": d, "tokens": n, "rounds": rounds, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.machine(), "note": NOTE,
        "rows": rows,
    }


def markdown(res: dict[str, Any]) -> str:
    lines = [
        f"# TTEmbedding forward speed: {res['vocab']} x {res['dim']}, {res['tokens']:,} tokens, "
        f"{res['threads']} threads, median of {res['rounds']} interleaved rounds",
        "",
        "| ids (unique) | mode | layer | params | ms | x nn.Embedding |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['ids']} ({r['unique_ids']:,}) | {r['mode']} | {r['layer']} | {r['params']:,} | {r['ms']} | "
            f"{r['x_nn_embedding']} |"
        )
    return "\n".join(lines) + "\n\n" + res["note"] + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, seconds (for CI)")
    args = p.parse_args(argv)
    res = run(args.quick)
    name = "tt_speed_quick" if args.quick else "tt_speed"
    write_result_files(RESULTS / name, res, markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
