"""Every optimized path against its reference: same factors, embeddings, gradients and logits within tolerance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import embfactor as ef
from embfactor.decomposition import get_method, optimal_relative_error, spectrum
from embfactor.decomposition._common import as_matrix, gram
from embfactor.errors import ConfigError, InvalidInputError
from embfactor.layers import FactorizedEmbedding, FactorizedLMHead
from tests.conftest import decaying_matrix, low_rank_matrix


def _embedding_like(n: int = 2000, d: int = 48, seed: int = 0) -> torch.Tensor:
    """Power-law spectrum like real token embeddings (slow decay)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    return (torch.randn(n, d, generator=g) * torch.arange(1, d + 1).float() ** -0.5) @ Q.T


def test_float32_gram_matches_float64_reference():
    E = _embedding_like()
    ref = gram(E, block_rows=300, precision="float64")
    fast = gram(E, block_rows=300, precision="float32")
    assert fast.dtype == torch.float64
    assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # a float64 matrix is always multiplied in float64
    assert torch.equal(gram(E.double(), precision="float32"), gram(E.double(), precision="float64"))
    with pytest.raises(InvalidInputError, match="precision must be"):
        gram(E, precision="half")


@pytest.mark.parametrize("rank", [6, 12, 24])
def test_fast_eig_matches_float64_eig_and_svd(rank):
    E = _embedding_like(seed=rank)
    eig = get_method("eig").fn
    fast = eig(E, rank)  # default: float32 blocks, float64 sums
    ref = eig(E, rank, gram_precision="float64")
    exact = get_method("svd").fn(E, rank)
    opt = optimal_relative_error(spectrum(E), rank)
    for f in (fast, ref):
        assert f.relative_error(E) == pytest.approx(opt, rel=1e-5)
    assert torch.allclose(fast.reconstruct(), exact.reconstruct(), atol=1e-4)
    assert torch.allclose(fast.singular_values, exact.singular_values.double(), rtol=1e-5)
    assert torch.allclose(fast.U, ref.U, atol=1e-4) and torch.allclose(fast.V, ref.V, atol=1e-4)


def test_fast_eig_singular_values_from_column_norms_on_wide_spectrum():
    # σ from 1 to 1e-3: √λ from a float32 Gram would be off for the small ones; ‖E·v‖ is not
    E = decaying_matrix(400, 32, decay=3.0)
    f = get_method("eig").fn(E, 30)
    sv = torch.linalg.svdvals(E.double())[:30]
    assert torch.allclose(f.singular_values, sv, rtol=1e-3)
    assert torch.allclose(f.U.T @ f.U, torch.diag(f.singular_values.float()), atol=1e-4)


def test_fast_eig_full_rank_and_wide_matrix():
    E = low_rank_matrix(60, 200, 5)  # wide: the Gram route transposes
    f = get_method("eig").fn(E, 5)
    assert f.meta["transposed"] is True
    assert torch.allclose(f.reconstruct(), E, atol=1e-4 * float(E.abs().max()))


def test_eig_rejects_unknown_precision():
    with pytest.raises(ConfigError, match="gram_precision must be"):
        ef.decompose(torch.randn(50, 8), rank=2, method="eig", gram_precision="bf16")


def test_blockwise_finite_check_finds_bad_entry_in_a_late_block():
    E = torch.zeros(70000, 3)
    E[69999, 2] = float("nan")
    with pytest.raises(InvalidInputError, match="row 69999, column 2"):
        as_matrix(E)


def _reference_forward(emb: FactorizedEmbedding, ids: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids.long(), emb.U, emb.padding_idx) @ emb.V


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_embedding_forward_matches_reference(shape, dtype):
    torch.manual_seed(0)
    emb = FactorizedEmbedding(50, 16, 4, padding_idx=0)
    ids = torch.randint(0, 50, shape, dtype=dtype)
    ids.view(-1)[0] = 0
    out = emb(ids)
    assert out.shape == (*shape, 16)
    assert torch.allclose(out, _reference_forward(emb, ids), atol=1e-6)
    assert torch.equal(out.view(-1, 16)[0], torch.zeros(16))


def test_embedding_forward_non_contiguous_ids_and_empty():
    emb = FactorizedEmbedding(30, 8, 2)
    ids = torch.randint(0, 30, (4, 6)).T  # non-contiguous view
    assert torch.allclose(emb(ids), _reference_forward(emb, ids), atol=1e-6)
    assert emb(torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3, 8)


@pytest.mark.parametrize("sparse", [False, True])
def test_embedding_gradients_match_reference(sparse):
    torch.manual_seed(0)
    emb = FactorizedEmbedding(40, 12, 3, padding_idx=1, sparse=sparse)
    ref = FactorizedEmbedding(40, 12, 3, padding_idx=1)
    ref.load_state_dict(emb.state_dict())
    ids = torch.tensor([[1, 4, 4, 9], [39, 0, 1, 7]])
    w = torch.randn(2, 4, 12)
    (emb(ids) * w).sum().backward()
    (_reference_forward(ref, ids) * w).sum().backward()
    gU = emb.U.grad.to_dense() if sparse else emb.U.grad
    assert emb.U.grad.is_sparse == sparse
    assert torch.allclose(gU, ref.U.grad, atol=1e-5)
    assert torch.allclose(emb.V.grad, ref.V.grad, atol=1e-5)
    assert torch.equal(gU[1], torch.zeros(3))  # padding row gets no gradient
    if sparse:  # only the gathered rows are touched
        touched = set(emb.U.grad.coalesce().indices()[0].tolist())
        assert touched <= {0, 4, 7, 9, 39}


