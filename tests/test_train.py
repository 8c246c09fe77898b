"""From-scratch training (embfactor.train.scratch, `embfactor train`): tiny configs on synthetic token streams."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from embfactor.cli.main import main
from embfactor.errors import ConfigError, InvalidInputError, UnknownMethodError
from embfactor.train import scratch
from embfactor.train.scratch import CausalLM, TrainConfig, parse_variant, plot_curves, train_variants

VOCAB = 64


def _streams(n_train: int = 4000, n_held: int = 600) -> tuple[np.ndarray, np.ndarray]:
    # A fixed random "sentence" of 40 tokens repeated: next-token prediction is learnable in a few dozen steps,
    # so the loss must fall from ~ln(64) towards 0.
    rng = np.random.default_rng(0)
    sentence = rng.integers(0, VOCAB, 40)
    stream = np.tile(sentence, (n_train + n_held) // 40 + 1)
    return stream[:n_train], stream[n_train : n_train + n_held]


def _cfg(**kw) -> TrainConfig:
    base = dict(
        variants=("dense",), steps=20, d_model=32, layers=1, heads=2, seq_len=16, batch_size=8,
        eval_tokens=256, eval_every=10, lr=1e-2,
    )
    base.update(kw)
    return TrainConfig(**base)


def _run(cfg: TrainConfig, **kw) -> dict:
    tr, he = _streams()
    return train_variants(cfg, train_ids=tr, heldout_ids=he, vocab_size=VOCAB, progress=False, **kw)


def test_loss_goes_down_for_dense_and_factorized():
    res = _run(_cfg(variants=("dense", "fact-d4")))
    for v in res["variants"]:
        assert v["skipped"] is None
        # starts at or above uniform (the tied head gives the current token a high logit at init)
        assert math.log(VOCAB) - 0.5 < v["first_train_loss"] < math.log(VOCAB) + 3
        assert v["final_val_loss"] < v["first_train_loss"] - 1.5, v["name"]
        ppl = [p["val_ppl"] for p in v["curve"]]
        assert [p["step"] for p in v["curve"]] == [10, 20]
        assert ppl[-1] < ppl[0]
        assert v["final_val_ppl"] == pytest.approx(math.exp(v["final_val_loss"]))
        assert v["tokens_per_s"] > 0 and v["train_time_s"] > 0


def test_same_seed_same_data_is_deterministic():
    a = _run(_cfg(steps=6, eval_every=3, variants=("fact-d8",)))["variants"][0]
    b = _run(_cfg(steps=6, eval_every=3, variants=("fact-d8",)))["variants"][0]
    assert a["train_losses"] == b["train_losses"]
    assert a["curve"] == b["curve"]


def test_variants_start_from_identical_blocks():
    cfg = _cfg()
    models = []
    for kind, rank in (("dense", None), ("factorized", 8)):
        torch.manual_seed(0)
        m = CausalLM(VOCAB, cfg, kind, rank)
        scratch._reset_non_embedding(m, 1)
        models.append(m)
    a, b = (dict(m.blocks.named_parameters()) for m in models)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_factorized_has_expected_parameter_savings():
    d, r = 32, 8
    res = _run(_cfg(steps=2, eval_every=1, variants=("dense", "fact-d4")))
    dense, fact = res["variants"]
    assert dense["embedding_params"] == VOCAB * d
    assert fact["embedding_params"] == VOCAB * r + r * d
    # only the token embedding differs; the tied head adds nothing (no bias)
    assert dense["total_params"] - fact["total_params"] == VOCAB * d - (VOCAB * r + r * d)
    assert dense["non_embedding_params"] == fact["non_embedding_params"]


def test_tied_head_shares_the_factors():
    m = CausalLM(VOCAB, _cfg(), "factorized", 8)
    assert m.head.U is m.token_embedding.U
    names = [n for n, _ in m.named_parameters()]
    assert sum(n.endswith(".U") for n in names) == 1


def test_tt_variant_trains_and_skipped_rows_still_render():
    res = _run(_cfg(steps=4, eval_every=2, variants=("dense", "tt"), tt_rank=4))
    dense, tt = res["variants"]
    assert tt["skipped"] is None
    assert tt["embedding_params"] < dense["embedding_params"]
    assert math.isfinite(tt["final_val_ppl"])
    # results written by versions that could skip a variant still render
    res["variants"][1] = {"name": "tt", "kind": "tt", "skipped": "TTEmbedding not available"}
    rows = scratch.summary_rows(res)
    assert rows[1][0] == "tt" and rows[1][-1].startswith("skipped")


def test_plot_json_and_run_folder_written(tmp_path):
    res = _run(_cfg(steps=4, eval_every=2, variants=("dense", "fact-r4")), keep_models=True)
    models = {v["name"]: v.pop("model") for v in res["variants"]}
    png = plot_curves(res, tmp_path / "ppl.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = scratch.save_run(res, tmp_path / "run", models)
    data = json.loads((out / "results.json").read_text())
    assert [v["name"] for v in data["variants"]] == ["dense", "fact-r4"]
    from safetensors.torch import load_file

    state = load_file(out / "fact-r4.safetensors")
    assert state["embed.token.U"].shape == (VOCAB, 4)
    # an unrelated non-empty folder is refused
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(InvalidInputError, match="not an 'embfactor train' output"):
        scratch.save_run(res, tmp_path / "other")


@pytest.mark.parametrize(
    ("kw", "err", "match"),
    [
        ({"variants": ("dense", "bogus")}, UnknownMethodError, r"unknown variant 'bogus'.*valid variants: dense"),
        ({"steps": 0}, ConfigError, r"steps must be a positive integer, got 0"),
        ({"steps": -3}, ConfigError, r"steps must be a positive integer, got -3"),
        ({"variants": ()}, ConfigError, r"at least one variant"),
        ({"variants": ("dense", "dense")}, ConfigError, r"distinct"),
        ({"variants": ("fact-d3",)}, ConfigError, r"not divisible by 3"),
        ({"heads": 3}, ConfigError, r"divisible by heads"),
        ({"positional": "rope"}, ConfigError, r"'sinusoidal' or 'learned'"),
        ({"device": "tpu"}, ConfigError, r"'cpu' or 'cuda'"),
    ],
)
def test_bad_config_errors(kw, err, match):
    with pytest.raises(err, match=match):
        _cfg(**kw)


def test_bad_token_streams():
    cfg = _cfg(steps=2)
    with pytest.raises(InvalidInputError, match="outside 0..63"):
        train_variants(cfg, train_ids=np.array([0, 64] * 50), heldout_ids=np.zeros(100, int), vocab_size=VOCAB,
                       progress=False)
    with pytest.raises(ConfigError, match="together"):
        train_variants(cfg, train_ids=np.zeros(100, int), progress=False)
    with pytest.raises(InvalidInputError, match="training text has 5 tokens"):
        train_variants(cfg, train_ids=np.zeros(5, int), heldout_ids=np.zeros(100, int), vocab_size=VOCAB,
                       progress=False)


def test_parse_variant():
    assert parse_variant("dense", 256) == ("dense", None)
    assert parse_variant("fact-d8", 256) == ("factorized", 32)
    assert parse_variant("fact-r48", 256) == ("factorized", 48)
    assert parse_variant("tt", 256) == ("tt", None)


def test_cli_rejects_bad_input_before_training(capsys, tmp_path):
    assert main(["train", "--steps", "0"]) == 2
    assert "steps must be a positive integer" in capsys.readouterr().err
    assert main(["train", "--variants", "dense,nope"]) == 2
    assert "unknown variant 'nope'" in capsys.readouterr().err
    assert main(["train", "--plot", str(tmp_path / "x.jpg")]) == 2
    assert "ending in .png" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert main(["train", "--output", str(tmp_path / "full")]) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_cli_quiet_like_every_command():
    """`train` takes --quiet / -q as the other commands do; --no-progress stays as a hidden alias."""
    from embfactor.cli.main import build_parser

    parser = build_parser()
    for flags, quiet in (([], False), (["--quiet"], True), (["-q"], True), (["--no-progress"], True)):
        assert parser.parse_args(["train", *flags]).quiet is quiet, flags
    assert "--no-progress" not in parser._subparsers._group_actions[0].choices["train"].format_help()


@pytest.mark.slow
def test_cli_tiny_run_on_bundled_wikipedia(tmp_path, capsys):
    """The real path: MiniLM's tokenizer on the bundled Wikipedia (token ids cached), 2 steps of a tiny model."""
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main([
        "train", "--variants", "dense,fact-d4", "--steps", "2", "--d-model", "16", "--layers", "1", "--heads", "2",
        "--seq-len", "16", "--batch-size", "2", "--eval-tokens", "64", "--positional", "learned",
        "--json", str(js), "--plot", str(png), "--quiet",
    ])
    assert rc == 0
    out, err = capsys.readouterr()
    assert "train dense" not in err  # no progress bar
    assert "fact-d4" in out and "final val ppl" in out
    data = json.loads(js.read_text())
    assert data["data"]["vocab_size"] == 30522
    assert data["data"]["train_tokens"] > 100_000
    assert data["variants"][1]["embedding_params"] == 30522 * 4 + 4 * 16
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_balanced_factor_init_keeps_table_scale():
    from embfactor.layers import FactorizedEmbedding

    torch.manual_seed(0)
    e = FactorizedEmbedding(2000, 64, rank=16, padding_idx=0)
    scratch.balance_factors_(e, 0.125)
    assert float(e.weight.detach().std()) == pytest.approx(0.125, rel=0.05)
    assert float(e.U.detach().std()) == pytest.approx(float(e.V.detach().std()), rel=0.1)
    assert not e.U[0].any()
