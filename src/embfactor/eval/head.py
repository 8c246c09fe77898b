"""The tied head's metric: the second moment H = E[h hᵀ] of the hidden states a tied LM head reads.

A tied head computes logits ``h @ E.T``; a table row's logit error under hidden state h is ``hᵀ(Eᵢ − Êᵢ)``, so the
mean squared logit error of row i is ``(Eᵢ − Êᵢ) H (Eᵢ − Êᵢ)ᵀ``. The planner rounds int tiers and ranks plans in
this metric for decoders whose head is tied (:func:`embfactor.decomposition.intk.hessian_round`). The input side has
no such matrix (its inputs are one-hot), so encoders and untied tables keep the plain squared error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# tokens H is estimated on: 4 windows of 512, 3.6x SmolLM2's width (576); the damping covers what they miss
HEAD_TOKENS = 2048
HEAD_WINDOW = 512


def tied_head(lm) -> torch.nn.Module | None:
    """The output head of a decoder whose weight *is* its input embedding's weight, else None.

    Example:
        >>> tied_head(load_model("smollm2")) is not None                               # doctest: +SKIP
        True
    """
    if getattr(lm, "kind", None) != "decoder":
        return None
    head = lm.model.get_output_embeddings()
    emb = lm.model.get_input_embeddings()
    weight = getattr(head, "weight", None)
    return head if weight is not None and weight is getattr(emb, "weight", None) else None


@torch.inference_mode()
def head_second_moment(lm, texts: str | Sequence[str], *, tokens: int = HEAD_TOKENS,
                       window: int = HEAD_WINDOW) -> torch.Tensor:
    """H = mean of h hᵀ over the inputs h of ``lm``'s output head on the first ``tokens`` tokens of ``texts``.

    The text is cut into windows of ``window`` tokens (the last partial window is dropped unless it is the only
    one); H is float64 (d × d).

    Args:
        lm: a LoadedModel of a decoder (any output head: the inputs are read by a forward hook on it).
        texts: calibration text (a list is joined by blank lines).

    Example:
        >>> H = head_second_moment(load_model("smollm2"), wiki_split("train"))            # doctest: +SKIP
        >>> H.shape                                                                       # doctest: +SKIP
        torch.Size([576, 576])
    """
    from embfactor.errors import InvalidInputError
    from embfactor.eval.perplexity import token_ids

    head = lm.model.get_output_embeddings()
    if head is None:
        raise InvalidInputError(f"{type(lm.model).__name__} has no output head to estimate its inputs' moment on")
    ids = token_ids(lm.tokenizer, texts, tokens)
    nwin = max(1, ids.numel() // window)
    batch = ids[: nwin * window].view(nwin, -1) if ids.numel() >= window else ids[None]
    acc: list[torch.Tensor] = []
    count = [0]

    def hook(_module, inputs, _output) -> None:
        h = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
        acc.append(h.T @ h)
        count[0] += h.shape[0]

    handle = head.register_forward_hook(hook)
    try:
        for row in batch:  # one window at a time: its vocabulary-sized logits are the peak
            lm.model(input_ids=row[None])
    finally:
        handle.remove()
    return torch.stack(acc).sum(0) / max(count[0], 1)
