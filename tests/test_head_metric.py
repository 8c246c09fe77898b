"""Rounding in a tied head's metric: H from the head's inputs, GPTQ-style int-k rounding, its use by the planner."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from embfactor.decomposition.intk import hessian_round, int_method, int_quantize
from embfactor.errors import ConfigError, InvalidInputError
from embfactor.eval.head import head_second_moment, head_statistics, tied_head
from embfactor.models import LoadedModel


class CharTokenizer:
    """Token id = byte value mod ``vocab``: enough text → ids for the head's second moment."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [b % self.vocab for b in text.encode()]}


def correlated_moment(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)  # strongly unequal, correlated directions
    X = torch.randn(4096, d, generator=g) @ A.T
    return (X.T @ X / X.shape[0]).double()


def head_error(E: torch.Tensor, Ehat: torch.Tensor, H: torch.Tensor) -> float:
    diff = (E - Ehat).double()
    return float(((diff @ H) * diff).sum())


@pytest.mark.parametrize("bits,group,d", [(4, 32, 64), (3, 16, 48), (8, None, 40), (2, 32, 40)])
def test_identity_metric_is_round_to_nearest(bits, group, d):
    E = torch.randn(70, d, generator=torch.Generator().manual_seed(1))
    a, b = hessian_round(E, torch.eye(d), bits=bits, group=group), int_quantize(E, bits=bits, group=group)
    assert torch.equal(a.packed, b.packed) and torch.equal(a.scale, b.scale)


@pytest.mark.parametrize("bits", [3, 4])
def test_head_metric_beats_round_to_nearest_at_equal_bytes(bits):
    d = 64
    E = torch.randn(300, d, generator=torch.Generator().manual_seed(2))
    H = correlated_moment(d)
    rtn, hr = int_quantize(E, bits=bits, group=32), hessian_round(E, H, bits=bits, group=32)
    assert hr.num_bytes == rtn.num_bytes and hr.packed.shape == rtn.packed.shape
    # what is measured is what the head sees: the metric error under H drops, the plain error rises
    assert head_error(E, hr.reconstruct(), H) < 0.7 * head_error(E, rtn.reconstruct(), H)
    assert hr.relative_error(E) > rtn.relative_error(E)


def test_head_metric_rows_are_independent_and_read_by_the_intk_format():
    from embfactor.formats.base import from_factors

    d = 64
    E = torch.randn(100, d, generator=torch.Generator().manual_seed(3))
    H = correlated_moment(d, seed=1)
    whole = hessian_round(E, H, bits=4, group=32).reconstruct()
    part = hessian_round(E[40:70], H, bits=4, group=32).reconstruct()
    torch.testing.assert_close(part, whole[40:70])  # a tier's rows round exactly as in the whole-table fit
    module = from_factors(hessian_round(E, H, bits=4, group=32))
    torch.testing.assert_close(module(torch.arange(100)), whole)


def test_int_method_takes_the_metric():
    d = 32
    E = torch.randn(50, d, generator=torch.Generator().manual_seed(4))
    H = correlated_moment(d)
    torch.testing.assert_close(int_method(E, bits=4, group=32, hessian=H).reconstruct(),
                               hessian_round(E, H, bits=4, group=32).reconstruct())
    with pytest.raises(ConfigError, match="symmetric=True"):
        int_method(E, bits=4, hessian=H, symmetric=False)


def test_hessian_round_errors():
    E = torch.randn(10, 32)
    with pytest.raises(InvalidInputError, match=r"H must be 32 × 32"):
        hessian_round(E, torch.eye(16))
    with pytest.raises(ConfigError, match="damp must be in"):
        hessian_round(E, torch.eye(32), damp=0.0)
    with pytest.raises(ConfigError, match="group must be one of"):
        hessian_round(E, torch.eye(32), group=24)


