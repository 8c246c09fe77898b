"""Evaluation tasks: known answers on tiny models and tiny data, and clear errors."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from embfactor.errors import ConfigError, InvalidInputError, UnknownMethodError
from embfactor.eval.tasks import available_tasks, evaluate
from embfactor.models import LoadedModel

TEXTS = [
    "the cat sat on the mat",
    "a dog is a good dog",
    "the film is very bad",
    "a very good movie",
    "the dog sat on a mat",
    "bad film bad movie",
]


@pytest.fixture
def bert_dir(tiny_bert_dir: Path) -> Path:
    """tiny_bert_dir with a tokenizer that knows its vocab.txt (``vocab_file=`` is ignored by transformers 5)."""
    from transformers import BertTokenizerFast

    BertTokenizerFast(vocab=str(tiny_bert_dir / "vocab.txt")).save_pretrained(tiny_bert_dir)
    return tiny_bert_dir


@pytest.fixture
def tokenizer(bert_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bert_dir))
    assert len(tok.get_vocab()) == 120
    return tok


@pytest.fixture
def bert_lm(tiny_bert, tokenizer) -> LoadedModel:
    return LoadedModel("tiny-bert", tiny_bert, tokenizer, "encoder", Path("."))


@pytest.fixture
def llama_lm(tiny_llama_tied, tokenizer) -> LoadedModel:
    # the tiny BERT WordPiece vocabulary has exactly the decoder's 120 tokens; any tokenizer of that size works
    return LoadedModel("tiny-llama", tiny_llama_tied, tokenizer, "decoder", Path("."))


def clone(lm: LoadedModel) -> LoadedModel:
    return LoadedModel(lm.name + "-copy", copy.deepcopy(lm.model), lm.tokenizer, lm.kind, lm.source)


def factorized(lm: LoadedModel, rank: int = 4) -> LoadedModel:
    from embfactor import factorize_

    c = clone(lm)
    factorize_(c.model, rank=rank, method="svd")
    return c


# --- registry and errors ---------------------------------------------------------------------------------------------


def test_registry_lists_the_four_tasks():
    assert available_tasks() == ["classification", "perplexity", "reconstruction", "similarity"]


def test_unknown_task_lists_valid_ones(bert_lm):
    with pytest.raises(UnknownMethodError, match=r"unknown evaluation task 'sts'.*valid tasks: classification, perplexity"):
        evaluate(bert_lm, "sts")


def test_perplexity_on_encoder_is_refused(bert_lm):
    with pytest.raises(InvalidInputError, match=r"'perplexity' applies to decoders.*is an encoder"):
        evaluate(bert_lm, "perplexity")


def test_similarity_on_decoder_is_refused(llama_lm):
    with pytest.raises(InvalidInputError, match=r"'similarity' applies to encoders"):
        evaluate(llama_lm, "similarity", texts=TEXTS, human=np.eye(6))


def test_mismatched_vocabulary_is_refused(bert_lm, tokenizer):
    from transformers import BertConfig, BertModel

    other = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=64)).eval()
    ref = LoadedModel("other", other, tokenizer, "encoder", Path("."))
    with pytest.raises(InvalidInputError, match=r"mismatched vocabularies: model 'tiny-bert' has a 120×32 embedding"):
        evaluate(bert_lm, "reconstruction", reference=ref, token_counts=np.ones(120))


def test_mismatched_tokenizer_is_refused(bert_lm, bert_dir, tmp_path):
    from transformers import BertTokenizerFast

    words = (bert_dir / "vocab.txt").read_text().split("\n")
    words[40] = "zebra"
    (tmp_path / "vocab.txt").write_text("\n".join(words))
    ref = LoadedModel("ref", bert_lm.model, BertTokenizerFast(vocab=str(tmp_path / "vocab.txt")), "encoder", Path("."))
    with pytest.raises(InvalidInputError, match="mismatched vocabularies: the tokenizers"):
        evaluate(bert_lm, "similarity", reference=ref, texts=TEXTS, human=np.eye(6))


def test_kind_mismatch_with_reference_is_refused(bert_lm, llama_lm):
    with pytest.raises(InvalidInputError, match="is an encoder but reference 'tiny-llama' is a decoder"):
        evaluate(bert_lm, "classification", reference=llama_lm, texts=TEXTS, labels=[0, 1] * 3, folds=2)


def test_empty_text_is_refused(bert_lm, llama_lm):
    with pytest.raises(InvalidInputError, match=r"texts\[1\] is empty"):
        evaluate(bert_lm, "similarity", texts=["a cat", "  ", "a dog"], human=np.eye(3))
    with pytest.raises(InvalidInputError, match="text to compute perplexity on is empty"):
        evaluate(llama_lm, "perplexity", text="   ", window=16, stride=16)
    with pytest.raises(InvalidInputError, match="non-empty list"):
        evaluate(bert_lm, "classification", texts=[], labels=[])


def test_labels_file_without_label_column(bert_lm, tmp_path):
    f = tmp_path / "data.csv"
    f.write_text("text,category\ngood,1\nbad,0\n")
    with pytest.raises(InvalidInputError, match="no 'label' column"):
        evaluate(bert_lm, "classification", labels_file=f)


def test_too_few_examples_per_class(bert_lm):
    with pytest.raises(InvalidInputError, match=r"rarest label has 3 example\(s\) but 5-fold"):
        evaluate(bert_lm, "classification", texts=TEXTS, labels=[0, 1] * 3)


def test_reconstruction_needs_reference(bert_lm):
    with pytest.raises(InvalidInputError, match="give a reference model"):
        evaluate(bert_lm, "reconstruction")


# --- similarity --------------------------------------------------------------------------------------------------------


def test_spearman_of_a_perfect_predictor_is_one():
    from embfactor.eval.similarity import correlations

    rng = np.random.default_rng(0)
    h = rng.random((8, 8))
    h = (h + h.T) / 2
    c = correlations(h**3, h)  # monotone transform: rank-perfect
    assert c["spearman"] == pytest.approx(1.0)
    assert c["pearson"] < 1.0
    assert c["n_pairs"] == 28
    assert correlations(h, h)["pearson"] == pytest.approx(1.0)


def test_similarity_known_answers(bert_lm):
    from embfactor.eval.embed import pooled_embeddings

    e = pooled_embeddings(bert_lm, TEXTS)
    human = (e @ e.T).double().numpy()  # the model's own cosines are a perfect prediction
    r = evaluate(bert_lm, "similarity", reference=clone(bert_lm), texts=TEXTS, human=human,
                 fidelity_texts=["a cat", "the good dog sat"])
    assert r["spearman"] == pytest.approx(1.0)
    assert r["pearson"] == pytest.approx(1.0)
    assert r["fidelity"] == pytest.approx(1.0, abs=1e-6)
    assert r["fidelity_min"] == pytest.approx(1.0, abs=1e-6)
    assert r["n_fidelity_texts"] == 8 and r["n_pairs"] == 15 and r["metric"] == "spearman"


def test_similarity_other_domain_fidelity(bert_lm):
    """Newsgroup posts by default (fidelity 1 against itself), scored apart from ``fidelity``; [] leaves them out."""
    from embfactor.data import newsgroup_posts

    posts = newsgroup_posts()
    assert len(posts) == 100 and len(set(posts)) == 100 and all(200 <= len(p) <= 600 for p in posts)
    assert sum(p.count(">") for p in posts) > 100  # quoted replies: not the Wikipedia prose of calibration
    human = np.random.default_rng(0).random((6, 6))
    same = evaluate(bert_lm, "similarity", reference=clone(bert_lm), texts=TEXTS, human=human + human.T,
                    fidelity_texts=["a cat"])
    assert same["fidelity_other"] == pytest.approx(1.0, abs=1e-6) and same["n_other_texts"] == 100
    low = evaluate(factorized(bert_lm, rank=2), "similarity", reference=bert_lm, texts=TEXTS, human=human + human.T,
                   fidelity_texts=["a cat"], other_texts=posts[:5] + ["the dog sat"])
    assert 0.0 < low["fidelity_other"] < 0.9999 and low["n_other_texts"] == 6
    assert low["fidelity_other_min"] <= low["fidelity_other"]
    none = evaluate(bert_lm, "similarity", reference=clone(bert_lm), texts=TEXTS, human=human + human.T,
                    fidelity_texts=["a cat"], other_texts=[])
    assert "fidelity_other" not in none and none["fidelity"] == pytest.approx(same["fidelity"])


def test_similarity_fidelity_drops_after_factorization(bert_lm):
    human = np.random.default_rng(0).random((6, 6))
    r = evaluate(factorized(bert_lm, rank=2), "similarity", reference=bert_lm, texts=TEXTS, human=human + human.T,
                 fidelity_texts=["a cat"])
    assert 0.0 < r["fidelity"] < 0.9999 and -1 <= r["spearman"] <= 1


# --- perplexity ----------------------------------------------------------------------------------------------------


PPL_TEXT = " ".join(TEXTS * 3)


def test_perplexity_equals_exp_mean_nll_by_hand(llama_lm):
    ids = torch.tensor(llama_lm.tokenizer(PPL_TEXT, add_special_tokens=False)["input_ids"][:40])
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, 40, 16):  # windows of 16, stride 16: each predicts all but its first token
            chunk = ids[b : b + 16][None]
            loss = llama_lm.model(input_ids=chunk, labels=chunk).loss  # mean NLL of chunk[1:]
            total += float(loss) * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    r = evaluate(llama_lm, "perplexity", text=PPL_TEXT, window=16, stride=16, max_tokens=40, batch_size=2)
    assert r["tokens"] == 40 and r["tokens_scored"] == count == 37
    assert r["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_perplexity_against_itself(llama_lm):
    r = evaluate(llama_lm, "perplexity", reference=clone(llama_lm), text=PPL_TEXT, window=16, stride=8, max_tokens=50)
    assert r["kl"] == pytest.approx(0.0, abs=1e-6)
    assert r["top1_agreement"] == 1.0
    assert r["reference_perplexity"] == pytest.approx(r["perplexity"], rel=1e-6)
    assert r["tokens_scored"] == 49  # overlapping windows score each token once


def test_perplexity_against_factorized_model(llama_lm):
    r = evaluate(factorized(llama_lm, rank=2), "perplexity", reference=llama_lm, text=PPL_TEXT, window=16,
                 stride=16, max_tokens=48)
    assert r["kl"] > 0 and 0 <= r["top1_agreement"] <= 1


def test_perplexity_window_checks(llama_lm):
    with pytest.raises(ConfigError, match="longer than 'tiny-llama' accepts"):
        evaluate(llama_lm, "perplexity", text=PPL_TEXT, window=128, stride=128)
    with pytest.raises(ConfigError, match="stride <= window"):
        evaluate(llama_lm, "perplexity", text=PPL_TEXT, window=16, stride=32)


def test_windows_score_each_position_once():
    from embfactor.eval.perplexity import windows

    for n, w, s in [(100, 16, 5), (17, 16, 8), (5, 16, 16)]:  # overlapping windows score every token once
        scored = [p for _, e, f in windows(n, w, s) for p in range(f, e)]
        assert scored == list(range(1, n))
    # back-to-back windows cannot score their first token (it has no context inside the window)
    scored = [p for _, e, f in windows(40, 16, 16) for p in range(f, e)]
    assert scored == [p for p in range(40) if p % 16]


# --- classification ---------------------------------------------------------------------------------------------------


def test_probe_on_separable_features_is_perfect():
    from embfactor.eval.classification import probe_accuracy

    rng = np.random.default_rng(0)
    X = np.r_[rng.normal(-3, 1, (20, 4)), rng.normal(3, 1, (20, 4))]
    assert probe_accuracy(X, [0] * 20 + [1] * 20) == [1.0] * 5


def test_classification_on_trivially_separable_texts(bert_lm, llama_lm):
    texts = [f"cat cat {w}" for w in "abcdefghij"] + [f"dog dog dog dog {w}" for w in "abcdefghij"]
    labels = ["cat"] * 10 + ["dog"] * 10
    for lm in (bert_lm, llama_lm):
        r = evaluate(lm, "classification", reference=clone(lm), texts=texts, labels=labels)
        assert r["accuracy"] == pytest.approx(1.0) and r["accuracy_std"] == 0
        assert r["reference_accuracy"] == r["accuracy"] and r["n_classes"] == 2 and r["folds"] == 5


def test_classification_reads_a_labels_file(bert_lm, tmp_path):
    f = tmp_path / "data.jsonl"
    rows = [{"text": f"cat cat {c}", "label": "pos"} for c in "abcdef"] + [
        {"text": f"dog dog dog dog {c}", "label": "neg"} for c in "abcdef"
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    r = evaluate(bert_lm, "classification", labels_file=f, folds=3)
    assert r["n"] == 12 and r["dataset"] == str(f) and len(r["fold_accuracies"]) == 3


# --- reconstruction ---------------------------------------------------------------------------------------------------


def test_reconstruction_identical_model(bert_lm):
    r = evaluate(bert_lm, "reconstruction", reference=clone(bert_lm), token_counts=np.arange(120), queries=None)
    assert r["relative_error"] == 0.0
    assert r["overlap_weighted"] == 1.0 and r["overlap_uniform"] == 1.0
    assert r["weighted_mass"] == 1.0 and r["queries"] == 120


def test_reconstruction_of_factorized_model(bert_lm):
    from embfactor import factorize_

    c = clone(bert_lm)
    rep = factorize_(c.model, rank=4, method="svd")
    r = evaluate(c, "reconstruction", reference=bert_lm, token_counts=np.arange(120) % 7, queries=30)
    assert r["relative_error"] == pytest.approx(rep.relative_error, rel=1e-4)
    assert 0 < r["overlap_uniform"] < 1 and 0 < r["overlap_weighted"] < 1
    assert r["queries"] == 30 and 0 < r["weighted_mass"] < 1


def test_nearest_neighbours_known_answer():
    from embfactor.eval.reconstruction import nearest_neighbours, neighbour_overlap

    table = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    nn = nearest_neighbours(table, torch.arange(5), k=1)
    assert nn.squeeze(1).tolist() == [1, 0, 3, 2, 2]
    assert neighbour_overlap(nn, nn).tolist() == [1.0] * 5


# --- CLI ---------------------------------------------------------------------------------------------------------------


def test_cli_evaluate_classification_writes_json(bert_dir, tmp_path, capsys):
    from embfactor.cli.main import main

    f = tmp_path / "d.csv"
    f.write_text("text,label\n" + "".join(f"cat cat {c},a\ndog dog dog dog {c},b\n" for c in "abcde"))
    out = tmp_path / "r.json"
    rc = main(["evaluate", str(bert_dir), "--task", "classification", "--labels", str(f), "--json", str(out), "-q"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["task"] == "classification" and r["n"] == 10 and r["accuracy"] == pytest.approx(1.0)
    assert "accuracy *" in capsys.readouterr().out


def test_cli_evaluate_errors_write_nothing(tiny_bert_dir, tmp_path, capsys):
    from embfactor.cli.main import main

    out = tmp_path / "r.json"
    assert main(["evaluate", str(tiny_bert_dir), "--task", "perplexity", "--json", str(out)]) == 2
    assert "applies to decoders" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_bert_dir), "--task", "similarity", "--max-tokens", "5", "--json", str(out)]) == 2
    assert "--max-tokens applies to the perplexity task" in capsys.readouterr().err
    assert not out.exists()


# --- real model --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_similarity_against_itself():
    from embfactor.models import load_model

    from embfactor.data import lee_background

    lm = load_model("minilm")
    # a few fidelity texts keep this test short; the default adds 200 held-out Wikipedia passages
    r = evaluate(lm, "similarity", reference=lm, fidelity_texts=lee_background()[:10])
    assert r["fidelity"] == pytest.approx(1.0, abs=1e-5)
    assert r["n_docs"] == 50 and r["n_pairs"] == 1225 and r["n_fidelity_texts"] == 60
    assert r["spearman"] == pytest.approx(0.508, abs=0.02)
