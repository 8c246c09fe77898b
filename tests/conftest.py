"""Tiny random models built from configs (no network), and matrices with known spectra."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 120
D = 32


def low_rank_matrix(n: int, d: int, k: int, seed: int = 0) -> torch.Tensor:
    """An n×d matrix of exact rank k."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) @ torch.randn(k, d, generator=g)


def decaying_matrix(n: int, d: int, seed: int = 0, decay: float = 3.0) -> torch.Tensor:
    """An n×d matrix with singular values decaying from 1 to 10^-decay and a small random tail."""
    g = torch.Generator().manual_seed(seed)
    Q1, _ = torch.linalg.qr(torch.randn(n, d, generator=g))
    Q2, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    s = torch.logspace(0, -decay, d)
    return (Q1 * s) @ Q2.T


@pytest.fixture
def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0,
    )
    return BertModel(cfg).eval()


@pytest.fixture
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=2, n_head=2, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def _llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_llama_tied():
    return _llama(True)


@pytest.fixture
def tiny_llama_untied():
    return _llama(False)


@pytest.fixture
def tiny_bert_dir(tmp_path: Path, tiny_bert) -> Path:
    """A saved tiny BERT folder with a WordPiece tokenizer: a valid MODEL for every CLI command."""
    from transformers import BertTokenizerFast

    folder = tmp_path / "tiny-bert"
    tiny_bert.save_pretrained(folder)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words += ["the", "cat", "dog", "sat", "on", "mat", "a", "is", "good", "bad", "movie", "film", "very"]
    words += [f"w{i}" for i in range(VOCAB - len(set(words)))]
    vocab = list(dict.fromkeys(words))[:VOCAB]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def write_st_modules(folder: Path, dim: int) -> None:
    """The sentence-transformers files of a Transformer + mean Pooling + Normalize model, in ``folder``."""
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": dim, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
    }))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48, "do_lower_case": False}))
