"""Distillation pieces of healing: input checks, training and held-out data, the losses, what trains.

- Encoders: the student's last hidden states and mean-pooled sentence embeddings match the teacher's
  (1 − cosine of the pooled embeddings + a normalized MSE on the token states).
- Decoders: the student's next-token distributions match the teacher's (KL(teacher ‖ student) per token).
- Supervised: a linear head on the pooled embedding, trained with cross-entropy (+ the distillation term); accuracy
  on a held-apart fifth of the labelled rows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embfactor.errors import InvalidInputError, SurgeryError, a_or_an

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
        raise InvalidInputError(
            f"the compressed model is {a_or_an(student.kind)} but the reference is {a_or_an(teacher.kind)}"
        )


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


def clean_texts(texts: Sequence[str] | None) -> list[str] | None:
    """The non-blank texts (None stays None); refuse a lone string or nothing left."""
    if texts is None:
        return None
    if isinstance(texts, str):
        raise InvalidInputError("texts must be a list of strings, not one string")
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise InvalidInputError("no text to heal on: the given texts are empty")
    return texts


def read_labels(labels: str | os.PathLike | tuple[Sequence[str], Sequence[Any]]) -> tuple[list[str], list[str]]:
    """(texts, labels as strings) from a CSV/JSONL file or a (texts, labels) pair; two classes at least."""
    from embfactor.data import read_labelled

    if isinstance(labels, (str, os.PathLike)):
        texts, raw = read_labelled(labels)
        return list(texts), [str(x) for x in raw]
    texts, raw = list(labels[0]), [str(x) for x in labels[1]]
    if len(texts) != len(raw) or len(set(raw)) < 2:
        raise InvalidInputError(
            f"labels needs as many labels as texts and at least two classes, got {len(texts)} texts, "
            f"{len(raw)} labels, {len(set(raw))} class(es)"
        )
    return texts, raw


@dataclass
class HealData:
    """Training items and a fixed held-out slice: texts (encoders, supervised) or token windows (decoders)."""

    train: Any
    eval: Any
    train_y: torch.Tensor | None = None
    eval_y: torch.Tensor | None = None
    classes: list[str] | None = None


def prepare_data(
    kind: str, tokenizer: Any, texts: list[str] | None, labelled: tuple[list[str], list[str]] | None, *,
    eval_texts: Sequence[str] | None, eval_size: int, max_length: int, seed: int,
) -> HealData:
    """The run's data: labelled rows split 4:1, or passages / token windows of ``texts`` (default: Wikipedia)."""
    from embfactor.data import wiki_split

    heldout = clean_texts(eval_texts) if eval_texts is not None else wiki_split("heldout")
    if labelled is not None:
        sup_texts, raw = labelled
        classes = sorted(set(raw))
        y = torch.tensor([classes.index(x) for x in raw])
        perm = np.random.default_rng(seed).permutation(len(sup_texts))
        n_eval = max(len(classes), len(perm) // 5)
        ev, tr = perm[:n_eval], perm[n_eval:]
        data = HealData([sup_texts[i] for i in tr], [sup_texts[i] for i in ev], y[torch.as_tensor(tr)],
                        y[torch.as_tensor(ev)], classes)
    elif kind == "encoder":
        held = passages(heldout)
        data = HealData(passages(texts if texts is not None else wiki_split("train")),
                        held[:: max(1, len(held) // eval_size)][:eval_size])
    else:
        ew = token_windows(tokenizer, heldout, max_length)
        data = HealData(token_windows(tokenizer, texts if texts is not None else wiki_split("train"), max_length),
                        ew[:: max(1, len(ew) // eval_size)][:eval_size])
    if len(data.train) == 0:
        raise InvalidInputError("no usable training passages in the given texts (each needs ≥ 20 characters)")
    return data


# ----------------------------------------------------------------------------------------------- losses


def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over the real (unmasked) tokens."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def hidden_states(model: nn.Module, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """The last layer's hidden states of an encoder or a causal LM."""
    if kind == "encoder":
        return model(**batch).last_hidden_state
    return model(**batch, output_hidden_states=True).hidden_states[-1]


def encoder_loss(
    s_hidden: torch.Tensor, t_hidden: torch.Tensor, mask: torch.Tensor, mse_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 − cos(pooled)) + mse_weight · ‖h_s − h_t‖²/‖h_t‖² over real tokens; also the pooled cosines."""
    s_hidden, t_hidden = s_hidden.float(), t_hidden.float()
    cos = F.cosine_similarity(pool(s_hidden, mask), pool(t_hidden, mask), dim=-1)
    m = mask.unsqueeze(-1).to(s_hidden.dtype)
    mse = ((s_hidden - t_hidden).pow(2) * m).sum() / (t_hidden.pow(2) * m).sum().clamp_min(1e-12)
    return (1 - cos).mean() + mse_weight * mse, cos


def decoder_loss(s_logits: torch.Tensor, t_logp: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) of the next-token distributions.

    Args:
        s_logits: the student's logits (batch × positions × vocab).
        t_logp: the teacher's log-probabilities (:func:`teacher_logprobs`), the same shape.
        mask: 1 for positions that count.
    """
    kl = F.kl_div(F.log_softmax(s_logits.float(), -1), t_logp, reduction="none", log_target=True).sum(-1)
    if mask is None:
        return kl.mean()
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1)


def teacher_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """The teacher's next-token log-probabilities, float32 (one vocab-sized tensor kept per batch, not its logits
    as well: at SmolLM2's 49,152 tokens each such tensor of a 16 × 128 batch is 400 MB)."""
    return F.log_softmax(logits.float(), -1)


# ----------------------------------------------------------------------------------------------- what trains


def upcast_half(params: dict[str, nn.Parameter]) -> dict[str, torch.dtype]:
    """Make float16/bfloat16 trainable parameters float32 in place; return the stored dtype of each one changed.

    Formats store codebooks and scales in half precision. AdamW on half tensors breaks: the second moment of small
    gradients and its eps (1e-8) underflow to 0, and the first step divides 0 by 0. So training runs on float32
    copies and :func:`cast_parameters` returns them to their stored dtype before saving.

    Example:
        >>> p = {"cb": nn.Parameter(torch.zeros(2, dtype=torch.float16))}
        >>> upcast_half(p), p["cb"].dtype
        ({'cb': torch.float16}, torch.float32)
    """
    stored = {}
    for name, p in params.items():
        if p.dtype in (torch.float16, torch.bfloat16):
            stored[name] = p.dtype
            p.data = p.data.float()
    return stored


def cast_parameters(params: dict[str, nn.Parameter], dtypes: dict[str, torch.dtype]) -> None:
    """Give each named parameter the dtype in ``dtypes`` (in place; the others are left as they are)."""
    for name, dt in dtypes.items():
        params[name].data = params[name].data.to(dt)


def trainable_parameters(
    model: nn.Module, *, train_layernorm: bool = False, train_all: bool = False
) -> dict[str, nn.Parameter]:
    """Freeze all but the embedding format's floating-point parameters; return the trainable ones by name.

    Generic over storage formats: a format's float parameters (factors, codebooks, scales) train, its integer codes
    (buffers, or integer parameters) never do. ``train_layernorm`` adds the norm weights, ``train_all`` every
    floating-point parameter of the model. A tied head's shared tensors appear once.

    Example:
        >>> sorted(trainable_parameters(factorized_bert))   # doctest: +SKIP
        ['embeddings.word_embeddings.U', 'embeddings.word_embeddings.V']
    """
    from embfactor.formats import is_row_format

    emb = model.get_input_embeddings()
    if not is_row_format(emb):
        raise SurgeryError(
            f"the model to heal has a plain {type(emb).__name__} input embedding; compress it first "
            "(embfactor compress / embfactor.factorize_) and heal the compressed model"
        )
    chosen = {id(p) for p in emb.parameters()}
    if train_layernorm:
        for m in model.modules():
            if "norm" in type(m).__name__.lower():
                chosen |= {id(p) for p in m.parameters(recurse=False)}
    out = {}
    for name, p in model.named_parameters():
        keep = p.is_floating_point() and (train_all or id(p) in chosen)
        p.requires_grad_(keep)
        if keep:
            out[name] = p
    if not out:
        raise SurgeryError(
            f"the {type(emb).__name__} embedding has no floating-point parameters to train (its tensors are "
            "integer codes or fixed buffers); heal with train_layernorm=True / train_all=True (--train-layernorm / "
            "--train-all) to train the rest of the model around it"
        )
    return out


def bf16_supported(device: str | torch.device = "cpu") -> bool:
    """True when ``device`` has native bfloat16 arithmetic (CUDA: Ampere and later; CPU: AVX-512 BF16 or AMX).

    Without it bf16 autocast emulates the format and is slower than fp32, so ``bf16="auto"`` checks this at run time.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
