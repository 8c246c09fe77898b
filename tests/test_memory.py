"""The memory-saving paths of `embfactor compress` compute the same numbers as the plain dense formulas."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from embfactor.decomposition._common import gram
from embfactor.decomposition.factors import relative_error
from embfactor.fileio import release_mapped_pages


def _dense_relative_error(E: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    E, U, V = E.double(), U.double(), V.double()
    return float(torch.linalg.norm(E - U @ V) / torch.linalg.norm(E))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("block_rows", [1, 7, 64, 10_000])
def test_blockwise_relative_error_matches_dense_formula(dtype, block_rows):
    g = torch.Generator().manual_seed(0)
    E = torch.randn(203, 24, generator=g).to(dtype)  # 203 rows: no block size divides it
    U, V = torch.randn(203, 5, generator=g).to(dtype), torch.randn(5, 24, generator=g).to(dtype)
    got = relative_error(E, U, V, block_rows=block_rows)
    assert got == pytest.approx(_dense_relative_error(E, U, V), rel=1e-6)
    # a good factorization (small error) is measured as accurately
    Us, S, Vh = torch.linalg.svd(E.double(), full_matrices=False)
    U8, V8 = (Us[:, :20] * S[:20]).to(dtype), Vh[:20].to(dtype)
    assert relative_error(E, U8, V8, block_rows=block_rows) == pytest.approx(
        _dense_relative_error(E, U8, V8), rel=1e-5 if dtype != torch.float16 else 1e-3
    )


def test_relative_error_edge_cases():
    Z = torch.zeros(10, 4)
    assert relative_error(Z, torch.zeros(10, 1), torch.zeros(1, 4), block_rows=3) == 0.0
    assert relative_error(Z, torch.ones(10, 1), torch.ones(1, 4), block_rows=3) == float("inf")


@pytest.mark.parametrize("block_rows", [1, 13, 2048])
def test_buffered_float64_gram_matches_dense_product(block_rows):
    g = torch.Generator().manual_seed(1)
    E = torch.randn(301, 17, generator=g)
    ref = E.double().T @ E.double()
    assert torch.allclose(gram(E, block_rows, precision="float64"), ref, rtol=1e-12, atol=1e-10)
    # a transposed (non-contiguous) view goes through the same buffer
    W = torch.randn(17, 301, generator=g)
    assert torch.allclose(
        gram(W.T, block_rows, precision="float64"), W.double() @ W.double().T, rtol=1e-12, atol=1e-10
    )


def test_release_mapped_pages_leaves_anonymous_memory_alone():
    t = torch.arange(1 << 20, dtype=torch.float32)
    assert release_mapped_pages(t) == 0
    assert torch.equal(t, torch.arange(1 << 20, dtype=torch.float32))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise on a file mapping is Linux-only here")
def test_release_mapped_pages_drops_file_pages_and_keeps_the_data(tmp_path):
    path = tmp_path / "w.bin"
    data = np.arange(1 << 21, dtype=np.float32)  # 8 MB
    data.tofile(path)
    mm = np.memmap(path, dtype=np.float32, mode="c")  # private file mapping, like the safetensors loader's
    t = torch.from_numpy(mm)
    assert float(t.sum()) == float(data.astype(np.float64).sum())  # page everything in
    released = release_mapped_pages(t[1000:])  # a view that does not start on a page boundary
    assert 0 < released <= (len(data) - 1000) * 4 and released % 4096 == 0
    assert torch.equal(t, torch.from_numpy(data))  # reads page the data in again from the file


@pytest.mark.parametrize("copy", [True, False])
def test_from_factors_copies_or_adopts_without_random_init(copy):
    from embfactor.layers import FactorizedEmbedding

    g = torch.Generator().manual_seed(0)
    U, V = torch.randn(50, 4, generator=g), torch.randn(4, 16, generator=g)
    U[3] = 0.5  # padding row, zeroed by the layer
    ref_U = U.clone()
    emb = FactorizedEmbedding.from_tensors(U, V, padding_idx=3, copy=copy)
    assert emb.U.device.type == "cpu" and emb.U.is_contiguous() and emb.U.requires_grad
    assert (emb.U.data_ptr() == U.data_ptr()) is not copy  # copy=False adopts the caller's temporary
    assert torch.equal(emb.U[3], torch.zeros(4))
    rows = [i for i in range(50) if i != 3]
    assert torch.equal(emb.U.detach()[rows], ref_U[rows]) and torch.equal(emb.V.detach(), V)
    assert torch.equal(U[3], ref_U[3]) is copy  # the caller's row is only touched when adopted
    # a half-precision V is converted to U's dtype either way
    emb16 = FactorizedEmbedding.from_tensors(U.double(), V.half(), copy=copy)
    assert emb16.V.dtype == torch.float64
