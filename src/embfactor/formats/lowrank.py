"""FactorizedEmbedding: a drop-in nn.Embedding whose table is U·V, gathered row by row."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from embfactor.decomposition.factors import Factors
from embfactor.errors import ConfigError, InvalidTypeError
from embfactor.formats.base import RowFormat, check_format_args, register_format


@register_format("factorized", factors=Factors)
class FactorizedEmbedding(RowFormat):
    """An embedding table E = U·V (U: vocab × r, V: r × d) that never builds the vocab × d table.

    Forward gathers the rows of U for the ids, then multiplies by V: ``F.embedding(x, U) @ V``, which costs
    r/d of the table's memory and one small matmul. Takes nn.Embedding's arguments, so it is a drop-in.

    Args:
        num_embeddings: vocabulary size.
        embedding_dim: d.
        rank: r, 1 ≤ r < min(vocab, d); r·(vocab + d) numbers instead of vocab·d.
        padding_idx: this row of U is zero and gets no gradient, so its embedding is zero (as in nn.Embedding).
        sparse: sparse gradients for U (only the gathered rows), for very large vocabularies.
        init_std: the std of entries of U·V at initialization (nn.Embedding draws N(0, 1)).
        full_rank: allow rank = min(vocab, d), which saves nothing on its own (a tier of a larger table may use it).

    Example:
        >>> emb = FactorizedEmbedding(1000, 64, rank=16, padding_idx=0)
        >>> emb(torch.tensor([[0, 5, 7]])).shape
        torch.Size([1, 3, 64])
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int,
        padding_idx: int | None = None,
        *,
        sparse: bool = False,
        init_std: float = 1.0,
        full_rank: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        padding_idx = check_format_args(num_embeddings, embedding_dim, padding_idx, rank=rank)
        top = min(num_embeddings, embedding_dim)
        if rank > top or (rank == top and not full_rank):
            # U·V of rank >= min(vocab, d) holds more numbers than the table itself (as decompose() refuses it)
            raise ConfigError(
                f"rank must be < min(num_embeddings, embedding_dim)={top}, got rank={rank}: a {num_embeddings}×"
                f"{embedding_dim} table stores {num_embeddings * embedding_dim:,} numbers, U·V of rank {rank} "
                f"{rank * (num_embeddings + embedding_dim):,}; use nn.Embedding"
            )
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.rank = rank
        self.padding_idx = padding_idx
        self.sparse = sparse
        self.init_std = init_std
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(num_embeddings, rank, **kw))
        self.V = nn.Parameter(torch.empty(rank, embedding_dim, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Var(U·V) = init_std² with Var(U) = init_std and Var(V) = init_std / r (ALBERT-style from scratch)."""
        with torch.no_grad():
            nn.init.normal_(self.U, std=self.init_std**0.5)
            nn.init.normal_(self.V, std=(self.init_std / self.rank) ** 0.5)
            self._zero_padding_row()

    def _zero_padding_row(self) -> None:
        if self.padding_idx is not None:
            with torch.no_grad():
                self.U[self.padding_idx].zero_()

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        # Gather r-wide rows of U, then one 2-D GEMM with V (benchmarks/runtime.py measures this path); the
        # padding row gets no gradient, as in nn.Embedding.
        return torch.mm(F.embedding(ids, self.U, self.padding_idx, sparse=self.sparse), self.V)

    @property
    def weight(self) -> torch.Tensor:
        """The dense table U·V, materialized on each read (read-only; costs vocab × d memory)."""
        return self.U @ self.V

    @weight.setter
    def weight(self, value: Any) -> None:
        raise AttributeError(
            "FactorizedEmbedding.weight is read-only (it is U·V); set .U and .V, or use to_dense() for a plain table"
        )

    @property
    def num_params(self) -> int:
        return self.U.numel() + self.V.numel()

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden · (U·V)ᵀ computed as (hidden·Vᵀ)·Uᵀ: r·(d + vocab) multiply-adds per row instead of d·vocab."""
        if hidden.dtype != self.U.dtype:  # bfloat16 activations on a float32 table: logits in the table's dtype
            return F.linear(F.linear(hidden.to(self.U.dtype), self.V), self.U).to(hidden.dtype)
        return F.linear(F.linear(hidden, self.V), self.U)

    def num_bytes(self) -> int:
        return self.U.numel() * self.U.element_size() + self.V.numel() * self.V.element_size()

    def dense(self) -> torch.Tensor:
        return self.U @ self.V

    def format_config(self) -> dict[str, Any]:
        return {"rank": self.rank, "sparse": self.sparse}

    @classmethod
    def empty(
        cls, num_embeddings: int, embedding_dim: int, padding_idx: int | None, *, rank: int, sparse: bool = False,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> FactorizedEmbedding:
        """Right shapes, values to be loaded (used when rebuilding a saved model)."""
        return cls(
            num_embeddings, embedding_dim, rank, padding_idx, sparse=sparse, full_rank=True, device=device, dtype=dtype
        )

    @classmethod
    def from_factors(
        cls,
        f: Factors,
        padding_idx: int | None = None,
        *,
        sparse: bool = False,
        zero_padding_row: bool = True,
        copy: bool = True,
    ) -> FactorizedEmbedding:
        """The layer holding a decomposition's U and V (see :meth:`from_tensors` for the keywords)."""
        return cls.from_tensors(f.U, f.V, padding_idx, sparse=sparse, zero_padding_row=zero_padding_row, copy=copy)

    @classmethod
    def from_tensors(
        cls,
        U: torch.Tensor,
        V: torch.Tensor,
        padding_idx: int | None = None,
        *,
        sparse: bool = False,
        zero_padding_row: bool = True,
        copy: bool = True,
    ) -> FactorizedEmbedding:
        """Wrap existing factors (copied into new parameters).

        ``zero_padding_row=False`` keeps U's padding row as given: a pretrained table whose padding row is not
        zero keeps (the approximation of) that row, as nn.Embedding would; it still gets no gradient.
        ``copy=False`` adopts U and V themselves (no second vocab × r block at the conversion's peak); for
        temporaries only, as the padding row of the caller's U may be zeroed in place.
        """
        # built on the meta device: the shapes without allocating and randomly initializing a U that is replaced
        emb = cls(U.shape[0], V.shape[1], U.shape[1], padding_idx, sparse=sparse, full_rank=True, device="meta",
                  dtype=U.dtype)
        emb.U = nn.Parameter(_owned(U, U.dtype, copy))
        emb.V = nn.Parameter(_owned(V, U.dtype, copy))
        if zero_padding_row:
            emb._zero_padding_row()
        return emb

    @classmethod
    def from_embedding(
        cls,
        embedding: nn.Embedding,
        rank: int | None = None,
        *,
        ratio: float | None = None,
        energy: float | None = None,
        max_error: float | None = None,
        method: str | None = None,
        seed: int = 0,
        progress: bool = False,
        **options: Any,
    ) -> FactorizedEmbedding:
        """Factorize a trained nn.Embedding (see :func:`embfactor.decomposition.decompose` for the arguments).

        A padding row that is zero in the original stays exactly zero; a non-zero one keeps its approximation.

        Example:
            >>> FactorizedEmbedding.from_embedding(nn.Embedding(100, 16), rank=4).rank
            4
        """
        from embfactor.decomposition import decompose  # the decompositions package is loaded on first use only

        if not isinstance(embedding, nn.Embedding):
            raise InvalidTypeError(f"from_embedding needs an nn.Embedding, got {type(embedding).__name__}")
        f = decompose(
            embedding.weight.detach(),
            rank,
            ratio=ratio,
            energy=energy,
            max_error=max_error,
            method=method,
            seed=seed,
            progress=progress,
            **options,
        )
        pad = embedding.padding_idx
        pad_is_zero = pad is None or not bool(embedding.weight[pad].any())
        emb = cls.from_factors(f, pad, sparse=embedding.sparse, zero_padding_row=pad_is_zero, copy=False)
        emb.factors_meta = {"method": f.method, **f.meta}
        return emb

    def to_dense(self) -> nn.Embedding:
        """A plain nn.Embedding holding U·V."""
        emb = nn.Embedding(
            self.num_embeddings,
            self.embedding_dim,
            self.padding_idx,
            sparse=self.sparse,
            device=self.U.device,
            dtype=self.U.dtype,
        )
        with torch.no_grad():
            emb.weight.copy_(self.U @ self.V)
        return emb

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s + (", sparse=True" if self.sparse else "")


def _owned(t: torch.Tensor, dtype: torch.dtype, copy: bool) -> torch.Tensor:
    """A contiguous tensor of ``dtype`` with t's values: t itself when allowed and already so, else a copy."""
    t = t.detach()
    if copy and t.dtype == dtype:
        return t.clone(memory_format=torch.contiguous_format)
    return t.to(dtype).contiguous()
