"""The shared suite: every registered decomposition and every registered storage format, one set of tests.

How each is exercised comes from tests/recipes.py (defaults cover most; a new method or format adds at most one
line there). Specific behaviour of one method or format stays in its own test file.
"""

from __future__ import annotations

import json
from functools import cache

import pytest
import torch
import torch.nn.functional as F

import embfactor as ef
from embfactor.decomposition import available_methods, get_method
from embfactor.errors import ConfigError, UnknownMethodError
from embfactor.formats import RowFormat, available_formats, from_factors, get_format
from embfactor.layers import FactorizedLMHead
from tests.conftest import decaying_matrix, low_rank_matrix
from tests.recipes import FORMATS, METHODS, MethodRecipe

N, D, PAD = 96, 24, 3


def skewed(n: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(7)) ** 8 * 1000 + 0.01


def recipe(method: str) -> MethodRecipe:
    return METHODS.get(method, MethodRecipe())


def run(method: str, E: torch.Tensor, **setting) -> ef.Factors:
    r = recipe(method)
    data = {"token_weights": skewed(E.shape[0])} if get_method(method).data_aware else {}
    return ef.decompose(E, method=method, seed=0, **r.options, **data, **setting)


@cache
def producers() -> dict[str, str]:
    """format name -> the first method (sorted) whose Factors that format holds."""
    E = decaying_matrix(40, 8)
    out: dict[str, str] = {}
    for m in available_methods():
        out.setdefault(from_factors(run(m, E, **recipe(m).settings[0])).format_name, m)
    return out


def build(name: str, E: torch.Tensor, pad: int | None) -> RowFormat:
    if name in FORMATS:
        return FORMATS[name].build(E, pad)
    m = producers()[name]
    return from_factors(run(m, E, **recipe(m).settings[-1]), pad)


# ------------------------------------------------------------------------------------------ decompositions
@pytest.mark.parametrize("method", [m for m in available_methods() if recipe(m).exact is not None])
def test_full_rank_reconstructs(method):
    E = low_rank_matrix(N, D, 4)
    f = run(method, E, **recipe(method).exact)
    err = float(torch.linalg.norm(E - f.reconstruct()) / torch.linalg.norm(E))
    assert err < 1e-5, err
    assert f.meta["relative_error"] == pytest.approx(err, abs=1e-5)


@pytest.mark.parametrize("method", available_methods())
def test_error_monotone_in_size(method):
    E = decaying_matrix(N, D, decay=2.0)
    errs = [run(method, E, **s).relative_error(E) for s in recipe(method).settings]
    assert all(b <= a + recipe(method).tol for a, b in zip(errs, errs[1:])), errs


