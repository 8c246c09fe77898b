"""What an input embedding module does besides its table lookup, and which other modules read its table.

A storage format replaces the *table*; everything else the replaced module's forward did must survive (STYLE habit
10). Rather than a list of architectures, the module is probed: its forward on a spread of token ids (the padding
row included) is compared with a plain lookup of its own weight, and the difference is fitted as a scale — a scalar
(Gemma's ``*ScaledWordEmbedding`` multiplies by √d, BART/mBART/M2M100 with ``scale_embedding``) or one factor per
column. Anything else (a bias, a nonlinearity, a projection, ``max_norm`` renormalization) cannot be reproduced by a
format and is refused before the model changes. peft hit the same bug in its TrainableTokens (issue 2809) and fixed
it by reading the module's scale (``_get_embed_scale``, PR 2825).

Encoder-decoders keep one table under several modules (T5: ``shared``, ``encoder.embed_tokens``,
``decoder.embed_tokens``, each an ``nn.Embedding`` holding the same weight tensor; BART's are scaled ones): every
module holding the table is found by tensor identity, and each gets a view of the one compressed table with its own
scale (:class:`embfactor.layers.SharedEmbedding`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from embfactor.errors import SurgeryError
from embfactor.formats.base import EmbedScale

PROBE_IDS = 512  # token ids the forward is probed on (spread over the vocabulary, the padding row included)


@dataclass(frozen=True)
class TableReaders:
    """What the input embedding's forward adds to its lookup, and the other input modules reading its table.

    Attributes:
        embed_scale: the input embedding's scale (None: its forward is the plain lookup).
        shared: fully qualified name -> scale of every other embedding module holding the same table (T5, BART).
    """

    embed_scale: EmbedScale = None
    shared: dict[str, EmbedScale] = field(default_factory=dict)


def probe_ids(module: nn.Embedding, n: int = PROBE_IDS) -> torch.Tensor:
    """Up to ``n`` token ids spread over the module's vocabulary, its first, last and padding row included."""
    vocab = module.num_embeddings
    ids = torch.linspace(0, vocab - 1, min(n, vocab)).round().long()
    if module.padding_idx is not None:
        ids = torch.cat([ids, torch.tensor([module.padding_idx % vocab])])
    return ids.unique().to(module.weight.device)


@torch.no_grad()
def embed_scale_of(module: nn.Embedding, where: str) -> EmbedScale:
    """What ``module``'s forward multiplies its table lookup by: None (nothing), a float, or one float per column.

    Args:
        module: an nn.Embedding (or subclass) with real (not meta) weights.
        where: how error messages name it, e.g. ``"GemmaForCausalLM.model.embed_tokens"``.

    Raises:
        SurgeryError: the forward does more than scale the lookup (names ``where``, the class and what differs).

    Example:
        >>> emb = nn.Embedding(10, 4)
        >>> embed_scale_of(emb, "toy.embed") is None
        True
    """
    what = f"{where} ({type(module).__name__})"
    if getattr(module, "max_norm", None) is not None:
        raise SurgeryError(
            f"{what} renormalizes its rows to max_norm={module.max_norm} in its forward (and rewrites its weight "
            "doing so); a compressed table cannot reproduce that. Build the model with max_norm=None"
        )
    ids = probe_ids(module)
    training = module.training
    module.eval()  # dropout inside a subclass would make the probe random
    try:
        out = module(ids)
    except Exception as e:  # noqa: BLE001 - any failure of a foreign forward means: not a plain lookup
        raise SurgeryError(f"{what}: its forward cannot be called on token ids alone ({type(e).__name__}: {e}); "
                           "embfactor replaces only an embedding's table") from None
    finally:
        module.train(training)
    plain = nn.functional.embedding(ids, module.weight)
    if not isinstance(out, torch.Tensor) or out.shape != plain.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SurgeryError(f"{what}: its forward returns {shape} for {len(ids)} token ids, not rows of its "
                           f"{tuple(module.weight.shape)} table; embfactor replaces only an embedding's table")
    finite = plain.isfinite().all(-1)  # a NaN/Inf row is the table's fault, refused later with its own error
    out, plain = out[finite], plain[finite]
    if torch.equal(out, plain):
        return None
    out, plain = out.double(), plain.double()
    # the module computes in its own dtype: a bf16 product is off by up to its rounding step
    tol = 8 * torch.finfo(module.weight.dtype).eps * max(float(out.norm()), 1e-30)
    scalar = float((out * plain).sum() / (plain * plain).sum().clamp_min(1e-300))
    if float((out - scalar * plain).norm()) <= tol:
        return None if scalar == 1.0 else scalar
    columns = (out * plain).sum(0) / (plain * plain).sum(0).clamp_min(1e-300)
    residual = float((out - columns * plain).norm())
    if residual <= tol:
        return [float(c) for c in columns]
    raise SurgeryError(
        f"{what}: its forward is not a scaled lookup of its weight (the best per-column scale leaves "
        f"{residual / max(float(out.norm()), 1e-30):.2%} of its output unexplained: a bias, a nonlinearity or "
        "another input?); a compressed table cannot reproduce it"
    )


def table_readers(model: nn.Module, embedding: nn.Embedding, embedding_module: str,
                  head: nn.Module | None = None) -> TableReaders:
    """Probe the input embedding and find every other module holding its table (by tensor identity).

    The output head (tied or not) is left to the caller. Another module holding the weight that is not an
    embedding (it would read the table some other way) is refused.

    Example:
        >>> readers = table_readers(t5, t5.shared, "shared")            # doctest: +SKIP
        >>> sorted(readers.shared)                                      # doctest: +SKIP
        ['decoder.embed_tokens', 'encoder.embed_tokens']
    """
    arch = type(model).__name__
    weight = embedding.weight
    shared: dict[str, EmbedScale] = {}
    for fqn, m in model.named_modules(remove_duplicate=False):
        if not fqn or fqn == embedding_module or (head is not None and m is head):
            continue
        if m is not embedding and m._parameters.get("weight") is not weight:
            continue
        if not isinstance(m, nn.Embedding):
            raise SurgeryError(
                f"{arch}.{fqn} ({type(m).__name__}) holds the input table of {embedding_module!r} but is neither an "
                "embedding nor the output head; embfactor cannot make it read a compressed table"
            )
        shared[fqn] = embed_scale_of(m, f"{arch}.{fqn}")
    return TableReaders(embed_scale_of(embedding, f"{arch}.{embedding_module}"), shared)


__all__ = ["PROBE_IDS", "TableReaders", "embed_scale_of", "probe_ids", "table_readers"]
