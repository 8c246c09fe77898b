"""The byte-budget planner (embfactor.plan): tiers at token-mass cuts, the proxy knapsack, the model check."""

from __future__ import annotations

import pytest
import torch

from embfactor.errors import ConfigError
from embfactor.plan import (
    FormatChoice,
    ModelScorer,
    calibration_split,
    candidate_plans,
    mass_boundaries,
    plan_model,
    search_plans,
    token_order,
)

from .conftest import D, VOCAB

SMALL_FORMATS = [
    FormatChoice("int", {"bits": 8, "group": 32}),
    FormatChoice("int", {"bits": 4, "group": 32}),
    FormatChoice("pq", {"sub_dim": 4, "K": 16}),
    FormatChoice("pq", {"sub_dim": 8, "K": 16}),
]


def zipf_counts(n: int, unseen: int = 0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = (1000.0 / torch.arange(1, n + 1)).floor()
    c = c[torch.randperm(n, generator=g)]
    if unseen:
        c[torch.randperm(n, generator=g)[:unseen]] = 0
    return c


def test_token_order_is_by_count_then_id():
    c = torch.tensor([0.0, 3.0, 7.0, 3.0, 0.0])
    assert token_order(c).tolist() == [2, 1, 3, 0, 4]


def test_mass_boundaries_are_shares_of_the_token_mass():
    c = torch.tensor([60.0, 20.0, 10.0, 10.0, 0.0, 0.0])
    order = token_order(c)
    assert mass_boundaries(c, order, (0.5,)) == [1]
    assert mass_boundaries(c, order, (0.8,)) == [2]
    assert mass_boundaries(c, order, (1.0,)) == [4]  # all seen tokens: the unseen ones can get their own tier
    assert mass_boundaries(torch.zeros(4), torch.arange(4), (0.5, 1.0)) == []


def test_search_fits_budget_and_spends_bytes_on_heavy_rows():
    n, d = 1000, 64
    rich, poor = FormatChoice("int", {"bits": 8, "group": 32}), FormatChoice("int", {"bits": 2, "group": 32})
    errors = {rich: torch.full((n,), 0.01, dtype=torch.float64), poor: torch.ones(n, dtype=torch.float64)}
    counts = zipf_counts(n)
    order = token_order(counts)
    weights = counts + 1
    budget = rich.bytes_for(200, d) + poor.bytes_for(800, d) + 125  # the 2-tier map: 1 bit per token
    plans = search_plans(errors, weights, order, [50, 100, 200, 400], budget, d, max_tiers=2)
    assert plans and all(p.bytes <= budget for p in plans)
    best = plans[0]
    # the rich format goes to the most frequent rows, as many as the budget allows
    assert [t.fmt for t in best.tiers] == [rich, poor]
    assert best.tiers[0].stop == 200
    # proxies are sorted and a single-format plan is among the candidates when it fits
    assert [p.proxy for p in plans] == sorted(p.proxy for p in plans)
    big = search_plans(errors, weights, order, [200], rich.bytes_for(n, d), d)
    assert len(big[0].tiers) == 1 and big[0].tiers[0].fmt == rich


def test_search_spends_the_budget_when_no_boundary_is_near_it():
    # most rows unseen (one mass boundary at 100 of 5,000 rows): the last cut still goes where the budget runs out
    n, d = 5000, 64
    rich, mid, poor = (FormatChoice("int", {"bits": b, "group": 32}) for b in (8, 5, 2))
    errors = {rich: torch.full((n,), 0.01, dtype=torch.float64), mid: torch.full((n,), 0.1, dtype=torch.float64),
              poor: torch.ones(n, dtype=torch.float64)}
    counts = torch.cat([zipf_counts(100), torch.zeros(n - 100)])
    order = token_order(counts)
    budget = rich.bytes_for(100, d) + mid.bytes_for(1234, d) + poor.bytes_for(n - 1334, d) + n // 4  # 2 bits/token
    plans = search_plans(errors, counts + 1, order, [100], budget, d, max_tiers=3)
    best = plans[0]
    assert [t.fmt for t in best.tiers] == [rich, mid, poor]
    assert [t.stop for t in best.tiers] == [100, 1334, n]
    assert best.bytes == budget
    for p in plans:  # every plan fits, and one more row in the richer of its last two tiers would not
        assert p.bytes <= budget
        if len(p.tiers) > 1 and p.tiers[-1].rows > 1:
            a, b = p.tiers[-2], p.tiers[-1]
            more = a.fmt.bytes_for(a.rows + 1, d) + b.fmt.bytes_for(b.rows - 1, d) - a.bytes - b.bytes
            assert p.bytes + more > budget


def test_candidate_plans_raise_when_nothing_fits():
    E = torch.randn(300, 32)
    with pytest.raises(ConfigError, match="no plan fits 100 bytes"):
        candidate_plans(E, zipf_counts(300), 100, formats=SMALL_FORMATS)


def _tiny_lm(model, kind):
    from embfactor.models import LoadedModel

    return LoadedModel("tiny", model, None, kind, None)


class _IdScorer(ModelScorer):
    """Decoder scorer on fixed token ids (the tiny models have no tokenizer)."""

    def __init__(self, lm, ids):
        self.lm, self.weight = lm, lm.model.get_input_embeddings().weight
        self.original = self.weight.detach().clone()
        self.batch = ids
        self.ref = self._logprobs()


@pytest.mark.parametrize("fixture", ["tiny_llama_tied", "tiny_gpt2"])
def test_plan_model_fits_budget_checks_candidates_and_leaves_model_alone(fixture, request):
    model = request.getfixturevalue(fixture)
    lm = _tiny_lm(model, "decoder")
    E0 = model.get_input_embeddings().weight.detach().clone()
    counts = zipf_counts(VOCAB, unseen=20)
    budget = VOCAB * D * 4 / 5
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    plan, module = plan_model(lm, budget, counts, formats=SMALL_FORMATS, scorer=_IdScorer(lm, ids), check=3)
    assert module.num_bytes() <= budget and plan.bytes == module.num_bytes()
    assert torch.equal(model.get_input_embeddings().weight, E0)  # candidates were scored in place, then undone
    scored = [c for c in plan.checked if c.get("score") is not None]
    assert len(scored) >= 2  # the check ran on several plans, and the chosen one scored best among them
    assert plan.score == max(c["score"] for c in scored)
    assert sum(t.rows for t in plan.tiers) == VOCAB
    assert sum(t.bytes for t in plan.tiers) <= plan.bytes
    # the module holds the planned table: close to the original, exact where the plan chose int8
    rows = module(torch.arange(VOCAB))
    assert rows.shape == E0.shape
    assert ((rows - E0).norm() / E0.norm()) < 0.5


def test_plan_model_encoder(tiny_bert):
    lm = _tiny_lm(tiny_bert, "encoder")
    counts = zipf_counts(VOCAB, unseen=30)

    class _Enc(ModelScorer):
        def __init__(self, lm):
            self.lm, self.weight = lm, lm.model.get_input_embeddings().weight
            self.original = self.weight.detach().clone()
            self.ids = torch.randint(1, VOCAB, (4, 12), generator=torch.Generator().manual_seed(2))
            self.ref = self._pooled()

        @torch.inference_mode()
        def _pooled(self, lm=None):
            out = (lm or self.lm).model(input_ids=self.ids).last_hidden_state
            return torch.nn.functional.normalize(out.mean(1), dim=-1)

    budget = VOCAB * D * 4 / 6
    plan, module = plan_model(lm, budget, counts, formats=SMALL_FORMATS, scorer=_Enc(lm), check=2)
    assert module.num_bytes() <= budget
    assert module.padding_idx == tiny_bert.get_input_embeddings().padding_idx
    d = plan.to_dict()
    assert d["bytes"] <= budget and d["tiers"] and all("label" in t and "token_mass" in t for t in d["tiers"])


def test_compress_size_without_method_plans_saves_loads_and_inspect_shows_it(tiny_bert_dir, tmp_path, capsys):
    import json

    from embfactor.cli.main import main
    from embfactor.models import load_model

    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(["the cat sat on the mat", "a good movie", "the dog is very bad", "a film"] * 5))
    out, rep = tmp_path / "planned", tmp_path / "rep.json"
    args = ["compress", str(tiny_bert_dir), "--size", "5x", "--text", str(text), "-o", str(out), "--json", str(rep)]
    assert main([*args, "-q"]) == 0
    printed = capsys.readouterr().out
    assert "plan (tiers by token frequency)" in printed and "checked on the model" in printed
    r = json.loads(rep.read_text())
    fp32 = r["vocab_size"] * r["hidden_size"] * 4
    assert r["method"] == "auto" and r["embedding_bytes_after"] <= fp32 / 5
    assert r["plan"]["bytes"] == r["embedding_bytes_after"]
    assert sum(t["rows"] for t in r["plan"]["tiers"]) == r["vocab_size"]
    assert sum(c.get("score") is not None for c in r["plan"]["checked"]) >= 1
    # the folder is a model: it loads without planning again and gives the saved table back
    original = load_model(str(tiny_bert_dir))
    lm = load_model(str(out))
    assert lm.record["report"]["plan"]["tiers"] == r["plan"]["tiers"]
    ids = torch.arange(r["vocab_size"])
    with torch.no_grad():
        reloaded = lm.model.get_input_embeddings()(ids)
        E = original.model.get_input_embeddings()(ids)
    # the loaded table is the planned one (not rows of other tokens): same error as the report states
    assert float((reloaded - E).norm() / E.norm()) == pytest.approx(r["relative_error"], rel=1e-4, abs=1e-6)
    assert lm.model.get_input_embeddings().num_bytes() == r["embedding_bytes_after"]
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "planned:" in shown and "plan (tiers by token frequency)" in shown


