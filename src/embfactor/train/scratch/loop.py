"""The training loop: one variant (train_one) and the comparison of several on the same batches (train_variants)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embfactor.errors import ConfigError, InvalidInputError
from embfactor.train.scratch.config import TrainConfig, parse_variant
from embfactor.train.scratch.data import batch_offsets, eval_windows, token_streams
from embfactor.train.scratch.model import CausalLM, _reset_non_embedding, embedding_params, total_params


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


def _build(vocab_size: int, cfg: TrainConfig, kind: str, rank: int | None,
           device: torch.device) -> tuple[CausalLM, torch.optim.Optimizer]:
    """The variant's model (non-embedding weights identical across variants) and its AdamW optimizer."""
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
    return model, opt


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
    model, opt = _build(vocab_size, cfg, kind, rank, device)
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
    out = _summary(name, kind, rank, model, curve, losses, run_loss, train_time, wall, cfg)
    if keep_model:
        out["model"] = model
    return out


def _summary(name: str, kind: str, rank: int | None, model: CausalLM, curve: list[dict[str, float]],
             losses: list[float], run_loss: float, train_time: float, wall: float, cfg: TrainConfig) -> dict[str, Any]:
    """One variant's result: sizes, the validation curve, losses and speed."""
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
        every variant's ``"skipped"`` is None (results of older versions may name a reason there).

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
