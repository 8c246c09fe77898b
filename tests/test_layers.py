"""FactorizedEmbedding, FactorizedLMHead and positional encodings behave as documented."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from embfactor import (
    FactorizedEmbedding,
    FactorizedLMHead,
    LearnedPositionalEncoding,
    SinusoidalPositionalEncoding,
    TransformerEmbedding,
)
from embfactor.errors import ConfigError, InvalidInputError, InvalidTypeError


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), ()])
def test_forward_equals_dense_lookup(shape):
    torch.manual_seed(0)
    emb = FactorizedEmbedding(50, 16, rank=4)
    x = torch.randint(0, 50, shape)
    assert emb(x).shape == (*shape, 16)
    assert torch.allclose(emb(x), F.embedding(x, emb.U @ emb.V), atol=1e-6)


def test_padding_row_zero_with_zero_gradient():
    emb = FactorizedEmbedding(30, 8, rank=3, padding_idx=2)
    x = torch.tensor([[2, 5, 2, 7]])
    out = emb(x)
    assert torch.count_nonzero(out[0, 0]) == 0 and torch.count_nonzero(out[0, 2]) == 0
    out.pow(2).sum().backward()
    assert torch.count_nonzero(emb.U.grad[2]) == 0
    assert torch.count_nonzero(emb.U.grad[5]) > 0


def test_negative_padding_idx_normalized():
    assert FactorizedEmbedding(30, 8, rank=3, padding_idx=-1).padding_idx == 29


@pytest.mark.parametrize("bad", [30, 1000, -1])
def test_out_of_range_ids(bad):
    emb = FactorizedEmbedding(30, 8, rank=3)
    with pytest.raises(IndexError, match=rf"token id {bad} is out of range for a vocabulary of 30"):
        emb(torch.tensor([1, bad]))


def test_float_ids_rejected():
    with pytest.raises(InvalidTypeError, match="integer tensor"):
        FactorizedEmbedding(30, 8, rank=3)(torch.tensor([1.0]))


def test_weight_is_read_only_product():
    emb = FactorizedEmbedding(20, 6, rank=2)
    assert torch.allclose(emb.weight, emb.U @ emb.V)
    with pytest.raises(AttributeError, match="read-only"):
        emb.weight = torch.zeros(20, 6)


def test_from_scratch_init_has_embedding_scale():
    torch.manual_seed(0)
    emb = FactorizedEmbedding(4000, 64, rank=16)
    assert emb.weight.std().item() == pytest.approx(1.0, rel=0.1)
    assert FactorizedEmbedding(4000, 64, rank=16, init_std=0.02).weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_trainable_from_scratch():
    torch.manual_seed(0)
    emb = FactorizedEmbedding(40, 8, rank=4)
    target = torch.randn(40, 8)
    opt = torch.optim.Adam(emb.parameters(), lr=0.05)
    ids = torch.arange(40)
    first = None
    for _ in range(100):
        loss = (emb(ids) - target).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_sparse_gradient_option():
    emb = FactorizedEmbedding(100, 8, rank=2, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    assert emb.U.grad.is_sparse and not emb.V.grad.is_sparse


def test_from_embedding_and_to_dense():
    torch.manual_seed(0)
    dense = nn.Embedding(60, 12, padding_idx=0)
    emb = FactorizedEmbedding.from_embedding(dense, rank=11, method="svd")
    assert emb.padding_idx == 0 and emb.rank == 11
    assert torch.count_nonzero(emb(torch.tensor([0]))) == 0  # the original padding row was zero
    back = emb.to_dense()
    assert isinstance(back, nn.Embedding) and back.padding_idx == 0
    assert torch.allclose(back.weight, emb.U @ emb.V)
    x = torch.randint(0, 60, (4, 5))
    assert torch.allclose(back(x), emb(x), atol=1e-6)
    full = FactorizedEmbedding.from_embedding(nn.Embedding(60, 12), ratio=2.0)
    assert full.num_params <= 60 * 12 / 2


def test_from_embedding_keeps_nonzero_padding_row():
    dense = nn.Embedding(20, 6, padding_idx=0)
    with torch.no_grad():
        dense.weight[0] = 1.0
    emb = FactorizedEmbedding.from_embedding(dense, rank=5)
    assert emb(torch.tensor([0])).abs().sum() > 0


def test_from_embedding_type_check():
    with pytest.raises(InvalidTypeError, match="needs an nn.Embedding"):
        FactorizedEmbedding.from_embedding(nn.Linear(3, 3), rank=1)


@pytest.mark.parametrize(
    ("args", "match"),
    [((0, 8, 2), "num_embeddings must be a positive integer"), ((10, 8, 0), "rank must be a positive integer")],
)
def test_bad_constructor_args(args, match):
    with pytest.raises(ConfigError, match=match):
        FactorizedEmbedding(*args)


def test_padding_idx_out_of_range():
    with pytest.raises(ConfigError, match="padding_idx must be within"):
        FactorizedEmbedding(10, 4, 2, padding_idx=10)


# --- tied head ---


def test_head_logits_and_sharing():
    torch.manual_seed(0)
    emb = FactorizedEmbedding(70, 16, rank=4)
    head = FactorizedLMHead(emb, bias=torch.randn(70))
    h = torch.randn(3, 5, 16)
    expected = h @ (emb.U @ emb.V).T + head.bias
    assert torch.allclose(head(h), expected, atol=1e-5)
    assert head.U is emb.U and head.V is emb.V
    assert [n for n, _ in head.named_parameters()] == ["bias"]  # the factors are registered once, in emb


def test_head_gradients_reach_shared_factors():
    emb = FactorizedEmbedding(30, 8, rank=2)
    head = FactorizedLMHead(emb)
    head(torch.randn(2, 8)).sum().backward()
    assert emb.U.grad is not None and emb.V.grad is not None


def test_head_rejects_dense_embedding_and_bad_bias():
    with pytest.raises(InvalidTypeError, match="ties to an embfactor storage format"):
        FactorizedLMHead(nn.Embedding(3, 3))
    with pytest.raises(ConfigError, match=r"bias must have shape \(30,\)"):
        FactorizedLMHead(FactorizedEmbedding(30, 8, rank=2), bias=torch.zeros(29))


# --- positional encodings ---


def test_sinusoidal_values():
    pe = SinusoidalPositionalEncoding(100, 8)
    enc = pe.encoding(100)
    assert enc[0, 0] == 0 and enc[0, 1] == 1
    assert enc[5, 0].item() == pytest.approx(math.sin(5))
    assert enc[5, 3].item() == pytest.approx(math.cos(5 / 10000 ** (2 / 8)))
    x = torch.zeros(2, 10, 8)
    assert torch.allclose(pe(x, offset=3)[0], enc[3:13])
    assert "pe" not in pe.state_dict()  # rebuilt, not saved


def test_sinusoidal_odd_dim():
    assert SinusoidalPositionalEncoding(10, 7).encoding(10).shape == (10, 7)


def test_positions_beyond_max_len():
    with pytest.raises(InvalidInputError, match="exceed max_len=10"):
        SinusoidalPositionalEncoding(10, 4)(torch.zeros(1, 11, 4))
    with pytest.raises(InvalidInputError, match="exceed max_len=10"):
        LearnedPositionalEncoding(10, 4)(torch.zeros(1, 8, 4), offset=3)


def test_learned_positions_trainable():
    pe = LearnedPositionalEncoding(16, 4)
    pe(torch.zeros(1, 5, 4)).sum().backward()
    assert pe.embedding.weight.grad[:5].abs().sum() > 0 and pe.embedding.weight.grad[5:].abs().sum() == 0


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", None])
@pytest.mark.parametrize("rank", [None, 4])
def test_transformer_embedding(positional, rank):
    torch.manual_seed(0)
    te = TransformerEmbedding(50, 16, rank=rank, max_len=32, positional=positional, dropout=0.0, layer_norm=True)
    ids = torch.randint(0, 50, (2, 9))
    out = te(ids)
    assert out.shape == (2, 9, 16)
    assert isinstance(te.token, FactorizedEmbedding) == (rank is not None)
    tok = te.token(ids) * math.sqrt(16)
    if positional is not None:
        tok = tok + te.position.encoding(9)
    assert torch.allclose(out, F.layer_norm(tok, (16,), te.norm.weight, te.norm.bias), atol=1e-5)


def test_transformer_embedding_bad_args():
    with pytest.raises(ConfigError, match="positional must be"):
        TransformerEmbedding(10, 4, positional="rotary")
    with pytest.raises(ConfigError, match="dropout must be in"):
        TransformerEmbedding(10, 4, dropout=1.5)
