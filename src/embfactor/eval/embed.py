"""Sentence embeddings from an encoder: mean pooling over real tokens, as sentence-transformers does for MiniLM."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from embfactor.errors import InvalidInputError


@torch.inference_mode()
def sentence_embeddings(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = 256,
    normalize: bool = True,
) -> torch.Tensor:
    """Mean-pooled (masked) last hidden states of ``texts``, L2-normalized by default.

    Texts are sorted by length for batching (less padding), and returned in the input order.

    Example:
        >>> e = sentence_embeddings(lm.model, lm.tokenizer, ["a cat", "a dog"])   # doctest: +SKIP
        >>> e.shape                                                               # doctest: +SKIP
        torch.Size([2, 384])
    """
    if isinstance(texts, str) or not len(texts):
        raise InvalidInputError("texts must be a non-empty list of strings")
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[torch.Tensor | None] = [None] * len(texts)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer(
            [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(device)
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        for j, i in enumerate(idx):
            out[i] = pooled[j].float().cpu()
    return torch.stack(out)  # type: ignore[arg-type]
