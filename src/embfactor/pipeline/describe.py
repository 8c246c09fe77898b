"""describe: the facts about a model's embedding that ``embfactor inspect`` and the server's ``/info`` both show."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass
class ModelFacts:
    """A model's embedding, its share of the model, its compression (if any) and its bytes.

    Sizes are derived from the tensors (``bytes_after``: the weights files when the model came from a folder,
    else the model's own tensors); the "before" figures come from the compression's report when there is one.
    """

    model: str
    kind: str
    source: str
    architecture: str
    compressed: bool
    vocab_size: int
    hidden_size: int
    format: str | None
    rank: int | None
    method: str | None
    tied_head: bool
    relative_error: float | None
    params_before: int
    params_after: int
    embedding_params_before: int
    embedding_params_after: int
    bytes_before: int
    bytes_after: int
    format_config: dict[str, Any] | None = None
    embedding_bytes: int = 0  # what the embedding stores now (a format's codes, codebooks, scales: all of it)

    @property
    def bytes_ratio(self) -> float:
        """fp32 bytes of the table / the bytes the embedding stores now."""
        return self.vocab_size * self.hidden_size * 4 / self.embedding_bytes if self.embedding_bytes else 1.0

    @property
    def embedding_share(self) -> float:
        """The embedding's share of the model's parameters now."""
        return self.embedding_params_after / self.params_after

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "embedding_share": self.embedding_share, "bytes_ratio": self.bytes_ratio}


def describe(lm: Any) -> ModelFacts:
    """Facts about a model (a name, a folder, or a :class:`embfactor.models.LoadedModel`), compressed or not.

    Example:
        >>> import embfactor as ef
        >>> ef.describe("minilm").embedding_share        # doctest: +SKIP
        0.516...
    """
    if isinstance(lm, (str, os.PathLike)):
        from embfactor.models import load_model

        lm = load_model(lm)
    from embfactor.eval.size import tensor_bytes, weights_bytes_on_disk
    from embfactor.formats import is_row_format
    from embfactor.surgery import count_params, find_embedding_and_head, get_meta

    model = lm.model
    emb = model.get_input_embeddings()
    record = lm.record or {}
    report = record.get("report") or {}
    meta = get_meta(model)
    if meta is not None:
        report = {**report, **meta.report}
    params_now = count_params(model)
    compressed = is_row_format(emb)
    if compressed:
        emb_now = int(emb.num_params)
        tied = meta.tied_head if meta is not None else bool(record.get("tied_head", False))
    else:
        emb_now = int(emb.weight.numel())
        tied = find_embedding_and_head(model).tied
    params_before = int(report.get("model_params_before", params_now))
    on_disk = weights_bytes_on_disk(lm.source) if lm.source is not None and lm.source.is_dir() else None
    bytes_now = on_disk or tensor_bytes(model)
    # compress records the figure it reported (the source's weights files, or its float32 tensors for a GGUF);
    # older outputs lack it: their source may be gone, and its float32 size is what the factorization saves on
    bytes_before = int(report.get("bytes_before", params_before * 4)) if report else bytes_now
    return ModelFacts(
        model=lm.name,
        kind=lm.kind,
        source=str(lm.source),
        architecture=type(model).__name__,
        compressed=compressed,
        vocab_size=int(emb.num_embeddings),
        hidden_size=int(emb.embedding_dim),
        format=getattr(emb, "format_name", None),
        # codebook and int-k tables have no rank (the record's rank is only the registry's target)
        rank=None if getattr(emb, "format_name", None) in ("codebook", "intk") else (
            meta.rank if meta is not None else record.get("rank")
        ),
        method=meta.method if meta is not None else record.get("method"),
        tied_head=bool(tied),
        relative_error=report.get("relative_error"),
        params_before=params_before,
        params_after=params_now,
        embedding_params_before=int(report.get("embedding_params_before", emb_now)),
        embedding_params_after=emb_now,
        bytes_before=bytes_before,
        bytes_after=bytes_now,
        format_config=emb.format_config() if compressed else None,
        embedding_bytes=int(emb.num_bytes()) if compressed else emb.weight.numel() * emb.weight.element_size(),
    )


def spectrum_facts(
    E: torch.Tensor, fractions: tuple[int, ...] = (1, 2, 4, 8, 12), *, top_rank: int | None = None
) -> dict[str, Any]:
    """Singular values of E and, at ranks d·k/16, the compression, energy kept and optimal relative error.

    ``top_rank``: E's known matrix rank (a U·V table's r): the ranks listed stop there.
    """
    from embfactor.decomposition import optimal_relative_error, spectrum

    vocab, d = E.shape
    sv = spectrum(E)
    e = sv.pow(2)
    ranks = sorted({max(1, d * k // 16) for k in fractions})
    if top_rank is not None:
        ranks = sorted({r for r in ranks if r < top_rank} | {top_rank})
    rows = [
        {
            "rank": r,
            "ratio": vocab * d / (r * (vocab + d)),
            "energy": float(e[:r].sum() / e.sum()),
            "optimal_relative_error": optimal_relative_error(sv, r),
        }
        for r in ranks
        if r < min(vocab, d)
    ]
    return {"spectrum": rows, "singular_values": sv.tolist()}
