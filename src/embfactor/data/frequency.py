"""Token frequencies counted with a model's own tokenizer, and the smoothed importance weights built from them.

Data-aware decompositions (``wsvd``, ``block``) weight each row of the embedding by how often its token occurs:
errors on frequent tokens cost more than errors on tokens that never appear. Counts are cached on disk
(``~/.cache/embfactor/freq-<hash>.npy``, keyed by the tokenizer's vocabulary and the corpus text), so the
Wikipedia extract is tokenized once per tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embfactor.errors import ConfigError, InvalidInputError

DEFAULT_POWER = 0.5
DEFAULT_FLOOR = 1.0  # add-one smoothing: a token never seen counts as seen once


def cache_dir() -> Path:
    """``$EMBFACTOR_CACHE`` or ``~/.cache/embfactor``."""
    return Path(os.environ.get("EMBFACTOR_CACHE", Path.home() / ".cache" / "embfactor"))


def _tokenizer_key(tokenizer: Any) -> str:
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        vocab = {}
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()[:16]


def _corpus_key(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "replace"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def token_counts(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    vocab_size: int | None = None,
    cache: bool = True,
    batch_size: int = 256,
) -> torch.Tensor:
    """How often each token id occurs when ``texts`` are tokenized by ``tokenizer`` (special tokens excluded).

    Args:
        tokenizer: a Hugging Face tokenizer (the model's own: frequencies are per *its* vocabulary).
        texts: the corpus, e.g. ``embfactor.data.wiki_split("train")`` or ``read_texts(files)``.
        vocab_size: length of the result (the embedding's rows; may exceed ``len(tokenizer)``).
        cache: read/write the counts under :func:`cache_dir`.

    Returns:
        float64 tensor of shape (vocab_size,).

    Example:
        >>> c = token_counts(lm.tokenizer, ["the cat sat"], vocab_size=30522)   # doctest: +SKIP
    """
    if isinstance(texts, str) or not len(texts):
        raise InvalidInputError("texts must be a non-empty list of strings to count token frequencies on")
    if not any(t.strip() for t in texts):
        raise InvalidInputError("the texts to count token frequencies on are all empty")
    n = int(vocab_size if vocab_size is not None else len(tokenizer))
    path = cache_dir() / f"freq-{_tokenizer_key(tokenizer)}-{_corpus_key(texts)}.npy"
    counts = None
    if cache and path.is_file():
        try:
            counts = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            counts = None  # a corrupt cache entry is simply recomputed
    if counts is None:
        counts = np.zeros(max(n, len(tokenizer)), dtype=np.float64)
        texts = [t for t in texts if t.strip()]
        for start in range(0, len(texts), batch_size):
            # verbose=False: whole articles exceed the model's length, which matters for a forward pass, not a count
            enc = tokenizer(
                list(texts[start : start + batch_size]), add_special_tokens=False, truncation=False, verbose=False
            )
            for ids in enc["input_ids"]:
                if ids:
                    counts[: max(ids) + 1] += np.bincount(ids, minlength=max(ids) + 1)[: counts.size]
        if cache:
            from embfactor.fileio import atomic_write_bytes

            import io

            buf = io.BytesIO()
            np.save(buf, counts, allow_pickle=False)
            try:
                atomic_write_bytes(path, buf.getvalue())
            except OSError:
                pass  # a read-only home folder only costs the recount
    out = np.zeros(n, dtype=np.float64)
    m = min(n, counts.size)
    out[:m] = counts[:m]
    return torch.from_numpy(out)


def weights_from_counts(
    counts: torch.Tensor, *, power: float = DEFAULT_POWER, floor: float = DEFAULT_FLOOR
) -> torch.Tensor:
    """Smoothed importance weights ``(count + floor) ** power``, normalized to mean 1 (float64).

    ``floor`` > 0 keeps tokens unseen in the corpus at a small positive weight; ``power`` < 1 flattens the
    Zipf distribution (1 = raw frequency, 0.5 = square root, 0 = uniform weights, i.e. plain SVD).
    """
    if not (isinstance(power, (int, float)) and 0 <= power <= 2):
        raise ConfigError(f"power must be a number in [0, 2], got {power!r}")
    if not (isinstance(floor, (int, float)) and floor > 0):
        raise ConfigError(f"floor must be a positive number (the pseudo-count of unseen tokens), got {floor!r}")
    c = torch.as_tensor(counts, dtype=torch.float64)
    if c.ndim != 1 or c.numel() == 0 or bool((c < 0).any()) or not bool(torch.isfinite(c).all()):
        raise InvalidInputError("counts must be a non-empty 1-D tensor of finite non-negative numbers")
    w = (c + floor) ** power
    return w / w.mean()


def token_weights(
    tokenizer: Any,
    texts: Sequence[str] | None = None,
    *,
    vocab_size: int | None = None,
    power: float = DEFAULT_POWER,
    floor: float = DEFAULT_FLOOR,
    cache: bool = True,
) -> torch.Tensor:
    """Per-token importance weights for ``wsvd``/``block``: smoothed frequencies on ``texts`` (mean 1).

    Args:
        tokenizer: the model's tokenizer.
        texts: the corpus; None uses the training part of the bundled Wikipedia extract.
        vocab_size: number of embedding rows (defaults to ``len(tokenizer)``).
        power, floor: see :func:`weights_from_counts`.

    Example:
        >>> w = token_weights(lm.tokenizer, vocab_size=30522)            # doctest: +SKIP
        >>> ef.decompose(E, ratio=6, method="wsvd", token_weights=w)      # doctest: +SKIP
    """
    if texts is None:
        from embfactor.data import wiki_split

        texts = wiki_split("train")
    counts = token_counts(tokenizer, texts, vocab_size=vocab_size, cache=cache)
    return weights_from_counts(counts, power=power, floor=floor)
