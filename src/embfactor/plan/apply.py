"""The apply step: what ``compress --size`` runs (:func:`plan_compress_`): install a plan into the model and record
it; rows that describe a recorded plan."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from embfactor.config import INPUT_RIDGE
from embfactor.errors import ConfigError
from embfactor.plan.calibration import calibration_reach, calibration_split, spread
from embfactor.plan.model import ModelScorer, plan_model
from embfactor.plan.search import CHECK_PLANS, FormatChoice, Plan, default_formats


def describe_checks(record: dict[str, Any]) -> list[list[Any]]:
    """Rows (plan, alpha, bytes, proxy error, score) of the candidates a recorded plan's check scored."""
    return [[c["label"], c["alpha"], f"{c['bytes']:,}", f"{c['proxy_error']:.4g}",
             "-" if c.get("score") is None else f"{c['score']:.5f}"] for c in record.get("checked", []) if "label" in c]



# --- the entry compress calls ---------------------------------------------------------------------------------------
AUTO = "auto"


def wants_plan(config) -> bool:
    """True when a FactorizationConfig asks the planner: ``method="auto"``, or no method with a byte ``size``."""
    return config.method == AUTO or (config.method is None and getattr(config, "size", None) is not None)


@torch.no_grad()
def table_relative_error(module, E: torch.Tensor, block: int = 16384) -> float:
    """||E - table|| / ||E|| of a RowFormat ``module`` against ``E``, read ``block`` rows at a time.

    One pass over a whole table in float64 held four vocab × d float64 copies: 3 GB for multilingual-e5-small's
    250,037 × 384 table, which made ``compress --size`` peak at 5.1 GB; by blocks the extra memory is ~50 MB.

    Example:
        >>> f = get_format("intk").from_factors(decompose(E, method="int", bits=8))    # doctest: +SKIP
        >>> table_relative_error(f, E) < 0.01                                          # doctest: +SKIP
        True
    """
    num = den = 0.0
    for s in range(0, E.shape[0], block):
        e = E[s:s + block].double()
        rows = module.gather(torch.arange(s, s + e.shape[0], device=E.device)).double()
        num += float(((rows - e) ** 2).sum())
        den += float((e**2).sum())
    return (num / max(den, 1e-60)) ** 0.5


def apply_plan_(model, module, plan: Plan, config, *, seconds: float = 0.0) -> dict[str, Any]:
    """Put a planned table into ``model`` (a tied head shares it) and record the plan; returns the report dict.

    The record is what :func:`embfactor.surgery.save_compressed` writes to embfactor.json: ``report["plan"]``
    holds the tiers, their formats, rows, token mass and bytes, and the candidates the check scored.
    """
    from embfactor.surgery.factorize import FactorizationReport, count_params, find_embedding_and_head, install_format_

    site = find_embedding_and_head(model)
    params_before = count_params(model)
    E = site.embedding.weight.detach()
    err = table_relative_error(module, E)
    module.to(E.device)
    vocab, d = int(E.shape[0]), int(E.shape[1])
    fp32_numel, dense_bytes = E.numel(), E.numel() * E.element_size()
    # --- the model is mutated only below this line ---
    meta = install_format_(model, module, tie_head=config.factorize_head, method=AUTO, rank=d)
    nbytes = int(module.num_bytes())
    report = FactorizationReport(
        model=type(model).__name__, method=AUTO, rank=d, vocab_size=vocab, hidden_size=d,
        embedding_params_before=fp32_numel, embedding_params_after=module.num_params,
        model_params_before=params_before, model_params_after=count_params(model),
        ratio=fp32_numel / max(1, module.num_params), relative_error=err, optimal_relative_error=0.0,
        tied_head=meta.tied_head, seconds=seconds, embedding_module=meta.embedding_module,
        head_module=meta.head_module,
    ).to_dict()
    report.update(embedding_bytes_before=dense_bytes, embedding_bytes_after=nbytes, bytes_ratio=fp32_numel * 4 / nbytes,
                  format=module.format_name, format_config=module.format_config(), plan=plan.to_dict())
    meta.factorization = config.to_dict()
    meta.report = report
    return report


