"""``embfactor heal``: distill the original model into a compressed one (or fine-tune it on labels), save the best."""

from __future__ import annotations

import argparse
from typing import Any

from embfactor.cli.common import add_verify_args, check_outputs, emit, table, verified_figures
from embfactor.errors import a_or_an


def render(r: dict[str, Any]) -> str:
    before, best = r["eval_before"], r["best_eval"]
    rows = [["held-out loss", before["loss"], best["loss"]]]
    if "fidelity" in before:
        rows.append(["held-out fidelity (cosine to reference)", before["fidelity"], best["fidelity"]])
    if "accuracy" in before:
        rows.append(["held-out accuracy", before["accuracy"], best["accuracy"]])
    head = (
        f"healed {a_or_an(r['kind'])} ({r['mode']}): {r['steps']} steps in {r['seconds']:.0f} s, "
        f"{r['trainable_params']:,} trainable parameters, best at step {r['best_step']}"
    )
    lead = [verified_figures(r["verified"]), ""] if r.get("verified") else []
    return "\n".join([*lead, head, table(rows, ["", "before", "best"]), f"saved to {r['output']}"])


def run(args: argparse.Namespace) -> int:
    check_outputs(folder=args.output, files=[("--json", args.json)], inputs=[args.compressed, args.reference])
    minutes = args.minutes
    if minutes is None and args.steps is None:
        minutes = 10.0
    from embfactor.pipeline.heal import heal

    r = heal(
        args.compressed, args.reference, args.output, text_files=args.text, minutes=minutes, steps=args.steps,
        labels=args.labels, progress=not args.quiet, lr=args.lr, relative_lr=args.relative_lr, lr_rest=args.lr_rest,
        batch_size=args.batch_size,
        max_length=args.max_length, train_layernorm=args.train_layernorm, train_all=args.train_all, bf16=args.bf16,
        dropout=args.dropout or None,
        eval_every=args.eval_every, resume=args.resume, seed=args.seed, loss_chunk=args.loss_chunk,
        checkpoint_layers=args.checkpoint_layers, verify=args.verify,
    )
    from accelerate import PartialState

    if PartialState().is_main_process:  # under `accelerate launch` every process returns the same run's summary
        return emit(r, render, args.json)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("heal", help="distill the original model into a compressed one (or fine-tune on labels)")
    p.add_argument("compressed", metavar="COMPRESSED", help="an embfactor output folder (from 'compress')")
    p.add_argument("--reference", required=True, help="the original model: 'minilm', 'smollm2' or a folder")
    p.add_argument("--output", "-o", required=True, help="output folder for the healed model and resume state")
    p.add_argument("--text", nargs="+", metavar="FILE", help="training text files (default: bundled Wikipedia)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="wall-clock budget (default 10)")
    budget.add_argument("--steps", type=int, help="number of optimizer steps")
    p.add_argument("--labels", metavar="FILE", help="CSV/JSONL with text,label: supervised fine-tuning with a head")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of the table's tensors (default 5e-4; for codebook and int-k tables 3e-3, "
                   "relative)")
    p.add_argument("--relative-lr", action=argparse.BooleanOptionalAction, default=None,
                   help="--lr is relative: each table tensor trains at lr x its RMS (default: on for codebook and "
                   "int-k tables)")
    p.add_argument("--lr-rest", type=float, default=None,
                   help="learning rate of the model's other weights with --train-all / --train-layernorm "
                   "(default: --lr; 1e-5 for codebook and int-k tables)")
    p.add_argument("--batch-size", type=int, default=None, help="texts per step (default 16)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per text (default 128)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between held-out evaluations (default 50)")
    p.add_argument("--loss-chunk", type=int, default=None,
                   help="decoders: token positions whose vocabulary-sized logits are computed at a time (default "
                   "256; 0 = the whole batch at once: same loss, several times the memory)")
    p.add_argument("--checkpoint-layers", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each transformer layer's activations in the backward pass instead of keeping "
                   "them: same gradients, one more forward per step (default: on for decoders, off for encoders)")
    p.add_argument("--train-layernorm", action="store_true", help="also train the LayerNorm/RMSNorm weights")
    p.add_argument("--train-all", action=argparse.BooleanOptionalAction, default=None,
                   help="train every weight, not only the table's (faster progress per step; Adam state for all). "
                   "Default: on for codebook and int-k tables (pq, rvq, int, the planner's), off for low rank")
    p.add_argument("--dropout", action="store_true",
                   help="keep the model's dropout on while training (default off: healing matches the teacher)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast on or off (default: off; faster only on CPUs/GPUs with bf16 units)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from --output")
    p.add_argument("--seed", type=int, default=None, help="seed of the data order (default 0)")
    add_verify_args(p)
    p.add_argument("--json", help="also write the summary as JSON to this file")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
