"""The byte-budget planner: frequency tiers of an embedding table, each stored in its own format (``--method auto``).

Tokens are ordered by how often the model's tokenizer produces them on calibration text (most frequent first);
a plan cuts that order into up to ``max_tiers`` tiers at cumulative shares of the token *mass* (never at fixed row
counts, so the same defaults serve 30k and 250k vocabularies), except the last cut, which goes where the byte budget
runs out (so a plan spends its budget even when most rows are unseen in the calibration text: unseen rows follow in
id order, which BPE and SentencePiece vocabularies roughly sort by frequency), and gives each tier a storage
format: dense int-k for the frequent rows, codebooks (PQ/RVQ) for the rest. Choosing a plan takes two steps, because the first one alone
misleads (starving tokens unseen in the calibration text cost real fidelity in the probes of issue 14):

1. **Proxy** (cheap): every candidate format is fitted once to the whole table; each row's squared error is kept.
   For token weights ``(count + 1)^alpha`` at a few alphas, a knapsack over (boundaries × formats) finds the plans
   of least weighted error whose bytes fit the budget (prefix sums make each plan O(tiers)).
2. **Check** (seconds each): the few best distinct plans are written into the model itself and scored on
   calibration text against the original: the mean cosine of pooled sentence embeddings (encoders) or minus the
   KL divergence of next-token distributions (decoders). The best-scoring plan is built (codebooks refitted on
   their tier's rows) into a ``tiered`` format.

Everything here is a pure function of tensors except :func:`plan_model` (the one entry the pipeline calls), which
reads a model, writes candidate tables into its embedding to score them and puts the original back.

The package follows those steps: :mod:`~embfactor.plan.search` (formats, tiers, the proxy knapsack, building a plan),
:mod:`~embfactor.plan.calibration` (the text the counts and the check read), :mod:`~embfactor.plan.model` (the check
on the model and :func:`plan_model`), :mod:`~embfactor.plan.apply` (what ``compress --size`` runs). The public names
are importable from ``embfactor.plan``; private helpers from their module.
"""

from __future__ import annotations

from embfactor.plan.apply import (
    AUTO,
    PlanReport,
    formats_from_options,
    apply_plan_,
    describe_checks,
    plan_compress_,
    table_relative_error,
    wants_plan,
)
from embfactor.plan.calibration import (
    CHECK_EVERY, calibration_passages, calibration_reach, calibration_split, spread,
)
from embfactor.plan.model import ModelScorer, plan_model, plan_table
from embfactor.plan.search import (
    ALPHAS,
    CHECK_PLANS,
    MASS_CUTS,
    MAX_TIERS,
    PROXY_KMEANS,
    FormatChoice,
    Plan,
    Tier,
    assemble,
    build_plan,
    candidate_plans,
    default_formats,
    fit_rows,
    mass_boundaries,
    row_errors,
    search_plans,
    tier_map_bytes,
    token_order,
    weights_for,
)
from embfactor.surgery.card import describe_plan  # the card shows the same rows

__all__ = [
    "ALPHAS", "AUTO", "CHECK_EVERY", "CHECK_PLANS", "MASS_CUTS", "MAX_TIERS", "PROXY_KMEANS", "FormatChoice",
    "ModelScorer", "Plan", "PlanReport", "Tier", "apply_plan_", "assemble", "build_plan", "calibration_passages",
    "calibration_reach", "calibration_split", "candidate_plans", "default_formats", "describe_checks", "describe_plan",
    "fit_rows", "formats_from_options", "mass_boundaries", "plan_compress_", "plan_model", "plan_table", "row_errors",
    "search_plans", "spread", "table_relative_error", "tier_map_bytes", "token_order", "wants_plan", "weights_for",
]
