"""``embfactor inspect``: the embedding's shape, share of the model, tying and spectrum."""

from __future__ import annotations

import argparse
from typing import Any

from embfactor.cli.common import add_model_arg, check_outputs, table, write_json


def inspect_model(model: str) -> dict[str, Any]:
    """:func:`embfactor.pipeline.describe` of ``model``, with the singular-value energy kept at a few ranks."""
    import torch

    from embfactor.models import load_model
    from embfactor.pipeline import describe, spectrum_facts

    lm = load_model(model)
    facts = describe(lm)
    emb = lm.model.get_input_embeddings()
    with torch.no_grad():
        E = (emb.dense() if facts.compressed else emb.weight).detach().float()
    # a U·V format's table has matrix rank r: above it every row would say "energy kept 1.0000"
    matrix_rank = emb.format_config().get("rank") if facts.compressed else None
    return {**facts.to_dict(), **spectrum_facts(E, top_rank=matrix_rank if isinstance(matrix_rank, int) else None)}


def _stored_as(r: dict[str, Any]) -> str:
    if not r["compressed"]:
        return ""
    fmt_name = r.get("format")
    facts = [f"rank {r['rank']}"] if r.get("rank") else []
    facts += [f"{fmt_name} format"] if fmt_name and fmt_name != "factorized" else []
    if fmt_name in ("codebook", "intk"):
        facts += [f"{k}={v}" for k, v in (r.get("format_config") or {}).items() if k != "zero_padding_row"]
    return f" (factorized{', ' if facts else ''}{', '.join(facts)})"


def render(r: dict[str, Any]) -> str:
    head = table(
        [
            ["model", r["model"]],
            ["architecture", f"{r['architecture']} ({r['kind']})"],
            ["embedding", f"{r['vocab_size']:,} x {r['hidden_size']}{_stored_as(r)}"],
            ["embedding parameters", r["embedding_params_after"]],
            ["embedding bytes", f"{r['embedding_bytes']:,} ({r['bytes_ratio']:.2f}x fewer than fp32)"],
            ["model parameters", r["params_after"]],
            ["embedding share", f"{100 * r['embedding_share']:.1f}%"],
            ["output head tied", r["tied_head"]],
        ]
    )
    spec = table(
        [[s["rank"], f"{s['ratio']:.2f}x", s["energy"], s["optimal_relative_error"]] for s in r["spectrum"]],
        ["rank", "compression", "energy kept", "optimal rel. error"],
    )
    return f"{head}\n\nsingular-value energy at a few ranks:\n{spec}"


def plot_spectrum(r: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from embfactor.fileio import atomic_write_bytes

    sv = np.asarray(r["singular_values"])
    energy = np.cumsum(sv**2) / np.sum(sv**2)
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].semilogy(np.arange(1, len(sv) + 1), sv)
    ax[0].set(xlabel="index", ylabel="singular value", title=f"spectrum of {r['model']} embedding")
    ax[1].plot(np.arange(1, len(sv) + 1), energy)
    ax[1].set(xlabel="rank r", ylabel="energy kept", title="cumulative energy", ylim=(0, 1.01))
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def run(args: argparse.Namespace) -> int:
    if args.methods:
        from embfactor.decomposition import method_infos

        print(table([[m.name, m.description] for m in method_infos()], ["method", "description"]))
        return 0
    check_outputs(files=[("--plot", args.plot), ("--json", args.json)], inputs=[args.model])
    r = inspect_model(args.model)
    print(render(r))
    if args.plot:
        plot_spectrum(r, args.plot)
        print(f"wrote {args.plot}")
    write_json(args.json, r)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show a model's embedding: size, share, tying, spectrum")
    add_model_arg(p)
    p.add_argument("--plot", metavar="FILE.png", help="plot the singular-value spectrum to this PNG")
    p.add_argument("--json", help="write the facts as JSON")
    p.add_argument("--methods", action="store_true", help="list the registered decomposition methods and exit")
    p.set_defaults(func=run)
