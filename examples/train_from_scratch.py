"""Train a small causal LM from scratch with a dense, two factorized (ALBERT-style) and a tensor-train embedding.

Same steps, seed and batch order for every variant; prints parameters, final validation perplexity and time,
and plots validation perplexity vs step. The CLI equivalent is ``embfactor train --plot ppl.png``.

Usage:
    python examples/train_from_scratch.py                 # the default run (~15 minutes on an idle 2-core CPU)
    python examples/train_from_scratch.py --steps 20      # a quick look
"""

from __future__ import annotations

import argparse

from embfactor.cli.train_cmd import render
from embfactor.train.scratch import DEFAULT_STEPS, TrainConfig, plot_curves, train_variants


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--variants", default="dense,fact-d4,fact-d8,tt")
    ap.add_argument("--plot", default="train_from_scratch.png")
    args = ap.parse_args()

    # d=256, 4 pre-LN layers, 4 heads, 128-token sequences, MiniLM's WordPiece tokenizer (30,522 tokens):
    # the embedding is 7.8M of the dense model's ~11M parameters, so its factorization matters.
    cfg = TrainConfig(variants=args.variants, steps=args.steps, positional="sinusoidal")
    result = train_variants(cfg)
    plot_curves(result, args.plot)
    print(render(result))
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
