"""Folders saved by embfactor before the storage formats (tests/fixtures/v1) still load and give the same outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import embfactor as ef
from embfactor.formats import BlockFactorizedEmbedding, FactorizedEmbedding, QuantizedFactorizedEmbedding, TTEmbedding

FIXTURES = Path(__file__).parent / "fixtures" / "v1"
LAYERS = {
    "factorized": FactorizedEmbedding,
    "block": BlockFactorizedEmbedding,
    "tt": TTEmbedding,
    "quantized": QuantizedFactorizedEmbedding,
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_v1_folder_loads_with_the_same_outputs(name):
    model = ef.load_compressed(FIXTURES / name)
    expected = torch.load(FIXTURES / name / "expected.pt")
    emb = model.get_input_embeddings()
    assert type(emb) is LAYERS[name]
    with torch.no_grad():
        out = model(input_ids=expected["ids"])
        got = out.logits if hasattr(out, "logits") else out.last_hidden_state
        torch.testing.assert_close(emb(expected["ids"]), expected["embeddings"], rtol=0, atol=1e-6)
    torch.testing.assert_close(got, expected["output"], rtol=1e-5, atol=1e-5)