def test_auto_needs_a_size_and_refuses_quantize(tiny_bert_dir, tmp_path, capsys):
    from embfactor.cli.main import main

    assert main(["compress", str(tiny_bert_dir), "--ratio", "4", "--method", "auto", "-o", str(tmp_path / "a")]) == 2
    assert "give size" in capsys.readouterr().err
    assert main(["compress", str(tiny_bert_dir), "--size", "4x", "--quantize", "int8", "-o", str(tmp_path / "b")]) == 2
    assert "--quantize does not apply to the planner" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()



def test_sweep_sizes_with_auto_and_the_int_reference(tiny_bert_dir, tmp_path):
    import numpy as np

    from embfactor.cli.sweep_cmd import render, run_sweep

    texts = ["the cat sat on the mat", "a dog is a good dog", "the film is very bad", "a very good movie", "bad film"]
    h = np.random.default_rng(0).random((5, 5))
    opts = {"texts": texts, "human": (h + h.T) / 2, "fidelity_texts": ["a cat", "the dog sat"]}
    # 40x is beyond both methods on this tiny table: those points are reported as not reachable, the rest stand
    r = run_sweep(str(tiny_bert_dir), json_path=str(tmp_path / "s.json"), sizes="4x,6x,40x", methods="auto,int",
                  progress=False, task_options=opts)
    assert {(p["method"], p["size"]) for p in r["skipped"]} == {("auto", "40x"), ("int", "40x")}
    assert all("fits" in p["reason"] for p in r["skipped"])
    assert "not reachable: int at 40x" in render(r)
    fp32 = 120 * 32 * 4
    pts = {(p["method"], p["size"]): p for p in r["points"]}
    assert set(pts) == {("auto", "4x"), ("auto", "6x"), ("int", "4x"), ("int", "6x")}
    for (method, size), p in pts.items():
        assert p["embedding_bytes"] <= fp32 / float(size[:-1]) and "fidelity" in p
    assert pts[("auto", "4x")]["plan"]["tiers"] and pts[("int", "4x")]["plan"] is None
    assert "auto" in render(r)


