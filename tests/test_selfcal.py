"""--calibration self: a decoder's own samples join the calibration text, drawn once per model and cached (issue 33)."""

from __future__ import annotations

import json

import pytest

from embfactor.cli.main import main
from embfactor.errors import ConfigError
from embfactor.models import load_model
from embfactor.plan import calibration_split
from embfactor.plan.selfcal import SelfTextSettings, calibration_texts, self_text
from tests.conftest import _llama
from tests.test_gguf_loader import write_tiny_gguf

SMALL = SelfTextSettings(tokens=64, new_tokens=16, batch=4)


@pytest.fixture
def tiny_decoder(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBFACTOR_CACHE", str(tmp_path / "cache"))
    return write_tiny_gguf(tmp_path / "tiny.gguf", _llama(True), tokenizer=True)


def test_samples_are_drawn_once_then_read_from_the_cache(tiny_decoder, tmp_path):
    lm = load_model(str(tiny_decoder))
    first = self_text(lm, SMALL)
    assert not first["cached"] and first["tokens"] >= SMALL.tokens and len(first["texts"]) >= 4
    again = self_text(lm, SMALL)
    assert again["cached"] and again["texts"] == first["texts"]
    # a new draw with the same seed is the same text (deterministic), another seed another one
    assert self_text(lm, SMALL, cache=False)["texts"] == first["texts"]
    other = SelfTextSettings(tokens=64, new_tokens=16, batch=4, seed=1)
    assert self_text(lm, other, cache=False)["texts"] != first["texts"]
    assert len(list((tmp_path / "cache").glob("selftext-*.json"))) == 1


def test_a_larger_draw_serves_a_smaller_budget_as_its_prefix(tiny_decoder, tmp_path):
    lm = load_model(str(tiny_decoder))
    big = self_text(lm, SelfTextSettings(tokens=160, new_tokens=16, batch=4))
    assert not big["cached"] and big["tokens"] >= 160
    small = self_text(lm, SMALL)
    assert small["cached"] and SMALL.tokens <= small["tokens"] < big["tokens"]
    assert small["texts"] == big["texts"][:len(small["texts"])]
    assert small["texts"] == self_text(lm, SMALL, cache=False)["texts"]  # what a draw of that budget alone gives
    assert small["seconds"] <= big["seconds"]
    # a larger budget than the cache holds draws again, and the new draw replaces the smaller one
    assert not self_text(lm, SelfTextSettings(tokens=200, new_tokens=16, batch=4))["cached"]
    assert len(list((tmp_path / "cache").glob("selftext-*.json"))) == 1


def test_calibration_tokens_need_self_calibration():
    from embfactor.plan.selfcal import check_calibration

    assert check_calibration("self", tokens=2048).tokens == 2048
    assert check_calibration("bundled") is None
    with pytest.raises(ConfigError, match="needs --calibration self"):
        check_calibration("bundled", tokens=2048)
    with pytest.raises(ConfigError, match="tokens must be a positive integer"):
        check_calibration("self", tokens=0)


def test_calibration_texts_mix_the_samples_into_the_given_text(tiny_decoder):
    lm = load_model(str(tiny_decoder))
    base = [f"paragraph {i} of the user's text." for i in range(40)]
    same, rec = calibration_texts(lm, "bundled", base)
    assert same is base and rec == {"calibration": "text"}
    mixed, rec = calibration_texts(lm, "self", base, SMALL)
    drawn = self_text(lm, SMALL)["texts"]
    assert rec["calibration"] == "self" and rec["self_samples"] == len(drawn)
    reach = rec["rows_reached"]
    assert max(reach["given"], reach["self"]) <= reach["both"] <= reach["given"] + reach["self"]
    assert sorted(mixed) == sorted(base + drawn)
    counted, held = calibration_split(mixed)
    assert any(t in drawn for t in held) and any(t in drawn for t in counted)  # the check's text holds samples too
    with pytest.raises(ConfigError, match="must be one of bundled, self"):
        calibration_texts(lm, "own", base)


def test_an_encoder_cannot_sample(tiny_bert_dir):
    with pytest.raises(ConfigError, match="samples text from a decoder"):
        self_text(load_model(str(tiny_bert_dir)), SMALL)


def test_compress_with_self_calibration_records_it(tiny_decoder, tmp_path, monkeypatch):
    import embfactor.plan.selfcal as selfcal

    monkeypatch.setattr(selfcal, "DEFAULT_TOKENS", 64)  # a few samples of the tiny model
    out = tmp_path / "out"
    assert main(["compress", str(tiny_decoder), "--size", "4x", "--calibration", "self", "-o", str(out), "-q",
                 "--json", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["calibration_source"]["calibration"] == "self" and r["calibration_source"]["self_tokens"] >= 64
    assert main(["compress", str(tiny_decoder), "--size", "4x", "--calibration", "self", "--calibration-tokens", "32",
                 "-o", str(tmp_path / "out32"), "-q", "--json", str(tmp_path / "r32.json")]) == 0
    r32 = json.loads((tmp_path / "r32.json").read_text())["calibration_source"]
    assert r32["self_cached"] and 32 <= r32["self_tokens"] <= r["calibration_source"]["self_tokens"]
    assert main(["compress", str(tiny_decoder), "--size", "4x", "--calibration-tokens", "32", "-o",
                 str(tmp_path / "o2")]) == 2
    with pytest.raises(SystemExit) as e:
        main(["compress", str(tiny_decoder), "--size", "4x", "--calibration", "mine", "-o", str(out)])
    assert e.value.code == 2