class PlanReport(dict):
    """The planner's report as the pipeline expects a FactorizationReport: ``to_dict()`` and ``seconds``."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self)

    @property
    def seconds(self) -> float:
        return float(self.get("seconds", 0.0))


def plan_compress_(lm, config, *, texts: Sequence[str] | None = None, check: int = CHECK_PLANS,
                   progress: Callable[[str], None] | None = None, scorer: ModelScorer | None = None) -> dict[str, Any]:
    """Plan, build and install the table of ``lm`` for ``config.size`` (what ``compress --size`` runs).

    Args:
        lm: the LoadedModel (changed in place: its embedding, and a tied head, become the planned table).
        config: a FactorizationConfig with a byte ``size`` ("16x" or "2.5MB").
        texts: calibration text (default: the bundled Wikipedia extract's training part): tokens are counted on
            four fifths of it, plans are checked on the fifth held apart (:func:`calibration_split`).
        check: plans scored on the model.
        scorer: a ModelScorer already made on the held-apart fifth of ``texts`` (the verifier's: its reference
            outputs are then held once, 512 MB at a 262,144-token vocabulary); default: one made here.

    Returns:
        The report dict (as :func:`apply_plan_`).

    Example:
        >>> lm = load_model("minilm")                                              # doctest: +SKIP
        >>> plan_compress_(lm, FactorizationConfig(size="16x"))["bytes_ratio"]      # doctest: +SKIP
        16.1
    """
    from embfactor.data.frequency import token_counts
    from embfactor.decomposition import budget_bytes

    if getattr(config, "size", None) is None:
        raise ConfigError("the planner (method 'auto') needs a byte target: size='16x' or size='2.5MB' (--size)")
    t0 = time.perf_counter()
    emb = lm.model.get_input_embeddings()
    vocab, d = emb.weight.shape
    budget = budget_bytes(config.size, vocab, d)
    if texts is None:
        from embfactor.data import wiki_split

        texts = wiki_split("train")
    count_texts, check_texts = calibration_split(texts)
    if check <= 0:
        scorer = None
    elif scorer is None:
        scorer = ModelScorer(lm, texts=check_texts)
    stages = {"check_reference": time.perf_counter() - t0}
    t = time.perf_counter()
    counts = token_counts(lm.tokenizer, count_texts, vocab_size=vocab)
    reach = calibration_reach(counts)
    stages["counting"] = time.perf_counter() - t
    t = time.perf_counter()
    metric, metric_name, predicted = _table_metric(lm, config.method_options, count_texts, progress)
    stages["metric"] = time.perf_counter() - t
    if predicted is not None:
        counts = with_predicted(counts, predicted)
    plan, module = plan_model(lm, budget, counts, check=check, seed=config.seed, progress=progress, scorer=scorer,
                              formats=formats_from_options(config.method_options, d),
                              hessian=metric)
    stages.update(plan.seconds)
    config = dataclasses.replace(config, method=AUTO)
    t = time.perf_counter()
    report = apply_plan_(lm.model, module, plan, config, seconds=time.perf_counter() - t0)
    stages["error"] = time.perf_counter() - t
    report.update(path="full", check="model" if check > 0 else "proxy", metric=metric_name,
                  counts="tokens" if predicted is None else "tokens+predicted", calibration=reach,
                  stage_seconds={k: round(v, 2) for k, v in stages.items()})
    return PlanReport(report)


def with_predicted(counts: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """A tied row's weight: the mean of its count as an input and its predicted count as an output (both scaled to
    the counted text's total), the two ways its errors reach a tied decoder's KL.

    Example:
        >>> with_predicted(torch.tensor([3., 1., 0.]), torch.tensor([1., 1., 2.])).tolist()
        [2.0, 1.0, 1.0]
    """
    p = predicted[: counts.numel()].to(counts.dtype)
    return (counts + p * (counts.sum() / p.sum().clamp_min(1e-30))) / 2


def _table_metric(lm, options: dict[str, Any], texts: Sequence[str], progress: Callable[[str], None] | None
                  ) -> tuple[torch.Tensor | None, str, torch.Tensor | None]:
    # (the d x d metric the planner rounds, encodes, trains codebooks and ranks plans in, its name, a tied head's
    # predicted counts or None). "input": the Fisher of the input embedding vectors (eval.head.input_fisher; MiniLM
    # 16x tiers: fidelity 0.9882 -> 0.9904, frontier_notes.md); "head": a tied head's H (SmolLM2 int4 g32 alone: KL
    # 0.150 -> 0.070, frontier-probes.md); "auto": the input metric, plus the head's for a tied decoder. Method
    # option metric=..., or head_metric=false; predicted_counts=true weighs rows by with_predicted.
    from embfactor.eval.head import head_statistics, input_fisher, tied_head

    opts = options or {}
    kind = opts.get("metric", "auto")
    if kind == "auto":
        kind = "input+head" if tied_head(lm) is not None and opts.get("head_metric", True) else "input"
    if kind in ("head", "input+head") and tied_head(lm) is None:
        raise ConfigError(f"metric={kind!r} needs a decoder whose head is tied to its input table; "
                          f"{type(lm.model).__name__} has none (use 'input' or 'plain')")
    M = predicted = None
    if "input" in kind:
        if progress:
            progress("measuring the input embedding's Fisher (its metric)")
        F = input_fisher(lm, list(texts))
        # F from a few thousand positions of one domain, blended toward plain squared error of the same trace: MiniLM
        # (fixed 16x / 32x tiers) 0.9904 / 0.9430 with F alone, 0.9905 / 0.9488 with this (frontier_notes.md)
        ridge = opts.get("ridge", INPUT_RIDGE)
        M = F + ridge * float(F.diagonal().sum()) / F.shape[0] * torch.eye(F.shape[0], dtype=F.dtype)
    if "head" in kind:
        if progress:
            progress("measuring the tied head's inputs (its metric)")
        # predicted counts are opt-in (method option predicted_counts=true): SmolLM2 8x perplexity +2.0% -> +1.55%,
        # but KL 0.0203 -> 0.0208 and top-1 0.946 -> 0.938 on held-out text, and the check preferred plain counts
        H, predicted = head_statistics(lm, spread(list(texts), 64), predicted=opts.get("predicted_counts", False))
        M = H if M is None else M + H
    return M, kind, predicted


def formats_from_options(options: dict[str, Any], d: int) -> list[FormatChoice] | None:
    # method_options of "auto": {"formats": ["int8 g32", "pq sub4 K256", ...]} restricts the candidates (labels)
    wanted = options.get("formats") if options else None
    if not wanted:
        return None
    known = {f.label: f for f in default_formats(d)}
    bad = [w for w in wanted if w not in known]
    if bad:
        raise ConfigError(f"unknown planner format(s) {bad}; valid: {', '.join(known)}")
    return [known[w] for w in wanted]
