"""Work the planner does once and reuses (issue 30): each int-k row rounded once across proxy, check and build; int
fits restricted to the rows a plan can give them; PQ rows encoded once, in the metric. Every reuse is checked
against the plain refit it replaces."""

from __future__ import annotations

import pytest
import torch

from embfactor.decomposition.codebook import encode_in_metric, pq, quantize_table
from embfactor.decomposition.intk import hessian_round
from embfactor.plan import FormatChoice, build_plan, candidate_plans, search, token_order
from embfactor.plan.model import plan_table

from .test_plan import SMALL_FORMATS, zipf_counts

INT4 = FormatChoice("int", {"bits": 4, "group": 32})


def _table(n: int = 3000, d: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(n, d, generator=g) * (torch.rand(n, 1, generator=g) + 0.5)
    A = torch.randn(d, d, generator=g)
    return E, (A @ A.T / d).double()  # a metric: symmetric positive definite


@pytest.mark.parametrize("metric", [False, True])
def test_rowwise_fit_rounds_each_row_once_and_as_a_whole_table_fit(metric):
    E, H = _table()
    H = H if metric else None
    fit = search.RowwiseFit(E, INT4, H)
    whole = search.fit_rows(E, INT4, None, hessian=H)
    g = torch.Generator().manual_seed(1)
    a = torch.randperm(E.shape[0], generator=g)[:700]
    b = torch.cat([a[:300], torch.randperm(E.shape[0], generator=g)[:500]])  # overlaps what was read
    for ids in (a, b, a):
        got = fit.factors(ids)
        assert torch.equal(got.packed, whole.packed[ids]) and torch.equal(got.scale, whole.scale[ids])
        assert torch.equal(fit.take(ids), whole.rows(0, E.shape[0])[ids])
    assert fit.kept == int(torch.cat([a, b]).unique().numel())  # each row rounded once
    assert got.meta == whole.meta and (got.bits, got.group) == (4, 32)
    assert torch.equal(fit.rows(10, 20), whole.rows(10, 20))


def test_rowwise_fit_rounds_nothing_for_rows_it_holds(monkeypatch):
    E, H = _table()
    fit = search.RowwiseFit(E, INT4, H)
    fit.take(torch.arange(0, 500))
    calls = []
    monkeypatch.setattr("embfactor.decomposition.intk.hessian_round", lambda *a, **k: calls.append(1))
    fit.take(torch.arange(100, 400))
    assert not calls


@pytest.mark.parametrize("metric", [False, True])
def test_build_from_the_proxy_fits_equals_a_refit(metric):
    E, H = _table()
    H = H if metric else None
    counts = zipf_counts(E.shape[0])
    plans, fits = candidate_plans(E, counts, E.numel() * 4 / 6, formats=SMALL_FORMATS, hessian=H)
    plan = next(p for p in plans if any(t.fmt.method == "int" for t in p.tiers))
    order = token_order(counts)
    reused = build_plan(E, plan, order, counts, hessian=H, fits=fits)
    refit = build_plan(E, plan, order, counts, hessian=H)
    ids = torch.arange(E.shape[0])
    assert torch.equal(reused.gather(ids), refit.gather(ids))
    assert reused.num_bytes() == refit.num_bytes()
    assert reused.format_config() == refit.format_config()
    for a, b in zip(reused.tiers, refit.tiers):
        assert a.state_dict().keys() == b.state_dict().keys()
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_plan_table_rounds_each_int_row_once(monkeypatch):
    """Proxy, check and build read the same rows of int tiers: each (row, format) is rounded once."""
    E, H = _table()
    counts = zipf_counts(E.shape[0])
    rounded: dict[tuple, int] = {}
    real = hessian_round

    def counting(X, M, **kw):
        key = (kw["bits"], kw["group"])
        rounded[key] = rounded.get(key, 0) + X.shape[0]
        return real(X, M, **kw)

    monkeypatch.setattr("embfactor.decomposition.intk.hessian_round", counting)

    class Scorer:  # scores a candidate by its error in the metric (no model needed)
        def score(self, table):
            diff = (table - E).double()
            return -float(((diff @ H) * diff).sum())

        def restore(self):
            pass

    plan, _, _ = plan_table(E, E.numel() * 4 / 6, counts, formats=SMALL_FORMATS, hessian=H, scorer=Scorer())
    assert rounded and all(rows <= E.shape[0] for rows in rounded.values())
    assert len(plan.checked) > 2  # several plans were checked, and the build read the chosen one's rows again


def test_int_fits_only_on_reachable_rows_choose_the_same_plans(monkeypatch):
    E, H = _table(4000, 64)
    counts = zipf_counts(E.shape[0], unseen=500)
    formats = [FormatChoice("int", {"bits": b, "group": 32}) for b in (8, 6, 4)] + SMALL_FORMATS[2:]
    for ratio in (5, 8, 11):
        budget = E.numel() * 4 / ratio
        reach = {f: search.reachable_rows(f, formats, E.shape[0], E.shape[1], budget) for f in formats}
        assert reach[formats[0]] < E.shape[0]  # int8 cannot hold every row at these sizes
        got, _ = candidate_plans(E, counts, budget, formats=formats, hessian=H)
        monkeypatch.setattr(search, "reachable_rows", lambda f, fs, n, d, b: n)
        full, _ = candidate_plans(E, counts, budget, formats=formats, hessian=H)
        monkeypatch.undo()
        assert [p.label for p in got] == [p.label for p in full]
        # float32 GEMMs over fewer rows block differently (and the row blocks run on threads): equal to float noise
        assert [p.proxy for p in got] == pytest.approx([p.proxy for p in full], rel=1e-6)
        for p in full:  # every plan's int tiers end within the rows their format was fitted on
            assert all(t.stop <= reach[t.fmt] for t in p.tiers)


def test_reachable_rows_bounds_every_plan_in_budget():
    fmts = [FormatChoice("int", {"bits": b, "group": 32}) for b in (8, 5, 3)]
    n, d = 1000, 64
    budget = n * d * 4 / 8
    r8 = search.reachable_rows(fmts[0], fmts, n, d, budget)
    below = fmts[2].bytes_for(1, d)
    assert fmts[0].bytes_for(r8, d) + below * (n - r8) <= budget < fmts[0].bytes_for(r8 + 1, d) + below * (n - r8 - 1)
    assert search.reachable_rows(fmts[2], fmts, n, d, budget) == n  # int3 alone fits: every row
    pq = FormatChoice("pq", {"sub_dim": 4, "K": 16})
    assert search.reachable_rows(pq, fmts + [pq], n, d, budget) == n  # codebooks are not bounded


def test_pq_in_a_metric_encodes_once_with_the_codes_of_the_two_step_reference():
    E, H = _table(2000, 24)
    w = torch.rand(E.shape[0]) + 0.1
    got = pq(E, sub_dim=3, K=16, codebook_dtype="int8", hessian=H, token_weights=w, seed=3)
    ref = quantize_table(E, sub_dim=3, K=16, codebook_dtype="int8", metric=H, token_weights=w, seed=3)
    ref = encode_in_metric(E, ref, H, token_weights=w)
    assert torch.equal(got.codes, ref.codes) and torch.equal(got.codebooks, ref.codebooks)
    assert torch.equal(got.codebook_scale, ref.codebook_scale)
    assert got.meta == ref.meta


def test_pq_in_a_metric_skips_the_plain_encoding(monkeypatch):
    E, H = _table(2000, 24)
    calls = []
    monkeypatch.setattr("embfactor.decomposition.codebook._encode", lambda *a, **k: calls.append(1))
    pq(E, sub_dim=3, K=16, hessian=H)
    assert not calls


def test_inverse_cholesky_is_factored_once_per_live_metric(monkeypatch):
    from embfactor.decomposition import _common

    _, H = _table(10, 16)
    first = _common.inverse_cholesky(H, 18)
    calls = []
    real = torch.linalg.cholesky
    monkeypatch.setattr(torch.linalg, "cholesky", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = _common.inverse_cholesky(H, 18)
    assert not calls and torch.equal(first, again)
    again.zero_()  # a caller's copy: the kept factor is not changed
    assert torch.equal(_common.inverse_cholesky(H, 18), first) and not calls
    H.mul_(2.0)  # changed in place: factored anew
    assert not torch.equal(_common.inverse_cholesky(H, 18), first) and calls
    key = (id(H), 18, _common.HESSIAN_DAMP)
    assert key in _common._FACTORS
    del H
    import gc

    gc.collect()
    assert key not in _common._FACTORS  # dropped with its metric
