"""Method options that fix the stored size (int bits=, pq sub_dim=/M=, rvq stages=, tt tt_rank=) need no size target.

A target given with them is a byte budget they must fit (the options win; a budget too small is an error naming
both); energy/max_error with them are refused; without either, the error says what to add, before the model loads.
"""

from __future__ import annotations

import json

import pytest
import torch

import embfactor as ef
from embfactor.cli.main import main
from embfactor.config import FactorizationConfig
from embfactor.decomposition import decompose, explicit_size, get_method
from embfactor.decomposition.codebook import codebook_bytes
from embfactor.errors import ConfigError
from embfactor.quant import grouped_bytes

from .conftest import D, VOCAB


def compress(model, out, *args):
    return main(["compress", str(model), *args, "-o", str(out), "-q"])


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if a model is loaded: the checks under test must come first."""

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr("embfactor.models.load_model", boom)


# ------------------------------------------------------------------------------------------- no target needed
def test_int_bits_without_target_compresses_to_grouped_bytes(tiny_bert_dir, tmp_path, capsys):
    out, rep = tmp_path / "int4", tmp_path / "r.json"
    argv = ["--method", "int", "--method-option", "bits=4", "--method-option", "group=32", "--json", str(rep)]
    assert compress(tiny_bert_dir, out, *argv) == 0
    text = capsys.readouterr().out
    r = json.loads(rep.read_text())
    want = grouped_bytes(VOCAB, D, 4, 32)
    assert r["format"] == "intk" and r["format_config"]["bits"] == 4 and r["format_config"]["group"] == 32
    assert r["embedding_bytes_after"] == want
    assert r["bytes_ratio"] == pytest.approx(VOCAB * D * 4 / want)
    assert f"({r['bytes_ratio']:.2f}x)" in text and "intk bits=4, group=32" in text
    assert r["bytes_after"] > 0 and r["rank"] >= 1
    # the saved record (no target in its config) loads back, with the same int-k table
    model = ef.load_compressed(out)
    assert model.get_input_embeddings().num_bytes() == want
    rec = json.loads((out / "embfactor.json").read_text())
    assert rec["factorization"]["ratio"] is None and rec["factorization"]["method_options"] == {"bits": 4, "group": 32}


def test_pq_sub_dim_and_k_without_target(tiny_bert_dir, tmp_path):
    rep = tmp_path / "r.json"
    argv = ["--method", "pq", "--method-option", "sub_dim=4", "--method-option", "K=16", "--json", str(rep)]
    assert compress(tiny_bert_dir, tmp_path / "pq", *argv) == 0
    r = json.loads(rep.read_text())
    assert r["format"] == "codebook" and r["format_config"]["K"] == 16
    assert r["embedding_bytes_after"] == codebook_bytes(VOCAB, D, sub_dim=4, K=16)


def test_python_api_without_target(tiny_bert_dir, tiny_llama_tied, tmp_path):
    from embfactor.pipeline import compress as compress_api

    rep = compress_api(tiny_bert_dir, method="int", method_options={"bits": 3, "group": 16}, output=tmp_path / "o",
                       progress=False)
    assert rep.factorization.embedding_bytes_after == grouped_bytes(VOCAB, D, 3, 16)
    r = ef.factorize_(tiny_llama_tied, method="rvq", stages=2, sub_dim=8, K=8)
    assert r.tied_head and r.embedding_bytes_after == codebook_bytes(VOCAB, D, sub_dim=8, K=8, stages=2)
    f = decompose(torch.randn(VOCAB, D), method="int", bits=8, group=None)
    assert f.num_bytes == grouped_bytes(VOCAB, D, 8, None)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("int", {"bits": 4}),
        ("int", {"bits": 3, "group": None, "symmetric": False}),
        ("int", {"bits": 6, "group": 16}),
        ("pq", {"sub_dim": 5, "K": 16}),  # 5 does not divide 32: the padded last sub-space is counted
        ("pq", {"M": 4, "K": 300}),  # K above the 120 rows is lowered to 120
        ("pq", {"sub_dim": 8, "K": 8, "rotation": "random", "row_scale": True, "codebook_dtype": "float32"}),
        ("pq", {"sub_dim": 4, "K": 16, "rotation": "random", "codebook_dtype": "int8"}),  # + column scales
        ("rvq", {"stages": 3, "K": 8}),
        ("rvq", {"sub_dim": 4, "K": 8}),
        ("tt", {"tt_rank": 3}),
    ],
)
def test_predicted_bytes_are_what_the_method_stores(method, options):
    E = torch.randn(VOCAB, D, generator=torch.Generator().manual_seed(0))
    f = decompose(E, method=method, **options)
    stored = f.num_params * 4 if method == "tt" else f.num_bytes  # tt: fp32 bytes of its cores
    assert explicit_size(method, (VOCAB, D), options) == stored


# ------------------------------------------------------------------------------------------- still refused
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "svd"], "no size target: give one of --size"),
        ([], "the default method has no options that fix the size"),
        (["--method", "int", "--method-option", "group=32"], "--method-option bits="),
        (["--method", "pq", "--method-option", "K=256"], "--method-option sub_dim= or --method-option M="),
    ],
)
def test_no_target_and_no_fixing_options_is_refused_before_loading(tiny_bert_dir, tmp_path, capsys, no_load, argv,
                                                                   message):
    assert compress(tiny_bert_dir, tmp_path / "o", *argv) == 2
    err = capsys.readouterr().err
    assert message in err and "--ratio" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_svd_without_target_names_the_methods_that_need_none(tiny_bert_dir, tmp_path, capsys, no_load):
    assert compress(tiny_bert_dir, tmp_path / "o", "--method", "svd") == 2
    err = capsys.readouterr().err
    assert "method 'svd' has no options that fix the size" in err and "int: --method-option bits=" in err


# ------------------------------------------------------------------------------------------- with a target
def test_target_that_allows_the_options_bytes_is_accepted(tiny_bert_dir, tmp_path):
    """The old workaround (`--ratio 2` with explicit bits) still runs, to the same bytes: the options win."""
    rep = tmp_path / "r.json"
    argv = ["--method", "int", "--method-option", "bits=4", "--ratio", "7", "--json", str(rep)]  # int4 g32 is 7.11x
    assert compress(tiny_bert_dir, tmp_path / "o", *argv) == 0
    assert json.loads(rep.read_text())["embedding_bytes_after"] == grouped_bytes(VOCAB, D, 4, 32)


@pytest.mark.parametrize(
    ("target", "named"),
    [(["--ratio", "16"], "ratio=16"), (["--size", "8x"], "size=8x"), (["--rank", "1"], "rank=1")],
)
def test_target_too_small_for_the_options_is_an_error_naming_both(tiny_bert_dir, tmp_path, capsys, target, named):
    argv = ["--method", "int", "--method-option", "bits=4", "--method-option", "group=32", *target]
    assert compress(tiny_bert_dir, tmp_path / "o", *argv) == 2
    err = capsys.readouterr().err
    assert "method 'int' with bits=4, group=32 stores 2,160 bytes" in err and "7.11x" in err
    assert f"more than {named} allows" in err
    assert not (tmp_path / "o").exists()


def test_energy_with_fixing_options_is_refused_before_loading(tiny_bert_dir, tmp_path, capsys, no_load):
    argv = ["--method", "pq", "--method-option", "sub_dim=4", "--energy", "0.9"]
    assert compress(tiny_bert_dir, tmp_path / "o", *argv) == 2
    assert "energy=0.9 picks a rank from the spectrum, but method 'pq' with sub_dim=4" in capsys.readouterr().err


def test_library_entry_points_agree_on_conflicts(tiny_bert):
    E = torch.randn(VOCAB, D)
    with pytest.raises(ConfigError, match=r"more than ratio=16 allows"):
        decompose(E, ratio=16, method="pq", sub_dim=2, K=16)
    with pytest.raises(ConfigError, match=r"max_error=0.5 picks a rank"):
        decompose(E, max_error=0.5, method="int", bits=2)
    # a config with both is still valid (folders saved with one by earlier versions load), compressing with it is not
    cfg = FactorizationConfig(method="int", max_error=0.5, method_options={"bits": 2})
    with pytest.raises(ConfigError, match=r"max_error=0.5 picks a rank"):
        ef.factorize_(tiny_bert, cfg)
    before = tiny_bert.get_input_embeddings()
    with pytest.raises(ConfigError, match=r"more than size=1kB allows"):
        ef.factorize_(tiny_bert, FactorizationConfig(method="tt", size="1kB", method_options={"tt_rank": 4}))
    assert tiny_bert.get_input_embeddings() is before  # refused before the model was touched
    with pytest.raises(ConfigError, match=r"give exactly one of rank=.*\(got none\); method 'svd' has no options"):
        FactorizationConfig(method="svd")
    with pytest.raises(ConfigError, match=r"give exactly one of rank=.*\(got none\)"):
        decompose(E, method="svd")


def test_every_size_option_is_a_real_option():
    for name in ("int", "pq", "rvq", "tt"):
        info = get_method(name)
        assert info.size_options and set(info.size_options) <= set(info.options)
