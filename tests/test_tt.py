"""TTEmbedding and the ``tt`` decomposition: rows from the cores, TT-SVD, save/load, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import embfactor.formats.tt as ttmod
from embfactor import TTEmbedding, decompose, load_compressed
from embfactor.decomposition.tt import TTFactors, tt_rank_for_budget, tt_svd
from embfactor.errors import ConfigError, InvalidTypeError
from embfactor.decomposition.tt import factorize_exact, factorize_padded, max_tt_ranks, tt_num_params
from embfactor.formats import from_factors
from embfactor.formats.tt import unique_ids
from tests.conftest import D, VOCAB, decaying_matrix


def full_table(emb: TTEmbedding) -> torch.Tensor:
    """Reference: contract all cores with einsum (independent of the layer's row algorithm)."""
    c = [x.detach().permute(1, 0, 2, 3) for x in emb.cores]  # (r_prev, n, m, r)
    T = c[0]
    for nxt in c[1:]:
        # T: (1, N.., M.., r) flattened as (1, N, M, r); append core: N -> N·n, M -> M·m
        one, N, M, r = T.shape
        T = torch.einsum("xnma,abcy->xnbmcy", T, nxt).reshape(one, N * nxt.shape[1], M * nxt.shape[2], nxt.shape[3])
    table = T[0, :, :, 0]
    table = table[: emb.num_embeddings].clone()
    if emb.padding_idx is not None and emb.zero_padding_row:
        table[emb.padding_idx] = 0
    return table


def test_shapes_factorized_automatically():
    assert factorize_exact(384, 3) == [6, 8, 8]
    assert math.prod(factorize_padded(30522, 3)) >= 30522
    assert math.prod(factorize_padded(30522, 3)) - 30522 < 100  # little padding
    assert factorize_padded(32768, 3) == [32, 32, 32]
    emb = TTEmbedding(30522, 384, tt_rank=8)
    assert emb.dim_shape == [6, 8, 8] and math.prod(emb.vocab_shape) >= 30522
    assert emb.num_params == tt_num_params(emb.vocab_shape, emb.dim_shape, [8, 8])


# the three row algorithms: one block + direct token gather; per-row products; blocks in several chunks
MODES = [(3, 8192), (0, 8192), (3, 12)]


@pytest.mark.parametrize(("dense_share", "block_rows"), MODES)
@pytest.mark.parametrize("num_cores", [2, 3, 4])
def test_forward_equals_reconstructed_rows(dense_share, block_rows, num_cores, monkeypatch):
    monkeypatch.setattr(ttmod, "_DENSE_SHARE", dense_share)
    monkeypatch.setattr(ttmod, "_BLOCK_ROWS", block_rows)
    torch.manual_seed(0)
    emb = TTEmbedding(VOCAB, D, tt_rank=5, num_cores=num_cores)
    table = full_table(emb)
    for shape in [(7,), (3, 40), (2, 3, 50), (), (0,), (2, 0)]:
        x = torch.randint(0, VOCAB, shape)
        out = emb(x)
        assert out.shape == (*shape, D)
        assert torch.allclose(out, table[x], atol=1e-5)
    assert torch.allclose(emb.weight, table, atol=1e-5)


@pytest.mark.parametrize(("dense_share", "block_rows"), MODES)
def test_gradients_match_dense_table(dense_share, block_rows, monkeypatch):
    monkeypatch.setattr(ttmod, "_DENSE_SHARE", dense_share)
    monkeypatch.setattr(ttmod, "_BLOCK_ROWS", block_rows)
    torch.manual_seed(0)
    emb = TTEmbedding(VOCAB, D, tt_rank=4)
    x = torch.randint(0, VOCAB, (4, 30))
    emb(x).pow(2).sum().backward()
    grads = [c.grad.clone() for c in emb.cores]
    emb.zero_grad()
    emb.materialize()[x].pow(2).sum().backward()
    for g, c in zip(grads, emb.cores):
        assert torch.allclose(g, c.grad, atol=1e-4)


def test_unique_ids_matches_torch_unique():
    x = torch.randint(0, 50, (500,))
    u, inv = unique_ids(x, 50)
    u2, inv2 = torch.unique(x, sorted=True, return_inverse=True)
    assert torch.equal(u, u2) and torch.equal(inv, inv2)


@pytest.mark.parametrize(("dense_share", "block_rows"), MODES)
def test_padding_row_zero_and_no_gradient(dense_share, block_rows, monkeypatch):
    monkeypatch.setattr(ttmod, "_DENSE_SHARE", dense_share)
    monkeypatch.setattr(ttmod, "_BLOCK_ROWS", block_rows)
    torch.manual_seed(0)
    emb = TTEmbedding(VOCAB, D, tt_rank=4, padding_idx=3)
    x = torch.tensor([[3, 5, 3, 7]])
    out = emb(x)
    assert torch.count_nonzero(out[0, 0]) == 0 and torch.count_nonzero(out[0, 2]) == 0
    emb.zero_grad()
    emb(torch.tensor([3, 3])).sum().backward()
    assert all(c.grad is None or torch.count_nonzero(c.grad) == 0 for c in emb.cores)
    emb.zero_grad()
    emb(torch.arange(VOCAB)).sum().backward()  # every id: the padding row still contributes nothing
    g = [c.grad.clone() for c in emb.cores]
    emb.zero_grad()
    ids = torch.tensor([i for i in range(VOCAB) if i != 3])
    emb(ids).sum().backward()
    assert all(torch.allclose(a, c.grad, atol=1e-5) for a, c in zip(g, emb.cores))


def test_variance_preserving_init():
    torch.manual_seed(0)
    for std in (1.0, 0.02):
        emb = TTEmbedding(4096, 64, tt_rank=16, init_std=std)
        assert emb.materialize().std().item() == pytest.approx(std, rel=0.15)


def test_project_is_tied_head():
    torch.manual_seed(0)
    emb = TTEmbedding(VOCAB, D, tt_rank=4)
    h = torch.randn(2, 5, D)
    assert torch.allclose(emb.project(h), h @ full_table(emb).T, atol=1e-5)


def test_errors():
    emb = TTEmbedding(VOCAB, D, tt_rank=4)
    with pytest.raises(IndexError, match=rf"token id {VOCAB} is out of range for a vocabulary of {VOCAB}"):
        emb(torch.tensor([1, VOCAB]))
    with pytest.raises(IndexError, match="token id -1 is out of range"):
        emb(torch.tensor([-1]))
    with pytest.raises(InvalidTypeError, match="integer tensor"):
        emb(torch.tensor([1.0]))
    for bad in (0, -3, [4], 2.5):
        with pytest.raises(ConfigError, match="tt_rank"):
            TTEmbedding(VOCAB, D, tt_rank=bad)
    with pytest.raises(ConfigError, match="dim_shape"):
        TTEmbedding(VOCAB, D, tt_rank=4, dim_shape=[3, 3, 3])
    with pytest.raises(ConfigError, match="covers"):
        TTEmbedding(VOCAB, D, tt_rank=4, vocab_shape=[2, 2, 2])
    with pytest.raises(ConfigError, match="num_cores"):
        TTEmbedding(VOCAB, D, tt_rank=4, num_cores=1)


def test_tt_svd_full_rank_reconstructs():
    E = decaying_matrix(VOCAB, D, seed=1)
    f = tt_svd(E, 10**6)
    assert f.tt_ranks == max_tt_ranks(f.meta["vocab_shape"], f.meta["dim_shape"])
    assert torch.allclose(f.reconstruct(), E, atol=1e-5)
    assert f.relative_error(E) < 1e-5


def test_tt_svd_error_monotone_and_module_matches():
    E = decaying_matrix(VOCAB, D, seed=2)
    errs = [tt_svd(E, r).relative_error(E) for r in (1, 2, 4, 8, 16)]
    assert all(a >= b - 1e-9 for a, b in zip(errs, errs[1:]))
    f = tt_svd(E, 4)
    emb = from_factors(f)
    assert isinstance(emb, TTEmbedding) and emb.num_params == f.num_params
    x = torch.arange(VOCAB)
    assert torch.allclose(emb(x), f.reconstruct(), atol=1e-6)


def test_registered_method_matches_budget():
    E = decaying_matrix(VOCAB, D, seed=3)
    f = decompose(E, rank=6, method="tt")
    assert isinstance(f, TTFactors) and f.method == "tt"
    budget = 6 * (VOCAB + D)
    assert f.num_params <= budget
    r = tt_rank_for_budget(VOCAB, D, budget)
    assert f.tt_ranks == [min(r, m) for m in max_tt_ranks(f.meta["vocab_shape"], f.meta["dim_shape"])]
    g = decompose(E, rank=6, method="tt", tt_rank=2)
    assert g.tt_ranks == [2, 2]
    assert 0 < f.meta["relative_error"] < 1


def test_from_embedding_keeps_nonzero_padding_row():
    torch.manual_seed(0)
    dense = nn.Embedding(VOCAB, D, padding_idx=0)
    with torch.no_grad():
        dense.weight[0] = 1.0
    emb = TTEmbedding.from_embedding(dense, tt_rank=10**6)
    assert not emb.zero_padding_row
    assert torch.allclose(emb(torch.tensor([0, 5])), dense.weight[[0, 5]], atol=1e-5)


def test_compress_cli_with_tt(tiny_bert_dir, tmp_path):
    from embfactor.cli.main import main

    out = tmp_path / "tt"
    assert main(["compress", str(tiny_bert_dir), "--ratio", "4", "--method", "tt", "-o", str(out), "-q"]) == 0
    model = load_compressed(out)
    emb = model.get_input_embeddings()
    assert isinstance(emb, TTEmbedding)
    assert emb.num_params <= 6 * (VOCAB + D) <= VOCAB * D / 4  # rank 6 reaches 4x; the TT fits its budget
