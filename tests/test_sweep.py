"""Sweeps: valid JSON + PNG on a tiny model, reference points, clear errors and nothing written on failure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from embfactor.errors import ConfigError, InvalidInputError, UnknownMethodError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEXTS = ["the cat sat on the mat", "a dog is a good dog", "the film is very bad", "a very good movie", "bad film"]


def _human() -> np.ndarray:
    rng = np.random.default_rng(0)
    h = rng.random((5, 5))
    return (h + h.T) / 2


@pytest.fixture
def opts():
    return {"texts": TEXTS, "human": _human(), "fidelity_texts": ["a cat", "the dog sat"]}


def test_sweep_writes_json_and_png(tiny_bert_dir: Path, tmp_path: Path, opts):
    from embfactor.cli.sweep_cmd import render, run_sweep

    plot, out = tmp_path / "sweep.png", tmp_path / "sweep.json"
    r = run_sweep(str(tiny_bert_dir), plot=str(plot), json_path=str(out), ratios="2,4", methods="svd",
                  quantize="none,int8", progress=False, task_options=opts)
    assert plot.read_bytes()[:8] == PNG_MAGIC
    data = json.loads(out.read_text())
    assert data["task"] == "similarity" and data["metric"] == "spearman"
    assert [p["label"] for p in data["reference"]] == ["original (fp32)", "dense int8", "dense int4"]
    assert data["reference"][0]["fidelity"] == 1.0
    assert data["reference"][0]["embedding_bytes"] == 120 * 32 * 4
    assert data["reference"][1]["embedding_bytes"] == 120 * 32 + 120 * 4
    pts = {(p["ratio"], p["quantize"]): p for p in data["points"]}
    assert set(pts) == {(2.0, "none"), (4.0, "none"), (2.0, "int8"), (4.0, "int8")}
    p2, p2q = pts[(2.0, "none")], pts[(2.0, "int8")]
    assert p2["embedding_bytes"] == p2["embedding_params"] * 4
    assert p2q["embedding_bytes"] == (120 + p2q["rank"]) * 4 + 120 * p2q["rank"] + p2q["rank"] * 32  # ints + scales
    assert pts[(4.0, "none")]["embedding_bytes"] < p2["embedding_bytes"]
    for p in data["points"]:
        assert -1 <= p["spearman"] <= 1 and 0 < p["fidelity"] <= 1 and p["rank"] >= 1
    assert "original (fp32)" in render(r) and "svd+int8" in render(r)


def test_sweep_identical_quality_for_rank_close_to_full(tiny_bert, tiny_bert_dir, opts):
    """A nearly lossless ratio keeps fidelity ~1; a higher ratio loses more."""
    from embfactor.pipeline.sweep import sweep

    r = sweep(str(tiny_bert_dir), ratios=[1.01, 8], methods=["svd"], progress=False, task_options=opts)
    near, far = sorted(r["points"], key=lambda p: p["ratio"])
    assert near["fidelity"] > far["fidelity"]
    assert near["relative_error"] < far["relative_error"]


def test_unknown_method_fails_before_writing(tiny_bert_dir, tmp_path, opts):
    from embfactor.cli.sweep_cmd import run_sweep

    plot, out = tmp_path / "s.png", tmp_path / "s.json"
    with pytest.raises(UnknownMethodError, match=r"unknown decomposition method 'nope'.*--skip-missing"):
        run_sweep(str(tiny_bert_dir), plot=str(plot), json_path=str(out), ratios="2", methods="svd,nope",
                  progress=False, task_options=opts)
    assert not plot.exists() and not out.exists()
    assert list(tmp_path.iterdir()) == [tiny_bert_dir]


def test_skip_missing_warns_and_continues(tiny_bert_dir, opts):
    from embfactor.pipeline.sweep import sweep

    with pytest.warns(UserWarning, match="skipping unknown decomposition method 'nope'"):
        r = sweep(str(tiny_bert_dir), ratios="4", methods="nope,svd", skip_missing=True, progress=False,
                  task_options=opts)
    assert [p["method"] for p in r["points"]] == ["svd"]


def test_bad_settings_fail_and_write_nothing(tiny_bert_dir, tmp_path, opts):
    from embfactor.cli.sweep_cmd import run_sweep

    out = tmp_path / "s.json"
    cases = [
        (ConfigError, "every ratio must be a finite number > 1", {"ratios": "2,0.5"}),
        (ConfigError, "ratios must be a comma-separated list of floats", {"ratios": "2,x"}),
        (ConfigError, "unknown quantize mode 'int3'", {"quantize": "none,int3"}),
        (ConfigError, "heal_minutes must be >= 0", {"heal_minutes": -1}),
        (InvalidInputError, "'perplexity' applies to decoders", {"task": "perplexity", "task_options": {}}),
        (ConfigError, "unknown option.*max_tokens for task 'similarity'", {"task_options": {**opts, "max_tokens": 5}}),
    ]
    for exc, msg, kw in cases:
        kwargs = {"ratios": "2", "methods": "svd", "progress": False, "task_options": opts, **kw}
        with pytest.raises(exc, match=msg):
            run_sweep(str(tiny_bert_dir), json_path=str(out), **kwargs)
    with pytest.raises(InvalidInputError, match="ending in .png"):
        run_sweep(str(tiny_bert_dir), plot=str(tmp_path / "s.jpg"), ratios="2", methods="svd", progress=False)
    assert not out.exists()


def test_sweep_perplexity_on_a_decoder(tiny_llama_tied, tiny_bert_dir):
    from transformers import BertTokenizerFast

    from embfactor.pipeline.sweep import plot_sweep, sweep
    from embfactor.models import LoadedModel

    tok = BertTokenizerFast(vocab=str(tiny_bert_dir / "vocab.txt"))
    lm = LoadedModel("tiny-llama", tiny_llama_tied, tok, "decoder", tiny_bert_dir)
    text = " ".join(TEXTS * 4)
    r = sweep(lm, ratios="2,4", methods="svd", quantize="none,int4", progress=False,
              task_options={"text": text, "window": 16, "stride": 16, "max_tokens": 48})
    assert r["task"] == "perplexity" and r["lower_is_better"]
    orig = r["reference"][0]
    assert orig["kl"] == 0.0 and orig["top1_agreement"] == 1.0
    for p in r["points"]:
        assert p["kl"] >= 0 and p["reference_perplexity"] == pytest.approx(orig["perplexity"], rel=1e-5)
    assert plot_sweep(r)[:8] == PNG_MAGIC
    # the loaded model was not touched: still a plain nn.Embedding, shared with the head
    assert type(lm.model.get_input_embeddings()).__name__ == "Embedding"
    assert lm.model.lm_head.weight is lm.model.get_input_embeddings().weight


def test_cli_sweep(tiny_bert_dir, tmp_path, capsys):
    from embfactor.cli.main import main

    out = tmp_path / "s.json"
    # an unknown method fails during validation, before the model is loaded or anything is evaluated
    assert main(["sweep", str(tiny_bert_dir), "--methods", "nope", "--json", str(out)]) == 2
    assert "unknown decomposition method 'nope'" in capsys.readouterr().err
    assert not out.exists()


def test_fake_quantized_factors_match_real_quantized_storage(tiny_bert_dir):
    """The fallback (fake-quantizing U and V) gives the same effective table as quantize_'s int storage."""
    import torch

    from embfactor import factorize_
    from embfactor.eval.reconstruction import effective_table
    from embfactor.pipeline.sweep import clone_model, fake_quantize_module_
    from embfactor.models import load_model

    from embfactor import surgery

    lm = load_model(str(tiny_bert_dir))
    factorize_(lm.model, rank=6, method="svd")
    real, fake = clone_model(lm), clone_model(lm)
    info = surgery.quantize_(real.model, 8)
    nbytes = fake_quantize_module_(fake.model.get_input_embeddings(), 8)
    assert nbytes == info["embedding_bytes"]
    torch.testing.assert_close(effective_table(real.model), effective_table(fake.model), rtol=1e-6, atol=1e-6)


