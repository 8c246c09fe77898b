"""TrainConfig and the embedding variants of a from-scratch comparison run."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from embfactor.errors import ConfigError, UnknownMethodError

ALL_VARIANTS = ("dense", "fact-d4", "fact-d8", "tt")
# Measured on the 2-core CPU: one optimizer step at batch 16 x 128 tokens costs ~3.2 (dense, fact-d4), ~2.3
# (fact-d8) and ~5.5 (tt) CPU-seconds, so 120 steps of all four variants plus 10 evaluations each take ~15 minutes
# of an idle machine. fp32: bf16 autocast was 2-3x slower on this CPU (AVX-512 without native bf16).
DEFAULT_STEPS = 120
_VARIANT_RE = re.compile(r"^(dense|tt|fact-d(\d+)|fact-r(\d+))$")


@dataclass
class TrainConfig:
    """Settings of one from-scratch comparison run (validated on construction).

    Args:
        variants: embedding variants: ``dense``, ``fact-dN`` (FactorizedEmbedding of rank d/N), ``fact-rN``
            (rank N), ``tt`` (TTEmbedding of TT rank ``tt_rank``).
        steps: optimizer steps per variant (same for all).
        d_model, layers, heads, ffn_mult: Transformer size (pre-LN blocks, GELU feed-forward of ffn_mult·d).
        seq_len, batch_size: tokens per sequence and sequences per step.
        positional: ``"sinusoidal"`` or ``"learned"`` positions in :class:`~embfactor.layers.TransformerEmbedding`.
        tokenizer: ``"minilm"`` (WordPiece, 30,522), ``"smollm2"`` (BPE, 49,152) or a local tokenizer folder.
        device: ``"cpu"`` or ``"cuda"``.
        bf16: bfloat16 autocast for the forward pass (weights and optimizer stay fp32).
        lr, warmup, weight_decay, grad_clip, dropout: optimization (AdamW, linear warmup over ``warmup`` of the
            steps, cosine decay to 10%).
        eval_every: evaluate every this many steps (0 = about 10 points per curve); the last step is always evaluated.
        eval_tokens: held-out tokens per evaluation (the same fixed windows every time).
        tt_rank: TT rank of the ``tt`` variant.
        seed: seed for initialization, dropout and the batch order.

    Example:
        >>> TrainConfig(variants=("dense",), steps=10).steps
        10
    """

    variants: tuple[str, ...] = ALL_VARIANTS
    steps: int = DEFAULT_STEPS
    d_model: int = 256
    layers: int = 4
    heads: int = 4
    ffn_mult: int = 4
    seq_len: int = 128
    batch_size: int = 16
    positional: str = "sinusoidal"
    tokenizer: str = "minilm"
    device: str = "cpu"
    bf16: bool = False
    lr: float = 2e-3
    warmup: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    dropout: float = 0.0
    eval_every: int = 0
    eval_tokens: int = 8192
    tt_rank: int = 32
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.variants, str):
            self.variants = tuple(v.strip() for v in self.variants.split(",") if v.strip())
        self.variants = tuple(self.variants)
        if not self.variants:
            raise ConfigError(f"give at least one variant; valid: {', '.join(ALL_VARIANTS)} (or fact-dN / fact-rN)")
        if len(set(self.variants)) != len(self.variants):
            raise ConfigError(f"variants must be distinct, got {list(self.variants)}")
        for v in self.variants:
            parse_variant(v, self.d_model if _pos_int(self.d_model) else 1)
        sizes = ("steps", "d_model", "layers", "heads", "ffn_mult", "seq_len", "batch_size", "eval_tokens", "tt_rank")
        for name in sizes:
            if not _pos_int(getattr(self, name)):
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.d_model % self.heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        if self.positional not in ("sinusoidal", "learned"):
            raise ConfigError(f"positional must be 'sinusoidal' or 'learned', got {self.positional!r}")
        if self.device not in ("cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ConfigError(f"eval_every must be an integer >= 0 (0 = automatic), got {self.eval_every!r}")
        if self.eval_tokens < self.seq_len:
            raise ConfigError(f"eval_tokens ({self.eval_tokens}) must be at least seq_len ({self.seq_len})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup is a share of the steps in [0, 1), got {self.warmup!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def eval_interval(self) -> int:
        return self.eval_every or max(1, self.steps // 10)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["variants"] = list(self.variants)
        d["eval_every"] = self.eval_interval
        return d


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def parse_variant(name: str, d_model: int) -> tuple[str, int | None]:
    """``(kind, rank)`` of a variant name: ("dense", None), ("factorized", r) or ("tt", None).

    Example:
        >>> parse_variant("fact-d4", 256)
        ('factorized', 64)
    """
    m = _VARIANT_RE.match(str(name))
    if not m:
        raise UnknownMethodError(
            f"unknown variant {name!r}; valid variants: {', '.join(ALL_VARIANTS)}, "
            "fact-dN (rank d/N) or fact-rN (rank N)"
        )
    if m.group(1) in ("dense", "tt"):
        return m.group(1), None
    if m.group(2) is not None:
        div = int(m.group(2))
        if div < 1 or d_model // div < 1 or d_model % div:
            raise ConfigError(f"variant {name!r}: d_model={d_model} is not divisible by {div} into a rank >= 1")
        return "factorized", d_model // div
    rank = int(m.group(3))
    if not 1 <= rank <= d_model:
        raise ConfigError(f"variant {name!r}: rank must be in 1..d_model={d_model}")
    return "factorized", rank
