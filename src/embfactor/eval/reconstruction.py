"""Reconstruction of the input embedding table against the original's: error and nearest-neighbour overlap.

- ``relative_error`` = ‖E − E'‖_F / ‖E‖_F, with E the reference's table and E' the model's effective table (read
  through the layer's forward for every token id, so any registered layer type works, factorized or quantized).
- ``overlap``: for a query token t, |N_E(t) ∩ N_E'(t)| / k, with N(t) its k = 10 nearest other tokens by cosine.
  ``overlap_weighted`` weights each query token by its frequency (counted with the model's own tokenizer on the
  training split of the bundled Wikipedia extract, or given as ``token_counts``) and averages over the
  ``queries`` (default 2,048) most frequent tokens; ``weighted_mass`` says which share of the corpus' tokens they
  cover. ``overlap_uniform`` averages over ``queries`` token ids drawn uniformly (seed 0). ``queries=None`` uses
  every token for both (exact, slower: vocab² · d multiply-adds per table).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from embfactor.errors import ConfigError, InvalidInputError
from embfactor.eval.registry import input_embedding, register_task

K = 10
QUERIES = 2048
QUERY_BLOCK = 512


@torch.inference_mode()
def effective_table(model, *, block: int = 8192) -> torch.Tensor:
    """The model's input embedding table as the model sees it (float32, vocab × d), built block by block.

    Example:
        >>> effective_table(lm.model).shape          # doctest: +SKIP
        torch.Size([30522, 384])
    """
    emb = input_embedding(model)
    n = int(emb.num_embeddings)
    # quantized layers hold only buffers (integer tables), so look at both
    device = next((t.device for t in (*emb.parameters(), *emb.buffers())), torch.device("cpu"))
    return torch.cat([emb(torch.arange(s, min(s + block, n), device=device)).float().cpu() for s in range(0, n, block)])


def token_counts(tokenizer, texts: Sequence[str], vocab_size: int) -> np.ndarray:
    """How often each token id occurs when ``texts`` are tokenized (no special tokens), as int64 (vocab_size,)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for s in range(0, len(texts), 16):
        # verbose=False: counting is not running the model, so "longer than the maximum ... indexing errors" is noise
        for ids in tokenizer(list(texts[s : s + 16]), add_special_tokens=False, verbose=False)["input_ids"]:
            ids = np.asarray(ids, dtype=np.int64)
            ids = ids[(ids >= 0) & (ids < vocab_size)]
            counts += np.bincount(ids, minlength=vocab_size)
    return counts


_COUNTS_CACHE: dict[tuple, np.ndarray] = {}


def wiki_token_counts(tokenizer, vocab_size: int) -> np.ndarray:
    """Token frequencies on the training split of the bundled Wikipedia extract (cached per vocabulary)."""
    from embfactor.data import wiki_split

    vocab = tokenizer.get_vocab()
    key = (type(tokenizer).__name__, vocab_size, hash(frozenset(vocab.items())))
    if key not in _COUNTS_CACHE:
        _COUNTS_CACHE[key] = token_counts(tokenizer, wiki_split("train"), vocab_size)
    return _COUNTS_CACHE[key]


def nearest_neighbours(table: torch.Tensor, queries: torch.Tensor, k: int = K, block: int = QUERY_BLOCK) -> torch.Tensor:
    """Ids of the ``k`` nearest other rows (cosine) of each query id, computed in blocks of query rows.

    Example:
        >>> nearest_neighbours(torch.eye(3) + 0.1, torch.tensor([0]), k=2).shape
        torch.Size([1, 2])
    """
    if k >= table.shape[0]:
        raise ConfigError(f"k={k} neighbours need a vocabulary of more than {k} tokens, got {table.shape[0]}")
    normed = F.normalize(table.float(), dim=-1)
    out = []
    for s in range(0, len(queries), block):
        q = queries[s : s + block]
        sims = normed[q] @ normed.T
        sims[torch.arange(len(q)), q] = -float("inf")  # a token is not its own neighbour
        out.append(sims.topk(k, dim=-1).indices)
    return torch.cat(out)


def neighbour_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row, the share of ids in ``a`` that are also in ``b`` (both (m × k) id tensors)."""
    return (a[:, :, None] == b[:, None, :]).any(-1).float().mean(-1)


@register_task(
    "reconstruction",
    kinds=("encoder", "decoder"),
    description="relative error of the input embedding vs the reference; overlap of each token's 10 nearest neighbours",
    metric="overlap_weighted",
)
@torch.inference_mode()
def reconstruction(
    lm,
    *,
    reference=None,
    k: int = K,
    queries: int | None = QUERIES,
    token_counts: np.ndarray | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Reconstruction error and neighbour overlap of ``lm``'s input embedding against ``reference``'s.

    Args:
        lm: the (compressed) model.
        reference: the original model (required).
        k: neighbours per token.
        queries: query tokens per average (None = all tokens, exact).
        token_counts: frequency of each token id (default: counted on the bundled Wikipedia training split).
        seed: seed of the uniform query sample.
        progress: progress bar.

    Returns:
        ``relative_error``, ``overlap_weighted``, ``overlap_uniform``, ``weighted_mass``, ``k``, ``queries``,
        ``vocab_size``.

    Example:
        >>> reconstruction(compressed, reference=original)["relative_error"]     # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    if reference is None:
        raise InvalidInputError("the reconstruction task compares against the original: give a reference model")
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    bar = tqdm(total=4, desc="reconstruction", unit="step", disable=not progress, leave=False)
    E_ref, E = effective_table(reference.model), effective_table(lm.model)
    n = E.shape[0]
    rel = float(torch.linalg.norm((E - E_ref).double()) / torch.linalg.norm(E_ref.double()).clamp_min(1e-30))
    bar.update()
    if token_counts is None:
        counts = wiki_token_counts(reference.tokenizer, n)
    else:
        counts = np.asarray(token_counts, dtype=np.float64)
        if counts.shape != (n,) or (counts < 0).any():
            raise InvalidInputError(f"token_counts must be {n} non-negative numbers, got shape {counts.shape}")
    counts = np.asarray(counts, dtype=np.float64)
    if counts.sum() <= 0:
        raise InvalidInputError("token_counts are all zero: no token of the vocabulary was seen")
    bar.update()
    m = n if queries is None else min(int(queries), n)
    if m < 1:
        raise ConfigError(f"queries must be at least 1 (or None for all tokens), got {queries}")
    order = np.argsort(-counts, kind="stable")
    weighted_q = torch.as_tensor(np.sort(order[:m]))
    if m == n:
        uniform_q = torch.arange(n)
    else:
        g = torch.Generator().manual_seed(seed)
        uniform_q = torch.randperm(n, generator=g)[:m].sort().values
    q = torch.unique(torch.cat([weighted_q, uniform_q]))  # sorted
    ov = neighbour_overlap(nearest_neighbours(E_ref, q, k), nearest_neighbours(E, q, k))
    bar.update(2)
    bar.close()
    pos = {int(t): i for i, t in enumerate(q.tolist())}
    w = torch.as_tensor(counts[weighted_q.numpy()])
    ov_w = ov[[pos[int(t)] for t in weighted_q]].double()
    ov_u = ov[[pos[int(t)] for t in uniform_q]].double()
    wsum = float(w.sum())
    return {
        "relative_error": rel,
        "overlap_weighted": float((ov_w * w).sum() / wsum) if wsum > 0 else float(ov_w.mean()),
        "overlap_uniform": float(ov_u.mean()),
        "weighted_mass": float(wsum / counts.sum()),
        "k": k,
        "queries": m,
        "vocab_size": n,
    }
