"""Codebook (pq, rvq) and dense int-k formats: decompositions, modules, tied head, bytes, save/load, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import embfactor as ef
from embfactor.decomposition.codebook import (
    CodebookFactors,
    codebook_bytes,
    plan_codebook,
    product_quantize,
    quantize_table,
    residual_quantize,
)
from embfactor.decomposition.intk import IntFactors, int_quantize, plan_int
from embfactor.errors import ConfigError
from embfactor.formats import from_factors, get_format
from embfactor.formats.codebook import CodebookEmbedding
from embfactor.formats.intk import IntKEmbedding
from embfactor.quant import KBITS, dequantize_groups, grouped_bytes, pack_bits, quantize_groups, unpack_bits

from .conftest import VOCAB


def _table(n: int = 600, d: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


CASES = [
    ("pq", {"sub_dim": 4, "K": 32}),
    ("pq", {"sub_dim": 3, "K": 16, "rotation": "random", "row_scale": True}),  # 3 does not divide 20
    ("rvq", {"sub_dim": 5, "K": 16, "stages": 3}),
    ("pq", {"sub_dim": 4, "K": 32, "codebook_dtype": "int8"}),
    ("rvq", {"sub_dim": 3, "K": 16, "stages": 2, "codebook_dtype": "int8", "rotation": "random", "row_scale": True}),
    ("int", {"bits": 3, "group": 16}),
    ("int", {"bits": 5, "group": None, "symmetric": False}),
]


def _factors(method: str, opts: dict, E: torch.Tensor, **kw):
    return ef.decompose(E, method=method, **opts, **kw)  # the options fix the size: no target


# --- packing ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", KBITS)
def test_pack_bits_round_trip_and_width(bits):
    q = torch.randint(0, 1 << bits, (7, 19), dtype=torch.uint8)
    p = pack_bits(q, bits)
    assert p.dtype == torch.uint8 and p.shape == (7, 19 if bits == 8 else 3 * bits)  # 8 values per `bits` bytes
    assert torch.equal(unpack_bits(p, bits, 19), q)


@pytest.mark.parametrize("bits", KBITS)
@pytest.mark.parametrize("group", [None, 16, 32])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int_k_error_is_bounded_by_half_a_step_and_bytes_add_up(bits, group, symmetric):
    t = _table(40, 50)
    p, s, lo = quantize_groups(t, bits, group, symmetric=symmetric)
    r = dequantize_groups(p, s, lo, bits=bits, cols=50, group=group)
    g = group or 50
    step = F.pad(s.float(), (0, 0)).repeat_interleave(g, dim=1)[:, :50]
    # half a step of rounding, plus the fp16 rounding of the scale/minimum themselves
    assert bool(((r - t).abs() <= step / 2 + 2e-3 * t.abs().amax()).all())
    stored = p.numel() + 2 * s.numel() + (0 if lo is None else 2 * lo.numel())
    assert stored == grouped_bytes(40, 50, bits, group, symmetric=symmetric)


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_groups_in_row_blocks_equals_one_pass(bits, symmetric, monkeypatch):
    """Large tables are quantized in blocks of rows (memory); the result is the one-pass result bit for bit."""
    import embfactor.quant as quant

    t = _table(45, 50)
    whole = quantize_groups(t, bits, 16, symmetric=symmetric)
    monkeypatch.setattr(quant, "QUANT_BLOCK_ROWS", 8)  # 45 rows: five full blocks and one of 5
    blocked = quantize_groups(t, bits, 16, symmetric=symmetric)
    assert torch.equal(blocked[0], whole[0]) and torch.equal(blocked[1], whole[1])
    assert (blocked[2] is None) == symmetric and (symmetric or torch.equal(blocked[2], whole[2]))


def test_int_k_error_falls_with_bits():
    t = _table(200, 64)
    errs = [int_quantize(t, bits=b, group=32).relative_error(t) for b in KBITS]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.01


# --- decompositions ---------------------------------------------------------------------------------------
def test_pq_reconstructs_exactly_when_every_row_is_a_centroid():
    E = _table(100, 12)
    f = product_quantize(E, sub_dim=4, K=256, codebook_dtype="float32")  # K is lowered to the 100 rows
    assert f.K == 100 and f.meta["K_requested"] == 256
    assert f.relative_error(E) < 1e-6
    r = residual_quantize(E, stages=2, sub_dim=6, K=256, codebook_dtype="float32")
    assert r.relative_error(E) < 1e-6


def test_int8_reconstructs_to_fp16_scale_precision():
    E = _table()
    assert int_quantize(E, bits=8, group=16).relative_error(E) < 5e-3


@pytest.mark.parametrize("method,opts", CASES)
def test_factors_bytes_add_up_and_match_the_module(method, opts):
    E = _table()
    f = _factors(method, opts, E, **({"token_weights": torch.rand(600) + 0.1} if method != "int" else {}))
    emb = from_factors(f)
    assert emb.num_bytes() == f.num_bytes
    state_bytes = sum(t.numel() * t.element_size() for t in emb.state_dict().values())
    assert state_bytes == f.num_bytes  # what a saved file holds
    if method == "int":
        assert f.num_bytes == grouped_bytes(600, 20, opts["bits"], opts["group"], symmetric=opts.get("symmetric", True))
    else:
        assert f.num_bytes == codebook_bytes(
            600, 20, sub_dim=opts["sub_dim"], K=opts["K"], stages=opts.get("stages", 1),
            rotation=opts.get("rotation", "none"), row_scale=opts.get("row_scale", False),
            codebook_dtype=opts.get("codebook_dtype", "float16"),
        )


def test_error_is_monotone_in_bytes():
    E = _table(2000, 16)
    pq = [product_quantize(E, sub_dim=sd, K=64, seed=0) for sd in (8, 4, 2)]
    rv = [residual_quantize(E, stages=s, sub_dim=8, K=64) for s in (1, 2, 3)]
    ik = [int_quantize(E, bits=b, group=16) for b in (2, 3, 4, 8)]
    for seq in (pq, rv, ik):
        assert [f.num_bytes for f in seq] == sorted(f.num_bytes for f in seq)
        errs = [f.relative_error(E) for f in seq]
        assert errs == sorted(errs, reverse=True), errs


def test_int8_codebooks_halve_codebook_bytes_at_a_tiny_error_cost():
    E = _table(2000, 16)
    w = torch.rand(2000) + 0.1
    half = quantize_table(E, sub_dim=4, K=64, token_weights=w, seed=0)
    int8 = quantize_table(E, sub_dim=4, K=64, token_weights=w, seed=0, codebook_dtype="int8")
    assert int8.codebooks.dtype == torch.int8 and int8.codebook_scale.shape == (1, 4, 1, 4)
    assert half.num_bytes - int8.num_bytes == 4 * 64 * 4 - 4 * 4 * 2  # one byte per codebook value, fp16 scales
    assert int8.relative_error(E) == pytest.approx(half.relative_error(E), rel=0.01)
    # the stored values are the ones the codes were chosen against: re-quantizing the float codebooks is exact
    from embfactor.decomposition.codebook import int8_codebooks

    q, sc = int8_codebooks(int8.books())
    assert torch.equal(q, int8.codebooks) and torch.equal(sc, int8.codebook_scale)


def test_int8_codebook_module_heals_its_scales_not_its_integers(tiny_gpt2):
    ef.factorize_(tiny_gpt2, method="pq", sub_dim=4, K=16, codebook_dtype="int8")
    emb = tiny_gpt2.get_input_embeddings()
    assert not emb.codebooks.requires_grad and emb.codebook_scale.requires_grad
    h = torch.randn(3, emb.embedding_dim)
    # the LUT head and the rows agree with the table the codes and int8 codebooks describe
    torch.testing.assert_close(emb.project(h), h @ emb.dense().T, rtol=1e-4, atol=1e-4)
    emb(torch.tensor([[1, 2, 3]])).sum().backward()
    assert emb.codebook_scale.grad is not None and float(emb.codebook_scale.grad.abs().sum()) > 0


def test_kmeans_is_deterministic_given_a_seed():
    E = _table(1500, 16)
    w = torch.rand(1500)
    a = quantize_table(E, sub_dim=4, K=32, token_weights=w, seed=3, max_train_points=1024)
    b = quantize_table(E, sub_dim=4, K=32, token_weights=w, seed=3, max_train_points=1024)
    c = quantize_table(E, sub_dim=4, K=32, token_weights=w, seed=4, max_train_points=1024)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.codebooks, b.codebooks)
    assert not torch.equal(a.codebooks, c.codebooks)


def test_token_weights_favour_heavy_rows():
    E = _table(3000, 8)
    w = torch.ones(3000)
    w[:100] = 1000.0
    plain = product_quantize(E, sub_dim=4, K=128)
    weighted = product_quantize(E, sub_dim=4, K=128, token_weights=w)
    err = lambda f: float((f.rows(0, 100) - E[:100]).norm())  # noqa: E731
    assert err(weighted) < 0.5 * err(plain)  # 100 heavy rows, 128 centroids: they nearly get their own


def test_large_k_uses_int16_codes():
    E = _table(1200, 8)
    f = product_quantize(E, sub_dim=4, K=1024)
    assert f.codes.dtype == torch.int16 and f.K == 1024
    emb = from_factors(f)
    assert torch.allclose(emb.dense(), f.reconstruct(), atol=1e-6)


def test_budget_picks_settings_that_fit():
    vocab, d = 30522, 384
    assert plan_codebook(vocab, d, vocab * d * 4 / 14.9) == {"sub_dim": 4, "K": 256, "stages": 1}
    assert plan_codebook(vocab, d, vocab * d * 4 / 9, method="rvq") == {"sub_dim": 8, "K": 256, "stages": 3}
    assert plan_int(vocab, d, vocab * d * 4 / 7.1) == {"bits": 4, "group": 32, "symmetric": True}
    E = _table(3000, 32)
    f = ef.decompose(E, method="pq", rank=4, budget_bytes=3000 * 32 * 4 / 12)
    assert f.num_bytes <= 3000 * 32 * 4 / 12


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda E: product_quantize(E, sub_dim=0), "sub_dim must be an integer in"),
        (lambda E: product_quantize(E, sub_dim=4, M=2), "give sub_dim or M, not both"),
        (lambda E: product_quantize(E, K=1), "K must be an integer in"),
        (lambda E: product_quantize(E, rotation="spin"), "rotation must be one of"),
        (lambda E: product_quantize(E, stages=2), "pq has one stage"),
        (lambda E: product_quantize(E, codebook_dtype="int4"), "codebook_dtype must be one of"),
        (lambda E: product_quantize(E, sub_dim=3, rotation="opq"), "needs sub_dim to divide"),
        (lambda E: int_quantize(E, bits=7), r"bits must be one of \(2, 3, 4, 5, 6, 8\)"),
        (lambda E: int_quantize(E, group=48), "group must be one of"),
        (lambda E: ef.decompose(E, rank=1, method="int", bit=4), r"unknown option\(s\) bit for method .int."),
        (lambda E: plan_codebook(600, 20, 10), "no pq setting fits 10 bytes"),
        (lambda E: plan_int(600, 20, 10), "no int-k setting fits 10 bytes"),
        (lambda E: product_quantize(E, token_weights=torch.ones(3)), "token_weights has 3 entries"),
    ],
)
def test_bad_options_raise_documented_errors(call, match):
    with pytest.raises((ConfigError, ef.errors.InvalidInputError), match=match):
        call(_table())


# --- modules ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,opts", CASES)
def test_forward_and_head_match_the_dense_table(method, opts):
    E = _table()
    emb = from_factors(_factors(method, opts, E), padding_idx=5)
    D = emb.dense().detach()
    assert float(D[5].abs().max()) == 0.0  # zero padding row, as nn.Embedding
    x = torch.randint(0, 600, (3, 9))
    assert torch.equal(emb(x), F.embedding(x, D))
    with torch.no_grad():
        for h in (torch.randn(1, 20), torch.randn(4, 20), torch.randn(2, 3, 20)):
            assert torch.allclose(emb.project(h), h @ D.T, atol=1e-5)


def test_registered_formats_and_factors_types():
    assert get_format("codebook") is CodebookEmbedding and get_format("intk") is IntKEmbedding
    assert isinstance(product_quantize(_table(), K=8), CodebookFactors)
    assert isinstance(int_quantize(_table()), IntFactors)


def test_codebooks_train_codes_stay_frozen():
    emb = from_factors(product_quantize(_table(), sub_dim=4, K=16, row_scale=True, codebook_dtype="float32"))
    names = {n for n, p in emb.named_parameters() if p.requires_grad}
    assert names == {"codebooks", "row_scale"} and "codes" in dict(emb.named_buffers())
    emb(torch.tensor([1, 2, 3])).sum().backward()
    assert emb.codebooks.grad is not None and float(emb.codebooks.grad.abs().sum()) > 0
    ik = from_factors(int_quantize(_table(), bits=4))
    ik.project(torch.randn(2, 20)).sum().backward()
    assert ik.scale.grad is not None and not ik.packed.requires_grad


def test_empty_then_load_state_dict_is_exact():
    for f in (residual_quantize(_table(), stages=2, sub_dim=6, K=16, rotation="random"), int_quantize(_table(), bits=3)):
        emb = from_factors(f, padding_idx=0)
        twin = type(emb).empty(600, 20, 0, **emb.format_config())
        twin.load_state_dict(emb.state_dict(), strict=True)
        assert torch.equal(twin.dense(), emb.dense())


def _max_op_allocation(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(max(e.cpu_memory_usage, 0) for e in prof.events())


def test_forward_and_head_never_build_the_table():
    """A 1,000,000 × 16 table (64 MB in fp32): no op of the forward or the head allocates a quarter of it."""
    vocab, d = 1_000_000, 16
    emb = CodebookEmbedding(vocab, d, K=16, sub_dim=4, stages=2)
    emb.codes.random_(0, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        emb.codebooks.normal_()
    table_bytes = vocab * d * 4
    ids = torch.randint(0, vocab, (4096,))
    with torch.no_grad():
        assert _max_op_allocation(lambda: emb(ids)) < table_bytes / 4
        for b in (1, 2):
            assert _max_op_allocation(lambda: emb.project(torch.randn(b, d))) < table_bytes / 4
        ik = IntKEmbedding(vocab, d, bits=4, group=None)
        assert _max_op_allocation(lambda: ik.project(torch.randn(1, d))) < table_bytes / 4
        # the check can fail: building the dense table is caught
        assert _max_op_allocation(lambda: emb.dense()) >= table_bytes


# --- models: factorize_, save/load, quantize ---------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_gpt2"])
@pytest.mark.parametrize("method,opts", [("pq", {"sub_dim": 4, "K": 16}), ("rvq", {"stages": 2, "K": 16}),
                                         ("int", {"bits": 4, "group": 16})])
def test_models_save_and_load_exactly(fixture, method, opts, request, tmp_path):
    model = request.getfixturevalue(fixture)
    rep = ef.factorize_(model, method=method, **opts)  # the options fix the size
    emb = model.get_input_embeddings()
    assert isinstance(emb, (CodebookEmbedding, IntKEmbedding)) and rep.method == method
    ef.save_compressed(model, tmp_path / "out")
    loaded = ef.load_compressed(tmp_path / "out")
    x = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        a, b = model(input_ids=x), loaded(input_ids=x)
    key = "logits" if hasattr(a, "logits") else "last_hidden_state"
    assert torch.equal(getattr(a, key), getattr(b, key))
    le = loaded.get_input_embeddings()
    assert type(le) is type(emb) and torch.equal(le.dense(), emb.dense())
    if fixture == "tiny_gpt2":  # tied head: logits from the same codes/codebooks
        assert loaded.get_output_embeddings().embedding is le


# --- byte targets and the command line ----------------------------------------------------------------------
def test_parse_size_and_budget():
    from embfactor.decomposition import budget_bytes, parse_size

    assert parse_size("16x") == ("x", 16.0) and parse_size("2.5MB") == ("bytes", 2.5e6)
    assert parse_size("1 KiB") == ("bytes", 1024.0) and parse_size("900") == ("bytes", 900.0)
    assert budget_bytes("4x", 100, 10) == 1000.0
    for bad in ("16", "x16", "1x", "0.5x", "-3MB", "3 parsecs", "0"):
        if bad in ("16",):
            continue
        with pytest.raises(ConfigError, match="size"):
            parse_size(bad)
    with pytest.raises(ConfigError, match="exactly one of"):
        ef.FactorizationConfig(size="8x", ratio=4)


@pytest.mark.parametrize("method,size", [("pq", "8x"), ("rvq", "6x"), ("int", "5x"), ("svd", "6x"), (None, "4x")])
def test_size_target_fits_the_budget(tiny_gpt2, method, size):
    vocab_d_fp32 = VOCAB * 32 * 4
    rep = ef.factorize_(tiny_gpt2, ef.FactorizationConfig(method=method, size=size))
    assert rep.embedding_bytes_after <= vocab_d_fp32 / float(size[:-1])
    assert rep.bytes_ratio == pytest.approx(vocab_d_fp32 / rep.embedding_bytes_after)
    assert rep.embedding_bytes_after == tiny_gpt2.get_input_embeddings().num_bytes()


def test_size_too_small_is_explained(tiny_gpt2):
    with pytest.raises(ConfigError, match="no pq setting fits"):
        ef.factorize_(tiny_gpt2, ef.FactorizationConfig(method="pq", size="1000x"))
    with pytest.raises(ConfigError, match="below one rank of factors"):
        ef.factorize_(tiny_gpt2, ef.FactorizationConfig(method="svd", size="1000x"))
    assert type(tiny_gpt2.get_input_embeddings()).__name__ == "Embedding"  # untouched


def test_quantize_stores_codebooks_in_fp16(tiny_gpt2, tmp_path):
    ef.factorize_(tiny_gpt2, method="pq", sub_dim=4, K=16, codebook_dtype="float32")
    emb = tiny_gpt2.get_input_embeddings()
    before = emb.num_bytes()
    q = ef.quantize_(tiny_gpt2, "int8")
    assert emb.codebooks.dtype == torch.float16 and q["embedding_bytes"] == emb.num_bytes() < before
    ef.save_compressed(tiny_gpt2, tmp_path / "q")
    loaded = ef.load_compressed(tmp_path / "q")
    assert loaded.get_input_embeddings().codebooks.dtype == torch.float16
    assert torch.equal(loaded.get_input_embeddings().dense(), emb.dense())


def test_cli_compress_pq_with_size_and_options(tiny_bert_dir, tmp_path, capsys):
    from embfactor.cli.main import main

    out = tmp_path / "pq"
    code = main(["compress", str(tiny_bert_dir), "--method", "pq", "--size", "6x", "--method-option", "K=32",
                 "--output", str(out), "--json", str(tmp_path / "r.json"), "-q", "--text", str(_text(tmp_path))])
    assert code == 0
    printed = capsys.readouterr().out
    assert "embedding bytes" in printed and "codebook" in printed
    import json

    r = json.loads((tmp_path / "r.json").read_text())
    assert r["format"] == "codebook" and r["format_config"]["K"] == 32 and r["bytes_ratio"] >= 6
    loaded = ef.load_compressed(out)
    assert isinstance(loaded.get_input_embeddings(), CodebookEmbedding)
    assert main(["inspect", str(out)]) == 0
    assert "codebook" in capsys.readouterr().out


def test_cli_rejects_bad_size_and_options(tiny_bert_dir, tmp_path, capsys):
    from embfactor.cli.main import main

    assert main(["compress", str(tiny_bert_dir), "--size", "big", "--output", str(tmp_path / "o")]) == 2
    assert "size must be" in capsys.readouterr().err
    assert main(["compress", str(tiny_bert_dir), "--size", "4x", "--method", "pq", "--method-option", "K",
                 "--output", str(tmp_path / "o")]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def _text(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("the cat sat on the mat . a good movie is a very good film . the dog is bad\n" * 20)
    return p


def test_fused_lut_kernel_matches_the_torch_path(monkeypatch):
    """The C kernels (batch-1 head, row gather) and the PyTorch paths give the same logits and rows."""
    from embfactor.formats import _lut_kernel

    import shutil

    emb = from_factors(residual_quantize(_table(), stages=2, sub_dim=4, K=32, row_scale=True), padding_idx=2)
    h = torch.randn(1, 20)
    if shutil.which("cc") or shutil.which("gcc"):  # with a compiler the kernel is really built and used
        assert _lut_kernel.lut_sum(emb.codes.view(600, -1), torch.zeros(2 * 5, 32)) is not None
    ids = torch.randint(0, 600, (50,))
    with torch.no_grad():
        fast, rows_fast = emb.project(h), emb(ids)
        monkeypatch.setattr(_lut_kernel, "lut_kernel", lambda: None)  # no compiler: the PyTorch path
        slow, rows_slow = emb.project(h), emb(ids)
    assert torch.allclose(fast, slow, atol=1e-5) and torch.allclose(slow, h @ emb.dense().T, atol=1e-5)
    assert torch.allclose(rows_fast, rows_slow, atol=1e-6) and not rows_fast[ids == 2].any()


def test_sweep_draws_the_int_k_curve_and_counts_codebook_bytes(tiny_bert_dir):
    from embfactor.pipeline.sweep import INT_K_CURVE, plot_sweep, sweep

    from tests.test_sweep import TEXTS, _human

    opts = {"texts": TEXTS, "human": _human(), "fidelity_texts": ["a cat", "the dog sat"]}
    r = sweep(str(tiny_bert_dir), ratios="6", methods="pq,svd", quantize="none,int8", progress=False,
              task_options=opts)
    assert [c["bits"] for c in r["int_k_curve"]] == [b for b, _ in INT_K_CURVE]
    assert all(c["embedding_bytes"] == grouped_bytes(VOCAB, 32, b, g) for c, (b, g) in zip(r["int_k_curve"], INT_K_CURVE))
    pq_points = [p for p in r["points"] if p["method"] == "pq"]
    assert len(pq_points) == 1 and pq_points[0]["quantize"] == "none"  # codes are integers already
    assert pq_points[0]["bytes_ratio"] >= 6
    assert plot_sweep(r)[:4] == b"\x89PNG"

