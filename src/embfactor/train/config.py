"""HealConfig: the settings of one healing run, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from embfactor.errors import ConfigError


@dataclass
class HealConfig:
    """Settings of :func:`embfactor.train.heal.heal` (every field has a default; bad values raise ConfigError).

    Args:
        minutes, steps: the budget (at least one must be given to ``heal``; with both, whichever ends first). The
            time covers evaluating and training, not loading and saving; a step starts only if it and the final
            evaluation still fit. On resume both count the earlier run too.
        lr: AdamW learning rate of the embedding format's tensors (factors, codebooks, scales), in (0, 1).
        relative_lr: read ``lr`` relative to each table tensor's RMS (its lr is ``lr × RMS``): Adam moves every
            entry by about lr per step whatever its size, so one absolute lr is far too large for small tensors
            (int8 scales, RMS ~0.002) when right for codebooks (RMS ~0.06), and differs between models.
        lr_rest: learning rate of the other weights that train (``train_all`` / ``train_layernorm``); None = ``lr``.
        batch_size: texts (encoders) or token windows (decoders) per step.
        max_length: tokens per text / window.
        train_layernorm: also train the LayerNorm/RMSNorm weights.
        train_all: train every floating-point weight of the model, not only the embedding format's.
        dropout: keep the model's dropout on while training. Off by default: healing matches the teacher's
            deterministic outputs, and dropout noise made the student's training loss 3× its held-out loss and
            moved codebooks away from the teacher (MiniLM pq, 50 steps: held-out fidelity fell 0.973 → 0.970).
        bf16: bfloat16 autocast: True, False or ``"auto"`` (on where the device has native bf16 units).
        eval_every: optimizer steps between held-out evaluations (the end of the run is always evaluated).
        eval_size: held-out texts / windows per evaluation.
        save_every_seconds: how often the best state so far is written to ``output`` during the run.
        mse_weight: weight of the token-state MSE beside the pooled cosine (encoders).
        distill_weight: weight of the distillation term beside the cross-entropy (supervised).
        warmup_steps: linear learning-rate warm-up.
        loss_chunk: decoders: token positions whose vocabulary-sized tensors (logits, log-probabilities, the KL and
            their gradients) are computed at a time, each chunk's recomputed in the backward pass; 0 = the whole
            batch at once. Same loss and gradients either way; at SmolLM2's 49,152 tokens a 16 × 128 batch holds
            403 MB per such tensor, a chunk of 256 positions 50 MB. Models that change the logits after the head
            (soft-capping) always use the whole batch.
        checkpoint_layers: recompute each transformer layer's activations in the backward pass instead of keeping
            them (activation checkpointing): True, False or ``"auto"`` (decoders only). The same loss and gradients
            for one more forward pass per step; a SmolLM2 batch of 16 × 128 keeps 3.8 GB of activations otherwise.
        weight_decay: AdamW weight decay, ≥ 0.
        seed: seed of the data order, the held-out split and the classifier's initialization.
        resume: continue an interrupted run from ``output``.
        eval_texts: held-out texts (default: the held-out part of the bundled Wikipedia extract).

    Example:
        >>> HealConfig(lr=1e-3, batch_size=8).batch_size
        8
        >>> HealConfig(lr=2.0)
        Traceback (most recent call last):
        ...
        embfactor.errors.ConfigError: lr must be in (0, 1), got 2.0
    """

    minutes: float | None = None
    steps: int | None = None
    lr: float = 5e-4
    relative_lr: bool = False
    lr_rest: float | None = None
    batch_size: int = 16
    max_length: int = 128
    train_layernorm: bool = False
    train_all: bool = False
    dropout: bool = False
    bf16: bool | str = False
    eval_every: int = 50
    eval_size: int = 64
    save_every_seconds: float = 120.0
    mse_weight: float = 1.0
    distill_weight: float = 1.0
    warmup_steps: int = 10
    loss_chunk: int = 256
    checkpoint_layers: bool | str = "auto"
    weight_decay: float = 0.0
    seed: int = 0
    resume: bool = False
    eval_texts: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if self.minutes is not None and not (_number(self.minutes) and 0 < self.minutes < math.inf):
            raise ConfigError(f"minutes must be a positive number, got {self.minutes!r}")
        if self.steps is not None and not _int_at_least(self.steps, 1):
            raise ConfigError(f"steps must be a positive integer, got {self.steps!r}")
        for name in ("batch_size", "max_length", "eval_every", "eval_size"):
            if not _int_at_least(getattr(self, name), 1):
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "seed", "loss_chunk"):
            if not _int_at_least(getattr(self, name), 0):
                raise ConfigError(f"{name} must be an integer ≥ 0, got {getattr(self, name)!r}")
        if not (_number(self.lr) and 0 < self.lr < 1):
            raise ConfigError(f"lr must be in (0, 1), got {self.lr!r}")
        if self.lr_rest is not None and not (_number(self.lr_rest) and 0 < self.lr_rest < 1):
            raise ConfigError(f"lr_rest must be in (0, 1), got {self.lr_rest!r}")
        for name in ("mse_weight", "distill_weight", "weight_decay"):
            if not (_number(getattr(self, name)) and 0 <= getattr(self, name) < math.inf):
                raise ConfigError(f"{name} must be a finite number ≥ 0, got {getattr(self, name)!r}")
        if not (_number(self.save_every_seconds) and self.save_every_seconds > 0):
            raise ConfigError(f"save_every_seconds must be a positive number, got {self.save_every_seconds!r}")
        for name in ("bf16", "checkpoint_layers"):
            if getattr(self, name) not in (True, False, "auto"):
                raise ConfigError(f"{name} must be True, False or 'auto', got {getattr(self, name)!r}")
        for name in ("train_layernorm", "train_all", "dropout", "relative_lr", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.eval_texts, str):
            raise ConfigError("eval_texts must be a list of strings, not one string")

    @classmethod
    def from_options(cls, **opts: Any) -> HealConfig:
        """A config from keyword options; None means the default, an unknown name lists the valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(opts) - set(names))
        if unknown:
            raise ConfigError(f"unknown healing options {unknown}; valid: {', '.join(sorted(names))}")
        return cls(**{k: v for k, v in opts.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON (what the resume state records; the held-out texts left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("resume", "eval_texts")}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(v: Any, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo
