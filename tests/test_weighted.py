"""Data-aware factorizations: wsvd (weighted SVD), block (frequency buckets), token frequencies, the block layer."""

from __future__ import annotations

import pytest
import torch

import embfactor as ef
from embfactor.decomposition.wsvd import weighted_error
from embfactor.errors import ConfigError, InvalidInputError
from embfactor.formats import from_factors
from embfactor.layers import BlockFactorizedEmbedding

from .conftest import decaying_matrix


def skewed_weights(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g) ** 8 * 1000 + 0.01  # Zipf-like: a few rows carry most of the weight


def test_wsvd_uniform_weights_equal_svd():
    E = decaying_matrix(300, 24, decay=2)
    a = ef.decompose(E, rank=6, method="svd")
    b = ef.decompose(E, rank=6, method="wsvd", token_weights=torch.full((300,), 3.0))
    torch.testing.assert_close(b.U, a.U, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(b.V, a.V, atol=1e-4, rtol=1e-3)


def test_wsvd_lower_weighted_error_than_svd_on_skewed_weights():
    E = torch.randn(400, 32, generator=torch.Generator().manual_seed(1))
    w = skewed_weights(400)
    a = ef.decompose(E, rank=8, method="svd")
    b = ef.decompose(E, rank=8, method="wsvd", token_weights=w)
    assert weighted_error(E, b.U, b.V, w) < 0.9 * weighted_error(E, a.U, a.V, w)
    assert b.relative_error(E) >= a.relative_error(E) - 1e-6  # svd stays optimal for the unweighted error


def test_wsvd_als_refinement_does_not_increase_error():
    E = torch.randn(200, 16, generator=torch.Generator().manual_seed(2))
    w = skewed_weights(200, 3)
    f0 = ef.decompose(E, rank=4, method="wsvd", token_weights=w)
    f1 = ef.decompose(E, rank=4, method="wsvd", token_weights=w, n_iter=3)
    # the closed form is already the optimum for row weights: ALS keeps it
    assert f1.meta["weighted_relative_error"] <= f0.meta["weighted_relative_error"] + 1e-6


@pytest.mark.parametrize("method", ["wsvd", "block"])
def test_data_aware_methods_need_weights(method):
    with pytest.raises(ConfigError, match="token_weights=.*--text"):
        ef.decompose(torch.randn(50, 8), rank=2, method=method)
    with pytest.raises(InvalidInputError, match="49 entries but the embedding has 50 rows"):
        ef.decompose(torch.randn(50, 8), rank=2, method=method, token_weights=torch.ones(49))
    with pytest.raises(InvalidInputError, match="non-negative"):
        ef.decompose(torch.randn(50, 8), rank=2, method=method, token_weights=-torch.ones(50))


def test_block_matches_budget_and_beats_svd_on_weighted_error():
    E = torch.randn(600, 32, generator=torch.Generator().manual_seed(4))
    w = skewed_weights(600, 5)
    f = ef.decompose(E, rank=8, method="block", token_weights=w)
    budget = 8 * (600 + 32)
    assert budget - (600 + 32) < f.num_params <= budget
    assert sum(f.meta["sizes"]) == 600 and len(f.meta["ranks"]) == len(f.meta["sizes"])
    assert f.meta["ranks"][0] >= f.meta["ranks"][-1]  # frequent tokens get more rank
    a = ef.decompose(E, rank=8, method="svd")
    assert weighted_error(E, f.U, f.V, w) < weighted_error(E, a.U, a.V, w)
    m = from_factors(f)
    assert isinstance(m, BlockFactorizedEmbedding) and m.num_params == f.num_params
    ids = torch.randint(0, 600, (3, 11))
    R = f.reconstruct()
    torch.testing.assert_close(m(ids), R[ids], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.weight, R, atol=1e-5, rtol=1e-5)
    h = torch.randn(2, 5, 32)
    torch.testing.assert_close(m.project(h), h @ R.T, atol=1e-4, rtol=1e-4)
    assert abs(f.relative_error(E) - float((E - R).norm() / E.norm())) < 1e-5


def test_block_layer_padding_and_bad_config():
    emb = BlockFactorizedEmbedding(20, 4, sizes=[5, 15], ranks=[3, 1], padding_idx=2)
    torch.nn.init.normal_(emb.tiers[0].U)
    torch.nn.init.normal_(emb.tiers[0].V)
    assert emb(torch.tensor([2])).abs().sum() == 0
    with pytest.raises(ConfigError, match="sum to num_embeddings=20"):
        BlockFactorizedEmbedding(20, 4, sizes=[5, 14], ranks=[3, 1])
    with pytest.raises(ConfigError, match="bucket rank 5"):
        BlockFactorizedEmbedding(20, 4, sizes=[5, 15], ranks=[5, 1])


def _weights(model) -> torch.Tensor:
    n = model.get_input_embeddings().num_embeddings
    return skewed_weights(n, 7)


class WordTokenizer:
    """A whitespace tokenizer with a fixed vocabulary (known answers for the counts)."""

    def __init__(self, words: list[str]) -> None:
        self.vocab = {w: i for i, w in enumerate(words)}

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    def __call__(self, texts, add_special_tokens=True, truncation=False, verbose=True):
        return {"input_ids": [[self.vocab.get(w, 1) for w in t.split()] for t in texts]}


def test_token_counts_and_weights(tmp_path, monkeypatch):
    from embfactor.data.frequency import token_counts, token_weights

    monkeypatch.setenv("EMBFACTOR_CACHE", str(tmp_path / "cache"))
    tok = WordTokenizer(["[PAD]", "[UNK]", "the", "cat", "dog", "sat"])
    texts = ["the cat sat on the mat", "the dog"]
    c = token_counts(tok, texts, vocab_size=8)
    assert c.tolist() == [0, 2, 3, 1, 1, 1, 0, 0]  # "on", "mat" are unknown; rows beyond the tokenizer stay 0
    assert list((tmp_path / "cache").glob("freq-*.npy"))  # cached on disk
    torch.testing.assert_close(token_counts(tok, texts, vocab_size=8), c)
    w = token_weights(tok, texts, vocab_size=8, power=1.0, floor=1.0)
    torch.testing.assert_close(w, (c + 1) / (c + 1).mean())  # unseen tokens keep the floor weight
    with pytest.raises(InvalidInputError, match="all empty"):
        token_counts(tok, ["  ", ""], vocab_size=8)
    with pytest.raises(ConfigError, match="floor must be a positive"):
        token_weights(tok, texts, vocab_size=8, floor=0)


def test_compress_cli_wsvd_with_text(tiny_bert_dir, tmp_path, monkeypatch):
    from embfactor.cli.main import main

    monkeypatch.setenv("EMBFACTOR_CACHE", str(tmp_path / "cache"))
    txt = tmp_path / "t.txt"
    txt.write_text("the cat sat on the mat\n\nthe dog is very good\n")
    out = tmp_path / "o"
    assert main(["compress", str(tiny_bert_dir), "--rank", "4", "--method", "wsvd", "--text", str(txt),
                 "-o", str(out), "-q"]) == 0
    assert ef.load_model(str(out)).record["method"] == "wsvd"
    assert main(["compress", str(tiny_bert_dir), "--rank", "4", "--method", "block", "--text",
                 str(tmp_path / "missing.txt"), "-o", str(tmp_path / "o2"), "-q"]) == 2
    assert not (tmp_path / "o2").exists()
