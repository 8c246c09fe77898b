"""The check on the model: :class:`ModelScorer` scores candidate tables in place; :func:`plan_model` chooses a plan
and builds it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from embfactor.errors import ConfigError
from embfactor.plan.calibration import _train_text, calibration_passages, spread
from embfactor.plan.search import (
    ALPHAS,
    CHECK_PLANS,
    MASS_CUTS,
    MAX_TIERS,
    FormatChoice,
    Plan,
    assemble,
    build_plan,
    candidate_plans,
    token_order,
)


class ModelScorer:
    """Scores candidate tables on a model against its original table: higher is better.

    Encoders: mean cosine of pooled sentence embeddings to the original's on calibration passages.
    Decoders: minus the mean KL(original ‖ candidate) of next-token distributions on calibration windows.
    The candidate is written into the model's input embedding (tied heads read it too); :meth:`restore` puts the
    original back.
    """

    def __init__(self, lm, *, texts: Sequence[str] | None = None, tokens: int = 512, window: int = 256,
                 passages: int = 48, original: torch.Tensor | None = None) -> None:
        self.lm = lm
        self.weight = lm.model.get_input_embeddings().weight
        # the table to put back: a copy the caller already holds (the planner's), else a new one
        self.original = self.weight.detach().clone() if original is None else original
        if lm.kind == "decoder":
            from embfactor.eval.perplexity import token_ids

            text = spread(list(texts), 16) if texts is not None else _train_text()
            ids = token_ids(lm.tokenizer, text, tokens)
            nwin = max(1, ids.numel() // window)
            self.batch = ids[: nwin * window].view(nwin, -1) if ids.numel() >= window else ids[None]
            self.ref = self._logprobs()
        else:
            self.texts = calibration_passages(passages, articles=texts)
            self.ref = self._pooled()

    @torch.inference_mode()
    def _logprobs(self) -> torch.Tensor:
        return torch.log_softmax(self.lm.model(input_ids=self.batch).logits.float(), -1)

    def _pooled(self) -> torch.Tensor:
        from embfactor.eval.embed import pooled_embeddings

        return pooled_embeddings(self.lm, self.texts, batch_size=16)

    @torch.inference_mode()
    def score(self, table: torch.Tensor) -> float:
        self.weight.copy_(table.to(self.weight.dtype))
        if self.lm.kind == "decoder":
            lp = self._logprobs()
            return -float((self.ref.exp() * (self.ref - lp)).sum(-1).mean())
        return float((self._pooled() * self.ref).sum(-1).mean())

    @torch.inference_mode()
    def restore(self) -> None:
        self.weight.copy_(self.original)


def plan_model(
    lm,
    budget_bytes: float,
    counts: torch.Tensor,
    *,
    check: int = CHECK_PLANS,
    formats: Sequence[FormatChoice] | None = None,
    alphas: Sequence[float] = ALPHAS,
    cuts: Sequence[float] = MASS_CUTS,
    max_tiers: int = MAX_TIERS,
    seed: int = 0,
    scorer: ModelScorer | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Plan, Any]:
    """Choose and build the storage of ``lm``'s embedding within ``budget_bytes``: (plan, RowFormat module).

    The model is left as it was (candidate tables are scored in place and the original is put back); the caller
    puts the returned module into the model.

    Args:
        lm: a LoadedModel (encoder or decoder; a tied head is scored through the shared table).
        budget_bytes: the most bytes the stored table may take.
        counts: token counts on calibration text (:func:`embfactor.data.frequency.token_counts`).
        check: how many of the proxy's plans are scored on the model (0: trust the proxy).
        formats, alphas, cuts, max_tiers: the search space (defaults :func:`default_formats`, ALPHAS, MASS_CUTS).
        scorer: a :class:`ModelScorer` (default: one on the bundled Wikipedia's training part).

    Example:
        >>> plan, module = plan_model(load_model("minilm"), 46_881_792 / 16, counts)     # doctest: +SKIP
        >>> plan.bytes <= 46_881_792 / 16                                                # doctest: +SKIP
        True
    """
    E = lm.model.get_input_embeddings().weight.detach().float().clone()
    t0 = time.perf_counter()
    plans, fits = candidate_plans(E, counts, budget_bytes, formats=formats, alphas=alphas, cuts=cuts,
                                  max_tiers=max_tiers, seed=seed, progress=progress)
    if not plans:
        raise ConfigError(f"no tier plan fits {budget_bytes:,.0f} bytes; ask for a smaller ratio")
    order = token_order(counts)
    best = plans[0]
    if check > 0 and len(plans) > 1:
        scorer = scorer or ModelScorer(lm, original=E)  # E is a copy: one table copy for both
        try:
            for p in plans[:check]:
                if progress:
                    progress(f"checking {p.label}")
                p.score = scorer.score(assemble(E, p, order, fits))
        finally:
            scorer.restore()
        best = max((p for p in plans[:check]), key=lambda p: p.score)
    best.checked = [{"label": p.label, "alpha": p.alpha, "bytes": p.bytes, "proxy_error": p.proxy,
                     "score": p.score} for p in plans[:max(check, 1)]]
    if progress:
        progress(f"building {best.label}")
    padding_idx = lm.model.get_input_embeddings().padding_idx
    module = build_plan(E, best, order, counts, padding_idx=padding_idx, seed=seed)
    best.bytes = int(module.num_bytes())
    for t, child in zip(best.tiers, getattr(module, "tiers", [module])):
        t.bytes = int(child.num_bytes())
    best.checked.append({"seconds": time.perf_counter() - t0})
    return best, module
