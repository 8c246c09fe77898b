"""The row-format interface: one base class for every storage format of a vocab × d embedding table.

A format answers four questions (faiss's Index and llama.cpp's block types are the models):
  - which rows: ``gather(ids) -> (n × d)`` for a 1-D LongTensor of ids, without building the table;
  - which logits for a tied head: ``project(hidden) -> (..., vocab)``, without building the table where the
    format allows (the base class falls back to chunks of ``dense()`` rows);
  - how many bytes it stores: ``num_bytes()`` (integers, scales, codebooks: everything a saved file holds);
  - how to rebuild itself: ``format_config()`` (JSON) + ``empty(vocab, d, padding_idx, **config)`` with the right
    tensor shapes, filled by ``load_state_dict(strict=True)``.

The base class turns that into a drop-in ``nn.Embedding``: ``forward`` (id checks, flatten, gather, reshape, and the
``embed_scale`` of the module it replaced: Gemma's and BART's scaled embeddings multiply their lookup by √d),
``weight`` / ``dense()`` / ``to_dense()`` (the stored table, unscaled, as the replaced module's ``weight`` was). A format built from a decomposition registers the Factors type it wraps,
so :func:`from_factors` finds the module for any ``Factors`` without the decompositions knowing about modules.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from embfactor.errors import ConfigError, InvalidTypeError, TokenIndexError, UnknownMethodError

# rows per chunk of the generic dense()/project(): a 16,384 × d float32 block (24 MB at d = 384)
_CHUNK_ROWS = 16384

_FORMATS: dict[str, type[RowFormat]] = {}
_BY_FACTORS: dict[type, type[RowFormat]] = {}


def check_token_ids(ids: torch.Tensor, vocab: int) -> None:
    """Raise TokenIndexError naming the first id outside [0, vocab)."""
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise InvalidTypeError(f"token ids must be an integer tensor (LongTensor), got dtype {ids.dtype}")
    if ids.numel() == 0:
        return
    lo, hi = torch.aminmax(ids)
    if int(lo) < 0 or int(hi) >= vocab:
        bad = int(lo) if int(lo) < 0 else int(hi)
        raise TokenIndexError(f"token id {bad} is out of range for a vocabulary of {vocab} (valid ids: 0..{vocab - 1})")


def check_format_args(
    num_embeddings: int, embedding_dim: int, padding_idx: int | None, **sizes: int
) -> int | None:
    """Validate the arguments every format shares; return padding_idx normalized to [0, vocab).

    ``sizes`` are further arguments that must be positive integers (e.g. ``rank=16``).
    """
    for name, v in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim), *sizes.items()):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if padding_idx is None:
        return None
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ConfigError(f"padding_idx must be within [-{num_embeddings}, {num_embeddings}), got {padding_idx}")
    return padding_idx % num_embeddings


EmbedScale = float | list[float] | None


def scale_rows(rows: torch.Tensor, scale: EmbedScale) -> torch.Tensor:
    """``rows`` times what the replaced module multiplied its lookup by: a scalar or one factor per column.

    The product is taken in the rows' dtype, as the scaled embeddings of transformers do (``* embed_scale.to(dtype)``).

    Example:
        >>> scale_rows(torch.ones(2, 3), 2.0).tolist()
        [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
    """
    if scale is None:
        return rows
    return rows * torch.tensor(scale, dtype=rows.dtype, device=rows.device)


# Healing settings of tables that store quantized values (codebook, int-k): every weight trains, each of the
# table's float tensors at 3e-3 × its RMS (relative: one absolute lr fits codebooks, RMS ~0.06, but wrecks int8
# scales, RMS ~0.002, and tables differ between models), the rest of the model at 1e-5. These tables start close to
# the original: larger steps raised the held-out loss, and letting the layers adapt gained more per step than the
# codebooks alone (MiniLM --size 16x, 60 steps: +0.0014 fidelity vs +0.0009).
QUANTIZED_TABLE_HEALING: dict[str, Any] = {"lr": 3e-3, "relative_lr": True, "train_all": True, "lr_rest": 1e-5}


class RowFormat(nn.Module):
    """Base class of a stored embedding table (vocab × d); subclasses implement gather, num_bytes, config, empty.

    Attributes every subclass sets in ``__init__``: ``num_embeddings``, ``embedding_dim``, ``padding_idx``.

    Example:
        >>> from embfactor.formats.lowrank import FactorizedEmbedding
        >>> emb = FactorizedEmbedding(1000, 64, rank=16)
        >>> emb(torch.tensor([[1, 2]])).shape, emb.num_bytes()
        (torch.Size([1, 2, 64]), 68096)
    """

    format_name: ClassVar[str] = ""
    # what the module this format replaced multiplied its lookup by (None: nothing). Input side only: the tied head
    # projects with the unscaled table, as the replaced head did. Found by embfactor.surgery.conform, saved in the
    # model's quantization_config and embfactor.json, and set again on load.
    embed_scale: EmbedScale = None
    awaiting_weights: bool = False
    # healing settings found best for this format (embfactor.train.heal uses them where the user gave none)
    heal_settings: ClassVar[dict[str, Any]] = {}
    num_embeddings: int
    embedding_dim: int
    padding_idx: int | None

    def heal_defaults(self) -> dict[str, Any]:
        """Healing options this table heals best with (:class:`embfactor.train.config.HealConfig` fields)."""
        return dict(self.heal_settings)

    def for_training_(self) -> None:
        """Give values stored as integers but meant to train (int8 codebooks) a float form, in place.

        Healing calls it before it chooses what trains, and :meth:`for_storage_` before it saves. Default: nothing
        (a format's float tensors train as they are; its integer codes never do).
        """

    def for_storage_(self) -> None:
        """Return what :meth:`for_training_` made float to its stored form (rounding it), in place. Default: nothing."""

    # --- what a format implements --------------------------------------------------------------------------
    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the table for a 1-D int64 tensor of valid ids: (len(ids) × d)."""
        raise NotImplementedError

    def num_bytes(self) -> int:
        """Bytes the format stores (what a saved file holds for it)."""
        return sum(t.numel() * t.element_size() for t in (*self.parameters(), *self.buffers()))

    def format_config(self) -> dict[str, Any]:
        """JSON-serializable settings beyond (vocab, d, padding_idx) that ``empty`` needs to rebuild the shapes."""
        raise NotImplementedError

    @classmethod
    def empty(
        cls, num_embeddings: int, embedding_dim: int, padding_idx: int | None, *,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None, **config: Any,
    ) -> RowFormat:
        """An instance with the right tensor shapes (values to be filled by ``load_state_dict``).

        The default calls ``cls(num_embeddings, embedding_dim, padding_idx, device=, dtype=, **config)``: formats whose
        constructor takes ``format_config()``'s keys as keywords need not override it.
        """
        return cls(num_embeddings, embedding_dim, padding_idx, device=device, dtype=dtype, **config)

    @classmethod
    def from_factors(cls, f: Any, padding_idx: int | None = None, **kw: Any) -> RowFormat:
        """The format holding a decomposition's result (formats registered with ``factors=`` implement it).

        Keywords every implementation accepts (and may ignore when they do not apply): ``zero_padding_row``
        (False keeps a pretrained non-zero padding row's approximation), ``copy`` (False lets the module adopt
        the factor tensors of a temporary Factors), ``sparse`` (sparse gradients, where the format has them).
        """
        raise NotImplementedError(f"{cls.__name__} is not built from a decomposition's Factors")

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., d) times the table's transpose: (..., vocab) logits for a tied head.

        This fallback builds one chunk of rows at a time; formats that can do better (low rank, codebooks) override.
        """
        outs = []
        for s in range(0, self.num_embeddings, _CHUNK_ROWS):
            rows = self.gather(torch.arange(s, min(s + _CHUNK_ROWS, self.num_embeddings), device=hidden.device))
            outs.append(torch.nn.functional.linear(hidden, rows.to(hidden.dtype)))
        return torch.cat(outs, dim=-1)

    # --- shared by every format ----------------------------------------------------------------------------
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return scale_rows(self.lookup(input), self.embed_scale)

    def lookup(self, input: torch.Tensor) -> torch.Tensor:
        """The stored rows of ``input`` (any shape of ids) without ``embed_scale``: the plain table lookup."""
        check_token_ids(input, self.num_embeddings)
        flat = input.reshape(-1)
        if flat.dtype != torch.long:
            flat = flat.long()
        return self.gather(flat).view(*input.shape, self.embedding_dim)

    def dense(self) -> torch.Tensor:
        """The whole (vocab × d) table, built a chunk of rows at a time (for tests and export; costs vocab × d)."""
        dev = next((t.device for t in (*self.parameters(), *self.buffers())), torch.device("cpu"))
        chunks = [
            self.gather(torch.arange(s, min(s + _CHUNK_ROWS, self.num_embeddings), device=dev))
            for s in range(0, self.num_embeddings, _CHUNK_ROWS)
        ]
        return torch.cat(chunks)

    @property
    def weight(self) -> torch.Tensor:
        """The dense table, materialized on each read (read-only).

        While transformers' ``from_pretrained`` is still filling the format's tensors (``awaiting_weights``, set by
        embfactor's quantizer), a meta tensor of the table's shape: model-level weight initializers read it then
        (T5's ``init.normal_(model.shared.weight)``), before derived buffers hold their values.
        """
        if self.awaiting_weights:
            return torch.empty(self.num_embeddings, self.embedding_dim, device="meta")
        return self.dense()

    @property
    def num_params(self) -> int:
        """Stored entries (parameters and buffers), whatever their width."""
        return sum(t.numel() for t in (*self.parameters(), *self.buffers()))

    def to_dense(self) -> nn.Embedding:
        """A plain nn.Embedding holding ``dense()``."""
        table = self.dense().detach()
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, device=table.device,
                           dtype=table.dtype if table.is_floating_point() else torch.float32)
        with torch.no_grad():
            emb.weight.copy_(table)
        return emb


def register_format(name: str, *, factors: type | None = None):
    """Class decorator: register a RowFormat under ``name``; ``factors`` is the Factors type it is built from.

    A format registered with ``factors=`` provides ``from_factors(f, padding_idx=None, **kw)``.
    """

    def wrap(cls: type[RowFormat]) -> type[RowFormat]:
        if name in _FORMATS and _FORMATS[name] is not cls:
            raise ValueError(f"a storage format named {name!r} is already registered")
        cls.format_name = name
        cls.layer_type = name  # the name saved models record (embfactor.json "layer_type")
        _FORMATS[name] = cls
        if factors is not None:
            _BY_FACTORS[factors] = cls
        return cls

    return wrap


def _ensure_builtin_formats() -> None:
    import embfactor.formats  # noqa: F401 - the package registers the built-in formats


def get_format(name: str) -> type[RowFormat]:
    _ensure_builtin_formats()
    try:
        return _FORMATS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown storage format {name!r}; valid formats: {', '.join(sorted(_FORMATS))}"
        ) from None


def available_formats() -> list[str]:
    _ensure_builtin_formats()
    return sorted(_FORMATS)


def is_row_format(module: nn.Module) -> bool:
    """True for any embfactor storage format (i.e. an embfactor embedding layer)."""
    return isinstance(module, RowFormat)


def from_factors(f: Any, padding_idx: int | None = None, **kw: Any) -> RowFormat:
    """The format module that holds a decomposition's result (looked up by its Factors type, most derived first)."""
    _ensure_builtin_formats()
    for t in type(f).__mro__:
        if t in _BY_FACTORS:
            return _BY_FACTORS[t].from_factors(f, padding_idx, **kw)
    raise UnknownMethodError(
        f"no storage format holds {type(f).__name__}; registered: {', '.join(sorted(c.__name__ for c in _BY_FACTORS))}"
    )