def test_plans_are_checked_on_text_held_apart_from_the_counts(monkeypatch):
    """The check must see text the token counts never saw (a plan that starves the counts' unseen tokens looked
    best when both came from one text); each calibration text is in exactly one of the two parts."""
    import embfactor.plan as plan_mod

    texts = [f"article {i} " + ("common words " * 3) + f"rare{i}" for i in range(20)]
    count, check = calibration_split(texts)
    assert set(count).isdisjoint(check) and sorted(count + check) == sorted(texts)
    assert len(check) == 4 and check[0] == texts[0]
    # few texts: split by lines; one line: both parts (nothing to hold apart)
    count, check = calibration_split(["a\nb\nc\nd\ne\nf", "g"])
    assert set(count).isdisjoint(check) and sorted(count + check) == list("abcdefg")
    assert calibration_split(["only line"]) == (["only line"], ["only line"])

    # plan_compress_ counts tokens on the first part and gives the scorer the held-apart one
    seen = {}

    class Stop(Exception):
        pass

    def fake_scorer(lm, texts):
        seen["check"] = list(texts)
        return None

    def fake_counts(tok, texts, vocab_size):
        seen["count"] = list(texts)
        raise Stop

    monkeypatch.setattr("embfactor.plan.apply.ModelScorer", fake_scorer)
    monkeypatch.setattr("embfactor.data.frequency.token_counts", fake_counts)
    emb = torch.nn.Embedding(VOCAB, D)
    lm = type("LM", (), {"model": type("M", (), {"get_input_embeddings": lambda self: emb})(), "tokenizer": None})()
    from embfactor.config import FactorizationConfig

    with pytest.raises(Stop):
        plan_mod.plan_compress_(lm, FactorizationConfig(size="8x"), texts=texts)
    assert seen["check"] and set(seen["check"]).isdisjoint(seen["count"])
    assert sorted(seen["check"] + seen["count"]) == sorted(texts)