@pytest.mark.parametrize("method", available_methods())
def test_counts_add_up_and_meta(method):
    E = decaying_matrix(N, D)
    f = run(method, E, **recipe(method).settings[1])
    fmt = from_factors(f)
    assert f.method == method
    assert f.shape == (N, D) == (fmt.num_embeddings, fmt.embedding_dim)
    assert fmt.num_params == f.num_params
    assert f.meta["relative_error"] == pytest.approx(f.relative_error(E), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(fmt.dense(), f.reconstruct(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", available_methods())
def test_deterministic_given_seed(method):
    E = decaying_matrix(N, D)
    a, b = (run(method, E, **recipe(method).settings[1]) for _ in range(2))
    assert torch.equal(a.reconstruct(), b.reconstruct())


@pytest.mark.parametrize("method", available_methods())
def test_unknown_option_names_the_valid_ones(method):
    with pytest.raises(ConfigError, match=rf"unknown option\(s\) bogus for method '{method}'; its options: "):
        run(method, decaying_matrix(N, D), rank=2, bogus=1)


@pytest.mark.parametrize(
    ("method", "options", "error", "match"),
    [(m, *bad) for m in available_methods() for bad in recipe(m).bad],
)
def test_bad_options_raise_documented_error(method, options, error, match):
    with pytest.raises(error, match=match):
        run(method, decaying_matrix(N, D), rank=2, **options)


@pytest.mark.parametrize("method", available_methods())
def test_model_save_load_round_trip(method, tiny_gpt2, tmp_path):
    """Through factorize_ / save / load on a model with a tied head: same logits, factors shared, nothing twice."""
    from tests.conftest import VOCAB

    opts = {"token_weights": skewed(VOCAB)} if get_method(method).data_aware else {}
    rep = ef.factorize_(tiny_gpt2, method=method, **recipe(method).settings[2], **recipe(method).options, **opts)
    emb, head = tiny_gpt2.get_input_embeddings(), tiny_gpt2.get_output_embeddings()
    assert rep.tied_head and isinstance(head, FactorizedLMHead) and head.embedding is emb
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        before = tiny_gpt2(input_ids=ids).logits
    ef.save_compressed(tiny_gpt2, tmp_path / "m")
    loaded = ef.load_compressed(tmp_path / "m")
    new = loaded.get_input_embeddings()
    assert type(new) is type(emb) and new.format_config() == emb.format_config()
    assert loaded.get_output_embeddings().embedding is new
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in tiny_gpt2.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, before)


# ------------------------------------------------------------------------------------------ storage formats
def test_every_format_has_a_recipe():
    missing = [n for n in available_formats() if n not in FORMATS and n not in producers()]
    assert not missing, f"add a FormatRecipe to tests/recipes.py for {missing}"


@pytest.fixture(params=available_formats())
def fmt_case(request):
    E = decaying_matrix(N, D, seed=1)
    E[PAD] = 0  # a pretrained padding row is zero; it must stay zero
    return request.param, E, build(request.param, E, PAD)


@pytest.mark.parametrize("shape", [(11,), (3, 5), ()])
def test_forward_equals_lookup_in_dense(fmt_case, shape):
    name, _, fmt = fmt_case
    x = torch.randint(0, N, shape, generator=torch.Generator().manual_seed(0))
    out = fmt(x)
    assert out.shape == (*shape, D)
    torch.testing.assert_close(out, F.embedding(x, fmt.dense()), rtol=1e-5, atol=1e-6)


def test_padding_row_stays_zero(fmt_case):
    _, _, fmt = fmt_case
    assert fmt.padding_idx == PAD
    assert torch.count_nonzero(fmt(torch.tensor([PAD, PAD]))) == 0


def test_tied_head_logits(fmt_case):
    _, _, fmt = fmt_case
    h = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(0))
    bias = torch.randn(N)
    head = FactorizedLMHead(fmt, bias)
    torch.testing.assert_close(head(h), h @ fmt.dense().T + bias, rtol=1e-4, atol=1e-4)
    assert head.embedding is fmt and not list(head.parameters())[1:]  # only the bias is the head's own


def test_bytes_and_params_add_up(fmt_case):
    _, _, fmt = fmt_case
    stored = fmt.state_dict().values()
    assert fmt.num_bytes() == sum(t.numel() * t.element_size() for t in stored)
    assert 0 <= fmt.num_params <= sum(t.numel() for t in stored)
    assert fmt.num_bytes() < N * D * 4  # every format is smaller than the fp32 table it stores


def test_save_load_round_trip(fmt_case, tmp_path):
    """What save_compressed stores for a format: its name and config as JSON, its tensors as safetensors."""
    from safetensors.torch import load_file, save_file

    name, _, fmt = fmt_case
    record = json.loads(json.dumps({"format": fmt.format_name, "config": fmt.format_config()}))
    save_file({k: v.contiguous() for k, v in fmt.state_dict().items()}, str(tmp_path / "t.safetensors"))
    new = get_format(record["format"]).empty(N, D, PAD, **record["config"])
    new.load_state_dict(load_file(str(tmp_path / "t.safetensors")), strict=True)
    assert type(new) is type(fmt) and new.format_name == name
    assert new.format_config() == fmt.format_config()
    assert torch.equal(new.dense(), fmt.dense())


def test_unknown_format_lists_valid_ones():
    with pytest.raises(UnknownMethodError, match="unknown storage format 'hologram'; valid formats: .*tiered"):
        get_format("hologram")
