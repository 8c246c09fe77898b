"""The input side's metric: the Fisher of the input embedding vectors (eval.head.input_fisher) and its use by the
planner (codebooks trained, rows rounded and encoded, plans ranked in it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from embfactor.eval.head import input_fisher
from embfactor.models import LoadedModel
from tests.test_head_metric import CharTokenizer

TEXT = "the cat sat on the mat and the dog sat on the log. a good film is a very good movie. " * 6


def _lm(model, kind: str) -> LoadedModel:
    return LoadedModel("tiny", model, CharTokenizer(model.get_input_embeddings().weight.shape[0]), kind, Path("."))


def _bert_lm(folder: Path) -> LoadedModel:
    from embfactor.models import load_model

    return load_model(str(folder))


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_gpt2", "tiny_llama_tied", "tiny_llama_untied"])
def test_input_fisher_is_psd_of_the_table_width_and_leaves_the_model_alone(fixture, request):
    value = request.getfixturevalue(fixture)
    lm = _bert_lm(value) if fixture == "tiny_bert_dir" else _lm(value, "decoder")
    before = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    texts = [TEXT] * 4 if lm.kind == "encoder" else TEXT
    F = input_fisher(lm, texts, probes=2, tokens=96, window=32, passages=8)
    d = lm.model.get_input_embeddings().weight.shape[1]
    assert F.shape == (d, d) and F.dtype == torch.float64
    torch.testing.assert_close(F, F.T)
    eig = torch.linalg.eigvalsh(F)
    assert eig.min() > -1e-9 * eig.max() and eig.max() > 0
    # estimated through autograd.grad at the embedding's output: no weight changed, no gradient left behind
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in lm.model.parameters())
    torch.testing.assert_close(input_fisher(lm, texts, probes=2, tokens=96, window=32, passages=8), F)


def test_encoder_fisher_knows_the_embedding_layernorm(tiny_bert_dir):
    """BERT's embedding LayerNorm removes each vector's mean: an error along the all-ones direction costs nothing."""
    lm = _bert_lm(tiny_bert_dir)
    F = input_fisher(lm, [TEXT] * 4, probes=2, passages=8)
    one = torch.ones(F.shape[0], dtype=torch.float64) / F.shape[0] ** 0.5
    assert float(one @ F @ one) < 1e-6 * float(F.diagonal().mean())


def test_fisher_is_for_the_tables_rows_when_the_module_scales_them(tiny_llama_untied):
    """A module that scales its output (Gemma's √d): F is per row of the stored table. Half the table and twice the
    output is the same model, so its F is four times as large (an error in a row reaches the output doubled)."""
    lm = _lm(tiny_llama_untied, "decoder")
    F = input_fisher(lm, TEXT, probes=2, tokens=96, window=32)
    emb = tiny_llama_untied.get_input_embeddings()
    with torch.no_grad():
        emb.weight.mul_(0.5)
    handle = emb.register_forward_hook(lambda _m, _i, out: out * 2)
    try:
        F2 = input_fisher(lm, TEXT, probes=2, tokens=96, window=32)
    finally:
        handle.remove()
        with torch.no_grad():
            emb.weight.mul_(2)
    torch.testing.assert_close(F2, 4 * F, rtol=1e-3, atol=1e-9)


def test_metric_moves_error_into_directions_it_ignores():
    """Under a metric that zeroes half the directions, int rounding, PQ (trained and encoded in it) and the planner's
    row errors put the error there: the metric error drops against the plain fit at the same bytes."""
    from embfactor.plan import FormatChoice, fit_rows, row_errors

    d = 32
    g = torch.Generator().manual_seed(3)
    E = torch.randn(600, d, generator=g)
    A = torch.randn(d // 2, d, generator=g).double()  # the output sees half the directions (random ones)
    M = A.T @ A / d
    null = torch.eye(d, dtype=torch.float64) - A.T @ torch.linalg.solve(A @ A.T, A)  # projector on what it ignores
    for fmt in (FormatChoice("int", {"bits": 3, "group": 16}), FormatChoice("pq", {"sub_dim": 3, "K": 16})):
        plain, metric = fit_rows(E, fmt, None), fit_rows(E, fmt, None, hessian=M)
        assert plain.num_bytes == metric.num_bytes
        seen = [float(row_errors(E, f, metric=M).sum()) for f in (plain, metric)]
        assert seen[1] < 0.7 * seen[0], (fmt.label, seen)
        hidden = [float((((E - f.rows(0, 600)).double() @ null) ** 2).sum()) for f in (plain, metric)]
        assert hidden[1] > hidden[0]  # the error went where the metric does not look


def test_compress_reports_its_metric_and_option_plain_turns_it_off(tiny_bert_dir, tmp_path, capsys):
    import json

    from embfactor.cli.main import main
    from embfactor.plan.apply import _table_metric

    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(["the cat sat on the mat", "a good movie", "the dog is very bad", "a film"] * 5))
    out, rep = tmp_path / "m", tmp_path / "m.json"
    assert main(["compress", str(tiny_bert_dir), "--size", "5x", "--text", str(text), "-o", str(out), "--json",
                 str(rep), "-q"]) == 0
    report = json.loads(rep.read_text())
    assert report["metric"] == "input" and report["counts"] == "tokens"
    # a few words reach a small share of the rows: the report and the printed summary say so, and what to do
    reach = report["calibration"]
    assert reach["rows_reached"] < 0.25 * reach["rows"] and "--text" in reach["note"]
    assert f"note: {reach['note']}" in capsys.readouterr().out
    lm = _bert_lm(tiny_bert_dir)
    assert _table_metric(lm, {"metric": "plain"}, ["a cat sat"], None) == (None, "plain", None)
    M, name, predicted = _table_metric(lm, {}, ["the cat sat on the mat. a good movie."], None)
    assert name == "input" and M.shape == (32, 32) and predicted is None
    # ridge: the blend toward plain squared error of the same trace (F + ridge·tr(F)/d·I)
    F = _table_metric(lm, {"ridge": 0.0}, ["the cat sat on the mat. a good movie."], None)[0]
    F1 = _table_metric(lm, {"ridge": 1.0}, ["the cat sat on the mat. a good movie."], None)[0]
    torch.testing.assert_close(F1 - F, float(F.diagonal().mean()) * torch.eye(32, dtype=F.dtype))
    bad = ["compress", str(tiny_bert_dir), "--size", "5x", "-o", str(tmp_path / "bad"), "--method-option"]
    assert main([*bad, "metric=fisher", "-q"]) == 2
    assert main([*bad, "ridge=-1", "-q"]) == 2 and main([*bad, "ridge=true", "-q"]) == 2
    assert main([*bad, "metric=head", "-q"]) == 2  # an encoder has no tied head
    assert not (tmp_path / "bad").exists()