def test_head_second_moment_is_the_heads_inputs(tiny_llama_tied, tiny_llama_untied, tiny_bert):
    lm = LoadedModel("tiny-llama", tiny_llama_tied, CharTokenizer(120), "decoder", Path("."))
    assert tied_head(lm) is tiny_llama_tied.lm_head
    assert tied_head(LoadedModel("u", tiny_llama_untied, CharTokenizer(120), "decoder", Path("."))) is None
    assert tied_head(LoadedModel("b", tiny_bert, CharTokenizer(120), "encoder", Path("."))) is None
    text = "the cat sat on the mat and the dog sat on the log " * 8
    H = head_second_moment(lm, text, tokens=96, window=32)
    ids = torch.tensor(CharTokenizer(120)(text)["input_ids"][:96]).view(3, 32)
    with torch.no_grad():  # Llama's last hidden state is the normed one the head reads
        h = tiny_llama_tied(input_ids=ids, output_hidden_states=True).hidden_states[-1].reshape(-1, H.shape[0])
    torch.testing.assert_close(H, (h.double().T @ h.double()) / h.shape[0])


def test_predicted_counts_are_the_models_next_token_probabilities(tiny_llama_tied):
    """head_statistics: the same H, and Σₜ softmax(logitsₜ): what a tied row's head error is weighted by."""
    from embfactor.plan.apply import with_predicted

    lm = LoadedModel("tiny-llama", tiny_llama_tied, CharTokenizer(120), "decoder", Path("."))
    text = "the cat sat on the mat and the dog sat on the log " * 8
    H, predicted = head_statistics(lm, text, tokens=96, window=32)
    torch.testing.assert_close(H, head_second_moment(lm, text, tokens=96, window=32))
    assert head_statistics(lm, text, tokens=96, window=32, predicted=False)[1] is None
    ids = torch.tensor(CharTokenizer(120)(text)["input_ids"][:96]).view(3, 32)
    with torch.no_grad():
        p = torch.softmax(tiny_llama_tied(input_ids=ids).logits.double(), -1).reshape(-1, 120).sum(0)
    torch.testing.assert_close(predicted, p)
    assert predicted.shape == (120,) and abs(float(predicted.sum()) - 96) < 1e-6
    # the planner's weight: half the count as an input, half the predicted count scaled to the counted total
    counts = torch.bincount(ids.flatten(), minlength=120).double()
    w = with_predicted(counts, predicted)
    torch.testing.assert_close(w, (counts + predicted * 96 / float(predicted.sum())) / 2)
    assert float(w.sum()) == pytest.approx(96) and bool((w[counts == 0] > 0).all())


