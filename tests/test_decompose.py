"""Decomposition specifics (near-optimality, canonical factors, options), rank choice and input checks.

The properties every method shares (exact at full rank, monotone error, counts, determinism, save/load) are in
the shared suite, tests/test_formats.py.
"""

from __future__ import annotations

import pytest
import torch

import embfactor as ef
from embfactor.decomposition import method_infos, optimal_relative_error, resolve_rank, spectrum
from embfactor.errors import ConfigError, InvalidInputError, InvalidTypeError, UnknownMethodError
from tests.conftest import decaying_matrix, low_rank_matrix

# int (dense int-k) is a storage format, not U·V: tests/test_codebook.py covers it with pq and rvq.
METHODS = [i.name for i in method_infos() if i.name not in ("tt", "int") and not i.data_aware]
NEAR_OPTIMAL = {"svd": 0.01, "eig": 0.01, "rsvd": 0.01, "als": 0.02}


def test_builtin_methods_are_registered():
    assert {"svd", "rsvd", "eig", "als", "gd"} <= set(METHODS)


@pytest.mark.parametrize("method", sorted(NEAR_OPTIMAL))
@pytest.mark.parametrize("rank", [4, 12])
def test_near_optimal(method, rank):
    E = decaying_matrix(300, 40, decay=2.0, seed=1)
    opt = optimal_relative_error(spectrum(E), rank)
    err = ef.decompose(E, rank=rank, method=method, seed=0).relative_error(E)
    assert opt <= err + 1e-6
    assert err <= opt * (1 + NEAR_OPTIMAL[method]), (err, opt)


@pytest.mark.parametrize("method", ["svd", "eig", "rsvd", "als"])
def test_canonical_factors_agree_across_methods(method):
    """Symmetric split and fixed signs: every exact method gives the same factors as svd."""
    E = low_rank_matrix(70, 12, 5, seed=2)
    ref = ef.decompose(E, rank=5, method="svd")
    f = ef.decompose(E, rank=5, method=method)
    assert torch.allclose(f.U, ref.U, atol=1e-3) and torch.allclose(f.V, ref.V, atol=1e-3)
    assert torch.allclose(f.U.T @ f.U, f.V @ f.V.T, atol=1e-3)  # symmetric split: both equal diag(S)


