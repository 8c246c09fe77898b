"""``embfactor train``: train a small causal LM from scratch with dense, factorized and TT embeddings; compare them."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from embfactor.cli.common import check_outputs, table, write_json

HEADERS = ["variant", "emb params", "total params", "final val ppl", "train s", "tokens/s", "note"]


def train_compare(
    variants: str | list[str] | tuple[str, ...] | None = None,
    *,
    plot: str | None = None,
    json_path: str | None = None,
    output: str | None = None,
    progress: bool = True,
    **config: Any,
) -> dict[str, Any]:
    """Run :func:`embfactor.train.scratch.train_variants` and write the plot / JSON / run folder.

    Args:
        variants: comma-separated names or a list (default: dense, fact-d4, fact-d8, tt).
        plot: PNG of validation perplexity vs step.
        json_path: results as JSON.
        output: a folder for results.json and each variant's weights (safetensors).
        progress: progress bars.
        **config: any other :class:`~embfactor.train.scratch.TrainConfig` field (steps, d_model, bf16, ...).

    Example:
        >>> train_compare("dense,fact-d8", steps=100, plot="ppl.png")["variants"][0]["final_val_ppl"]  # doctest: +SKIP
    """
    from embfactor.errors import InvalidInputError
    from embfactor.train.scratch import TrainConfig, plot_curves, save_run, strip_models, train_variants

    if variants is not None:
        config["variants"] = variants
    cfg = TrainConfig(**{k: v for k, v in config.items() if v is not None})
    if plot and not str(plot).lower().endswith(".png"):
        raise InvalidInputError(f"--plot writes a PNG; give a file name ending in .png, got {plot!r}")
    check_outputs(files=[("--plot", plot), ("--json", json_path)], write_into=[("--output", output)])
    if output:  # refuse a bad output folder before spending minutes on training
        from pathlib import Path

        out = Path(output)
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "results.json").is_file())):
            raise InvalidInputError(
                f"output {out} exists and is not an empty folder or an earlier 'embfactor train' output"
            )
    result = train_variants(cfg, progress=progress, keep_models=bool(output))
    models = {v["name"]: v["model"] for v in result["variants"] if "model" in v}
    result = strip_models(result)
    if plot:
        plot_curves(result, plot)
        result["plot"] = str(plot)
        print(f"wrote {plot}", file=sys.stderr)
    if output:
        save_run(result, output, models)
        result["output"] = str(output)
        print(f"wrote {output}/results.json and {len(models)} weight file(s)", file=sys.stderr)
    write_json(json_path, result)
    return result


def render(result: dict[str, Any]) -> str:
    from embfactor.train.scratch import summary_rows

    c, d = result["config"], result["data"]
    head = (
        f"d={c['d_model']} layers={c['layers']} heads={c['heads']} seq={c['seq_len']} batch={c['batch_size']} "
        f"steps={c['steps']} positions={c['positional']} bf16={c['bf16']} device={result['device']}\n"
        f"data: {d['source']}, vocab {d['vocab_size']:,}, {d['train_tokens']:,} train tokens, "
        f"val ppl on {d['eval_tokens']:,} held-out tokens (every {c['eval_every']} steps)\n"
    )
    return head + table(summary_rows(result), HEADERS)


def register(sub: argparse._SubParsersAction) -> None:
    from embfactor.train.scratch import ALL_VARIANTS, DEFAULT_STEPS

    p = sub.add_parser(
        "train",
        help="train a small LM from scratch with dense / factorized / TT embeddings and compare",
        description=(
            "Train a small pre-LN causal Transformer LM (tied output head) from scratch on the bundled Wikipedia "
            "extract once per embedding variant, with the same steps, seed and batch order, and report parameters, "
            "validation perplexity curves and time. The defaults take ~15 minutes on an idle 2-core CPU."
        ),
    )
    p.add_argument(
        "--variants", default=",".join(ALL_VARIANTS),
        help="comma-separated: dense, fact-dN (FactorizedEmbedding of rank d/N), fact-rN (rank N), tt "
        f"(default {','.join(ALL_VARIANTS)})",
    )
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps per variant (default {DEFAULT_STEPS})")
    p.add_argument("--d-model", type=int, default=256, help="model width d (default 256)")
    p.add_argument("--layers", type=int, default=4, help="Transformer blocks (default 4)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence (default 128)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (default 16)")
    p.add_argument("--positional", choices=("sinusoidal", "learned"), default="sinusoidal", help="position encoding")
    p.add_argument("--tokenizer", default="minilm", help="'minilm' (WordPiece 30,522; default), 'smollm2' or a folder")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (fast on GPUs / CPUs with AMX; slower on plain AVX-512)")
    p.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate (default 2e-3)")
    p.add_argument("--tt-rank", type=int, default=None, help="TT rank of the tt variant (default 32)")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default: steps/10)")
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens per evaluation (default 8192)")
    p.add_argument("--seed", type=int, default=None, help="seed for init, dropout and batch order (default 0)")
    p.add_argument("--output", default=None, metavar="DIR", help="folder for results.json and the trained weights")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="plot validation perplexity vs step")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars (like every other command)")
    p.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)  # deprecated alias
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = train_compare(
        args.variants,
        steps=args.steps,
        d_model=args.d_model,
        layers=args.layers,
        heads=args.heads,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        positional=args.positional,
        tokenizer=args.tokenizer,
        device=args.device,
        bf16=args.bf16,
        lr=args.lr,
        tt_rank=args.tt_rank,
        eval_every=args.eval_every,
        eval_tokens=args.eval_tokens,
        seed=args.seed,
        plot=args.plot,
        json_path=args.json,
        output=args.output,
        progress=not args.quiet,
    )
    print(render(result))
    return 0