def test_table_relative_error_by_blocks_equals_the_whole_table():
    """apply_plan_ reports ||E - table|| / ||E|| read in row blocks (memory); it equals the one-pass figure."""
    from embfactor.decomposition.intk import int_quantize
    from embfactor.formats.base import from_factors
    from embfactor.plan import table_relative_error

    torch.manual_seed(0)
    E = torch.randn(103, 32)
    module = from_factors(int_quantize(E, bits=3, group=16))
    whole = float((module.dense().double() - E.double()).norm() / E.double().norm())
    assert whole > 0.01
    assert abs(table_relative_error(module, E, block=10) - whole) < 1e-12
    assert abs(table_relative_error(module, E) - whole) < 1e-12


def test_row_sample_keeps_the_head_whole_and_the_weight_totals():
    from embfactor.plan.search import RowSample

    counts = zipf_counts(10_000)
    order = token_order(counts)
    assert RowSample.of(order, rows=10_000) is None  # small tables are measured on every row
    s = RowSample.of(order, rows=2_000)
    pos = s.positions
    assert pos[:1000].tolist() == list(range(1000)) and int(pos.numel()) <= 2_000
    assert s.stride == 9 and pos[1000:].tolist() == list(range(1000, 10_000, 9))
    w = counts.double() + 1
    assert float(s.weights(w).sum()) == pytest.approx(float(w.sum()), rel=0.02)


def test_row_sample_spread_follows_each_rows_energy():
    """Errors proportional to a row's energy (with a ratio that drifts along the order) are spread exactly enough."""
    from embfactor.plan.search import RowSample

    g = torch.Generator().manual_seed(0)
    n = 20_000
    order = torch.randperm(n, generator=g)
    energy = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    ratio = torch.empty(n, dtype=torch.float64)
    ratio[order] = torch.linspace(0.1, 0.2, n, dtype=torch.float64)  # fits get worse down the order
    truth = ratio * energy
    s = RowSample.of(order, rows=4_000)
    est = s.spread(truth[s.ids], energy)
    assert torch.equal(est[s.ids], truth[s.ids])
    assert torch.allclose(est, truth, rtol=0.02)
    assert not torch.allclose(est, energy * float(truth.sum() / energy.sum()), rtol=0.02)  # the drift is followed


def test_large_tables_are_planned_on_a_row_sample(monkeypatch):
    """Past PROXY_ROWS the proxy trains and measures on a sample: plans agree with the full measurement and the
    checked tables read every row (codebook rows outside the sample are encoded when read)."""
    from embfactor.plan import assemble, search

    g = torch.Generator().manual_seed(0)
    n, d = 6_000, 32
    E = torch.randn(n, d, generator=g) * (torch.rand(n, 1, generator=g) + 0.5)
    counts = zipf_counts(n)
    budget = n * d * 4 / 12
    full, full_fits = candidate_plans(E, counts, budget, formats=SMALL_FORMATS)
    monkeypatch.setattr(search, "PROXY_ROWS", 2_000)
    sampled, fits = candidate_plans(E, counts, budget, formats=SMALL_FORMATS)
    assert sampled[0].proxy == pytest.approx(full[0].proxy, rel=0.15)
    assert {p.label for p in sampled[:3]} & {p.label for p in full[:3]}
    pq = next(f for f in fits if f.method == "pq")
    assert isinstance(fits[pq], search.EncodedOnDemand)
    order = token_order(counts)
    rel = float((assemble(E, sampled[0], order, fits) - E).norm() / E.norm())
    rel_full = float((assemble(E, full[0], order, full_fits) - E).norm() / E.norm())
    assert 0 < rel < rel_full * 1.1
    # rows a checked plan read are encoded once and kept: reading them again encodes nothing
    seen = int(fits[pq].known.sum())
    assert 0 < seen < n
    calls = []
    monkeypatch.setattr("embfactor.decomposition.codebook.hessian_encode", lambda *a, **k: calls.append(1))
    monkeypatch.setattr("embfactor.decomposition.codebook._encode", lambda *a, **k: calls.append(1))
    again = fits[pq].take(fits[pq].known.nonzero()[:, 0])
    assert not calls and again.shape == (seen, d)
