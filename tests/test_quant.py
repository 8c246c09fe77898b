"""Quantized factors: error bounds, QuantizedFactorizedEmbedding, quantize_, bit-exact save/load, compress --quantize."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from embfactor import FactorizedEmbedding, QuantizedFactorizedEmbedding, factorize_, load_compressed, quantize_
from embfactor import save_compressed
from embfactor.errors import ConfigError, SurgeryError
from embfactor.quant import dequantize_rows, fake_quantize_rows, quantize_rows, quantized_bytes
from embfactor.surgery import get_meta
from embfactor.surgery.quantize import dense_embedding_bytes, factor_bytes
from tests.conftest import D, VOCAB


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("cols", [7, 16])
def test_round_trip_error_bound(bits, cols):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(50, cols, generator=g) * torch.logspace(-3, 2, 50)[:, None]
    t[3] = 0.0  # an all-zero row stays exactly zero
    q, s = quantize_rows(t, bits)
    assert q.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert q.shape == (50, cols if bits == 8 else (cols + 1) // 2)
    back = dequantize_rows(q, s, bits=bits, cols=cols)
    assert back.shape == t.shape
    assert bool(((t - back).abs() <= s[:, None] / 2 * (1 + 1e-6)).all())
    qmax = 2 ** (bits - 1) - 1
    assert torch.allclose(s[:3], t[:3].abs().amax(1) / qmax)
    assert torch.count_nonzero(back[3]) == 0
    # the largest entry of every row is represented exactly up to float rounding
    assert torch.allclose(back.abs().amax(1)[4:], t.abs().amax(1)[4:], rtol=1e-6)


def test_int4_packs_two_per_byte_and_round_trips_exactly():
    vals = torch.arange(-7, 8, dtype=torch.float32).repeat(2, 1)  # 15 columns (odd)
    q, s = quantize_rows(vals, 4)
    assert q.shape == (2, 8) and torch.equal(s, torch.ones(2))
    assert torch.equal(dequantize_rows(q, s, bits=4, cols=15), vals)
    assert quantized_bytes(2, 15, 4) == 2 * 8 + 2 * 4


@pytest.mark.parametrize("bad", [3, 16, "int2", True])
def test_bad_bits(bad):
    with pytest.raises(ConfigError, match="bits must be"):
        QuantizedFactorizedEmbedding(10, 4, 2, bits=bad)
    if not isinstance(bad, str):
        with pytest.raises(ConfigError, match="bits must be one of"):
            quantize_rows(torch.ones(2, 2), bad)


@pytest.mark.parametrize("bits", [8, 4])
def test_layer_forward_dequantizes_gathered_rows(bits):
    torch.manual_seed(0)
    f = FactorizedEmbedding(VOCAB, D, rank=6, padding_idx=0)
    q = QuantizedFactorizedEmbedding.from_factorized(f, bits)
    Uq = fake_quantize_rows(f.U.detach(), bits)
    Vq = fake_quantize_rows(f.V.detach(), bits)
    x = torch.randint(0, VOCAB, (3, 11))
    x[0, 0] = 0
    out = q(x)
    assert out.shape == (3, 11, D)
    assert torch.allclose(out, (Uq @ Vq)[x], atol=1e-6)
    assert torch.count_nonzero(out[0, 0]) == 0  # a zero padding row stays zero
    h = torch.randn(2, D)
    assert torch.allclose(q.project(h), h @ (Uq @ Vq).T, atol=1e-5)
    assert q.num_bytes() == factor_bytes(VOCAB, D, 6, bits)
    assert not list(q.parameters())  # storage is integer buffers


def test_quantized_bytes_formula():
    assert dense_embedding_bytes(30522, 384) == 30522 * 384 * 4
    assert factor_bytes(30522, 384, 63, 8) == 30522 * 63 + 30522 * 4 + 63 * 384 + 63 * 4
    assert factor_bytes(30522, 384, 64, 4) == 30522 * 32 + 30522 * 4 + 64 * 192 + 64 * 4
    assert dense_embedding_bytes(30522, 384) / factor_bytes(30522, 384, 63, 8) > 20


@pytest.mark.parametrize("bits", [8, 4])
def test_tied_model_quantize_save_load_bit_exact(bits, tiny_gpt2, tmp_path):
    factorize_(tiny_gpt2, rank=8, method="svd")
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        fp = tiny_gpt2(x).logits
    summary = quantize_(tiny_gpt2, bits)
    emb, head = tiny_gpt2.get_input_embeddings(), tiny_gpt2.get_output_embeddings()
    assert isinstance(emb, QuantizedFactorizedEmbedding) and emb.bits == bits
    assert head.embedding is emb  # the tied head reads the same quantized storage
    sd = tiny_gpt2.state_dict()
    assert not any(k.startswith("lm_head") and "U_q" in k for k in sd)  # stored once
    assert summary["embedding_bytes"] == emb.num_bytes()
    assert summary["bytes_ratio"] == pytest.approx(VOCAB * D * 4 / emb.num_bytes())
    with torch.no_grad():
        before = tiny_gpt2(x).logits
    assert (before - fp).abs().max() < (0.05 if bits == 8 else 0.5) * fp.abs().max()
    save_compressed(tiny_gpt2, tmp_path / "q")
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    key = [k for k in tensors if k.endswith("U_q")]
    assert len(key) == 1 and tensors[key[0]].dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert torch.equal(tensors[key[0]], emb.U_q)
    loaded = load_compressed(tmp_path / "q")
    lemb = loaded.get_input_embeddings()
    assert isinstance(lemb, QuantizedFactorizedEmbedding) and loaded.get_output_embeddings().embedding is lemb
    for name in ("U_q", "U_scale", "V_q", "V_scale"):
        assert torch.equal(getattr(lemb, name), getattr(emb, name))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, before)
    assert get_meta(loaded).report["quantization"]["bits"] == bits


def test_untied_bert_quantize_round_trip(tiny_bert, tmp_path):
    factorize_(tiny_bert, rank=8)
    quantize_(tiny_bert, "int8")
    x = torch.randint(1, VOCAB, (2, 7))
    with torch.no_grad():
        before = tiny_bert(x).last_hidden_state
    save_compressed(tiny_bert, tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(load_compressed(tmp_path / "b")(x).last_hidden_state, before)


def test_quantize_errors_leave_model_untouched(tiny_gpt2, tiny_bert):
    with pytest.raises(SurgeryError, match="not factorized"):
        quantize_(tiny_gpt2, 8)
    factorize_(tiny_gpt2, rank=4)
    emb = tiny_gpt2.get_input_embeddings()
    with pytest.raises(ConfigError, match="bits must be 8 or 4"):
        quantize_(tiny_gpt2, 3)
    assert tiny_gpt2.get_input_embeddings() is emb
    quantize_(tiny_gpt2, 8)
    with pytest.raises(SurgeryError, match="already quantized"):
        quantize_(tiny_gpt2, 4)
    factorize_(tiny_bert, rank=4, method="tt")
    with pytest.raises(SurgeryError, match="TTEmbedding"):
        quantize_(tiny_bert, 8)


def test_compress_cli_quantize(tiny_bert_dir, tmp_path, capsys):
    from embfactor.cli.main import main

    out = tmp_path / "out"
    rc = main(["compress", str(tiny_bert_dir), "--rank", "8", "--quantize", "int4", "-o", str(out), "-q"])
    assert rc == 0
    assert "int4 factors" in capsys.readouterr().out
    model = load_compressed(out)
    emb = model.get_input_embeddings()
    assert isinstance(emb, QuantizedFactorizedEmbedding) and emb.bits == 4
    with pytest.raises(ConfigError, match="does not apply to --method tt"):
        from embfactor.pipeline import compress
        from embfactor.config import FactorizationConfig

        compress(str(tiny_bert_dir), FactorizationConfig(rank=4, method="tt"), tmp_path / "x", quantize="int8")
