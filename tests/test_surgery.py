"""factorize_, save and load on tiny BERT, GPT-2 and Llama models (tied and untied heads)."""

from __future__ import annotations

import json

import pytest
import torch

import embfactor as ef
from embfactor.errors import CorruptFileError, InvalidInputError, InvalidTypeError, ModelNotFoundError, SurgeryError
from embfactor.layers import FactorizedEmbedding, FactorizedLMHead
from embfactor.surgery import get_meta
from tests.conftest import D, VOCAB


def _ids(n=2, t=7, seed=0):
    return torch.randint(1, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_bert_report_adds_up(tiny_bert):
    before = sum(p.numel() for p in tiny_bert.parameters())
    rep = ef.factorize_(tiny_bert, ratio=4, method="svd")
    r = rep.rank
    assert rep.embedding_params_before == VOCAB * D
    assert rep.embedding_params_after == r * (VOCAB + D)
    assert rep.model_params_before == before
    assert rep.model_params_after == before - VOCAB * D + r * (VOCAB + D)
    assert rep.ratio == pytest.approx(VOCAB * D / (r * (VOCAB + D)))
    assert rep.ratio >= 4
    assert rep.tied_head is False
    assert rep.relative_error == pytest.approx(rep.optimal_relative_error, rel=1e-4)
    assert isinstance(tiny_bert.get_input_embeddings(), FactorizedEmbedding)


def test_bert_forward_uses_factors(tiny_bert):
    emb_dense = tiny_bert.get_input_embeddings().weight.detach().clone()
    ef.factorize_(tiny_bert, rank=8, method="svd")
    x = _ids()
    emb = tiny_bert.get_input_embeddings()
    assert torch.allclose(emb(x), torch.nn.functional.embedding(x, emb.U @ emb.V), atol=1e-6)
    assert not torch.allclose(emb.weight, emb_dense)  # rank 8 < 32: it really is an approximation


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama_tied"])
def test_tied_head_shares_factors(fixture, request):
    model = request.getfixturevalue(fixture)
    rep = ef.factorize_(model, rank=10, method="svd")
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert rep.tied_head and isinstance(head, FactorizedLMHead)
    assert head.U is emb.U and head.V is emb.V
    h = torch.randn(2, 3, D)
    assert torch.allclose(head(h), h @ (emb.U @ emb.V).T, atol=1e-5)
    n_unique = len({id(p) for p in model.parameters()})
    assert n_unique == len(list(model.parameters()))
    assert rep.model_params_after == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        logits = model(input_ids=_ids()).logits
    assert logits.shape == (2, 7, VOCAB) and torch.isfinite(logits).all()


def test_untied_llama_keeps_dense_head(tiny_llama_untied):
    head_before = tiny_llama_untied.get_output_embeddings()
    rep = ef.factorize_(tiny_llama_untied, rank=10)
    assert rep.tied_head is False
    assert tiny_llama_untied.get_output_embeddings() is head_before
    assert isinstance(tiny_llama_untied.get_input_embeddings(), FactorizedEmbedding)


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_gpt2", "tiny_llama_tied", "tiny_llama_untied"])
def test_save_load_round_trip(fixture, request, tmp_path):
    model = request.getfixturevalue(fixture)
    ef.factorize_(model, rank=12, method="eig")
    ef.save_compressed(model, tmp_path / "out")
    assert {"model.safetensors", "config.json", "embfactor.json"} <= {p.name for p in (tmp_path / "out").iterdir()}
    loaded = ef.load_compressed(tmp_path / "out")
    x = _ids()
    with torch.no_grad():
        a, b = model(input_ids=x), loaded(input_ids=x)
    key = "logits" if hasattr(a, "logits") else "last_hidden_state"
    assert torch.allclose(getattr(a, key), getattr(b, key), atol=1e-6)
    emb = loaded.get_input_embeddings()
    assert isinstance(emb, FactorizedEmbedding) and emb.rank == 12
    if get_meta(model).tied_head:
        head = loaded.get_output_embeddings()
        assert head.U is emb.U and head.V is emb.V
        # the sharing survives a training step: one update moves both
        loaded(input_ids=x).logits.sum().backward()
        assert emb.U.grad is not None


def test_loaded_model_can_be_saved_again(tiny_gpt2, tmp_path):
    ef.factorize_(tiny_gpt2, rank=6)
    ef.save_compressed(tiny_gpt2, tmp_path / "a")
    again = ef.load_compressed(tmp_path / "a")
    ef.save_compressed(again, tmp_path / "b")
    third = ef.load_compressed(tmp_path / "b")
    x = _ids()
    with torch.no_grad():
        assert torch.allclose(tiny_gpt2(input_ids=x).logits, third(input_ids=x).logits, atol=1e-6)


def test_validation_before_mutation(tiny_gpt2):
    state = _state(tiny_gpt2)
    modules = dict(tiny_gpt2.named_modules())
    for kwargs in ({"rank": 32}, {"ratio": 0.5}, {"rank": 4, "method": "nope"}, {"energy": 2.0}):
        with pytest.raises(ValueError):
            ef.factorize_(tiny_gpt2, **kwargs)
        assert dict(tiny_gpt2.named_modules()).keys() == modules.keys()
        assert all(a is b for a, b in zip(dict(tiny_gpt2.named_modules()).values(), modules.values()))
        assert all(torch.equal(state[k], v) for k, v in tiny_gpt2.state_dict().items())


def test_already_factorized(tiny_bert):
    ef.factorize_(tiny_bert, rank=4)
    with pytest.raises(SurgeryError, match="already factorized"):
        ef.factorize_(tiny_bert, rank=4)


def test_plain_module_needs_module_name():
    model = torch.nn.Sequential(torch.nn.Embedding(50, 10), torch.nn.Linear(10, 2))
    with pytest.raises(SurgeryError, match="pass module_name="):
        ef.factorize_(model, rank=3)
    rep = ef.factorize_(model, rank=3, module_name="0")
    assert isinstance(model[0], FactorizedEmbedding) and rep.rank == 3
    with pytest.raises(SurgeryError, match="has no submodule 'nope'"):
        ef.factorize_(torch.nn.Sequential(torch.nn.Embedding(5, 4)), rank=1, module_name="nope")


def test_config_and_keywords_conflict(tiny_bert):
    with pytest.raises(SurgeryError, match="either config= or keyword"):
        ef.factorize_(tiny_bert, ef.FactorizationConfig(rank=4), rank=5)


def test_save_requires_factorized(tiny_bert, tmp_path):
    with pytest.raises(SurgeryError, match="is not factorized"):
        ef.save_compressed(tiny_bert, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_save_refuses_foreign_folder(tiny_bert, tmp_path):
    ef.factorize_(tiny_bert, rank=4)
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    with pytest.raises(InvalidInputError, match="not an embfactor output; refusing to overwrite"):
        ef.save_compressed(tiny_bert, target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]


def test_save_replaces_earlier_output_atomically(tiny_bert, tmp_path):
    ef.factorize_(tiny_bert, rank=4)
    ef.save_compressed(tiny_bert, tmp_path / "o")
    ef.save_compressed(tiny_bert, tmp_path / "o")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no temporary folders left behind


def test_load_errors(tiny_bert, tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        ef.load_compressed(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="embfactor.json is missing"):
        ef.load_compressed(tmp_path / "empty")
    ef.factorize_(tiny_bert, rank=4)
    out = tmp_path / "o"
    ef.save_compressed(tiny_bert, out)
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="model.safetensors"):
        ef.load_compressed(out)
    rec = json.loads((out / "embfactor.json").read_text())
    (out / "embfactor.json").write_text(json.dumps({**rec, "format_version": 99}))
    with pytest.raises(CorruptFileError, match="format_version 99 is not supported"):
        ef.load_compressed(out)
    (out / "embfactor.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        ef.load_compressed(out)


def test_load_rejects_mismatched_rank(tiny_bert, tmp_path):
    ef.factorize_(tiny_bert, rank=4)
    out = tmp_path / "o"
    ef.save_compressed(tiny_bert, out)
    rec = json.loads((out / "embfactor.json").read_text())
    (out / "embfactor.json").write_text(json.dumps({**rec, "layer_config": {"rank": 5, "sparse": False}}))
    with pytest.raises(CorruptFileError, match="weights do not match"):
        ef.load_compressed(out)
    (out / "embfactor.json").write_text(json.dumps({**rec, "layer_type": "hologram"}))
    with pytest.raises(CorruptFileError, match="unknown storage format 'hologram'"):
        ef.load_compressed(out)


def test_config_json_round_trip():
    cfg = ef.FactorizationConfig(ratio=6, method="rsvd", method_options={"power_iters": 2})
    back = ef.FactorizationConfig.from_dict(json.loads(cfg.to_json()))
    assert back == cfg
    with pytest.raises(CorruptFileError, match="unknown fields"):
        ef.FactorizationConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_api_takes_what_load_model_returns_and_save_carries_its_tokenizer(tiny_bert_dir, tmp_path):
    """The README's flow: factorize_/quantize_/save on a load_model result; the folder then works with the CLI
    (it was refused: no tokenizer was saved, and factorize_ raised "needs a torch nn.Module, got LoadedModel")."""
    from fastapi.testclient import TestClient

    import embfactor as ef
    from embfactor.cli.serve_cmd import build_app

    lm = ef.load_model(tiny_bert_dir)
    report = ef.factorize_(lm, rank=8, method="svd")
    assert report.rank == 8 and lm.model.get_input_embeddings().num_params == 8 * (VOCAB + D)
    ef.quantize_(lm, "int8")
    out = ef.save_compressed(lm, tmp_path / "api-r8")
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()
    again = ef.load_model(out)
    assert again.compressed and again.tokenizer("the cat")["input_ids"] == lm.tokenizer("the cat")["input_ids"]
    ids = torch.tensor([lm.tokenizer("the cat sat")["input_ids"]])
    assert torch.equal(ef.load_compressed(out)(input_ids=ids).last_hidden_state, lm.model(input_ids=ids).last_hidden_state)
    client = TestClient(build_app(str(out)))  # what `embfactor serve` runs on the folder
    assert client.post("/embed", json={"texts": ["the cat"]}).status_code == 200
    with pytest.raises(InvalidTypeError, match="needs a torch nn.Module, got str"):
        ef.save_compressed("not a model", tmp_path / "x")