def test_sparse_training_step_updates_only_gathered_rows():
    torch.manual_seed(0)
    emb = FactorizedEmbedding(100, 8, 2, sparse=True)
    before = emb.U.detach().clone()
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    emb(torch.tensor([3, 5, 5])).sum().backward()
    opt.step()
    changed = (emb.U.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [3, 5]


@pytest.mark.parametrize("tokens", [1, 7, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factorized_head_matches_dense_logits(tokens, dtype):
    torch.manual_seed(0)
    emb = FactorizedEmbedding(300, 24, 6).to(dtype)
    head = FactorizedLMHead(emb, bias=torch.randn(300))
    h = torch.randn(2, tokens, 24).to(dtype)
    dense = F.linear(h.float(), (emb.U @ emb.V).float(), head.bias.float())
    tol = 1e-4 if dtype == torch.float32 else 0.15
    assert torch.allclose(head(h).float(), dense, atol=tol, rtol=tol)


def test_factorize_keeps_optimal_factors_with_fast_paths(tiny_llama_tied):
    E = tiny_llama_tied.get_input_embeddings().weight.detach().clone()
    rep = ef.factorize_(tiny_llama_tied, rank=8, method="eig")
    ref = get_method("svd").fn(E, 8)
    emb = tiny_llama_tied.get_input_embeddings()
    assert rep.relative_error == pytest.approx(rep.optimal_relative_error, rel=1e-5)
    assert torch.allclose(emb.U @ emb.V, ref.reconstruct(), atol=1e-5)
    ids = torch.tensor([[1, 2, 3]])
    logits = tiny_llama_tied(ids).logits
    assert torch.isfinite(logits).all()


def test_float32_gram_accepts_parameters_and_views():
    # the fast path hands float32 row blocks to NumPy (BLAS syrk); a Parameter or a strided view must work too
    W = torch.nn.Parameter(_embedding_like(300, 16))
    ref = gram(W.detach(), precision="float64")
    assert torch.allclose(gram(W, block_rows=64, precision="float32"), ref, rtol=1e-5, atol=1e-6)
    wide = _embedding_like(40, 300)
    assert torch.allclose(gram(wide.T, block_rows=64, precision="float32"), gram(wide.T.contiguous()), atol=1e-4)


@pytest.mark.parametrize("split", ["symmetric", "left", "right"])
def test_eig_in_place_scaling_matches_svd_for_every_split(split):
    E = _embedding_like(500, 24, seed=3)
    f = ef.decompose(E, rank=8, method="eig", split=split)
    ref = ef.decompose(E, rank=8, method="svd", split=split)
    assert torch.allclose(f.U, ref.U, atol=1e-4) and torch.allclose(f.V, ref.V, atol=1e-4)


@pytest.mark.parametrize("rank", [16, 64, 200])
def test_subset_eigh_path_matches_full_eigh(rank, monkeypatch):
    # ranks ≤ d/8 take LAPACK syevr for the top eigenpairs only (from d = 2,048 on; lowered here to keep the test
    # small), larger ones the full eigh
    from embfactor.decomposition import eig as svd_module

    E = _embedding_like(n=3000, d=512, seed=rank)
    eig = get_method("eig").fn
    monkeypatch.setattr(svd_module, "SUBSET_EIGH_MIN_DIM", 512)
    fast = eig(E, rank)
    monkeypatch.setattr(svd_module, "SUBSET_EIGH_MIN_DIM", 10**9)
    full = eig(E, rank)
    opt = optimal_relative_error(spectrum(E), rank)
    assert fast.relative_error(E) == pytest.approx(opt, rel=1e-5)
    assert torch.allclose(fast.singular_values, full.singular_values, rtol=1e-5)
    assert torch.allclose(fast.reconstruct(), full.reconstruct(), atol=1e-4)
    assert torch.allclose(fast.U, full.U, atol=1e-3) and torch.allclose(fast.V, full.V, atol=1e-3)


@pytest.mark.parametrize("sub", [3, 4, 12])
def test_pq_encoding_in_the_head_metric_equals_the_cdist_reference(monkeypatch, sub):
    """hessian_encode's nearest codeword by one GEMM with the norms as bias (issue 30) against cdist + argmin."""
    import embfactor.decomposition.codebook as cb

    g = torch.Generator().manual_seed(sub)
    d, K = 48, 64
    X = _embedding_like(3000, d, seed=sub)
    A = torch.randn(d, d, generator=g) / d ** 0.5
    H = A @ A.T + 0.1 * torch.eye(d)
    books = torch.randn(d // sub, K, sub, generator=g) * 0.3
    fast = cb.hessian_encode(X, books, H, block_rows=1000)
    monkeypatch.setattr(cb, "nearest", lambda x, b, norms: torch.cdist(x, b).argmin(1))
    ref = cb.hessian_encode(X, books, H, block_rows=1000)
    assert torch.equal(fast, ref)
