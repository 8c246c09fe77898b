"""Healing: train a compressed model's storage format so that it behaves like the original again (distillation).

Encoders match the teacher's token states and pooled embeddings, decoders its next-token distributions, and with
``labels=`` a linear head on the pooled embedding is fine-tuned jointly (see :mod:`embfactor.train.distill`).

Only the embedding format's floating-point tensors train by default, whatever the format (factors, codebooks,
scales; integer codes never): ``train_layernorm=True`` adds the LayerNorm/RMSNorm weights, ``train_all=True`` every
weight (more progress per step, ~1.7× the step time and Adam state for the whole model). The teacher's outputs are
computed on the fly under ``torch.inference_mode``.

The loop runs under HF Accelerate: ``accelerate launch --num_processes N -m embfactor.cli.main heal ...`` runs N
processes (GPUs, or CPU processes with ``--cpu``), each on its share of every batch, with gradients averaged; they
agree on when to stop, and only the main process writes. Checkpoints (:mod:`embfactor.train.checkpoint`): the best
model so far, its classifier and the resume state, in one atomic swap; ``resume=True`` continues an interrupted run.

A run is a few steps, each a method of :class:`_HealRun`: set up (freeze, data, accelerator), start (first evaluation
or resume), train (step, evaluate at intervals and at the end, keep the best), finish (best weights, final save,
summary).
"""

from __future__ import annotations

import dataclasses
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

from embfactor.errors import ConfigError, InvalidInputError
from embfactor.train.checkpoint import (
    HEAD_FILE,
    HEAD_JSON,
    STATE_JSON,
    STATE_TENSORS,
    head_files,
    read_state,
    restore_optimizer,
    state_files,
)
from embfactor.surgery.rest import round_rest_
from embfactor.train.config import HealConfig
from embfactor.train.distill import (
    bf16_supported,
    cast_parameters,
    check_compatible,
    chunked_decoder_loss,
    clean_texts,
    decoder_loss,
    encoder_loss,
    head_inputs,
    head_split_matches,
    hidden_states,
    passages,
    pool,
    prepare_data,
    read_labels,
    recompute_layers,
    teacher_logprobs,
    token_windows,
    trainable_parameters,
    upcast_half,
)

__all__ = [
    "HEAD_FILE", "HEAD_JSON", "STATE_JSON", "STATE_TENSORS", "HealConfig", "bf16_supported", "check_compatible",
    "decoder_loss", "encoder_loss", "heal", "passages", "token_windows", "trainable_parameters",
]


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
    config: HealConfig | None = None,
    verify: int | bool | None = None,
    **opts: Any,
) -> dict[str, Any]:
    """Distill ``teacher`` into the compressed ``student`` (trained in place); keep and save the best state.

    Args:
        student: the compressed :class:`~embfactor.models.LoadedModel` (its embedding must be a storage format).
        teacher: the original LoadedModel it was compressed from (same vocabulary).
        texts: unlabelled training text; None = the training part of the bundled Wikipedia extract.
        minutes, steps: the budget (at least one; with both, whichever ends first); see :class:`HealConfig`.
        output: folder for the healed model (best checkpoint, written atomically) and the resume state.
        labels: a CSV/JSONL file with ``text,label`` (or a (texts, labels) pair): supervised fine-tuning with a
            classification head on the pooled embedding; saved as classifier.safetensors + classifier.json.
        progress: tqdm progress bar with the loss and the best held-out loss so far.
        config: a :class:`HealConfig`; ``opts`` (any of its fields by name) override it. Without a config,
            options left unset (or None) take the student table's own settings first
            (:meth:`~embfactor.formats.base.RowFormat.heal_defaults`: codebook and int-k tables train every weight,
            each table tensor at 3e-3 × its RMS and the rest at 1e-5), then HealConfig's defaults.
        verify: the final save loads the written folder as users do and scores it against ``teacher`` on held-out
            text (:mod:`embfactor.verify`), failing with VerificationError and writing nothing when it is
            far worse than the healed model in memory. None/True: the default sample; a number: that many
            passages (encoders) or 256-token windows (decoders); 0/False: skip.

    Returns:
        A summary: steps, seconds, eval loss before/best/last, the eval history, fidelity (encoders) or
        KL (decoders), accuracy (supervised), trainable parameter count, output folder.

    Raises:
        InvalidInputError: mismatched vocabularies, empty texts, bad labels; SurgeryError: student not compressed,
        or nothing to train; ConfigError: bad options or no budget. Nothing is written when validation fails.

    Example:
        >>> s, t = load_model("out/minilm-r6"), load_model("minilm")              # doctest: +SKIP
        >>> heal(s, t, minutes=10, output="out/minilm-r6-healed")["best_eval"]     # doctest: +SKIP
    """
    from embfactor.fileio import check_output_dir

    # ---- validate everything before any work or write
    check_compatible(student, teacher)
    cfg = _config(config, minutes, steps, opts, format_defaults(student.model))
    texts = clean_texts(texts)
    labelled = read_labels(labels) if labels is not None else None
    out_dir = Path(output) if output is not None else None
    if out_dir is not None:
        check_output_dir(out_dir, inputs=(student.source, teacher.source))
    resume = None
    if cfg.resume:
        if out_dir is None:
            raise ConfigError("resume=True needs output= (the folder of the interrupted run)")
        resume = read_state(out_dir)
    run = _HealRun(student, teacher, cfg, texts, labelled, out_dir, progress)
    run.verify = verify
    run.start(resume)
    run.train()
    return run.finish()


