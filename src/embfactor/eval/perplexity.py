"""Perplexity (decoders) on the held-out Wikipedia articles, and agreement with the original model.

Protocol (fixed so numbers are comparable): the held-out articles are joined with blank lines and tokenized by the
model's tokenizer without special tokens; the first ``max_tokens`` (default 16,384) tokens are cut into windows of
``window`` (default 256) tokens starting every ``stride`` (default 256) tokens. Each window predicts the tokens it
has not scored before (with stride == window: all but its first token, since that one has no context), so every
token is scored at most once. Perplexity = exp(mean negative log-likelihood over scored tokens).

With a reference (the original model) on the same windows: ``kl`` = mean over scored positions of
KL(reference ‖ model) of the next-token distributions (nats), and ``top1_agreement`` = share of positions where both
models' most likely next token is the same.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from embfactor.errors import ConfigError, InvalidInputError
from embfactor.eval.registry import register_task

WINDOW = 256
STRIDE = 256
MAX_TOKENS = 16_384


def heldout_text() -> str:
    """The held-out Wikipedia articles (never used for healing), joined by blank lines."""
    from embfactor.data import wiki_split

    return "\n\n".join(wiki_split("heldout"))


def token_ids(tokenizer, text: str | Sequence[str], max_tokens: int | None) -> torch.Tensor:
    """Token ids of ``text`` (a list of texts is joined by blank lines), without special tokens, cut to the budget."""
    if not isinstance(text, str):
        text = "\n\n".join(text)
    if not text.strip():
        raise InvalidInputError("the text to compute perplexity on is empty")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise InvalidInputError(f"perplexity needs at least 2 tokens of text, got {len(ids)}")
    return torch.tensor(ids, dtype=torch.long)


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over ``n`` tokens; each position scored at most once.

    Example:
        >>> windows(10, 4, 4)
        [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
        >>> windows(10, 4, 2)
        [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    """
    out, scored_to = [], 1  # position 0 can never be predicted
    begin = 0
    while True:
        end = min(begin + window, n)
        first = max(scored_to, begin + 1)
        if first < end:
            out.append((begin, end, first))
            scored_to = end
        if end >= n:
            return out
        begin += stride


def _logits(model, ids: torch.Tensor, autocast: bool) -> torch.Tensor:
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        return model(input_ids=ids).logits.float()


def _max_positions(model) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int):
            return v
    return None


def _check_windows(lm, reference, window: int, stride: int, max_tokens: int | None) -> None:
    """ConfigError for a window/stride/max_tokens the protocol cannot use, or a window longer than a model accepts."""
    if window < 2 or stride < 1 or stride > window:
        raise ConfigError(f"need window >= 2 and 1 <= stride <= window, got window={window}, stride={stride}")
    if max_tokens is not None and max_tokens < 2:
        raise ConfigError(f"max_tokens must be at least 2 (or None for all), got {max_tokens}")
    for m in (lm, reference):
        limit = _max_positions(m.model) if m is not None else None
        if limit is not None and window > limit:
            raise ConfigError(f"window={window} is longer than {m.name!r} accepts ({limit} positions); lower --window")


