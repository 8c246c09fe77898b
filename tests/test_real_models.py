"""The bundled default model (all-MiniLM-L6-v2) end to end: compress, save, load, same sentence embeddings."""

from __future__ import annotations

import json

import pytest
import torch

import embfactor as ef
from embfactor.cli.main import main

pytestmark = pytest.mark.slow

SENTENCES = ["A man is playing a guitar.", "The new movie is awesome.", "Embeddings can be factorized."]


def _sentence_embeddings(model, tokenizer):
    batch = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm") / "r6"
    rep = out.parent / "r6.json"
    assert main(["compress", "minilm", "--ratio", "6", "--output", str(out), "--json", str(rep), "-q"]) == 0
    return out, json.loads(rep.read_text())


def test_minilm_ratio6_near_optimal(compressed):
    _, r = compressed
    assert r["vocab_size"] == 30522 and r["hidden_size"] == 384 and r["tied_head"] is False
    assert r["ratio"] >= 6
    assert r["relative_error"] <= r["optimal_relative_error"] * 1.01
    assert r["bytes_after"] < r["bytes_before"]


def test_saved_folder_gives_same_sentence_embeddings(compressed):
    out, r = compressed
    lm = ef.load_model("minilm")
    ef.factorize_(lm.model, ratio=6, method=r["method"])
    in_memory = _sentence_embeddings(lm.model, lm.tokenizer)
    loaded = ef.load_model(str(out))
    assert loaded.compressed and loaded.kind == "encoder"
    from_disk = _sentence_embeddings(loaded.model, loaded.tokenizer)
    assert torch.allclose(in_memory, from_disk, atol=1e-6)


def test_fidelity_grows_with_rank(compressed):
    """Cosine between original and compressed sentence embeddings: plain SVD at 6x loses a lot (what healing is
    for); a higher rank loses less."""
    out, _ = compressed
    orig = ef.load_model("minilm")
    ref = _sentence_embeddings(orig.model, orig.tokenizer)
    loaded = ef.load_model(str(out))
    cos_r63 = (ref * _sentence_embeddings(loaded.model, loaded.tokenizer)).sum(-1).mean()
    ef.factorize_(orig.model, rank=320)
    cos_r320 = (ref * _sentence_embeddings(orig.model, orig.tokenizer)).sum(-1).mean()
    assert 0 < cos_r63 < cos_r320 < 1
