"""What an exported file is run on, shared by the encoder and decoder exports: example inputs, the check's feeds,
an ONNX Runtime session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# texts the written file is checked on against PyTorch (two lengths, so padding is exercised)
CHECK_TEXTS = ["The quick brown fox jumps over the lazy dog.", "Embedding tables compress well."]


def example_inputs(vocab: int, names: list[str], *, batch: int = 2, length: int = 8) -> tuple[Any, ...]:
    """Deterministic example inputs; the last sequence is padded, so the traced graph handles attention masks."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length // 2:] = 0
    out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return tuple(out[n] for n in names)


def session(data: bytes | str | Path, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session on serialized model bytes or a file."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    src = data if isinstance(data, bytes) else str(data)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def check_feeds(lm: Any, names: list[str], texts: list[str] = CHECK_TEXTS) -> dict[str, Any]:
    """Inputs to check a file on: ``texts`` tokenized (padded), or :func:`example_inputs` without a tokenizer."""
    import torch

    tok = lm.tokenizer
    if tok is None:
        vocab = lm.model.get_input_embeddings().num_embeddings
        return dict(zip(names, example_inputs(vocab, names, length=6)))
    if getattr(tok, "pad_token", None) is None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, padding=True, return_tensors="pt")
    return {n: enc[n] if n in enc else torch.zeros_like(enc["input_ids"]) for n in names}
