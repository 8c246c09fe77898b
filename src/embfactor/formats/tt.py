"""TTEmbedding: an embedding table stored as a tensor train (TT), computing only the requested rows.

The (vocab × d) table is viewed as a tensor with modes (n_1·m_1, …, n_k·m_k), where vocab ≤ n_1⋯n_k (the vocabulary
is padded when it has no nice factors) and d = m_1⋯m_k. Core t has shape (n_t, r_{t-1}, m_t, r_t) with r_0 = r_k = 1,
and row i = (i_1, …, i_k) (mixed radix, i_1 most significant) of the table is the product of the core slices
G_1[i_1] ⋯ G_k[i_k], reshaped to d (column j = (j_1, …, j_k), j_1 most significant).

The forward never builds the table: it takes the unique ids, then walks the cores left to right over the unique
*prefixes* (i_1, …, i_t) at each depth, so every shared prefix is contracted once (one batched matmul per core), and
finally expands the unique rows to the input's shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from embfactor.decomposition.tt import TTFactors, resolve_tt_shapes
from embfactor.errors import ConfigError
from embfactor.formats.base import RowFormat, check_format_args, register_format

# block mode when the asked ids are at least 1/_DENSE_SHARE of the rows under their prefixes
_DENSE_SHARE = 3
_BLOCK_ROWS = 8192  # rows per block of prefixes in block mode (bounded memory)


def unique_ids(ids: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique ids and the inverse map, like ``torch.unique(sorted=True, return_inverse=True)``.

    Token ids live in a small known range, so a presence mask and a cumulative sum (O(vocab + n), no sort) replace
    the sort torch.unique needs: several times faster for 65k tokens.
    """
    if ids.numel() * 8 < vocab:  # few ids: sorting them is cheaper than a vocab-sized mask
        return torch.unique(ids, sorted=True, return_inverse=True)
    mark = torch.zeros(vocab, dtype=torch.bool, device=ids.device)
    mark[ids] = True
    uniq = mark.nonzero().squeeze(1)
    pos = torch.cumsum(mark, 0) - 1
    return uniq, pos.index_select(0, ids)


