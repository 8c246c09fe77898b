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


KL_POSITIONS = 32  # positions whose KL terms are computed at once by the decoder check


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
        # the table to put back: candidates replace the weight's data (a tied head shares the parameter) and the
        # original tensor is put back, so no copy of the table is needed (``original``: one the caller holds)
        self.original = self.weight.data if original is None else original
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

    # One window at a time: at a 262,144-token vocabulary each vocabulary-sized tensor of the whole batch (logits,
    # log-probabilities, the KL's terms) is 537 MB, and scoring the batch at once held five of them.
    @torch.inference_mode()
    def _logprobs(self) -> torch.Tensor:
        from embfactor.eval.perplexity import teacher_logprobs

        return torch.cat([teacher_logprobs(self.lm.model(input_ids=w[None]).logits) for w in self.batch])

    def _pooled(self, lm=None) -> torch.Tensor:
        from embfactor.eval.embed import pooled_embeddings

        return pooled_embeddings(lm or self.lm, self.texts, batch_size=16)

    @torch.inference_mode()
    def score(self, table: torch.Tensor) -> float:
        self.weight.data = table.to(self.weight.dtype)
        return self.score_of(self.lm)

    @torch.inference_mode()
    def score_of(self, lm) -> float:
        """``lm`` scored as the candidates are, against the original's outputs (e.g. the written model: its own
        table, nothing swapped)."""
        if self.lm.kind != "decoder":
            return float((self._pooled(lm) * self.ref).sum(-1).mean())
        from embfactor.eval.perplexity import token_kl

        kl = 0.0
        for i, w in enumerate(self.batch):
            logits = lm.model(input_ids=w[None]).logits[0]
            # KL a few positions at a time: its log-softmax and terms for the whole window were four more
            # vocabulary-sized tensors (1 GB at a 262,144-token vocabulary and 256 positions)
            kl += sum(float(token_kl(logits[a:a + KL_POSITIONS], self.ref[i, a:a + KL_POSITIONS]).sum())
                      for a in range(0, logits.shape[0], KL_POSITIONS))
        return -kl / self.batch.numel()

    @torch.inference_mode()
    def restore(self) -> None:
        self.weight.data = self.original


def plan_model(lm, budget_bytes: float, counts: torch.Tensor, *, check: int = CHECK_PLANS,
               scorer: ModelScorer | None = None, **search: Any) -> tuple[Plan, Any]:
    """Choose and build the storage of ``lm``'s embedding within ``budget_bytes``: (plan, RowFormat module).

    The model is left as it was (candidate tables are scored in place and the original is put back); the caller
    puts the returned module into the model.

    Args:
        lm: a LoadedModel (encoder or decoder; a tied head is scored through the shared table).
        budget_bytes: the most bytes the stored table may take.
        counts: token counts on calibration text (:func:`embfactor.data.frequency.token_counts`).
        check: how many of the proxy's plans are scored on the model (0: trust the proxy).
        scorer: a :class:`ModelScorer` (default: one on the bundled Wikipedia's training part).
        search: :func:`plan_table`'s options (formats, alphas, cuts, max_tiers, seed, progress, hessian).
        hessian: the second moment of a tied head's inputs (:func:`embfactor.eval.head.head_second_moment`):
            int-k tiers round and PQ tiers encode in the head's metric, and the proxy measures errors in it.

    Example:
        >>> plan, module = plan_model(load_model("minilm"), 46_881_792 / 16, counts)     # doctest: +SKIP
        >>> plan.bytes <= 46_881_792 / 16                                                # doctest: +SKIP
        True
    """
    emb = lm.model.get_input_embeddings()
    E = emb.weight.detach().float()  # the model's own table when it is float32: the check never writes into it
    if scorer is None and check > 0:
        scorer = ModelScorer(lm)
    plan, module, _ = plan_table(E, budget_bytes, counts, check=check, scorer=scorer, padding_idx=emb.padding_idx,
                                 **search)
    return plan, module


def plan_table(
    E: torch.Tensor,
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
    padding_idx: int | None = None,
    progress: Callable[[str], None] | None = None,
    hessian: torch.Tensor | None = None,
) -> tuple[Plan, Any, dict[str, float]]:
    """Choose and build the storage of table ``E``: (plan, RowFormat module, seconds per stage).

    ``check``, ``formats``, ``alphas``, ``cuts``, ``max_tiers``: as :func:`candidate_plans` (the search space);
    ``scorer`` scores the first ``check`` plans on a model. Without a ``scorer`` (or with ``check=0``) the proxy's
    best plan is built: what the table-only path does, which
    has no model to score plans on. ``E`` is read, never written; it may be in any float dtype (bf16 rows are
    converted a block at a time).

    Example:
        >>> plan, module, seconds = plan_table(torch.randn(3000, 64), 3000 * 64 * 4 / 8, torch.rand(3000))  # doctest: +SKIP
        >>> sorted(seconds)                                                                                  # doctest: +SKIP
        ['build', 'check', 'fits']
    """
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    plans, fits = candidate_plans(E, counts, budget_bytes, formats=formats, alphas=alphas, cuts=cuts,
                                  max_tiers=max_tiers, seed=seed, progress=progress, hessian=hessian)
    if not plans:
        raise ConfigError(f"no tier plan fits {budget_bytes:,.0f} bytes; ask for a smaller ratio")
    seconds["fits"] = time.perf_counter() - t0
    t = time.perf_counter()
    order = token_order(counts)
    best = plans[0]
    checking = check > 0 and len(plans) > 1 and scorer is not None
    _keep_fits(fits, plans[:check] if checking else [best])  # what the check reads and the build may reuse
    if checking:
        try:
            for p in plans[:check]:
                if progress:
                    progress(f"checking {p.label}")
                scorer.restore()  # the last candidate is let go before the next is built: one table at a time
                p.score = scorer.score(assemble(E, p, order, fits))
        finally:
            scorer.restore()
        best = max((p for p in plans[:check]), key=lambda p: p.score)
    _keep_fits(fits, [best])
    seconds["check"] = time.perf_counter() - t
    best.checked = [{"label": p.label, "alpha": p.alpha, "bytes": p.bytes, "proxy_error": p.proxy,
                     "score": p.score} for p in plans[:max(check, 1)]]
    if progress:
        progress(f"building {best.label}")
    t = time.perf_counter()
    module = build_plan(E, best, order, counts, padding_idx=padding_idx, seed=seed, hessian=hessian, fits=fits)
    del fits
    best.bytes = int(module.num_bytes())
    for tier, child in zip(best.tiers, getattr(module, "tiers", [module])):
        tier.bytes = int(child.num_bytes())
    seconds["build"] = time.perf_counter() - t
    best.checked.append({"seconds": time.perf_counter() - t0})
    best.seconds = seconds
    return best, module, seconds


def _keep_fits(fits: dict[FormatChoice, Any], plans: Sequence[Plan]) -> None:
    # drop the proxy's fits of formats none of ``plans`` uses: what they hold (codes, kept roundings) is let go
    used = {t.fmt for p in plans for t in p.tiers}
    for f in [f for f in fits if f not in used]:
        del fits[f]
