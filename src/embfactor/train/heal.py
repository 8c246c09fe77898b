"""Healing: train a compressed model's factors so that it behaves like the original again (knowledge distillation).

- Encoders: the student's last hidden states and mean-pooled sentence embeddings match the teacher's
  (1 − cosine of the pooled embeddings + a normalized MSE on the token states).
- Decoders: the student's next-token distributions match the teacher's (KL(teacher ‖ student) per token).
- Supervised (``labels=``): a linear classification head on the pooled embedding is trained jointly with the
  factorized embedding (cross-entropy + the distillation term as a regularizer); accuracy is reported on a
  held-apart fifth of the labelled rows.

Only the factorized embedding is trained by default (``train_layernorm=True`` adds the LayerNorm/RMSNorm
weights, ``train_all=True`` trains every weight: more progress per step, ~1.7× the step time and Adam state for
the whole model); the teacher's outputs are computed on the fly under ``torch.inference_mode``. The loop runs under
HF Accelerate, so ``accelerate launch`` runs the same code on several GPUs; here it runs on CPU.
Checkpoints: the best model so far (lowest held-out loss, or highest held-out accuracy) is written atomically
with :func:`embfactor.surgery.save_compressed`; the training state (current and best trainable tensors,
optimizer moments, step, elapsed time) goes beside it as ``heal_state.safetensors`` + ``heal_state.json``
(no pickles), so ``resume=True`` continues an interrupted run.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embfactor.errors import ConfigError, CorruptFileError, InvalidInputError, SurgeryError, a_or_an

STATE_TENSORS = "heal_state.safetensors"
STATE_JSON = "heal_state.json"
HEAD_FILE = "classifier.safetensors"
HEAD_JSON = "classifier.json"
DEFAULTS: dict[str, Any] = {
    "lr": 5e-4,
    "batch_size": 16,
    "max_length": 128,
    "train_layernorm": False,
    "train_all": False,
    "bf16": False,
    "eval_every": 50,
    "eval_size": 64,
    "save_every_seconds": 120.0,
    "mse_weight": 1.0,
    "distill_weight": 1.0,
    "warmup_steps": 10,
    "weight_decay": 0.0,
    "seed": 0,
    "resume": False,
    "eval_texts": None,
}


# ----------------------------------------------------------------------------------------------- inputs


def check_compatible(student: Any, teacher: Any) -> None:
    """Student and teacher must share the vocabulary (same embedding rows, same tokenizer) and the kind."""
    s_emb = student.model.get_input_embeddings()
    t_emb = teacher.model.get_input_embeddings()
    sv, tv = int(s_emb.num_embeddings), int(t_emb.num_embeddings)
    if sv != tv or s_emb.embedding_dim != t_emb.embedding_dim:
        raise InvalidInputError(
            f"the compressed model's embedding is {sv}×{s_emb.embedding_dim} but the reference's is "
            f"{tv}×{t_emb.embedding_dim}: heal a model against the original it was compressed from"
        )
    try:
        same_vocab = student.tokenizer.get_vocab() == teacher.tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        same_vocab = len(student.tokenizer) == len(teacher.tokenizer)
    if not same_vocab:
        raise InvalidInputError(
            "the compressed model and the reference have different tokenizer vocabularies; token ids would not "
            "mean the same tokens. Heal against the original model the compressed one was made from"
        )
    if student.kind != teacher.kind:
        raise InvalidInputError(f"the compressed model is {a_or_an(student.kind)} but the reference is {a_or_an(teacher.kind)}")


def passages(texts: Sequence[str], max_chars: int = 600) -> list[str]:
    """Split texts into paragraph-sized passages (lines, long lines cut at sentence ends) for encoder batches."""
    out = []
    for t in texts:
        for line in t.split("\n"):
            line = line.strip()
            while len(line) > max_chars:
                cut = line.rfind(". ", 0, max_chars)
                cut = cut + 1 if cut > max_chars // 3 else max_chars
                out.append(line[:cut].strip())
                line = line[cut:].strip()
            if len(line) >= 20:
                out.append(line)
    return out


def token_windows(tokenizer: Any, texts: Sequence[str], length: int) -> torch.Tensor:
    """All texts tokenized, joined with EOS and cut into windows of ``length`` tokens (decoder training)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for start in range(0, len(texts), 64):
        for row in tokenizer(list(texts[start : start + 64]), add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            if eos is not None:
                ids.append(eos)
    n = len(ids) // length
    if n == 0:
        raise InvalidInputError(f"the text is too short: {len(ids)} tokens, need at least {length} for one window")
    return torch.tensor(ids[: n * length]).view(n, length)


def _check_texts(texts: Sequence[str] | None) -> list[str] | None:
    if texts is None:
        return None
    if isinstance(texts, str):
        raise InvalidInputError("texts must be a list of strings, not one string")
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise InvalidInputError("no text to heal on: the given texts are empty")
    return texts


def _options(opts: dict[str, Any]) -> dict[str, Any]:
    unknown = set(opts) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown healing options {sorted(unknown)}; valid: {', '.join(sorted(DEFAULTS))}")
    o = {**DEFAULTS, **{k: v for k, v in opts.items() if v is not None}}
    for k in ("batch_size", "max_length", "eval_every", "eval_size"):
        if isinstance(o[k], bool) or not isinstance(o[k], int) or o[k] < 1:
            raise ConfigError(f"{k} must be a positive integer, got {o[k]!r}")
    if not (isinstance(o["lr"], (int, float)) and 0 < o["lr"] < 1):
        raise ConfigError(f"lr must be in (0, 1), got {o['lr']!r}")
    return o


# ----------------------------------------------------------------------------------------------- model parts


def trainable_parameters(
    model: nn.Module, *, train_layernorm: bool = False, train_all: bool = False
) -> dict[str, nn.Parameter]:
    """Freeze everything but the factorized embedding (optionally also the norms, or nothing at all with
    ``train_all``); return the trainable parameters by name (a tied head's shared factors appear once)."""
    from embfactor.formats import is_row_format

    emb = model.get_input_embeddings()
    if not is_row_format(emb):
        raise SurgeryError(
            f"the model to heal has a plain {type(emb).__name__} input embedding; compress it first "
            "(embfactor compress / embfactor.factorize_) and heal the compressed model"
        )
    emb_ids = {id(p) for p in emb.parameters()}
    norm_ids = set()
    if train_layernorm:
        for m in model.modules():
            if "norm" in type(m).__name__.lower():
                norm_ids |= {id(p) for p in m.parameters(recurse=False)}
    out = {}
    for name, p in model.named_parameters():
        keep = train_all or id(p) in emb_ids or id(p) in norm_ids
        p.requires_grad_(keep)
        if keep:
            out[name] = p
    return out


def _pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def _hidden(model: nn.Module, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    if kind == "encoder":
        return model(**batch).last_hidden_state
    return model(**batch, output_hidden_states=True).hidden_states[-1]


def encoder_loss(
    s_hidden: torch.Tensor, t_hidden: torch.Tensor, mask: torch.Tensor, mse_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 − cos(pooled)) + mse_weight · ‖h_s − h_t‖²/‖h_t‖² over real tokens; also the pooled cosines."""
    s_hidden, t_hidden = s_hidden.float(), t_hidden.float()
    cos = F.cosine_similarity(_pool(s_hidden, mask), _pool(t_hidden, mask), dim=-1)
    m = mask.unsqueeze(-1).to(s_hidden.dtype)
    mse = ((s_hidden - t_hidden).pow(2) * m).sum() / (t_hidden.pow(2) * m).sum().clamp_min(1e-12)
    return (1 - cos).mean() + mse_weight * mse, cos


def decoder_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) of the next-token distributions."""
    s_logp = F.log_softmax(s_logits.float(), -1)
    t_logp = F.log_softmax(t_logits.float(), -1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    if mask is None:
        return kl.mean()
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1)


# ----------------------------------------------------------------------------------------------- state files


def _state_files(
    params: dict[str, nn.Parameter], best: dict[str, torch.Tensor], optimizer: Any, head: nn.Module | None,
    info: dict[str, Any],
) -> dict[str, bytes]:
    """The resume state as file contents (written into the checkpoint's temporary folder, swapped in with it)."""
    from safetensors.torch import save

    from embfactor.fileio import json_bytes

    tensors = {f"current.{k}": p.detach().cpu().contiguous() for k, p in params.items()}
    tensors.update({f"best.{k}": v.cpu().contiguous() for k, v in best.items()})
    if head is not None:
        tensors.update({f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()})
    sd = optimizer.state_dict()
    scalars: dict[str, Any] = {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.ndim > 0:
                tensors[f"opt.{i}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{i}.{k}"] = float(v)
    meta = {**info, "param_names": list(params), "optimizer_scalars": scalars, "param_groups": sd["param_groups"]}
    return {STATE_TENSORS: save(tensors), STATE_JSON: json_bytes(meta)}


def _read_state(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not (directory / STATE_JSON).is_file() or not (directory / STATE_TENSORS).is_file():
        raise InvalidInputError(f"cannot resume: {directory} holds no healing state ({STATE_JSON}, {STATE_TENSORS})")
    try:
        info = json.loads((directory / STATE_JSON).read_text())
        tensors = load_file(str(directory / STATE_TENSORS))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise CorruptFileError(f"cannot resume from {directory}: corrupt healing state ({e})") from None
    return info, tensors


def _restore_optimizer(optimizer: Any, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    for key, v in info.get("optimizer_scalars", {}).items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = torch.tensor(v)
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})


# ----------------------------------------------------------------------------------------------- the loop


def heal(
    student: Any,
    teacher: Any,
    *,
    texts: Sequence[str] | None = None,
    minutes: float | None = None,
    steps: int | None = None,
    output: str | os.PathLike | None = None,
    labels: str | os.PathLike | tuple[Sequence[str], Sequence[Any]] | None = None,
    progress: bool = True,
    **opts: Any,
) -> dict[str, Any]:
    """Distill ``teacher`` into the factorized ``student`` (trained in place); keep and save the best state.

    Args:
        student: the compressed :class:`~embfactor.models.LoadedModel` (its embedding must be factorized).
        teacher: the original LoadedModel it was compressed from (same vocabulary).
        texts: unlabelled training text; None = the training part of the bundled Wikipedia extract.
        minutes, steps: the budget (at least one; with both, whichever ends first). On resume both count the
            earlier run too.
        output: folder for the healed model (best checkpoint, written atomically) and the resume state.
        labels: a CSV/JSONL file with ``text,label`` (or a (texts, labels) pair): supervised fine-tuning with a
            classification head on the pooled embedding; saved as classifier.safetensors + classifier.json.
        progress: tqdm progress bar with the loss.
        **opts: lr, batch_size, max_length, train_layernorm, train_all, bf16, eval_every (steps), eval_size,
            save_every_seconds, mse_weight, distill_weight, warmup_steps, weight_decay, seed, resume,
            eval_texts (held-out texts; default the held-out part of the bundled Wikipedia extract).

    Returns:
        A summary: steps, seconds, eval loss before/best/last, the eval history, fidelity (encoders) or
        KL (decoders), accuracy (supervised), trainable parameter count, output folder.

    Raises:
        InvalidInputError: mismatched vocabularies, empty texts, bad labels; SurgeryError: student not factorized;
        ConfigError: bad options or no budget. Nothing is written when validation fails.

    Example:
        >>> s, t = load_model("out/minilm-r6"), load_model("minilm")              # doctest: +SKIP
        >>> heal(s, t, minutes=10, output="out/minilm-r6-healed")["best_eval"]     # doctest: +SKIP
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from embfactor.data import read_labelled, wiki_split
    from embfactor.fileio import check_output_dir
    from embfactor.surgery import save_compressed

    # ---- validate everything before any work or write
    o = _options(opts)
    if minutes is None and steps is None:
        raise ConfigError("give a healing budget: minutes= (wall clock) and/or steps= (optimizer steps)")
    if minutes is not None and not (isinstance(minutes, (int, float)) and minutes > 0):
        raise ConfigError(f"minutes must be a positive number, got {minutes!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    check_compatible(student, teacher)
    texts = _check_texts(texts)
    kind = student.kind
    sup_texts: list[str] | None = None
    if labels is not None:
        if isinstance(labels, (str, os.PathLike)):
            sup_texts, raw_labels = read_labelled(labels)
        else:
            sup_texts, raw_labels = list(labels[0]), [str(x) for x in labels[1]]
            if len(sup_texts) != len(raw_labels) or len(set(raw_labels)) < 2:
                raise InvalidInputError("labels needs as many labels as texts and at least two classes")
        classes = sorted(set(map(str, raw_labels)))
        y_all = torch.tensor([classes.index(str(x)) for x in raw_labels])
    out_dir = Path(output) if output is not None else None
    if out_dir is not None:
        check_output_dir(out_dir, inputs=(student.source, teacher.source))
    resume_info = resume_tensors = None
    if o["resume"]:
        if out_dir is None:
            raise ConfigError("resume=True needs output= (the folder of the interrupted run)")
        resume_info, resume_tensors = _read_state(out_dir)

    torch.manual_seed(o["seed"])
    model, tmodel, tok = student.model, teacher.model, student.tokenizer
    params = trainable_parameters(model, train_layernorm=o["train_layernorm"], train_all=o["train_all"])
    for p in tmodel.parameters():
        p.requires_grad_(False)
    tmodel.eval()
    head = None
    if sup_texts is not None:
        head = nn.Linear(model.get_input_embeddings().embedding_dim, len(classes))
    pad_added = False
    if tok.pad_token is None:  # decoders: pad with EOS for batching (restored at the end)
        tok.pad_token, pad_added = tok.eos_token, True

    # ---- data: training batches and a fixed held-out slice
    heldout = _check_texts(o["eval_texts"]) if o["eval_texts"] is not None else wiki_split("heldout")
    rng = np.random.default_rng(o["seed"])
    if sup_texts is not None:
        perm = rng.permutation(len(sup_texts))
        n_eval = max(len(classes), len(perm) // 5)
        eval_idx, train_idx = perm[:n_eval], perm[n_eval:]
        train_items: Any = [sup_texts[i] for i in train_idx]
        train_y = y_all[torch.as_tensor(train_idx)]
        eval_items: Any = [sup_texts[i] for i in eval_idx]
        eval_y = y_all[torch.as_tensor(eval_idx)]
    elif kind == "encoder":
        train_items = passages(texts if texts is not None else wiki_split("train"))
        held = passages(heldout)
        eval_items = held[:: max(1, len(held) // o["eval_size"])][: o["eval_size"]]
    else:
        train_items = token_windows(tok, texts if texts is not None else wiki_split("train"), o["max_length"])
        ew = token_windows(tok, heldout, o["max_length"])
        eval_items = ew[:: max(1, len(ew) // o["eval_size"])][: o["eval_size"]]
    if len(train_items) == 0:
        raise InvalidInputError("no usable training passages in the given texts (each needs ≥ 20 characters)")

    accelerator = Accelerator(mixed_precision="bf16" if o["bf16"] else "no")
    train_list = list(params.values()) + (list(head.parameters()) if head is not None else [])
    optimizer = torch.optim.AdamW(train_list, lr=o["lr"], weight_decay=o["weight_decay"])
    if head is not None:
        model, head, optimizer = accelerator.prepare(model, head, optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    tmodel.to(accelerator.device)
    device = accelerator.device

    def encode(batch_texts: list[str]) -> dict[str, torch.Tensor]:
        enc = tok(batch_texts, padding=True, truncation=True, max_length=o["max_length"], return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def batch_at(items: Any, idx: np.ndarray) -> dict[str, torch.Tensor]:
        if isinstance(items, torch.Tensor):
            ids = items[torch.as_tensor(idx)].to(device)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return encode([items[i] for i in idx])

    def distill(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, per-item metric, pooled student embedding) on one batch."""
        with torch.inference_mode(), accelerator.autocast():
            t_out = _hidden(tmodel, batch, "encoder") if kind == "encoder" else tmodel(**batch).logits
        t_out = t_out.clone()  # inference tensors cannot be saved for backward
        with accelerator.autocast():
            if kind == "encoder":
                s_hidden = model(**batch).last_hidden_state
                loss, cos = encoder_loss(s_hidden, t_out, batch["attention_mask"], o["mse_weight"])
                return loss, cos.detach(), _pool(s_hidden.float(), batch["attention_mask"])
            s = model(**batch, output_hidden_states=head is not None)
            loss = decoder_loss(s.logits[:, :-1], t_out[:, :-1], batch["attention_mask"][:, 1:])
            pooled = _pool(s.hidden_states[-1].float(), batch["attention_mask"]) if head is not None else loss
            return loss, loss.detach().reshape(1), pooled

    def step_loss(idx: np.ndarray) -> torch.Tensor:
        batch = batch_at(train_items, idx)
        loss, _, pooled = distill(batch)
        if head is not None:
            ce = F.cross_entropy(head(pooled), train_y[torch.as_tensor(idx)].to(device))
            loss = ce + o["distill_weight"] * loss
        return loss

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        losses, metrics, correct = [], [], 0
        bs = o["batch_size"]
        for start in range(0, len(eval_items), bs):
            idx = np.arange(start, min(start + bs, len(eval_items)))
            batch = batch_at(eval_items, idx)
            loss, metric, pooled = distill(batch)
            losses.append(float(loss) * len(idx))
            metrics.append(metric.float().cpu())
            if head is not None:
                correct += int((head(pooled).argmax(-1).cpu() == eval_y[torch.as_tensor(idx)]).sum())
        model.train()
        r = {"loss": sum(losses) / len(eval_items)}
        if kind == "encoder":
            r["fidelity"] = float(torch.cat(metrics).mean())
        if head is not None:
            r["accuracy"] = correct / len(eval_items)
            r["score"] = -r["accuracy"] + 1e-6 * r["loss"]  # lower is better; ties broken by the loss
        else:
            r["score"] = r["loss"]
        return r

    # ---- resume or start
    t0, c0 = time.perf_counter(), time.process_time()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    step, elapsed_before = 0, 0.0
    history: list[dict[str, Any]] = []
    unwrap = accelerator.unwrap_model
    if resume_info is not None:
        if resume_info.get("param_names") != list(params):
            raise InvalidInputError(
                "cannot resume: the saved state trains different parameters (was --train-layernorm or --train-all changed?)"
            )
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(resume_tensors[f"current.{k}"])
            if head is not None:
                unwrap(head).load_state_dict({k[5:]: v for k, v in resume_tensors.items() if k.startswith("head.")})
        _restore_optimizer(optimizer, resume_info, resume_tensors)
        step, elapsed_before = int(resume_info["step"]), float(resume_info["seconds"])
        history = list(resume_info.get("history", []))
        best = {k: resume_tensors[f"best.{k}"].clone() for k in params}
        before, best_eval = resume_info["eval_before"], resume_info["best_eval"]
    else:
        before = evaluate()
        history.append({"step": 0, "seconds": 0.0, **before})
        best = {k: p.detach().clone() for k, p in params.items()}
        best_eval = before
    best_head = {k: v.clone() for k, v in unwrap(head).state_dict().items()} if head is not None else None

    def save_checkpoint(final: bool = False) -> None:
        if out_dir is None or not accelerator.is_main_process:
            return
        m = unwrap(model)
        current = {k: p.detach().clone() for k, p in params.items()}
        summary = {"healing": _summary(final=final)}
        # Everything the output holds goes into the one temporary folder and appears in one swap: a kill at any
        # moment leaves the complete earlier output or the complete new one, never a model without its classifier
        # or resume state.
        files: dict[str, bytes] = {}
        if head is not None:
            from safetensors.torch import save

            from embfactor.fileio import json_bytes

            files[HEAD_FILE] = save({k: v.contiguous() for k, v in best_head.items()})
            files[HEAD_JSON] = json_bytes({"classes": classes, "pooling": "mean",
                                           "in_features": int(best_head["weight"].shape[1])})
        info = {"step": step, "seconds": elapsed(), "history": history, "eval_before": before,
                "best_eval": best_eval, "options": {k: v for k, v in o.items() if k not in ("resume", "eval_texts")}}
        files.update(_state_files(params, best, optimizer, unwrap(head) if head is not None else None, info))
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(best[k])
        try:
            save_compressed(m, out_dir, tokenizer=tok, inputs=(student.source, teacher.source), files=files, extra={
                "source_model": student.record.get("source_model", student.name), **summary})
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(current[k])

    def _summary(final: bool = True) -> dict[str, Any]:
        r = {
            "kind": kind,
            "mode": "supervised" if head is not None else "distillation",
            "steps": step,
            "seconds": round(elapsed(), 1),
            "cpu_seconds": round(time.process_time() - c0, 1),  # this run only; tells a busy machine from a slow loop
            "eval_before": before,
            "best_eval": best_eval,
            "last_eval": history[-1] if history else None,
            "best_step": best_eval.get("step", 0),
            "history": history,
            "trainable_params": sum(p.numel() for p in params.values()),
            "train_layernorm": o["train_layernorm"],
            "train_all": o["train_all"],
            "bf16": o["bf16"],
            "device": str(device),
            "lr": o["lr"],
            "batch_size": o["batch_size"],
            "max_length": o["max_length"],
            "texts": "wiki_split('train')" if texts is None and head is None else "user",
            "complete": final,
        }
        if head is not None:
            r["classes"] = classes
        return r

    # The budget covers evaluating and training (not loading or saving): a step starts only when it and the final
    # evaluation fit in what is left, judged by the slowest recent step and the last evaluation's duration.
    step_cost = {"step": 0.0, "eval": 0.0}

    def budget_left() -> bool:
        if steps is not None and step >= steps:
            return False
        if minutes is None:
            return True
        return elapsed() + step_cost["step"] + step_cost["eval"] <= minutes * 60

    def run_eval() -> None:
        nonlocal best_eval, best, best_head
        t = time.perf_counter()
        r = {"step": step, "seconds": 0.0, "train_loss": ema, **evaluate()}
        step_cost["eval"] = time.perf_counter() - t
        r["seconds"] = round(elapsed(), 1)
        history.append(r)
        if r["score"] < best_eval["score"]:
            best_eval = r
            best = {k2: p.detach().clone() for k2, p in params.items()}
            if head is not None:
                best_head = {k2: v.clone() for k2, v in unwrap(head).state_dict().items()}

    def show() -> None:
        shown = {"loss": f"{ema:.4f}"} if ema is not None else {}
        if head is not None:
            shown["best_acc"] = f"{best_eval['accuracy']:.4f}"
        shown["best"] = f"{best_eval['loss']:.4f}"
        bar.set_postfix(**shown, s=f"{elapsed():.0f}")

    # ---- train
    model.train()
    n = len(train_items)
    bs = min(o["batch_size"], n)
    per_epoch = max(1, n // bs)
    total = steps if steps is not None else None
    bar = tqdm(total=total, initial=min(step, total) if total else step, desc="heal", unit="step",
               disable=not progress or not accelerator.is_local_main_process)
    last_save = time.perf_counter()
    ema = None
    ran = False
    while budget_left() or (not ran and (steps is None or step < steps)):  # one step even if none fits the time
        ran = True
        t_step = time.perf_counter()
        epoch, k = divmod(step, per_epoch)
        order = np.random.default_rng(o["seed"] + 1 + epoch).permutation(n)
        idx = order[k * bs : (k + 1) * bs]
        for g in optimizer.param_groups:  # linear warm-up, then constant (the budget may be wall-clock)
            g["lr"] = o["lr"] * min(1.0, (step + 1) / max(1, o["warmup_steps"]))
        loss = step_loss(idx)
        if not torch.isfinite(loss):
            raise InvalidInputError(f"the loss became {float(loss)} at step {step}; lower lr (now {o['lr']})")
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        step += 1
        lv = float(loss.detach())
        ema = lv if ema is None else 0.9 * ema + 0.1 * lv
        took = time.perf_counter() - t_step
        step_cost["step"] = max(took, 0.8 * step_cost["step"])  # the slowest recent step, decaying
        bar.update(1)
        if step % o["eval_every"] == 0 or not budget_left():
            run_eval()
            if out_dir is not None and time.perf_counter() - last_save > o["save_every_seconds"]:
                save_checkpoint()
                last_save = time.perf_counter()
        show()
    if history[-1]["step"] != step:  # the end of the run is always evaluated, whatever the interval
        run_eval()
        show()
    bar.close()
    # the student ends in its best state
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(best[k])
    if head is not None:
        unwrap(head).load_state_dict(best_head)
        student.classifier = unwrap(head)
        student.classes = classes
    save_checkpoint(final=True)
    if pad_added:
        tok.pad_token = None
    for p in unwrap(model).parameters():
        p.requires_grad_(True)
    unwrap(model).eval()
    summary = _summary(final=True)
    summary["output"] = str(out_dir) if out_dir is not None else None
    summary["improvement"] = {
        "loss": before["loss"] - best_eval["loss"],
        "loss_relative": (before["loss"] - best_eval["loss"]) / before["loss"] if before["loss"] else 0.0,
    }
    if not math.isfinite(summary["improvement"]["loss"]):
        summary["improvement"]["loss"] = None
    return summary