def test_external_gguf_table_matches_ggml_block_rounding():
    """Q8_0 as llama.cpp computes it: per block of 32, d = absmax/127, values round(x / d), d stored in fp16."""
    from embfactor.pipeline.references import external_table

    E = torch.randn(6, 64, generator=torch.Generator().manual_seed(5))
    T, nbytes, info = external_table("gguf-q8_0", E)
    blocks = E.view(6, 2, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    expected = (torch.round(blocks * (1 / d)) * d.half().float()).view(6, 64)
    torch.testing.assert_close(T, expected, atol=1e-6, rtol=0)
    assert nbytes == 6 * 2 * 34 and info["bits_per_value"] == 8.5


def _plain_hessian_round(E: torch.Tensor, H: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    """GPTQ's rule one column at a time, every later column updated at once (no lazy blocks, no transposes)."""
    from embfactor.decomposition._common import inverse_cholesky

    U, qmax, w = inverse_cholesky(H, E.shape[1]), 2 ** (bits - 1) - 1, E.clone().float()
    out = torch.empty_like(w)
    for c in range(E.shape[1]):
        if c % g == 0:
            sf = (w[:, c:c + g].abs().amax(1) / qmax).clamp_min(torch.finfo(torch.float16).tiny).half().float()
        q = torch.round(w[:, c] / sf).clamp(-qmax, qmax)
        out[:, c] = q * sf
        w[:, c + 1:] -= ((w[:, c] - q * sf) / U[c, c])[:, None] * U[c, c + 1:][None]
    return out


def _plain_hessian_encode(X: torch.Tensor, books: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    from embfactor.decomposition._common import inverse_cholesky

    M, _, sub = books.shape
    U, w, out = inverse_cholesky(H, M * sub), X.clone(), torch.empty(X.shape[0], M, dtype=torch.long)
    for m in range(M):
        c0, c1 = m * sub, (m + 1) * sub
        T = torch.linalg.inv(U[c0:c1, c0:c1])
        out[:, m] = torch.cdist(w[:, c0:c1] @ T, books[m] @ T).argmin(1)
        w[:, c1:] -= ((w[:, c0:c1] - books[m][out[:, m]]) @ T) @ U[c0:c1, c1:]
    return out


def well_conditioned_moment(d: int) -> torch.Tensor:
    # correlated neighbours, spread scales, condition number ~100: float32 rounding does not flip any code
    X = torch.randn(3000, d, generator=torch.Generator().manual_seed(6)) * torch.linspace(0.2, 2, d)
    X[:, 1:] += 0.5 * X[:, :-1]
    return (X.T @ X / X.shape[0]).double()


@pytest.mark.parametrize("bits,group", [(4, 32), (3, 16)])
def test_hessian_round_matches_the_plain_rule(bits, group):
    d = 160  # two lazy blocks of 128 columns and a partial one
    E = torch.randn(300, d, generator=torch.Generator().manual_seed(7))
    H = well_conditioned_moment(d)
    torch.testing.assert_close(hessian_round(E, H, bits=bits, group=group).reconstruct(),
                               _plain_hessian_round(E, H, bits, group), atol=0, rtol=0)


def test_hessian_encode_matches_the_plain_rule_and_lowers_the_head_error():
    from embfactor.decomposition.codebook import hessian_encode

    d, sub = 150, 3
    X = torch.randn(400, d, generator=torch.Generator().manual_seed(8))
    books = torch.randn(d // sub, 16, sub, generator=torch.Generator().manual_seed(9))
    H = correlated_moment(d)
    codes = hessian_encode(X, books, H)
    assert torch.equal(codes, _plain_hessian_encode(X, books, H))
    nearest = torch.cdist(X.view(400, -1, sub).transpose(0, 1), books).argmin(-1).T
    decoded = [books[torch.arange(d // sub), c].reshape(400, d) for c in (codes, nearest)]
    assert head_error(X, decoded[0], H) < 0.8 * head_error(X, decoded[1], H)


def test_planner_fits_and_errors_in_the_head_metric():
    """fit_rows passes H to int and pq (the same rows as the direct calls); row_errors measures diff·H·diffᵀ."""
    from embfactor.decomposition.codebook import encode_in_metric, pq, quantize_table
    from embfactor.plan import FormatChoice, fit_rows, row_errors

    d = 24
    E = torch.randn(400, d, generator=torch.Generator().manual_seed(10))
    H = correlated_moment(d)
    f_int = fit_rows(E, FormatChoice("int", {"bits": 4, "group": 16}), None, hessian=H)
    torch.testing.assert_close(f_int.reconstruct(), hessian_round(E, H, bits=4, group=16).reconstruct())
    f_pq = fit_rows(E, FormatChoice("pq", {"sub_dim": 3, "K": 16}), None, hessian=H)
    assert f_pq.meta["encoding"] == "hessian" and f_pq.meta["training"] == "metric"
    trained = quantize_table(E, sub_dim=3, K=16, metric=H)  # codebooks trained in the metric, then encoded in it
    assert torch.equal(f_pq.codes, encode_in_metric(E, trained, H).codes)
    errs = row_errors(E, f_int, metric=H)
    diff = (E - f_int.reconstruct()).double()
    torch.testing.assert_close(errs, ((diff @ H) * diff).sum(1))
    with pytest.raises(ConfigError, match="no rotation and no row scale"):
        pq(E, sub_dim=3, K=16, rotation="random", hessian=H)