def test_sweep_with_healing(tiny_bert_dir, opts, monkeypatch):
    """--heal-minutes calls embfactor.train.heal.heal(student, teacher, minutes=...) on each factorized copy."""
    import importlib

    heal_mod = importlib.import_module("embfactor.train.heal")  # the module (embfactor.train.heal is also a function)
    from embfactor.pipeline.sweep import sweep
    from embfactor.layers import FactorizedEmbedding

    calls = []

    def fake_heal(student, teacher, *, minutes=None, progress=True, **kw):  # the real one trains for minutes
        calls.append((type(student.model.get_input_embeddings()), type(teacher.model.get_input_embeddings()), minutes, kw))
        return {"steps": 7, "seconds": 1.0, "history": [1, 2, 3], "best_eval": {"loss": 0.5}}

    monkeypatch.setattr(heal_mod, "heal", fake_heal)
    r = sweep(str(tiny_bert_dir), ratios="2,4", methods="svd", heal_minutes=0.5, progress=False, task_options=opts,
              heal_options={"lr": 1e-3})
    assert [c[:3] for c in calls] == [(FactorizedEmbedding, torch.nn.Embedding, 0.5)] * 2 and calls[0][3] == {"lr": 1e-3}
    assert [p["label"] for p in r["points"]] == ["svd+heal0.5m"] * 2
    assert r["points"][0]["heal"] == {"steps": 7, "seconds": 1.0, "best_eval": {"loss": 0.5}}  # history left out


def test_external_references_are_reference_rows(tiny_bert_dir, opts):
    """gguf's Q8_0/Q4_0 enter a sweep as reference points, computed by the gguf package, at their stored bytes."""
    from embfactor.pipeline.sweep import sweep

    r = sweep(str(tiny_bert_dir), ratios="4", methods="svd,gguf-q8_0,gguf-q4_0", progress=False, task_options=opts)
    ext = {p["label"]: p for p in r["reference"] if p.get("kind") == "external"}
    assert set(ext) == {"gguf-q8_0", "gguf-q4_0"}
    # blocks of 32 values: 34 bytes (Q8_0) and 18 bytes (Q4_0) per block; a 32-wide row is one block
    assert ext["gguf-q8_0"]["embedding_bytes"] == 120 * 34 and ext["gguf-q4_0"]["embedding_bytes"] == 120 * 18
    assert ext["gguf-q8_0"]["fidelity"] > ext["gguf-q4_0"]["fidelity"] and ext["gguf-q8_0"]["fidelity"] > 0.999
    assert [p["method"] for p in r["points"]] == ["svd"] and "gguf-q4_0" in r["settings"]["methods"]


def test_external_reference_errors(tiny_bert_dir, opts):
    import torch

    from embfactor.pipeline.references import check_external, external_table
    from embfactor.pipeline.sweep import sweep

    with pytest.raises(ConfigError, match="rows of 40 values are not a multiple of 32"):
        external_table("gguf-q4_0", torch.randn(4, 40))
    with pytest.raises(ConfigError, match="valid: gguf-q8_0"):
        check_external("gguf-q3_k")
    with pytest.raises(UnknownMethodError, match="gguf-q3_k"):
        sweep(str(tiny_bert_dir), ratios="4", methods="gguf-q3_k", progress=False, task_options=opts)
