"""From-scratch training of a small causal Transformer LM with a dense, factorized (ALBERT-style) or TT embedding.

Every variant sees the same token stream, the same batch order (one seeded generator draws all batch offsets up
front) and the same initialization seed for the non-embedding weights, so the validation curves differ only by
the embedding. The output head is tied to the token embedding: ``F.linear(h, E)`` for the dense table,
:class:`~embfactor.layers.FactorizedLMHead` for the factorized ones (logits cost r·(d + vocab) instead of d·vocab).

Example:
    >>> from embfactor.train.scratch import TrainConfig, train_variants
    >>> result = train_variants(TrainConfig(variants=("dense", "fact-d4"), steps=200))   # doctest: +SKIP
    >>> [(v["name"], v["final_val_ppl"]) for v in result["variants"]]                       # doctest: +SKIP
"""

from embfactor.train.scratch.config import ALL_VARIANTS, DEFAULT_STEPS, TrainConfig, parse_variant
from embfactor.train.scratch.data import (
    batch_offsets,
    cache_dir,
    encode_texts,
    eval_windows,
    load_tokenizer,
    token_streams,
)
from embfactor.train.scratch.loop import evaluate_loss, train_one, train_variants
from embfactor.train.scratch.model import (
    CausalLM,
    _reset_non_embedding,
    balance_factors_,
    embedding_params,
    total_params,
)
from embfactor.train.scratch.outputs import plot_curves, save_run, strip_models, summary_rows

__all__ = [
    "ALL_VARIANTS", "DEFAULT_STEPS", "CausalLM", "TrainConfig", "_reset_non_embedding", "balance_factors_",
    "batch_offsets", "cache_dir", "embedding_params", "encode_texts", "eval_windows", "evaluate_loss",
    "load_tokenizer", "parse_variant", "plot_curves", "save_run", "strip_models", "summary_rows", "token_streams",
    "total_params", "train_one", "train_variants",
]
