"""Distillation pieces of healing: input checks, training and held-out data, the losses, what trains.

- Encoders: the student's last hidden states and mean-pooled sentence embeddings match the teacher's
  (1 − cosine of the pooled embeddings + a normalized MSE on the token states).
- Decoders: the student's next-token distributions match the teacher's (KL(teacher ‖ student) per token).
- Supervised: a linear head on the pooled embedding, trained with cross-entropy (+ the distillation term); accuracy
  on a held-apart fifth of the labelled rows.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embfactor.errors import InvalidInputError, SurgeryError, a_or_an
from embfactor.eval.perplexity import teacher_logprobs, token_kl  # the KL of distillation is the metric's

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
    kl = token_kl(s_logits, t_logp)
    if mask is None:
        return kl.mean()
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1)


def _kl_sum(s_hidden: torch.Tensor, t_hidden: torch.Tensor, weight: torch.Tensor, s_head: nn.Module,
            t_head: nn.Module) -> torch.Tensor:
    # One chunk of positions: the weighted sum of KL(teacher ‖ student), from the hidden states through both heads.
    # The same operations as decoder_loss ∘ teacher_logprobs, so the sum over chunks is the unchunked loss.
    with torch.no_grad():
        t_logp = teacher_logprobs(t_head(t_hidden))
    return (token_kl(s_head(s_hidden), t_logp) * weight).sum()


def chunked_decoder_loss(
    s_hidden: torch.Tensor, t_hidden: torch.Tensor, s_head: nn.Module, t_head: nn.Module,
    mask: torch.Tensor | None = None, *, chunk: int = 256,
) -> torch.Tensor:
    """:func:`decoder_loss` of ``s_head(s_hidden)`` against ``teacher_logprobs(t_head(t_hidden))``, computed
    ``chunk`` token positions at a time: the same value and gradients, without a batch's vocabulary-sized tensors.

    Each chunk's logits are recomputed in the backward pass (``torch.utils.checkpoint``), so one chunk's vocabulary-
    sized tensors (logits, log-probabilities, the KL's terms and their gradients) live at a time, never the batch's:
    healing SmolLM2 (49,152 tokens) on 16 × 128 windows held 403 MB per such tensor, and several at once. The cost
    is one more head projection per chunk (student and teacher) in the backward pass. A tied head of a compressed
    model is its format's ``project``, so the dense table is never built either.

    Args:
        s_hidden: the student's final hidden states (what its output head takes), batch × positions × d.
        t_hidden: the teacher's, the same positions (no gradient flows to the teacher).
        s_head, t_head: the output heads (``model.get_output_embeddings()``).
        mask: 1 for positions that count (as in :func:`decoder_loss`; None = all).
        chunk: token positions per chunk (≥ 1; the batch's positions are flattened first).

    Example:
        >>> head = nn.Linear(8, 50, bias=False)
        >>> h = torch.randn(2, 5, 8)
        >>> full = decoder_loss(head(h), teacher_logprobs(head(h + 0.1)))
        >>> bool(torch.allclose(chunked_decoder_loss(h, h + 0.1, head, head, chunk=3), full, atol=1e-6))
        True
    """
    from torch.utils.checkpoint import checkpoint

    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise InvalidInputError(f"chunk must be a positive number of token positions, got {chunk!r}")
    sh = s_hidden.reshape(-1, s_hidden.shape[-1])
    th = t_hidden.reshape(-1, t_hidden.shape[-1]).detach()
    n = sh.shape[0]
    if th.shape[0] != n:
        raise InvalidInputError(f"the student has {n} hidden positions and the teacher {th.shape[0]}; they must match")
    if mask is None:
        weight, denom = torch.ones(n, device=sh.device), torch.tensor(float(n), device=sh.device)
    else:
        weight = mask.reshape(-1).to(torch.float32)
        denom = weight.sum().clamp_min(1)
    # only needed when something will be differentiated; under no_grad (evaluation) a chunk simply runs and is freed
    grad = torch.is_grad_enabled() and (sh.requires_grad or any(p.requires_grad for p in s_head.parameters()))
    total = torch.zeros((), device=sh.device)
    for s in range(0, n, chunk):
        args = (sh[s : s + chunk], th[s : s + chunk], weight[s : s + chunk], s_head, t_head)
        # non-reentrant: the chunks' gradients meet in one autograd graph, so each parameter's gradient is
        # accumulated once per backward (what DDP's gradient hooks expect), not once per chunk
        part = checkpoint(_kl_sum, *args, use_reentrant=False) if grad else _kl_sum(*args)
        total = total + part
    return total / denom


@contextlib.contextmanager
def head_inputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While open, each forward of the causal LM ``model`` records what its output head takes (the final hidden
    states, appended to the yielded list) and runs the head on the first position only: the batch's logits are
    never computed. (One position, not none: a format's ``project`` need not handle empty input.)

    A forward pre-hook on ``model.get_output_embeddings()``, so it works through wrappers (DDP) and for any model
    whose forward calls the head on its hidden states; :func:`head_split_matches` checks that nothing but the head
    stands between those and the logits.

    Example:
        >>> with head_inputs(gpt2) as seen:                        # doctest: +SKIP
        ...     gpt2(input_ids=ids).logits.shape[1], seen[0].shape[1]
        (1, 12)
    """
    seen: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if not args:
            raise InvalidInputError(f"{type(model).__name__} calls its output head without positional hidden states")
        seen.append(args[0])
        return (args[0][..., :1, :], *args[1:]), kwargs

    handle = model.get_output_embeddings().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def head_split_matches(model: nn.Module, input_ids: torch.Tensor) -> bool:
    """True when ``model``'s logits are its output head applied to the hidden states :func:`head_inputs` records.

    False for models that transform the logits after the head (Gemma-2's soft-capping, Cohere's logit scale) or
    whose head is called otherwise: their loss must be computed from the full logits.
    """
    head = model.get_output_embeddings()
    if head is None:
        return False
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
            full = model(**batch).logits
            with head_inputs(model) as seen:
                first = model(**batch).logits
            if len(seen) != 1 or first.shape[-2] != 1:
                return False
            split = head(seen[0])
        return split.shape == full.shape and bool(torch.allclose(split, full, rtol=1e-4, atol=1e-5))
    except Exception:  # noqa: BLE001 -- any failure: the split does not apply to this model, the full logits do
        return False
    finally:
        model.train(was_training)


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The model's outermost transformer blocks (Hugging Face ``GradientCheckpointingLayer``s), in order."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # an older transformers: no common base class to find the blocks by
        return []
    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if isinstance(m, GradientCheckpointingLayer) and not any(name.startswith(p + ".") for p, _ in found):
            found.append((name, m))
    return [m for _, m in found]


def _recomputed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


@contextlib.contextmanager
def recompute_layers(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """While open (and gradients are on), each transformer layer of ``model`` keeps only its inputs for the
    backward pass and recomputes its activations there (activation checkpointing); yields how many layers.

    Works in eval mode, unlike Hugging Face's ``gradient_checkpointing_enable`` (on only while ``model.training``;
    healing runs without dropout, in eval mode), and leaves the model as it was on exit: each layer's forward is
    wrapped on the instance for the duration. The recomputation is exact (the same kernels on the same inputs; the
    RNG state is restored for dropout), so loss and gradients are unchanged, for one more forward pass per step.
    Non-reentrant checkpointing, so the wrapped forward may take keyword arguments and DDP sees one gradient per
    parameter. A forward under it must not write a KV cache (pass ``use_cache=False``): the replay would write again.

    Example:
        >>> with recompute_layers(llama) as n:                # doctest: +SKIP
        ...     loss = llama(input_ids=ids, use_cache=False).logits.sum()
        >>> loss.backward()                                   # doctest: +SKIP
    """
    layers = transformer_layers(model) if enabled and torch.is_grad_enabled() else []
    missing = object()
    saved = [layer.__dict__.get("forward", missing) for layer in layers]
    for layer in layers:
        layer.forward = functools.partial(_recomputed, layer.forward)
    try:
        yield len(layers)
    finally:
        for layer, old in zip(layers, saved):
            if old is missing:
                del layer.forward
            else:
                layer.forward = old


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
