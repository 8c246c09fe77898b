"""TieredFormat (``tiered``): the rows of a table split into tiers, each tier stored in its own format.

Token ids map to a row of the tier-concatenated order through the ``position`` buffer (a permutation of
range(vocab)): tier 0 holds positions [0, n_0), tier 1 the next n_1, and so on. Frequent tokens can get a rich
format and rare ones a cheap one (GroupReduce's buckets, or a codebook for the tail). ``gather`` asks each tier
for its own rows; ``project`` asks each tier for its logits (each child's ``project``, so no table is built where
the children do not build one) and puts them in token order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from embfactor.errors import ConfigError, InvalidInputError
from embfactor.formats.base import RowFormat, check_format_args, get_format, is_row_format, register_format


def _version_of(t: torch.Tensor) -> int:
    # an inference tensor (a buffer made under torch.inference_mode) has no version counter; it cannot be written
    # outside inference mode, so 0 stands for "unchanged"
    return 0 if t.is_inference() else t._version


INDEX_BITS = (1, 2, 4, 8)  # bits per token of a compact tier map: a token's tier never straddles two bytes


def index_bits(tiers: int) -> int:
    """The fewest bits per token (1, 2, 4 or 8) that name one of ``tiers`` tiers.

    Example:
        >>> [index_bits(t) for t in (2, 3, 4, 5, 200)]
        [1, 2, 2, 4, 8]
    """
    return next(b for b in INDEX_BITS if (1 << b) >= tiers)


def pack_tiers(tier_of: torch.Tensor, bits: int) -> torch.Tensor:
    """Tier numbers (< 2^bits) packed ``8 // bits`` to a byte, first token in the lowest bits (uint8).

    Example:
        >>> pack_tiers(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).tolist()
        [13, 1]
    """
    per = 8 // bits
    t = torch.nn.functional.pad(tier_of.to(torch.int64), (0, -tier_of.numel() % per)).view(-1, per)
    return (t << (bits * torch.arange(per, device=t.device))).sum(1).to(torch.uint8)


def unpack_tiers(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` tier numbers (int64) of :func:`pack_tiers`' bytes; integer division and remainder only, so
    an exported graph computes it with standard operators."""
    per = 8 // bits
    shifts = (1 << (bits * torch.arange(per, device=packed.device))).to(torch.int64)
    return ((packed.to(torch.int64)[:, None] // shifts) % (1 << bits)).reshape(-1)[:n]


_fewest_bits = index_bits  # TieredFormat's argument of the same name hides the function


@register_format("tiered")
class TieredFormat(RowFormat):
    """A vocab × d table whose rows are split into tiers stored in any formats.

    Args:
        tiers: one RowFormat per tier (same embedding_dim); their row counts sum to the vocabulary.
        position: token id → row in the tier-concatenated order (a permutation of range(vocab)); identity if None.
        padding_idx: this token id embeds to zero (when ``zero_padding``) and gets no gradient.
        zero_padding: False keeps a pretrained non-zero padding row (its approximation), as nn.Embedding would.
        compact_index: store each token's tier instead of its position (each tier's tokens in id order).
        index_bits: bits per token of the compact map (1, 2, 4 or 8; default 8): :func:`index_bits` of the tier
            count packs MiniLM's 2-tier map into 3.8 KB instead of 30.5 KB (0.9% of a 16x budget).

    Example:
        >>> from embfactor.formats import FactorizedEmbedding, ZeroRows
        >>> emb = TieredFormat([FactorizedEmbedding(10, 16, rank=8), ZeroRows(90, 16)])
        >>> emb(torch.tensor([[0, 50]])).shape, emb.num_params, emb.num_bytes()
        (torch.Size([1, 2, 16]), 208, 1632)
    """

    def __init__(
        self,
        tiers: Sequence[RowFormat],
        position: torch.Tensor | None = None,
        padding_idx: int | None = None,
        *,
        zero_padding: bool = True,
        compact_index: bool = False,
        index_bits: int = 8,
    ) -> None:
        super().__init__()
        if not tiers or not all(is_row_format(t) for t in tiers):
            raise ConfigError(f"tiers must be a non-empty list of storage formats, got {[type(t).__name__ for t in tiers]}")
        dims = {t.embedding_dim for t in tiers}
        if len(dims) != 1:
            raise ConfigError(f"all tiers must have the same embedding_dim, got {sorted(dims)}")
        sizes = [t.num_embeddings for t in tiers]
        vocab, d = sum(sizes), dims.pop()
        self.padding_idx = check_format_args(vocab, d, padding_idx)
        self.num_embeddings, self.embedding_dim, self.zero_padding = vocab, d, bool(zero_padding)
        self.tiers = nn.ModuleList(tiers)
        device = next((x.device for x in (*self.tiers.parameters(), *self.tiers.buffers())), None)
        if position is None:
            position = torch.arange(vocab)
        position = torch.as_tensor(position, dtype=torch.int64, device=device)
        if position.shape != (vocab,) or not torch.equal(torch.sort(position.cpu()).values, torch.arange(vocab)):
            raise InvalidInputError(f"position must be a permutation of range({vocab}) (one row per token id)")
        self.register_buffer("starts", torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()]), persistent=False)
        self.compact_index, self.index_bits = bool(compact_index), 8
        self._tok_cache: tuple[Any, torch.Tensor] | None = None
        if self.compact_index:
            # Store one byte per token (its tier) instead of an int64 position: a tier's rows are its tokens in id
            # order, so positions follow from the tiers (8x fewer index bytes: 1% of a 16x MiniLM budget, not 8%).
            if len(tiers) > 255:
                raise ConfigError(f"compact_index holds at most 255 tiers, got {len(tiers)}")
            if index_bits not in INDEX_BITS or (1 << index_bits) < len(tiers):
                raise ConfigError(f"index_bits must be one of {INDEX_BITS} and name all {len(tiers)} tiers (at least "
                                  f"{_fewest_bits(len(tiers))}), got {index_bits!r}")
            self.index_bits = int(index_bits)
            tier_of = torch.searchsorted(self.starts.to(position.device), position, right=True) - 1
            self.register_buffer("tier_of", pack_tiers(tier_of, index_bits) if index_bits < 8 else
                                 tier_of.to(torch.uint8))
            self._pos_cache: tuple[Any, torch.Tensor] | None = None
            if not torch.equal(self.token_positions(), position):
                raise InvalidInputError(
                    "compact_index needs each tier's tokens in increasing id order (position increasing within a "
                    "tier); pass compact_index=False for any other permutation"
                )
        else:
            self.register_buffer("position", position)

    def _positions_from_tiers(self) -> torch.Tensor:
        t = self.tier_of.long() if self.index_bits == 8 else unpack_tiers(self.tier_of, self.index_bits,
                                                                          self.num_embeddings)
        onehot = torch.nn.functional.one_hot(t, len(self.tiers))
        rank = (onehot.cumsum(0) - 1).gather(1, t[:, None]).squeeze(1)  # index of each token within its tier
        starts = torch.tensor([0, *torch.tensor(self.sizes).cumsum(0).tolist()], device=t.device)
        return starts[t] + rank

    def token_positions(self) -> torch.Tensor:
        """token id → row in the tier-concatenated order.

        With ``compact_index`` the map is derived from ``tier_of`` and cached until ``tier_of`` changes (by
        identity and version: loaders such as transformers' ``from_pretrained`` fill buffers without
        ``load_state_dict``, so a map built at construction would go stale).
        """
        if not self.compact_index:
            return self.position
        key = (self.tier_of.data_ptr(), _version_of(self.tier_of), self.tier_of.device)
        if self._pos_cache is None or self._pos_cache[0] != key:
            with torch.inference_mode(False):  # a cached map must serve later autograd calls too
                self._pos_cache = (key, self._positions_from_tiers())
        return self._pos_cache[1]

    @property
    def sizes(self) -> list[int]:
        """Rows per tier."""
        return [t.num_embeddings for t in self.tiers]

    def heal_defaults(self) -> dict[str, Any]:
        """The healing settings of the tier holding the most rows."""
        return max(self.tiers, key=lambda t: t.num_embeddings).heal_defaults()

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        pos = self.token_positions().index_select(0, ids)
        out: torch.Tensor | None = None
        for t, child in enumerate(self.tiers):
            lo, hi = int(self.starts[t]), int(self.starts[t + 1])
            sel = ((pos >= lo) & (pos < hi)).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            rows = child.gather(pos.index_select(0, sel) - lo)
            if out is None:
                out = rows.new_zeros(ids.shape[0], self.embedding_dim)
            out = out.index_copy(0, sel, rows.to(out.dtype))  # out of place: autograd reaches every tier
        if out is None:  # no ids: an empty block of the first tier's dtype
            return self.tiers[0].gather(ids[:0])
        return self._mask_padding(out, ids)

    def _mask_padding(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.padding_idx is None or not self.zero_padding:
            return rows
        return rows * (ids != self.padding_idx).unsqueeze(-1).to(rows.dtype)

    def row_tokens(self) -> torch.Tensor:
        """row of the tier-concatenated order → token id (the inverse of :meth:`token_positions`).

        Cached (int64, 8 bytes per token) until the position map changes, as ``token_positions``.
        """
        pos = self.token_positions()
        key = (pos.data_ptr(), _version_of(pos), pos.device)
        if self._tok_cache is None or self._tok_cache[0] != key:
            with torch.inference_mode(False):  # a cached map must serve later autograd calls too
                tokens = torch.empty_like(pos)
                tokens[pos] = torch.arange(pos.shape[0], device=pos.device)
            self._tok_cache = (key, tokens)
        return self._tok_cache[1]

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Each tier's logits written by its own ``project_into`` straight to its tokens' columns (one pass).

        The int-k and codebook tiers' C kernels write the scattered columns themselves; other tiers project then
        copy. Logits are float32 for inference (the kernels' output) and cast to ``hidden``'s dtype at the end.
        """
        lead = hidden.shape[:-1]
        h = hidden.reshape(-1, self.embedding_dim)
        grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in self.parameters()))
        out = torch.empty(h.shape[0], self.num_embeddings, device=h.device,
                          dtype=h.dtype if grad else torch.float32)
        tokens = self.row_tokens()
        for t, child in enumerate(self.tiers):
            child.project_into(h, out, tokens[int(self.starts[t]) : int(self.starts[t + 1])])
        if self.padding_idx is not None and self.zero_padding:
            out[:, self.padding_idx] = 0.0
        return out.to(hidden.dtype).view(*lead, self.num_embeddings)

    @property
    def num_params(self) -> int:
        """Entries of the tiers (the index map is bookkeeping; ``num_bytes`` counts it)."""
        return sum(t.num_params for t in self.tiers)

    def num_bytes(self) -> int:
        """The tiers' bytes plus the token → row index map."""
        index = self.tier_of if self.compact_index else self.position
        return sum(t.num_bytes() for t in self.tiers) + index.numel() * index.element_size()

    def format_config(self) -> dict[str, Any]:
        tiers = [{"format": t.format_name, "rows": t.num_embeddings, "config": t.format_config()} for t in self.tiers]
        out: dict[str, Any] = {"tiers": tiers, "zero_padding": self.zero_padding}
        if self.compact_index:
            out["compact_index"] = True
            if self.index_bits != 8:
                out["index_bits"] = self.index_bits
        return out

    @classmethod
    def empty(
        cls, num_embeddings: int, embedding_dim: int, padding_idx: int | None, *, tiers: Sequence[dict[str, Any]],
        zero_padding: bool = True, compact_index: bool = False, index_bits: int = 8,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> TieredFormat:
        """Tiers rebuilt from their saved specs ``{"format", "rows", "config"}``; values and position to be loaded."""
        children = []
        for i, spec in enumerate(tiers):
            if not isinstance(spec, dict) or not {"format", "rows", "config"} <= set(spec):
                raise ConfigError(f"tier {i} must be a dict with 'format', 'rows' and 'config', got {spec!r}")
            fmt = get_format(spec["format"])
            children.append(fmt.empty(spec["rows"], embedding_dim, None, device=device, dtype=dtype, **spec["config"]))
        position = None
        if compact_index:  # a placeholder with each tier's rows in id order; load_state_dict sets the real map
            position = torch.arange(sum(int(s["rows"]) for s in tiers))
        emb = cls(children, position, padding_idx=padding_idx, zero_padding=zero_padding, compact_index=compact_index,
                  index_bits=index_bits)
        if emb.num_embeddings != num_embeddings:
            raise ConfigError(f"the tiers hold {emb.num_embeddings} rows, not num_embeddings={num_embeddings}")
        return emb

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, sizes={self.sizes}"
        return s + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")
