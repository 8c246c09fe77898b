"""verify: load a written model folder the way users load it and score it against the original on held-apart text.

What a user gets is the folder, not the model in memory: a format that drops part of its module's forward (a scale),
a tensor that is not saved, or a loader that rebuilds something else all pass every in-memory check. So after
``compress`` (and ``heal``) write a folder, it is loaded with ``from_pretrained`` (after ``import embfactor``, the
transformers route) and scored against outputs the original model gave *before* it was changed:

- encoders: fidelity, the mean cosine of mean-pooled sentence embeddings, on held-out Wikipedia passages;
- decoders: KL(original ‖ written) of the next-token distributions, top-1 agreement and the perplexity ratio, on
  windows of the held-out Wikipedia articles.

Held-out text is never calibration text: the planner counts and checks on the training part of the extract.

Two predictions say what the figure should be. The compressed model still in memory, scored on the same text: the
written model must match it (to rounding), whatever its quality, so an honest 0.55 of a low-rank table passes and a
saved model that is not the one scored fails. And for the planner, its own check of the chosen plan: it scored the
table inside the *original* module, so the written model is also scored the way the check was, on the check's text
(the calibration text held apart from the token counts), and a replacement that loses what the original module did
shows up as a written model far worse than the check predicted for the same table.

Example:
    >>> v = Verifier(lm)                          # the original's outputs, before it changes       # doctest: +SKIP
    >>> ...                                       # compress lm in place                             # doctest: +SKIP
    >>> v.predict(lm)                             # the in-memory compressed model's figure          # doctest: +SKIP
    >>> save_compressed(lm.model, out, verify=v)  # loads the temporary folder, raises if far worse  # doctest: +SKIP
    >>> v.result["measured"]["fidelity"]                                                             # doctest: +SKIP
    0.998...
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from embfactor.errors import ConfigError, VerificationError

ENCODER_PASSAGES = 64  # held-out passages of 3 sentences: ~2 s for MiniLM on one core
DECODER_WINDOWS = 2  # held-out windows of WINDOW tokens: a few seconds for SmolLM2
WINDOW = 256

# "Far worse" (a sign that the written model is not the scored one), as a deficit (1 - fidelity, or KL in nats) on
# the same text: written > FACTOR x predicted + MARGIN. Rounding moves these figures by well under the margins.
FACTOR = 2.0
MARGIN = {"encoder": 0.02, "decoder": 0.05}


def default_samples(kind: str) -> int:
    """Held-apart samples scored by default: passages (encoders) or 256-token windows (decoders)."""
    return ENCODER_PASSAGES if kind == "encoder" else DECODER_WINDOWS


class Verifier:
    """The original model's outputs on held-apart text, and the check of a written folder against them.

    Create it before the model is compressed; call :meth:`predict` on the compressed model in memory; pass it as
    ``save_compressed(..., verify=verifier)``, which calls it on the temporary folder before the rename, so a
    failing check leaves no output. ``result`` then holds the report's ``verified`` record.

    Args:
        lm: the original model (a LoadedModel), not yet changed.
        samples: held-out passages (encoders) or windows of 256 tokens (decoders); None: 64 / 2.
        check_texts: the text the planner checks its plans on (:func:`embfactor.plan.calibration_split`): the
            written model is scored on it too and compared with the plan's check of the chosen plan.
    """

    def __init__(self, lm: Any, *, samples: int | None = None, check_texts: list[str] | None = None) -> None:
        if samples is not None and samples < 1:
            raise ConfigError(f"verification samples must be at least 1 (or verify off), got {samples}")
        self.kind = lm.kind
        self.samples = samples or default_samples(lm.kind)
        self.plan_score: float | None = None
        self.check = None
        if check_texts is not None:  # the planner's scorer: candidates are swapped in and the original put back
            from embfactor.plan import ModelScorer

            self.check = ModelScorer(lm, texts=check_texts)  # the planner checks its plans with it too
        self.predicted: dict[str, float] | None = None
        self.result: dict[str, Any] | None = None
        if self.kind == "encoder":
            from embfactor.eval.similarity import wiki_passages

            self.texts = wiki_passages(self.samples)
            self.what = f"{len(self.texts)} held-out Wikipedia passages"
        else:
            from embfactor.eval.perplexity import heldout_text, token_ids

            window = min(WINDOW, _positions(lm.model) or WINDOW)
            ids = token_ids(lm.tokenizer, heldout_text(), self.samples * window)
            n = max(1, ids.numel() // window)
            self.ids = ids[: n * window].view(n, -1) if ids.numel() >= window else ids[None]
            self.what = f"{self.ids.numel():,} held-out Wikipedia tokens ({self.ids.shape[0]} windows)"
        self.reference = self._outputs(lm)

    @torch.inference_mode()
    def _outputs(self, lm: Any) -> torch.Tensor:
        if self.kind == "encoder":
            from embfactor.eval.embed import pooled_embeddings

            return pooled_embeddings(lm, self.texts, batch_size=16)
        return torch.cat([torch.log_softmax(lm.model(input_ids=w[None]).logits.float(), -1) for w in self.ids])

    @torch.inference_mode()
    def score(self, lm: Any) -> dict[str, float]:
        """The figures of ``lm`` against the original's outputs: fidelity (encoders); kl, top1_agreement,
        perplexity_ratio (decoders)."""
        if self.kind == "encoder":
            cos = (self._outputs(lm) * self.reference).sum(-1).clamp(-1, 1)
            return {"fidelity": float(cos.mean()), "fidelity_min": float(cos.min())}
        from embfactor.plan.model import KL_POSITIONS as step

        kl = nll = ref_nll = agree = 0.0
        for i, w in enumerate(self.ids):  # a window, then a few positions at a time (vocabulary-sized tensors)
            logits = lm.model(input_ids=w[None]).logits[0]
            for a in range(0, logits.shape[0], step):
                out, ref = torch.log_softmax(logits[a:a + step].float(), -1), self.reference[i, a:a + step]
                kl += float((ref.exp() * (ref - out)).sum())
                agree += float((out.argmax(-1) == ref.argmax(-1)).sum())
                tgt = w[a + 1:a + step + 1, None]  # next tokens (the window's last position has none)
                nll -= float(out[:tgt.shape[0]].gather(-1, tgt).sum())
                ref_nll -= float(ref[:tgt.shape[0]].gather(-1, tgt).sum())
        positions, targets = self.ids.numel(), self.ids[:, 1:].numel()
        nll, ref_nll = nll / targets, ref_nll / targets
        return {"kl": max(0.0, kl / positions), "top1_agreement": agree / positions,
                "perplexity_ratio": math.exp(nll - ref_nll), "perplexity": math.exp(nll),
                "reference_perplexity": math.exp(ref_nll)}

    def predict(self, lm: Any, plan_report: dict[str, Any] | None = None) -> dict[str, float]:
        """Score the compressed model in memory (what the written one must match); ``plan_report``: a compress
        report whose planner check (if any) is a second prediction."""
        if plan_report is not None:
            self.plan_score = plan_check_score(plan_report)
        self.predicted = self.score(lm)
        return self.predicted

    def __call__(self, folder: str | os.PathLike) -> dict[str, Any]:
        """Load ``folder`` as users do, score it, and raise VerificationError if it is far worse than predicted."""
        t0 = time.perf_counter()
        written = load_written(folder)
        measured = self.score(written)
        check = None
        if self.check is not None and self.plan_score is not None:
            check = {"predicted": self.plan_score, "measured": self.check_score(written)}
        problems = self.problems(measured, check)
        self.result = {
            "metric": "fidelity" if self.kind == "encoder" else "kl", "measured": measured,
            "predicted": self.predicted, "plan_check": check, "text": self.what,
            "loaded_with": f"{type(written.model).__name__}.from_pretrained",
            "seconds": round(time.perf_counter() - t0, 2), "ok": not problems,
        }
        if problems:
            raise VerificationError(
                f"the written model is far worse than the model that was compressed ({'; '.join(problems)}): "
                "the saved model is not the one that was scored, so nothing was written. This is a bug in "
                "embfactor; please report it with the command line"
            )
        return self.result

    @torch.inference_mode()
    def check_score(self, written: Any) -> float:
        """``written`` scored as the planner's check scored its candidates: mean cosine (encoders) or minus the KL
        (decoders) to the original, on the check's text."""
        return self.check.score_of(written)

    def problems(self, measured: dict[str, float], check: dict[str, float] | None = None) -> list[str]:
        """What makes the written model far worse than a prediction on the same text (empty when nothing does)."""
        key = "fidelity" if self.kind == "encoder" else "kl"
        out = []
        if self.predicted is not None and _far_worse(self.kind, measured[key], self.predicted[key]):
            out.append(f"{key} {measured[key]:.4f} written vs {self.predicted[key]:.4f} in memory, on {self.what}")
        if check is not None:
            sign = 1.0 if self.kind == "encoder" else -1.0  # the check's score is minus the KL for decoders
            got, want = sign * check["measured"], sign * check["predicted"]
            if _far_worse(self.kind, got, want):
                out.append(f"{key} {got:.4f} written vs {want:.4f} predicted by the plan's check, on its text")
        return out


def _far_worse(kind: str, got: float, want: float) -> bool:
    return _deficit(kind, got) > FACTOR * max(_deficit(kind, want), 0.0) + MARGIN[kind]


def _deficit(kind: str, value: float) -> float:
    # how far from the original: 1 - cosine for encoders, the KL itself for decoders
    return 1.0 - value if kind == "encoder" else value


def _positions(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def load_written(folder: str | os.PathLike) -> Any:
    """The folder as a user loads it: ``<Architecture>.from_pretrained(folder)`` after ``import embfactor``
    (``AutoModel`` for a sentence-transformers folder), with the tokenizer saved in it; a LoadedModel."""
    from embfactor.models import LoadedModel, _load_hf_folder, kind_of

    path = Path(folder)
    model, tok = _load_hf_folder(path)
    return LoadedModel(str(path), model.eval(), tok, kind_of(model), path)


def plan_check_score(report: dict[str, Any]) -> float | None:
    """The planner's check of the chosen plan in a compress report (None without a plan or a check)."""
    plan = report.get("plan") or {}
    score = plan.get("score")
    return float(score) if score is not None else None


__all__ = ["Verifier", "default_samples", "load_written", "plan_check_score"]