@register_format("tt", factors=TTFactors)
class TTEmbedding(RowFormat):
    """A drop-in nn.Embedding stored as a tensor train; the forward contracts only the requested rows.

    Args:
        num_embeddings: vocabulary size (padded internally to ∏ vocab_shape).
        embedding_dim: d.
        tt_rank: the TT rank (one int for all bonds, or a list of num_cores − 1); clamped to the exact TT ranks.
        padding_idx: ids equal to it embed to zero (when ``zero_padding_row``) and give no gradient.
        num_cores: k, used when the shapes are chosen automatically.
        vocab_shape, dim_shape: explicit factorizations (∏ vocab_shape ≥ vocab, ∏ dim_shape = d).
        init_std: std of a table entry at initialization (nn.Embedding: N(0, 1)); variance-preserving over ranks.
        zero_padding_row: False keeps the TT row of padding_idx (a pretrained non-zero padding row); it then
            still receives gradient through the shared cores.

    Example:
        >>> emb = TTEmbedding(30522, 384, tt_rank=16, padding_idx=0)
        >>> emb.vocab_shape, emb.dim_shape, emb.num_params
        ([27, 29, 39], [6, 8, 8], 66976)
        >>> emb(torch.tensor([[0, 5, 7]])).shape
        torch.Size([1, 3, 384])
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        tt_rank: int | Sequence[int] = 16,
        padding_idx: int | None = None,
        *,
        num_cores: int = 3,
        vocab_shape: Sequence[int] | None = None,
        dim_shape: Sequence[int] | None = None,
        init_std: float = 1.0,
        zero_padding_row: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        padding_idx = check_format_args(num_embeddings, embedding_dim, padding_idx)
        self.vocab_shape, self.dim_shape, self.tt_ranks = resolve_tt_shapes(
            num_embeddings, embedding_dim, tt_rank, num_cores=num_cores, vocab_shape=vocab_shape, dim_shape=dim_shape
        )
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.init_std = float(init_std)
        self.zero_padding_row = bool(zero_padding_row)
        r = [1, *self.tt_ranks, 1]
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(n, r[t], m, r[t + 1], **kw))
            for t, (n, m) in enumerate(zip(self.vocab_shape, self.dim_shape))
        )
        # strides of the mixed-radix vocabulary index: prefix of depth t = id // _div[t]
        self._div = [math.prod(self.vocab_shape[t + 1 :]) for t in range(len(self.vocab_shape))]
        self.reset_parameters()

    @property
    def tt_rank(self) -> int:
        return max(self.tt_ranks)

    @property
    def num_cores(self) -> int:
        return len(self.vocab_shape)

    def reset_parameters(self) -> None:
        """Entries of the table get variance init_std²: each of the k cores has std (init_std²/∏r_t)^(1/2k)."""
        k = self.num_cores
        std = (self.init_std**2 / math.prod(self.tt_ranks)) ** (1.0 / (2 * k))
        with torch.no_grad():
            for c in self.cores:
                nn.init.normal_(c, std=std)

    @property
    def num_params(self) -> int:
        return sum(c.numel() for c in self.cores)

    def _rows(self, uniq: torch.Tensor) -> torch.Tensor:
        """Rows (len(uniq) × d) for *sorted, unique* int64 ids, sharing each prefix's contraction."""
        prefix, parent = self._prefixes(uniq)
        return self._last_level(prefix, parent, uniq % self.vocab_shape[-1])

    def _prefixes(self, uniq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Contract cores 1..k−1 for the unique prefixes (i_1..i_{k−1}) of sorted unique ids.

        Returns (prefix (Q, m_1⋯m_{k−1}, r_{k−1}), parent (U,): the prefix index of each id).
        """
        k = self.num_cores
        # prefixes[t]: the sorted unique prefixes (i_1..i_t+1) as integers; parents[t]: index of each one's prefix
        # one level up. Built bottom-up, each unique_consecutive runs on an already sorted, smaller array.
        prefixes: list[torch.Tensor] = [uniq]
        parents: list[torch.Tensor | None] = []
        for t in range(k - 1, 0, -1):
            up, inv = torch.unique_consecutive(prefixes[0] // self.vocab_shape[t], return_inverse=True)
            prefixes.insert(0, up)
            parents.insert(0, inv)
        parents.insert(0, None)
        cur: torch.Tensor | None = None  # (Q, M, r_t): the contracted prefixes of the current depth
        for t in range(k - 1):
            core = self.cores[t]  # (n, r_prev, m, r)
            _, rp, m, rn = core.shape
            digit = prefixes[t] % self.vocab_shape[t] if t > 0 else prefixes[t]
            sl = core.index_select(0, digit)
            if cur is None:
                cur = sl.reshape(-1, m, rn)  # r_0 = 1
            else:
                left = cur.index_select(0, parents[t])  # (Q, M, r_prev)
                cur = torch.bmm(left, sl.reshape(-1, rp, m * rn)).reshape(left.shape[0], left.shape[1] * m, rn)
        assert cur is not None and parents[-1] is not None
        return cur, parents[-1]

    def _block(self, prefix: torch.Tensor) -> torch.Tensor:
        """All rows under the given prefixes: (n_k·Q, d), row s·Q + q = prefix q followed by last digit s.

        One GEMM per last digit s, (Q·M × r) @ (r × m_k); the (n_k, Q·M, m_k) result *is* the rows as contiguous
        d-vectors (no transpose copy), so rows are taken out with a plain index_select (whose backward is cheap).
        """
        n_k, r, m_k, _ = self.cores[-1].shape
        Q, M, _ = prefix.shape
        return torch.matmul(prefix.reshape(1, Q * M, r), self.cores[-1].reshape(n_k, r, m_k)).reshape(n_k * Q, M * m_k)

    def _last_level(self, prefix: torch.Tensor, parent: torch.Tensor, digit: torch.Tensor) -> torch.Tensor:
        """Rows (U × d) = prefix[parent[u]] (M × r) @ last core[digit[u]] (r × m_k), for U sorted unique ids.

        Sparse ids: one small product per id (batched). Dense ids (most rows under the present prefixes asked for):
        all n_k rows of each present prefix by GEMMs (:meth:`_block`), then the asked rows picked out; this costs at
        most 1/density more multiply-adds but runs at GEMM speed instead of gathering a (U, M, r) copy.
        Blocks are made for a chunk of prefixes at a time, so the table is never materialized whole.
        """
        core = self.cores[-1]  # (n_k, r, m_k, 1)
        n_k, r, m_k, _ = core.shape
        Q, M, _ = prefix.shape
        U = digit.shape[0]
        if U == 0:
            return prefix.new_zeros(0, M * m_k)
        if U * _DENSE_SHARE < Q * n_k:
            left = prefix.index_select(0, parent)  # (U, M, r)
            right = core.index_select(0, digit).reshape(U, r, m_k)
            return torch.bmm(left, right).reshape(U, M * m_k)
        chunk = max(1, _BLOCK_ROWS // n_k)
        outs = []
        # uniq is sorted, so the ids of a chunk of prefixes are one contiguous slice
        bounds = torch.searchsorted(parent, torch.arange(0, Q + chunk, chunk, device=parent.device)).tolist()
        for c, q0 in enumerate(range(0, Q, chunk)):
            lo, hi = bounds[c], bounds[c + 1]
            cq = min(chunk, Q - q0)
            block = self._block(prefix[q0 : q0 + cq])
            outs.append(block.index_select(0, digit[lo:hi] * cq + (parent[lo:hi] - q0)))
        return (outs[0] if len(outs) == 1 else torch.cat(outs)).reshape(U, M * m_k)

    def _mask_padding(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.padding_idx is None or not self.zero_padding_row:
            return rows
        keep = (ids != self.padding_idx).unsqueeze(-1)
        return rows * keep.to(rows.dtype)

    def gather(self, flat: torch.Tensor) -> torch.Tensor:
        uniq, inverse = unique_ids(flat, self.num_embeddings)
        prefix, parent = self._prefixes(uniq)
        digit = uniq % self.vocab_shape[-1]
        n_blk = prefix.shape[0] * self.vocab_shape[-1]
        if uniq.numel() * _DENSE_SHARE >= n_blk and n_blk <= max(_BLOCK_ROWS, flat.numel()):
            # Dense ids, and the rows under the present prefixes are no more than the output's rows: build that
            # block once and gather every token straight from it (one pass like nn.Embedding's, no (U, d) copy).
            # Memory stays within the output's size, so a large vocabulary still never gets its table built.
            block = self._block(prefix)
            out = block.index_select(0, (digit * prefix.shape[0] + parent).index_select(0, inverse))
            if self.padding_idx is not None and self.zero_padding_row:
                out.index_fill_(0, (flat == self.padding_idx).nonzero().squeeze(1), 0.0)
        else:
            rows = self._mask_padding(self._last_level(prefix, parent, digit), uniq)
            out = rows.index_select(0, inverse)
        return out

    def dense(self) -> torch.Tensor:
        """The dense (vocab × d) table (costs vocab × d memory)."""
        return self.materialize()

    def materialize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows start..stop−1 of the table (default: all)."""
        stop = self.num_embeddings if stop is None else stop
        ids = torch.arange(start, stop, device=self.cores[0].device)
        return self._mask_padding(self._rows(ids), ids)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden · Eᵀ for a tied output head.

        The table is built (block by block, at GEMM speed) for the product: for ≥ d tokens it is smaller than the
        (tokens × vocab) logits it produces, and one large matmul beats stitching per-chunk logits together.
        """
        return torch.nn.functional.linear(hidden, self.materialize().to(hidden.dtype))

    def to_dense(self) -> nn.Embedding:
        """A plain nn.Embedding holding the table."""
        c = self.cores[0]
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, device=c.device, dtype=c.dtype)
        with torch.no_grad():
            emb.weight.copy_(self.materialize())
        return emb

    def format_config(self) -> dict[str, Any]:
        return {
            "tt_rank": list(self.tt_ranks),
            "vocab_shape": list(self.vocab_shape),
            "dim_shape": list(self.dim_shape),
            "zero_padding_row": self.zero_padding_row,
        }

    @classmethod
    def empty(
        cls,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None,
        *,
        tt_rank: int | Sequence[int],
        vocab_shape: Sequence[int] | None = None,
        dim_shape: Sequence[int] | None = None,
        zero_padding_row: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> TTEmbedding:
        """Right shapes, values to be loaded (used when rebuilding a saved model)."""
        return cls(
            num_embeddings, embedding_dim, list(tt_rank) if not isinstance(tt_rank, int) else tt_rank, padding_idx,
            vocab_shape=vocab_shape, dim_shape=dim_shape, zero_padding_row=zero_padding_row, device=device, dtype=dtype,
        )

    @classmethod
    def from_factors(
        cls, f: TTFactors, padding_idx: int | None = None, *, zero_padding_row: bool = True, **_: Any
    ) -> TTEmbedding:
        """The layer holding a TT decomposition's cores (``sparse`` and ``copy`` do not apply: cores are copied)."""
        return cls.from_cores(f.cores, f.shape[0], padding_idx, zero_padding_row=zero_padding_row)

    @classmethod
    def from_cores(
        cls,
        cores: Sequence[torch.Tensor],
        num_embeddings: int,
        padding_idx: int | None = None,
        *,
        zero_padding_row: bool = True,
    ) -> TTEmbedding:
        """Wrap existing cores of shape (n_t, r_{t-1}, m_t, r_t) (copied into new parameters)."""
        vocab_shape = [int(c.shape[0]) for c in cores]
        dim_shape = [int(c.shape[2]) for c in cores]
        ranks = [int(c.shape[3]) for c in cores[:-1]]
        emb = cls(
            num_embeddings, math.prod(dim_shape), ranks, padding_idx, vocab_shape=vocab_shape, dim_shape=dim_shape,
            zero_padding_row=zero_padding_row, device=cores[0].device, dtype=cores[0].dtype,
        )
        if emb.tt_ranks != ranks:
            raise ConfigError(f"core ranks {ranks} exceed the exact TT ranks {emb.tt_ranks} for these shapes")
        with torch.no_grad():
            for p, c in zip(emb.cores, cores):
                p.copy_(c)
        return emb

    @classmethod
    def from_embedding(
        cls, embedding: nn.Embedding, tt_rank: int | Sequence[int], *, num_cores: int = 3, **shapes: Any
    ) -> TTEmbedding:
        """TT-SVD of a trained nn.Embedding (see :func:`embfactor.decomposition.tt.tt_svd`).

        Example:
            >>> TTEmbedding.from_embedding(nn.Embedding(100, 16), tt_rank=4).tt_ranks
            [4, 4]
        """
        from embfactor.decomposition.tt import tt_svd

        E = embedding.weight.detach()
        f = tt_svd(E, tt_rank, num_cores=num_cores, **shapes)
        pad = embedding.padding_idx
        pad_is_zero = pad is None or not bool(E[pad].any())
        return cls.from_factors(f, pad, zero_padding_row=pad_is_zero)

    def extra_repr(self) -> str:
        s = (
            f"{self.num_embeddings}, {self.embedding_dim}, tt_rank={self.tt_ranks}, "
            f"vocab_shape={self.vocab_shape}, dim_shape={self.dim_shape}"
        )
        return s + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")
