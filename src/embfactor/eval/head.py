"""The planner's metrics: the tied head's H = E[h hᵀ], and the input side's Fisher F of the embedding vectors.

A tied head computes logits ``h @ E.T``; a table row's logit error under hidden state h is ``hᵀ(Eᵢ − Êᵢ)``, so the
mean squared logit error of row i is ``(Eᵢ − Êᵢ) H (Eᵢ − Êᵢ)ᵀ``. The input side has a d × d matrix too, though its
inputs are one-hot: an error δ in the embedding *vector* a position reads costs ≈ ½ δᵀ F δ, with F the
Gauss-Newton / Fisher matrix of that vector (:func:`input_fisher`). The planner rounds int tiers, trains and encodes
PQ tiers and ranks plans in F (plus H for a tied decoder: both in KL units) instead of the plain squared error
(:func:`embfactor.decomposition.intk.hessian_round`, :func:`embfactor.decomposition.codebook.hessian_encode`).
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
    return head_statistics(lm, texts, tokens=tokens, window=window, predicted=False)[0]


@torch.inference_mode()
def head_statistics(lm, texts: str | Sequence[str], *, tokens: int = HEAD_TOKENS, window: int = HEAD_WINDOW,
                    predicted: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(H, predicted): :func:`head_second_moment`'s H, and each token's predicted count Σₜ p(token | prefix ≤ t)
    over the same positions (float64, one entry per output logit; None with ``predicted=False``), from one forward
    pass per window.

    The predicted count is what a tied row's head error is weighted by in the KL (the second-order term of
    row i is ½ Σₜ pₜ,ᵢ (hₜᵀ(Eᵢ − Êᵢ))²): unlike a count of the text's tokens it is non-zero for every token the model
    finds plausible somewhere, and near zero for tokens it never predicts.

    Example:
        >>> H, predicted = head_statistics(load_model("smollm2"), wiki_split("train"))    # doctest: +SKIP
        >>> float(predicted.sum())                                                      # doctest: +SKIP
        2048.0
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
    sums: list[torch.Tensor] = []
    count = [0]

    def hook(_module, inputs, output) -> None:
        h = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
        acc.append(h.T @ h)
        count[0] += h.shape[0]
        if predicted:  # 64 positions at a time: a vocabulary-sized float64 softmax per position
            logits = output.reshape(-1, output.shape[-1])
            sums.append(sum(torch.softmax(logits[a:a + 64].double(), -1).sum(0) for a in range(0, len(logits), 64)))

    handle = head.register_forward_hook(hook)
    try:
        for row in batch:  # one window at a time: its vocabulary-sized logits are the peak
            lm.model(input_ids=row[None])
    finally:
        handle.remove()
    return torch.stack(acc).sum(0) / max(count[0], 1), torch.stack(sums).sum(0) if sums else None


# --- the input side: the Fisher of the input embedding vectors ---------------------------------------------------
# passages (encoders) or windows (decoders) and probes the input metric is estimated on: MiniLM's 64 passages x 4
# probes take ~10 s of CPU. A decoder's one sample per position is already a sum of independent zero-mean terms at
# every earlier input, so one probe is unbiased; four cost SmolLM2 ~5 CPU-minutes (frontier_notes.md, issue 22)
FISHER_PASSAGES = 64
FISHER_PROBES = {"encoder": 4, "decoder": 1}
FISHER_TOKENS = 2048
FISHER_WINDOW = 256


def input_fisher(lm, texts: str | Sequence[str], *, passages: int = FISHER_PASSAGES, probes: int | None = None,
                 tokens: int = FISHER_TOKENS, window: int = FISHER_WINDOW, seed: int = 0,
                 batch_size: int = 16) -> torch.Tensor:
    """F = E_t[g_t g_tᵀ]: the (d × d) second moment of the output's sensitivity to the input embedding vector.

    An error δ in the embedding vector a position t reads reaches the output through the model's Jacobian; its
    cost is ≈ ½ δᵀ F_t δ with F_t the Gauss-Newton / Fisher matrix of that vector, so ``F`` (the mean of F_t over
    positions) is the input side's analogue of the tied head's H: it knows what the embedding LayerNorm removes
    (the mean and, on average, the radial component), its per-column scaling and what the first layers ignore.

    - Encoders (cosine of mean-pooled sentence embeddings f): 1 − cos(f(e+δ), f(e)) ≈ ½ δᵀ Jᵀ P J δ / |f|² with P
      the projector orthogonal to f; with v ~ N(0, P / |f|²) one backward of Σ f·v gives g_t = Jᵀ v at every
      position at once (Hutchinson: E[g gᵀ] = Jᵀ P J / |f|²). Passages: :func:`calibration_passages` of ``texts``.
    - Decoders (KL of next-token distributions): g_t is the gradient of Σ log p(y) with every y drawn from the model's
      own distribution (the Fisher of the KL, in the same units as the head's :func:`head_second_moment` term for a
      tied table). Windows of ``window`` tokens from the first ``tokens`` tokens of ``texts``.

    The gradient is read at the input embedding module's output (a forward hook makes it a leaf), through
    ``torch.autograd.grad``: no weight is written and no ``.grad`` is left on the model. A module that scales its
    output (Gemma's √d) is accounted for: F is returned for the table's rows.

    Args:
        lm: a LoadedModel (encoder or decoder).
        texts: calibration text (encoders: articles or passages; decoders: text, a list is joined by blank lines).
        probes: random output directions (encoders) or sampled continuations (decoders) per passage or window
            (default :data:`FISHER_PROBES` of the model's kind).
        seed: the probes' random generator (the result is deterministic given it).

    Returns:
        F as float64 (d × d), symmetric positive semi-definite.

    Example:
        >>> F = input_fisher(load_model("minilm"), wiki_split("train"))                 # doctest: +SKIP
        >>> F.shape                                                                      # doctest: +SKIP
        torch.Size([384, 384])
    """
    from embfactor.errors import InvalidInputError

    emb = lm.model.get_input_embeddings()
    weight = getattr(emb, "weight", None)
    if weight is None:
        raise InvalidInputError(f"{type(lm.model).__name__} has no input embedding table to estimate a metric for")
    probes = _fisher_probes(lm, probes)
    d = int(weight.shape[1])
    gen = torch.Generator().manual_seed(seed)
    acc = torch.zeros(d, d, dtype=torch.float64)
    count = [0]
    state: dict[str, torch.Tensor] = {}

    def hook(_module, inputs, output):
        # the embedding's output as a leaf: the gradient of each position's vector, not the table's summed one
        leaf = output.detach().requires_grad_(True)
        ids = inputs[0]
        rows = weight.detach()[ids].to(leaf.dtype)
        den = float((rows.float() ** 2).sum())
        state["scale"] = torch.tensor(float((leaf.detach().float() * rows.float()).sum()) / den if den > 0 else 1.0)
        state["leaf"] = leaf
        return leaf

    def add(grad: torch.Tensor, mask: torch.Tensor | None) -> None:
        g = grad.reshape(-1, d).double() * float(state["scale"])  # d(out)/d(row) = scale: F for the table's rows
        if mask is not None:
            g = g[mask.reshape(-1).bool()]
        acc.add_(g.T @ g)
        count[0] += g.shape[0]

    handles = _hook_readers(lm.model, emb, hook)
    try:
        with torch.enable_grad():
            if lm.kind == "decoder":
                _decoder_fisher(lm, texts, state, add, probes=probes, tokens=tokens, window=window, gen=gen)
            else:
                _encoder_fisher(lm, texts, state, add, passages=passages, probes=probes, gen=gen,
                                batch_size=batch_size)
    finally:
        for h in handles:
            h.remove()
    F = acc / max(count[0], 1)
    return (F + F.T) / 2


def _fisher_probes(lm, probes: int | None) -> int:
    """The probes per passage or window: ``probes``, checked, or the default of the model's kind."""
    from embfactor.errors import InvalidInputError

    probes = FISHER_PROBES["decoder" if lm.kind == "decoder" else "encoder"] if probes is None else probes
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise InvalidInputError(f"probes must be a positive integer, got {probes!r}")
    return probes


def _hook_readers(model: torch.nn.Module, emb: torch.nn.Module, hook) -> list:
    """``hook`` on every module that looks rows up in ``emb``'s table (T5 / BART stacks hold their own module over
    the shared weight); their handles."""
    weight = emb.weight
    readers = [m for m in model.modules()
               if m is emb or (isinstance(m, torch.nn.Embedding) and getattr(m, "weight", None) is weight)]
    return [m.register_forward_hook(hook) for m in readers]


def _encoder_fisher(lm, texts, state, add, *, passages: int, probes: int, gen: torch.Generator,
                    batch_size: int) -> None:
    from embfactor.eval.embed import encoder_of, usable_positions
    from embfactor.eval.similarity import MAX_LENGTH
    from embfactor.data.corpora import calibration_passages

    arts = [texts] if isinstance(texts, str) else list(texts)
    items = calibration_passages(passages, articles=arts)
    model = encoder_of(lm)
    longest = min(MAX_LENGTH, usable_positions(model) or MAX_LENGTH)  # RoBERTa/MPNet number from padding_idx + 1
    for start in range(0, len(items), batch_size):
        batch = lm.tokenizer(items[start:start + batch_size], padding=True, truncation=True, max_length=longest,
                             return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        f = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)  # the mean pooling sentence-transformers applies
        fd = f.detach().float()
        unit = fd / fd.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        for p in range(probes):
            z = torch.randn(fd.shape, generator=gen)
            v = (z - (z * unit).sum(-1, keepdim=True) * unit) / fd.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            (grad,) = torch.autograd.grad((f * v.to(f.dtype)).sum(), state["leaf"], retain_graph=p + 1 < probes)
            add(grad, batch["attention_mask"])


def _decoder_fisher(lm, texts, state, add, *, probes: int, tokens: int, window: int, gen: torch.Generator) -> None:
    from embfactor.eval.perplexity import token_ids

    ids = token_ids(lm.tokenizer, texts, tokens)
    nwin = max(1, ids.numel() // window)
    batch = ids[: nwin * window].view(nwin, -1) if ids.numel() >= window else ids[None]
    for row in batch:  # one window at a time: its vocabulary-sized logits are the peak
        logits = lm.model(input_ids=row[None]).logits[0]
        logp = torch.log_softmax(logits.float(), dim=-1)
        probs = logp.detach().exp()
        for p in range(probes):
            y = torch.multinomial(probs, 1, generator=gen)  # the model's own continuation: the Fisher of its KL
            (grad,) = torch.autograd.grad(logp.gather(1, y).sum(), state["leaf"], retain_graph=p + 1 < probes)
            add(grad, None)