def _same_length_batches(wins: list[tuple[int, int, int]], batch_size: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive windows of one length, at most ``batch_size`` per batch (all but possibly the last window).

    Example:
        >>> _same_length_batches([(0, 4, 0), (2, 6, 4), (4, 7, 6)], 4)
        [[(0, 4, 0), (2, 6, 4)], [(4, 7, 6)]]
    """
    groups: list[list[tuple[int, int, int]]] = []
    for w in wins:
        if groups and len(groups[-1]) < batch_size and (groups[-1][0][1] - groups[-1][0][0]) == (w[1] - w[0]):
            groups[-1].append(w)
        else:
            groups.append([w])
    return groups


@register_task(
    "perplexity",
    kinds=("decoder",),
    description="held-out Wikipedia perplexity; KL(reference || model) and top-1 agreement vs the reference",
    metric="perplexity",
    lower_is_better=True,
)
@torch.inference_mode()
def perplexity(
    lm,
    *,
    reference=None,
    text: str | Sequence[str] | None = None,
    window: int = WINDOW,
    stride: int = STRIDE,
    max_tokens: int | None = MAX_TOKENS,
    batch_size: int = 4,
    bf16: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Token-level perplexity of a causal LM (see the module docstring for the protocol).

    Args:
        lm: the model (LoadedModel, decoder).
        reference: the original model; adds ``kl`` and ``top1_agreement``.
        text: the text (or list of texts) to score; default the held-out Wikipedia articles.
        window, stride: window length and step in tokens (stride ≤ window).
        max_tokens: token budget (None = all of the text).
        batch_size: windows per forward pass.
        bf16: run under bfloat16 autocast (faster on CPUs with bf16 units; default float32 for exact numbers).
        progress: progress bar.

    Returns:
        ``perplexity``, ``nll`` (mean, nats), ``tokens_scored``, ``tokens``, ``window``, ``stride``, ``seconds``,
        ``tokens_per_second``; with a reference also ``kl``, ``top1_agreement``, ``reference_perplexity``.

    Example:
        >>> perplexity(load_model("smollm2"), max_tokens=4096)["perplexity"]      # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    _check_windows(lm, reference, window, stride, max_tokens)
    ids = token_ids(lm.tokenizer, heldout_text() if text is None else text, max_tokens)
    wins = windows(len(ids), window, stride)
    t0 = time.perf_counter()
    nll_sum, kl_sum, agree, scored = 0.0, 0.0, 0, 0
    ref_nll_sum = 0.0
    groups = _same_length_batches(wins, batch_size)
    bar = tqdm(total=sum(e - f for _, e, f in wins), desc="perplexity", unit="tok", disable=not progress, leave=False)
    for group in groups:
        batch = torch.stack([ids[b:e] for b, e, _ in group])
        logp = F.log_softmax(_logits(lm.model, batch, bf16), dim=-1)
        ref_logp = F.log_softmax(_logits(reference.model, batch, bf16), dim=-1) if reference is not None else None
        for k, (b, e, first) in enumerate(group):
            pos = torch.arange(first - b - 1, e - b - 1)  # logits at pos predict the token at pos + 1
            tgt = batch[k, pos + 1]
            lp = logp[k, pos]
            nll_sum -= float(lp.gather(-1, tgt[:, None]).sum())
            if ref_logp is not None:
                rlp = ref_logp[k, pos]
                ref_nll_sum -= float(rlp.gather(-1, tgt[:, None]).sum())
                kl_sum += float((rlp.exp() * (rlp - lp)).sum())
                agree += int((rlp.argmax(-1) == lp.argmax(-1)).sum())
            scored += len(pos)
            bar.update(len(pos))
    bar.close()
    seconds = time.perf_counter() - t0
    nll = nll_sum / scored
    out: dict[str, Any] = {
        "perplexity": math.exp(nll),
        "nll": nll,
        "tokens": int(len(ids)),
        "tokens_scored": scored,
        "window": window,
        "stride": stride,
        "max_tokens": max_tokens,
        "bf16": bf16,
        "seconds": seconds,
        "tokens_per_second": len(ids) * (2 if reference is not None else 1) / seconds if seconds > 0 else None,
    }
    if reference is not None:
        out.update(
            kl=max(0.0, kl_sum / scored),  # rounding can make an exact 0 come out as -1e-9
            top1_agreement=agree / scored,
            reference_perplexity=math.exp(ref_nll_sum / scored),
        )
    return out


def token_kl(s_logits: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) at each position (the last dimension is the vocabulary), from the student's logits and
    the teacher's log-probabilities."""
    return F.kl_div(F.log_softmax(s_logits.float(), -1), t_logp, reduction="none", log_target=True).sum(-1)


def teacher_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """The teacher's next-token log-probabilities, float32 (one vocab-sized tensor kept per batch, not its logits
    as well: at SmolLM2's 49,152 tokens each such tensor of a 16 × 128 batch is 400 MB)."""
    return F.log_softmax(logits.float(), -1)