@pytest.mark.parametrize("split", ["left", "right"])
def test_split_options(split):
    E = low_rank_matrix(40, 10, 3)
    f = ef.decompose(E, rank=3, method="svd", split=split)
    eye = torch.eye(3)
    if split == "left":
        assert torch.allclose(f.V @ f.V.T, eye, atol=1e-5)
    else:
        assert torch.allclose(f.U.T @ f.U, eye, atol=1e-5)
    assert torch.allclose(f.reconstruct(), E, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_inputs_cast_back(dtype):
    E = decaying_matrix(64, 16).to(dtype)
    f = ef.decompose(E, rank=4, method="svd")
    assert f.U.dtype == dtype and f.V.dtype == dtype
    assert f.relative_error(E) < 1.0


def test_default_method_depends_on_shape():
    assert ef.default_method((30522, 384)) == "eig"
    assert ef.default_method((500, 400)) == "svd"
    assert ef.decompose(decaying_matrix(400, 32), rank=4).method == "eig"


def test_gd_extra_loss_is_used():
    E = decaying_matrix(60, 12)
    f = ef.decompose(E, rank=3, method="gd", steps=60, extra_loss=lambda U, V: 10.0 * U.pow(2).mean())
    plain = ef.decompose(E, rank=3, method="gd", steps=60)
    assert f.U.pow(2).mean() < plain.U.pow(2).mean()


# --- rank choice ---


def test_rank_for_ratio():
    r = resolve_rank((30522, 384), ratio=6)
    assert 30522 * 384 / (r * (30522 + 384)) >= 6 > 30522 * 384 / ((r + 1) * (30522 + 384))


def test_energy_and_max_error_targets():
    E = decaying_matrix(200, 30, decay=2.0)
    sv = spectrum(E)
    e = sv.pow(2)
    r = resolve_rank(E.shape, energy=0.9, singular_values=sv)
    assert e[:r].sum() / e.sum() >= 0.9 > e[: r - 1].sum() / e.sum()
    r2 = resolve_rank(E.shape, max_error=0.2, singular_values=sv)
    assert optimal_relative_error(sv, r2) <= 0.2 < optimal_relative_error(sv, r2 - 1)
    f = ef.decompose(E, max_error=0.2, method="svd")
    assert f.rank == r2 and f.relative_error(E) <= 0.2 + 1e-6


def test_energy_one_on_low_rank_matrix_finds_true_rank():
    E = low_rank_matrix(50, 20, 7)
    assert ef.decompose(E, energy=1.0).rank == 7


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, r"rank must be >= 1"),
        ({"rank": -3}, r"rank must be >= 1"),
        ({"rank": 16}, r"rank must be >= 1 and < min\(vocab, d\)=16"),
        ({"rank": 40}, r"< min\(vocab, d\)"),
        ({"rank": 2.5}, r"rank must be an integer"),
        ({"ratio": 1.0}, r"ratio must be a finite number > 1"),
        ({"ratio": 0.5}, r"ratio must be a finite number > 1"),
        ({"ratio": 1000.0}, r"ratio=1000.0 is too large"),
        ({"energy": 0.0}, r"energy must be in \(0, 1\]"),
        ({"energy": 1.5}, r"energy must be in \(0, 1\]"),
        ({"energy": 1.0}, r"needs rank 16 = min\(vocab, d\)"),
        ({"max_error": 0.0}, r"max_error must be in \(0, 1\)"),
        ({"max_error": 1.0}, r"max_error must be in \(0, 1\)"),
        ({}, r"give exactly one of"),
        ({"rank": 3, "ratio": 2.0}, r"give exactly one of .*rank, ratio"),
    ],
)
def test_bad_rank_targets(kwargs, match):
    E = decaying_matrix(64, 16)
    with pytest.raises(ConfigError, match=match):
        ef.decompose(E, method="svd", **kwargs)


def test_errors_are_value_errors():
    with pytest.raises(ValueError, match="rank must be"):
        ef.decompose(decaying_matrix(20, 8), rank=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_rejected(bad):
    E = decaying_matrix(30, 8)
    E[3, 5] = bad
    with pytest.raises(InvalidInputError, match=r"NaN or Inf \(first at row 3, column 5\)"):
        ef.decompose(E, rank=2)


@pytest.mark.parametrize(
    ("E", "exc", "match"),
    [
        (torch.zeros(3, 4, 5), InvalidInputError, "must be a 2-D"),
        (torch.zeros(0, 4), InvalidInputError, "is empty"),
        (torch.zeros(5, 4, dtype=torch.int64), InvalidTypeError, "floating-point"),
        ([[1.0, 2.0]], InvalidTypeError, "torch.Tensor or numpy.ndarray"),
    ],
)
def test_bad_matrices(E, exc, match):
    with pytest.raises(exc, match=match):
        ef.decompose(E, rank=1)


def test_unknown_method_lists_valid_ones():
    with pytest.raises(UnknownMethodError, match=r"unknown decomposition method 'nope'; valid methods: .*svd"):
        ef.decompose(decaying_matrix(20, 8), rank=2, method="nope")


def test_numpy_input_accepted():
    E = decaying_matrix(40, 10).numpy()
    assert ef.decompose(E, rank=3).U.shape == (40, 3)


def test_zero_matrix_energy_rejected():
    with pytest.raises(InvalidInputError, match="all zeros"):
        ef.decompose(torch.zeros(10, 4), energy=0.5)
    assert ef.decompose(torch.zeros(10, 4), rank=2, method="svd").relative_error(torch.zeros(10, 4)) == 0.0