def _config(config: HealConfig | None, minutes: float | None, steps: int | None, opts: dict[str, Any],
            format_defaults: dict[str, Any] | None = None) -> HealConfig:
    # format_defaults: the student's table's own settings (RowFormat.heal_defaults), under what the caller gave
    budget = {k: v for k, v in (("minutes", minutes), ("steps", steps)) if v is not None}
    if config is None:
        given = {k: v for k, v in opts.items() if v is not None}
        cfg = HealConfig.from_options(**{**(format_defaults or {}), **given}, **budget)
    else:
        HealConfig.from_options(**opts)  # names checked
        cfg = dataclasses.replace(config, **{k: v for k, v in opts.items() if v is not None}, **budget)
    if cfg.minutes is None and cfg.steps is None:
        raise ConfigError("give a healing budget: minutes= (wall clock) and/or steps= (optimizer steps)")
    return cfg


def format_defaults(model: nn.Module) -> dict[str, Any]:
    """The healing settings the model's embedding format declares (empty for a plain embedding)."""
    emb = model.get_input_embeddings()
    get = getattr(emb, "heal_defaults", None)
    return get() if callable(get) else {}


EVALS_PER_BUDGET = 8  # a minutes budget is evaluated at least this often (besides every eval_every steps)


class _HealRun:
    """One healing run's state: the models, data, optimizer, best weights so far, history and clock."""

    def __init__(self, student: Any, teacher: Any, cfg: HealConfig, texts: list[str] | None,
                 labelled: tuple[list[str], list[str]] | None, out_dir: Path | None, progress: bool) -> None:
        from embfactor.eval.embed import usable_positions

        limit = usable_positions(student.model)
        if limit is not None and cfg.max_length > limit:  # longer windows would index past the position table
            cfg = dataclasses.replace(cfg, max_length=limit)
        self.student, self.teacher, self.cfg, self.out_dir, self.progress = student, teacher, cfg, out_dir, progress
        self.kind, self.tok = student.kind, student.tokenizer
        self.user_texts = texts is not None
        torch.manual_seed(cfg.seed)
        from embfactor.formats import is_row_format

        # int8 codebooks train as float values (rounded back to int8 whenever the model is saved)
        self.formats = [m for m in student.model.modules() if is_row_format(m)]
        self.stored_form(False)
        self.params = trainable_parameters(student.model, train_layernorm=cfg.train_layernorm,
                                           train_all=cfg.train_all)
        self.stored_dtypes = upcast_half(self.params)  # half-precision codebooks/scales train as float32
        for p in teacher.model.parameters():
            p.requires_grad_(False)
        teacher.model.eval()
        self.pad_added = self.tok.pad_token is None
        if self.pad_added:  # decoders: pad with EOS for batching (restored at the end)
            self.tok.pad_token = self.tok.eos_token
        self.data = prepare_data(self.kind, self.tok, texts, labelled, eval_texts=cfg.eval_texts,
                                 eval_size=cfg.eval_size, max_length=cfg.max_length, seed=cfg.seed)
        head = None
        if self.data.classes is not None:
            head = nn.Linear(student.model.get_input_embeddings().embedding_dim, len(self.data.classes))
        self._setup_accelerator(head)
        self.loss_chunk = self._loss_chunk()
        auto = cfg.checkpoint_layers == "auto"  # decoders: their activations dominate a step's memory
        self.recompute = self.kind == "decoder" if auto else bool(cfg.checkpoint_layers)
        self.step, self.seconds_before, self.ema = 0, 0.0, None
        self.history: list[dict[str, Any]] = []
        self.cost = {"step": 0.0, "eval": 0.0, "train": 0.0}  # slowest recent step, last evaluation, all steps
        self.verify: int | bool | None = None  # samples of the final save's check (0/False: none)
        self.verified: dict[str, Any] | None = None

    def _setup_accelerator(self, head: nn.Module | None) -> None:
        from accelerate import Accelerator

        # Autocast is ours, not Accelerate's mixed_precision: Accelerate keeps that in a process-wide state that
        # refuses to change, so a second heal() in the same process with another bf16 setting would fail.
        self.acc = Accelerator()
        self.bf16 = bf16_supported(self.acc.device) if self.cfg.bf16 == "auto" else bool(self.cfg.bf16)
        if self.cfg.batch_size < self.acc.num_processes:
            raise ConfigError(f"batch_size {self.cfg.batch_size} is smaller than the {self.acc.num_processes} "
                              "processes that share each batch; give at least one text per process")
        optimizer = torch.optim.AdamW(self._param_groups(head), weight_decay=self.cfg.weight_decay)
        if head is not None:
            self.model, self.head, self.optimizer = self.acc.prepare(self.student.model, head, optimizer)
        else:
            (self.model, self.optimizer), self.head = self.acc.prepare(self.student.model, optimizer), None
        self.device = self.acc.device
        self.tmodel = self.teacher.model.to(self.device)

    def _loss_chunk(self) -> int:
        """Positions per chunk of the decoder loss: the configured size when both models' logits are their head
        applied to the final hidden states (checked on a few tokens), else 0 (the whole batch's logits at once)."""
        if self.kind != "decoder" or self.cfg.loss_chunk == 0:
            return 0
        vocab = self.student.model.get_input_embeddings().num_embeddings
        ids = (torch.arange(1, 9) % vocab).unsqueeze(0).to(self.device)  # any few tokens will do
        split = all(head_split_matches(m, ids) for m in (self.acc.unwrap_model(self.model), self.tmodel))
        return self.cfg.loss_chunk if split else 0

    def _param_groups(self, head: nn.Module | None) -> list[dict[str, Any]]:
        """The table's tensors at ``lr`` (× each one's RMS with ``relative_lr``), a classifier at ``lr``, the rest of
        the model's trained weights at ``lr_rest``."""
        cfg = self.cfg
        own = {id(p) for p in self.student.model.get_input_embeddings().parameters()}
        fmt = [p for p in self.params.values() if id(p) in own]
        rest = [p for p in self.params.values() if id(p) not in own]
        if cfg.relative_lr:  # one group per table tensor, at lr × its RMS
            groups = [{"params": [p], "lr": lr, "base_lr": lr}
                      for p in fmt for lr in [cfg.lr * max(float(p.detach().float().pow(2).mean().sqrt()), 1e-12)]]
        else:
            groups = [{"params": fmt, "lr": cfg.lr, "base_lr": cfg.lr}]
        if head is not None:
            groups.append({"params": list(head.parameters()), "lr": cfg.lr, "base_lr": cfg.lr})
        if rest:
            lr_rest = cfg.lr if cfg.lr_rest is None else cfg.lr_rest
            groups.append({"params": rest, "lr": lr_rest, "base_lr": lr_rest})
        return [g for g in groups if g["params"]]

    # ------------------------------------------------------------------------------------------- batches, losses

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def batch_at(self, items: Any, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """The model inputs of the items at ``idx``: token windows as they are, texts tokenized and padded."""
        if isinstance(items, torch.Tensor):
            ids = items[torch.as_tensor(idx)].to(self.device)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        enc = self.tok([items[i] for i in idx], padding=True, truncation=True, max_length=self.cfg.max_length,
                       return_tensors="pt")
        keep = ("input_ids", "attention_mask", "token_type_ids")
        return {k: v.to(self.device) for k, v in enc.items() if k in keep}

    def distill(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, per-item metric, pooled student embedding) on one batch."""
        mask = batch["attention_mask"]
        if self.kind == "decoder" and self.loss_chunk:
            return self.distill_chunked(batch)
        with torch.inference_mode(), self.autocast():
            if self.kind == "encoder":
                t_out = hidden_states(self.tmodel, batch, "encoder")
            else:
                t_out = teacher_logprobs(self.tmodel(**batch, use_cache=False).logits[:, :-1])
        t_out = t_out.clone()  # inference tensors cannot be saved for backward
        with self.autocast():
            if self.kind == "encoder":
                with recompute_layers(self.student.model, self.recompute):
                    s_hidden = self.model(**batch).last_hidden_state
                loss, cos = encoder_loss(s_hidden, t_out, mask, self.cfg.mse_weight)
                return loss, cos.detach(), pool(s_hidden.float(), mask)
            with recompute_layers(self.student.model, self.recompute):
                s = self.model(**batch, output_hidden_states=self.head is not None, use_cache=False)
            loss = decoder_loss(s.logits[:, :-1], t_out, mask[:, 1:])
            pooled = pool(s.hidden_states[-1].float(), mask) if self.head is not None else loss
            return loss, loss.detach().reshape(1), pooled

    def distill_chunked(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`distill` of a decoder from both models' final hidden states, ``loss_chunk`` positions of logits
        at a time (:func:`~embfactor.train.distill.chunked_decoder_loss`): the same loss and gradients."""
        student = self.acc.unwrap_model(self.model)
        with torch.inference_mode(), self.autocast(), head_inputs(self.tmodel) as seen:
            self.tmodel(**batch, use_cache=False)
        t_hidden = seen[0][:, :-1].clone()  # inference tensors cannot be saved for backward
        with self.autocast():
            # the forward goes through the wrapper (DDP) all the same
            with head_inputs(student) as seen, recompute_layers(student, self.recompute):
                s = self.model(**batch, output_hidden_states=self.head is not None, use_cache=False)
            loss = chunked_decoder_loss(seen[0][:, :-1], t_hidden, student.get_output_embeddings(),
                                        self.tmodel.get_output_embeddings(), batch["attention_mask"][:, 1:],
                                        chunk=self.loss_chunk)
        pooled = pool(s.hidden_states[-1].float(), batch["attention_mask"]) if self.head is not None else loss
        return loss, loss.detach().reshape(1), pooled

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss (and fidelity / accuracy); ``score`` orders results, lower is better."""
        self.model.eval()
        items, losses, metrics, correct = self.data.eval, [], [], 0
        for start in range(0, len(items), self.cfg.batch_size):
            idx = np.arange(start, min(start + self.cfg.batch_size, len(items)))
            loss, metric, pooled = self.distill(self.batch_at(items, idx))
            losses.append(float(loss) * len(idx))
            metrics.append(metric.float().cpu())
            if self.head is not None:
                correct += int((self.head(pooled).argmax(-1).cpu() == self.data.eval_y[torch.as_tensor(idx)]).sum())
        self.model.train(self.cfg.dropout)  # eval mode while training, unless dropout is asked for
        r = {"loss": sum(losses) / len(items)}
        if self.kind == "encoder":
            r["fidelity"] = float(torch.cat(metrics).mean())
        if self.head is not None:
            r["accuracy"] = correct / len(items)
            r["score"] = -r["accuracy"] + 1e-6 * r["loss"]  # ties broken by the loss
        else:
            r["score"] = r["loss"]
        return r

    # ------------------------------------------------------------------------------------------- clock, best

    def elapsed(self) -> float:
        return self.seconds_before + time.perf_counter() - self.t0

    def snapshot(self) -> None:
        """Remember the current trainable tensors (and head) as the best so far."""
        self.best = {k: p.detach().clone() for k, p in self.params.items()}
        self.best_head = ({k: v.clone() for k, v in self.acc.unwrap_model(self.head).state_dict().items()}
                          if self.head is not None else None)

    def start(self, resume: tuple[dict[str, Any], dict[str, torch.Tensor]] | None) -> None:
        """Start the clock; continue from a saved state, or evaluate the student as it is."""
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        if resume is None:
            self.before = self.evaluate()
            self.history.append({"step": 0, "seconds": 0.0, **self.before})
            self.best_eval = self.before
            self.snapshot()
            return
        info, tensors = resume
        if info.get("param_names") != list(self.params):
            raise InvalidInputError("cannot resume: the saved state trains different parameters "
                                    "(was --train-layernorm or --train-all changed?)")
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(tensors[f"current.{k}"])
        if self.head is not None:
            self.acc.unwrap_model(self.head).load_state_dict(
                {k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
        restore_optimizer(self.optimizer, info, tensors)
        self.step, self.seconds_before = int(info["step"]), float(info["seconds"])
        self.history = list(info.get("history", []))
        self.before, self.best_eval = info["eval_before"], info["best_eval"]
        self.snapshot()
        self.best = {k: tensors[f"best.{k}"].clone() for k in self.params}

    # ------------------------------------------------------------------------------------------- the loop

    def budget_left(self) -> bool:
        """Another step fits: the step budget is not used up, and the slowest recent step plus the final
        evaluation fit in the time left. All processes follow the main process's answer."""
        cfg = self.cfg
        more = cfg.steps is None or self.step < cfg.steps
        if more and cfg.minutes is not None:
            more = self.elapsed() + self.cost["step"] + self.cost["eval"] <= cfg.minutes * 60
        return self.main_process_says(more)

    def main_process_says(self, flag: bool) -> bool:
        """The main process's ``flag`` in every process: clocks differ between processes, and a step or an
        evaluation they disagree on would hang."""
        if self.acc.num_processes == 1:
            return flag
        from accelerate.utils import broadcast

        return bool(broadcast(torch.tensor([int(flag)], device=self.device), from_process=0).item())

    def train_step(self) -> None:
        """One optimizer step on this step's batch (each process on its share)."""
        cfg, n = self.cfg, len(self.data.train)
        t = time.perf_counter()
        bs = min(cfg.batch_size, n)
        epoch, k = divmod(self.step, max(1, n // bs))
        idx = np.random.default_rng(cfg.seed + 1 + epoch).permutation(n)[k * bs : (k + 1) * bs]
        idx = idx[self.acc.process_index :: self.acc.num_processes]
        for g in self.optimizer.param_groups:  # linear warm-up, then constant (the budget may be wall-clock)
            g["lr"] = g.get("base_lr", cfg.lr) * min(1.0, (self.step + 1) / max(1, cfg.warmup_steps))
        # the last step's gradients go before the forward, not after it: they would sit beside its activations
        self.optimizer.zero_grad(set_to_none=True)
        loss, _, pooled = self.distill(self.batch_at(self.data.train, idx))
        if self.head is not None:
            ce = F.cross_entropy(self.head(pooled), self.data.train_y[torch.as_tensor(idx)].to(self.device))
            loss = ce + cfg.distill_weight * loss
        if not torch.isfinite(loss):
            raise InvalidInputError(f"the loss became {float(loss)} at step {self.step}; lower lr (now {cfg.lr})")
        self.acc.backward(loss)
        self.optimizer.step()
        self.step += 1
        lv = float(loss.detach())
        self.ema = lv if self.ema is None else 0.9 * self.ema + 0.1 * lv
        took = time.perf_counter() - t
        self.cost["train"] += took
        self.cost["step"] = max(took, 0.8 * self.cost["step"])  # the slowest recent step, decaying

    def eval_due(self) -> bool:
        """A time budget is also evaluated every 1/EVALS_PER_BUDGET of it: slow steps (a decoder on a CPU takes
        20-50 s each) would otherwise reach no ``eval_every`` before the end, and the best state would be a guess.
        All processes follow the main process's answer."""
        if self.cfg.minutes is None:
            return False
        last = self.history[-1]["seconds"] if self.history else 0.0
        return self.main_process_says(self.elapsed() - last >= self.cfg.minutes * 60 / EVALS_PER_BUDGET)

    def evaluate_and_keep_best(self) -> None:
        t = time.perf_counter()
        r = {"step": self.step, "seconds": 0.0, "train_loss": self.ema, **self.evaluate()}
        self.cost["eval"] = time.perf_counter() - t
        r["seconds"] = round(self.elapsed(), 1)
        self.history.append(r)
        if r["score"] < self.best_eval["score"]:
            self.best_eval = r
            self.snapshot()

    def train(self) -> None:
        """Step until the budget is spent (at least one step); evaluate at intervals and always at the end."""
        from tqdm.auto import tqdm

        total = self.cfg.steps
        bar = tqdm(total=total, initial=min(self.step, total) if total else self.step, desc="heal", unit="step",
                   disable=not self.progress or not self.acc.is_local_main_process)
        last_save = time.perf_counter()
        more = self.budget_left() or (self.cfg.steps is None or self.step < self.cfg.steps)
        while more:
            self.train_step()
            bar.update(1)
            more = self.budget_left()
            if self.step % self.cfg.eval_every == 0 or not more or self.eval_due():
                self.evaluate_and_keep_best()
                if self.out_dir is not None and time.perf_counter() - last_save > self.cfg.save_every_seconds:
                    self.save()
                    last_save = time.perf_counter()
            bar.set_postfix(self.shown())
        if self.history[-1]["step"] != self.step:  # e.g. a resumed run with nothing left to do
            self.evaluate_and_keep_best()
            bar.set_postfix(self.shown())
        self.loop_seconds = self.elapsed()
        bar.close()

    def shown(self) -> dict[str, str]:
        """The progress bar's figures: running loss, the best held-out loss (and accuracy) so far, seconds."""
        shown = {"loss": f"{self.ema:.4f}"} if self.ema is not None else {}
        if self.head is not None:
            shown["best_acc"] = f"{self.best_eval['accuracy']:.4f}"
        shown["best"] = f"{self.best_eval['loss']:.4f}"
        shown["s"] = f"{self.elapsed():.0f}"
        return shown

    # ------------------------------------------------------------------------------------------- save, finish

    def load_best(self) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.best[k])

    def stored_form(self, stored: bool) -> None:
        """The embedding formats' tensors as stored (True) or in their trainable float form (False)."""
        for f in self.formats:
            f.for_storage_() if stored else f.for_training_()

    def save(self, final: bool = False) -> None:
        """Write the best model so far, its classifier and the resume state to the output in one swap."""
        from embfactor.surgery import save_compressed

        if self.out_dir is not None and self.acc.is_main_process:
            files = head_files(self.best_head, self.data.classes) if self.head is not None else {}
            info = {"step": self.step, "seconds": self.elapsed(), "history": self.history,
                    "eval_before": self.before, "best_eval": self.best_eval, "options": self.cfg.to_dict()}
            head = self.acc.unwrap_model(self.head) if self.head is not None else None
            files.update(state_files(self.params, self.best, self.optimizer, head, info))
            current = {k: p.detach().clone() for k, p in self.params.items()}
            extra = {"source_model": self.student.record.get("source_model", self.student.name),
                     "healing": self.summary(final=final)}
            verifier = self.verifier() if final else None
            self.load_best()
            cast_parameters(self.params, self.stored_dtypes)
            self.stored_form(True)
            model = self.acc.unwrap_model(self.model)
            try:
                if verifier is not None:  # the model as it is saved, in memory: what the written one must match
                    round_rest_(model)  # a trained rest (--train-all) as it is written (restored from current after)
                    training = model.training
                    model.eval()
                    verifier.predict(dataclasses.replace(self.student, model=model))
                    model.train(training)
                save_compressed(model, self.out_dir, tokenizer=self.tok, files=files,
                                inputs=(self.student.source, self.teacher.source), extra=extra, verify=verifier)
                self.verified = verifier.result if verifier is not None else None
            finally:
                self.stored_form(False)
                cast_parameters(self.params, {k: current[k].dtype for k in self.stored_dtypes})
                with torch.no_grad():
                    for k, p in self.params.items():
                        p.copy_(current[k])

    def verifier(self) -> Any:
        """The check of the final save against the teacher (None when verification is off)."""
        if self.verify is False or self.verify == 0:
            return None
        from embfactor.verify import Verifier

        return Verifier(self.teacher, samples=None if self.verify is True else self.verify)

    def summary(self, final: bool = True) -> dict[str, Any]:
        cfg = self.cfg
        r = {
            "kind": self.kind,
            "mode": "supervised" if self.head is not None else "distillation",
            "steps": self.step,
            "seconds": round(getattr(self, "loop_seconds", None) or self.elapsed(), 1),
            "cpu_seconds": round(time.process_time() - self.c0, 1),  # this run only: a busy machine vs a slow loop
            "step_seconds": round(self.cost["train"], 3),  # this run's optimizer steps only (no evaluation)
            "eval_before": self.before,
            "best_eval": self.best_eval,
            "last_eval": self.history[-1] if self.history else None,
            "best_step": self.best_eval.get("step", 0),
            "history": self.history,
            "trainable_params": sum(p.numel() for p in self.params.values()),
            "train_layernorm": cfg.train_layernorm,
            "train_all": cfg.train_all,
            "bf16": self.bf16,
            "device": str(self.device),
            "processes": self.acc.num_processes,
            "lr": cfg.lr,
            "lr_rest": cfg.lr_rest,
            "relative_lr": cfg.relative_lr,
            "batch_size": cfg.batch_size,
            "max_length": cfg.max_length,
            "loss_chunk": self.loss_chunk if self.kind == "decoder" else None,
            "checkpoint_layers": self.recompute,
            "texts": "user" if self.user_texts or self.head is not None else "wiki_split('train')",
            "complete": final,
        }
        if self.head is not None:
            r["classes"] = self.data.classes
        return r

    def finish(self) -> dict[str, Any]:
        """Leave the student in its best state (with its classifier), save it, restore what was changed."""
        self.load_best()
        if self.head is not None:
            head = self.acc.unwrap_model(self.head)
            head.load_state_dict(self.best_head)
            self.student.classifier, self.student.classes = head, self.data.classes
        self.save(final=True)
        self.acc.wait_for_everyone()  # the others return once the main process has written the output
        if self.pad_added:
            self.tok.pad_token = None
        cast_parameters(self.params, self.stored_dtypes)  # the model in memory is the one saved
        self.stored_form(True)
        model = self.acc.unwrap_model(self.model)
        round_rest_(model)  # a trained rest (--train-all) in the precision it was saved in
        for p in model.parameters():
            p.requires_grad_(p.is_floating_point())  # integer tensors (a format's codes) cannot require gradients
        model.eval()
        r = self.summary(final=True)
        r["output"] = str(self.out_dir) if self.out_dir is not None else None
        r["verified"] = self.verified
        before, best = self.before["loss"], self.best_eval["loss"]
        gain = before - best
        r["improvement"] = {"loss": gain if math.isfinite(gain) else None,
                            "loss_relative": gain / before if before else 0.0}
        return r
