"""Calibration text a decoder writes itself (issue 33): samples from the original model, before any change.

English Wikipedia reaches about half of a 49k vocabulary and a tenth of a 262k one; the rows it never shows go to the
coarsest tiers, and the tokens the model itself predicts there carry much of a compressed decoder's KL. Sampling the
original model at temperature 1 from a few generic prompts shows the planner the tokens the model will read and
write, with nothing the user has to supply. The samples are cached under :func:`embfactor.data.frequency.cache_dir`
keyed by the model (its config and the bytes of its table) and the sampling settings but not the token budget: a
draw is a sequence of whole batches, and a budget of N tokens takes its first samples up to N, so a larger draw
serves every smaller budget as its prefix (the same samples a draw of N alone would give) and a second ``compress``
or a ``sweep`` of the same model pays nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from embfactor.errors import ConfigError

# generic starts of text, code and letters: each continuation is the model's own choice of topic and register
PROMPTS = (
    "The", "In 1998,", "Here is a recipe", "def main():", "Dear", "Once upon a time", "The results show that",
    "Question:", "import numpy as np", "According to", "Chapter 1", "It was", "Today I", "The following", "#", "A",
)
DEFAULT_TOKENS = 8192
CHOICES = ("bundled", "self")


@dataclass(frozen=True)
class SelfTextSettings:
    """How the samples are drawn: ``tokens`` new tokens in all, ``new_tokens`` per sample, ``batch`` at a time."""

    tokens: int = DEFAULT_TOKENS
    new_tokens: int = 256
    batch: int = 8
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("tokens", "new_tokens", "batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"self-calibration {name} must be a positive integer, got {v!r}")
        if not self.temperature > 0:
            raise ConfigError(f"self-calibration temperature must be > 0, got {self.temperature!r}")


def model_key(model: torch.nn.Module, settings: SelfTextSettings) -> str:
    """A key of the model and the settings but the token budget: its config and its input table's bytes (unique to a
    model and cheap: one tensor, not every weight)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    h.update(json.dumps(config.to_dict() if config is not None else {}, sort_keys=True, default=str).encode())
    table = model.get_input_embeddings().weight.detach()
    h.update(table.float().contiguous().numpy().tobytes() if table.numel() < 2**22 else
             table[:: max(1, table.shape[0] // 4096)].float().contiguous().numpy().tobytes())
    h.update(json.dumps({k: v for k, v in settings.__dict__.items() if k != "tokens"}, sort_keys=True).encode())
    return h.hexdigest()[:24]


@torch.inference_mode()
def self_text(lm: Any, settings: SelfTextSettings | None = None, *, cache: bool = True) -> dict[str, Any]:
    """Sample ``settings.tokens`` tokens of text from ``lm`` (a decoder, unchanged): ``{"texts", "tokens",
    "seconds", "cached"}``. Deterministic for a seed; read from the cache when a draw at least as large was made
    before (its first samples up to the budget; ``seconds``: what drawing them took then).

    Example:
        >>> out = self_text(load_model("smollm2"))            # doctest: +SKIP
        >>> out["tokens"] >= 8192                              # doctest: +SKIP
        True
    """
    from embfactor.data.frequency import cache_dir

    settings = settings or SelfTextSettings()
    if lm.kind != "decoder":
        raise ConfigError(f"--calibration self samples text from a decoder; {lm.name!r} is an encoder")
    path = cache_dir() / f"selftext-{model_key(lm.model, settings)}.json"
    if cache and path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("tokens", 0) >= settings.tokens and "counts" in data:
            return {**_prefix(data, settings.tokens), "cached": True}
    data = _sample(lm, settings)
    if cache:
        from embfactor.fileio import atomic_write_text

        os.makedirs(path.parent, exist_ok=True)
        atomic_write_text(path, json.dumps(data))
    return {**_prefix(data, settings.tokens), "cached": False}


def _prefix(data: dict[str, Any], tokens: int) -> dict[str, Any]:
    """The first samples of a draw that hold ``tokens`` tokens (the last one whole)."""
    total, n = 0, 0
    for n, c in enumerate(data["counts"], 1):
        total += c
        if total >= tokens:
            break
    return {"texts": data["texts"][:n], "tokens": total, "seconds": data["elapsed"][n - 1] if n else 0.0,
            "settings": {**data["settings"], "tokens": tokens}}


def _sample(lm: Any, s: SelfTextSettings) -> dict[str, Any]:
    """Whole batches of ``s.new_tokens`` new tokens until ``s.tokens``: the texts, each one's new tokens, and the
    seconds elapsed when its batch ended (so a prefix of the draw knows what it cost)."""
    tok, model = lm.tokenizer, lm.model
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(s.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    texts: list[str] = []
    counts: list[int] = []
    elapsed: list[float] = []
    total, i, t0 = 0, 0, time.perf_counter()
    try:
        while total < s.tokens:
            prompts = [PROMPTS[(i + k) % len(PROMPTS)] for k in range(s.batch)]
            i += s.batch
            enc = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
            width = max(map(len, enc))
            ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])  # left padding: continuations align
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
            # always whole batches of new_tokens: a draw for a larger budget then starts with this one's samples
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=s.temperature,
                                 top_k=0, top_p=1.0, max_new_tokens=s.new_tokens, pad_token_id=pad)
            for p, row in zip(prompts, out[:, width:]):
                kept = row[row != pad] if pad is not None else row
                total += int(kept.numel())
                counts.append(int(kept.numel()))
                texts.append(p + tok.decode(kept, skip_special_tokens=True))
            elapsed += [round(time.perf_counter() - t0, 1)] * len(prompts)
    finally:
        torch.random.set_rng_state(generator_state)
    return {"texts": texts, "counts": counts, "elapsed": elapsed, "tokens": total, "settings": s.__dict__}


def check_calibration(calibration: str, *, table_only: str | None = None,
                      tokens: int | None = None) -> SelfTextSettings | None:
    """The sampling settings of ``calibration`` (None for ``bundled``), checked before the model loads: a ConfigError
    saying what would be right for a name not in :data:`CHOICES`, ``tokens`` (``--calibration-tokens``) without
    ``self`` or not positive, and anything but ``bundled`` on the table-only path (whose reason is ``table_only``),
    which loads no model."""
    if calibration not in CHOICES:
        raise ConfigError(f"--calibration must be one of {', '.join(CHOICES)}, got {calibration!r}")
    if tokens is not None and calibration != "self":
        raise ConfigError(f"--calibration-tokens {tokens} sets how much text the model writes: it needs "
                          f"--calibration self (got --calibration {calibration})")
    if table_only and calibration != "bundled":
        raise ConfigError(f"--calibration {calibration} needs the model loaded; the table-only path ({table_only}) "
                          "reads only its table: use --calibration bundled")
    if calibration == "bundled":
        return None
    return SelfTextSettings(tokens=DEFAULT_TOKENS if tokens is None else tokens)


def calibration_texts(lm: Any, calibration: str, texts: list[str] | None,
                      settings: SelfTextSettings | None = None) -> tuple[list[str] | None, dict[str, Any]]:
    """The calibration texts for ``calibration`` (``bundled``: ``texts`` as given; ``self``: those, or the bundled
    extract, plus the model's own samples) and what the report records of them."""
    checked = check_calibration(calibration)
    if checked is None:
        return texts, {"calibration": "bundled" if texts is None else "text"}
    from embfactor.data import wiki_split

    drawn = self_text(lm, settings or checked)
    base = list(texts) if texts is not None else wiki_split("train")
    # interleaved, so calibration_split's held-apart fifth (the check's text) holds samples too
    mixed = _interleave(base, drawn["texts"])
    return mixed, {"calibration": "self", "self_tokens": drawn["tokens"], "self_samples": len(drawn["texts"]),
                   "self_seconds": drawn["seconds"], "self_cached": drawn["cached"],
                   "rows_reached": _reach(lm, {"given": base, "self": drawn["texts"], "both": mixed})}


def _reach(lm: Any, sources: dict[str, list[str]]) -> dict[str, int]:
    """Rows of the table each source's tokens reach (the counts are cached, and the planner counts ``both`` next)."""
    from embfactor.data.frequency import token_counts

    vocab = lm.model.get_input_embeddings().weight.shape[0]
    return {k: int((token_counts(lm.tokenizer, v, vocab_size=vocab) > 0).sum()) for k, v in sources.items()}


def _interleave(a: list[str], b: list[str]) -> list[str]:
    if not b:
        return list(a)
    step = max(1, len(a) // len(b))
    out: list[str] = []
    for i, t in enumerate(b):
        out += a[i * step:(i + 1) * step] + [t]
    return out + a[len(b) * step:]
