"""CompressionMeta: what a compressed model carries (and embfactor.json records) to be rebuilt without decomposing.

It travels on the model as ``model.embfactor_meta`` (:data:`META_ATTR`); :func:`get_meta` / :func:`set_meta` are the
only readers and writers. Saved folders keep its fields as top-level keys of embfactor.json (the layout every
earlier version wrote, versioned by the record's ``format_version``), so old outputs load unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from embfactor.errors import CorruptFileError

META_ATTR = "embfactor_meta"
META_VERSION = 1
# fields a record may lack (written before they existed)
_OPTIONAL = ("report", "rest", "embed_scale", "shared_modules")


@dataclass
class CompressionMeta:
    """Where the compressed embedding sits in the model and how it was made.

    Attributes:
        embedding_module: fully qualified name of the input embedding (a storage format).
        head_module: name of the output head tied to it (None when not tied).
        tied_head: the head shares the embedding's tensors.
        rank: the rank (or, for budget-based methods, the equal-budget rank) of the factorization.
        method: the decomposition (or, for a hand-built format, the format's name).
        factorization: the FactorizationConfig as a dict (``FactorizationConfig.to_dict()``).
        report: the FactorizationReport as a dict, plus what later steps add (``quantization``, ``bytes_before``).
        extra: more facts to record (e.g. ``source_model``).
        rest: how the other weights are stored (:func:`embfactor.surgery.rest.store_rest_`: ``dtype``, ``linear``,
            ``linear_modules``); empty for a model whose rest is stored as it is in memory.
        embed_scale: what the replaced embedding module multiplied its lookup by (None: nothing; a float, or one
            per column), applied by the format on the input side only.
        shared_modules: other input modules that read the same table (name -> their own embed_scale), e.g. T5's
            ``encoder.embed_tokens`` and ``decoder.embed_tokens`` next to ``shared``.

    Example:
        >>> m = CompressionMeta("embed", None, False, 8, "svd", {})
        >>> CompressionMeta.from_record(m.to_record()) == m
        True
    """

    embedding_module: str
    head_module: str | None
    tied_head: bool
    rank: int
    method: str
    factorization: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    rest: dict[str, Any] = field(default_factory=dict)
    embed_scale: float | list[float] | None = None
    shared_modules: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """The fields as embfactor.json stores them (``extra`` merged in at the top level)."""
        d = dataclasses.asdict(self)
        return {**d.pop("extra"), **d}

    @classmethod
    def from_record(cls, record: dict[str, Any], *, source: str = "embfactor.json") -> CompressionMeta:
        """Read the fields from a record; CorruptFileError names the missing ones."""
        names = [f.name for f in dataclasses.fields(cls) if f.name not in (*_OPTIONAL, "extra")]
        missing = [k for k in names if k not in record]
        if missing:
            raise CorruptFileError(f"{source}: missing fields {missing}")
        return cls(**{k: record[k] for k in names}, report=dict(record.get("report") or {}),
                   rest=dict(record.get("rest") or {}), embed_scale=record.get("embed_scale"),
                   shared_modules=dict(record.get("shared_modules") or {}))


def get_meta(model: nn.Module) -> CompressionMeta | None:
    """The model's compression metadata (None for a model embfactor has not compressed)."""
    meta = getattr(model, META_ATTR, None)
    return meta if isinstance(meta, CompressionMeta) else None


def set_meta(model: nn.Module, meta: CompressionMeta) -> None:
    setattr(model, META_ATTR, meta)
