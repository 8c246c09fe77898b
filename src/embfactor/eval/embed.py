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
    progress: bool = False,
) -> torch.Tensor:
    """Mean-pooled (masked) last hidden states of ``texts``, L2-normalized by default.

    Texts are sorted by length for batching (less padding), and returned in the input order.
    ``progress=True`` shows a progress bar over the batches.

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
    from tqdm.auto import tqdm

    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="embedding", unit="batch", disable=not progress, leave=False):
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


def encoder_of(lm) -> nn.Module:
    """The module whose ``last_hidden_state`` is pooled: the model itself for encoders, the base model for decoders,
    the encoder of an encoder-decoder.

    A causal LM's ``base_model`` (e.g. ``LlamaModel`` inside ``LlamaForCausalLM``) returns the hidden states the
    head reads, without computing vocab-sized logits.
    """
    if getattr(getattr(lm.model, "config", None), "is_encoder_decoder", False) and hasattr(lm.model, "get_encoder"):
        return lm.model.get_encoder()  # T5, BART, ...: the encoder's states (the full model needs decoder inputs)
    if lm.kind == "decoder":
        base = getattr(lm.model, "base_model", None)
        return base if isinstance(base, nn.Module) and base is not lm.model else lm.model.get_decoder()
    return lm.model


def pooled_embeddings(lm, texts: Sequence[str], **kwargs) -> torch.Tensor:
    """:func:`sentence_embeddings` for any LoadedModel (encoder or decoder).

    Decoder tokenizers often have no padding token; the end-of-sequence token is used for padding (masked out of
    the mean, so its value does not matter).

    Example:
        >>> pooled_embeddings(load_model("smollm2"), ["a cat"]).shape     # doctest: +SKIP
        torch.Size([1, 576])
    """
    tok = lm.tokenizer
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise InvalidInputError(f"the tokenizer of {lm.name!r} has neither a padding nor an end-of-sequence token")
        tok.pad_token = tok.eos_token
    # never feed more tokens than the model has positions for (sentence-transformers caps MiniLM at 256 too)
    encoder = encoder_of(lm)
    limit = usable_positions(encoder)
    if limit is not None and limit < kwargs.get("max_length", 256):
        kwargs["max_length"] = limit
    return sentence_embeddings(encoder, tok, texts, **kwargs)


def usable_positions(model: nn.Module) -> int | None:
    """How many tokens a sequence may have: ``max_position_embeddings``, less RoBERTa-style position offsets.

    RoBERTa, MPNet, XLM-R number positions from ``padding_idx + 1`` (their position table has a padding row), so
    MPNet's 514 positions hold 512 tokens; feeding 514 indexes past the table. None when the config has no limit.

    Example:
        >>> usable_positions(load_model(all_mpnet_folder).model)          # doctest: +SKIP
        512
    """
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int) or isinstance(limit, bool):
        return None
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    positions = getattr(embeddings, "position_embeddings", None)
    offset = getattr(positions, "padding_idx", None)
    return limit - (offset + 1) if isinstance(offset, int) and 0 <= offset < limit else limit
