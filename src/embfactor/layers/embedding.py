"""FactorizedEmbedding: a drop-in nn.Embedding whose table is U·V, gathered row by row."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from embfactor.errors import ConfigError, InvalidTypeError, TokenIndexError
from embfactor.layers.registry import check_layer_args, is_factorized_layer, register_layer


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


@register_layer("factorized")
class FactorizedEmbedding(nn.Module):
    """An embedding table E = U·V (U: vocab × r, V: r × d) that never builds the vocab × d table.

    Forward gathers the rows of U for the ids, then multiplies by V: ``F.embedding(x, U) @ V``, which costs
    r/d of the table's memory and one small matmul. Takes nn.Embedding's arguments, so it is a drop-in.

    Args:
        num_embeddings: vocabulary size.
        embedding_dim: d.
        rank: r, 1 ≤ r; smaller than d to save parameters.
        padding_idx: this row of U is zero and gets no gradient, so its embedding is zero (as in nn.Embedding).
        sparse: sparse gradients for U (only the gathered rows), for very large vocabularies.
        init_std: the std of entries of U·V at initialization (nn.Embedding draws N(0, 1)).

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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        padding_idx = check_layer_args(num_embeddings, embedding_dim, padding_idx, rank=rank)
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

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        check_token_ids(input, self.num_embeddings)
        # Gather r-wide rows of U for the flattened ids, then one 2-D GEMM with V: no batched-matmul dispatch
        # and no int64 copy of ids that already are int64 (benchmarks/runtime.py measures this path).
        flat = input.reshape(-1)
        if flat.dtype != torch.long:
            flat = flat.long()
        rows = F.embedding(flat, self.U, self.padding_idx, sparse=self.sparse)
        return torch.mm(rows, self.V).view(*input.shape, self.embedding_dim)

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
        return F.linear(F.linear(hidden, self.V), self.U)

    def layer_config(self) -> dict[str, Any]:
        return {"rank": self.rank, "sparse": self.sparse}

    @classmethod
    def empty(
        cls, num_embeddings: int, embedding_dim: int, padding_idx: int | None, *, rank: int, sparse: bool = False,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> FactorizedEmbedding:
        """Right shapes, values to be loaded (used when rebuilding a saved model)."""
        return cls(num_embeddings, embedding_dim, rank, padding_idx, sparse=sparse, device=device, dtype=dtype)

    @classmethod
    def from_factors(
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
        emb = cls(U.shape[0], V.shape[1], U.shape[1], padding_idx, sparse=sparse, device="meta", dtype=U.dtype)
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
        """Factorize a trained nn.Embedding (see :func:`embfactor.decompose.decompose` for the arguments).

        A padding row that is zero in the original stays exactly zero; a non-zero one keeps its approximation.

        Example:
            >>> FactorizedEmbedding.from_embedding(nn.Embedding(100, 16), rank=4).rank
            4
        """
        from embfactor.decompose import decompose

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
        emb = cls.from_factors(f.U, f.V, pad, sparse=embedding.sparse, zero_padding_row=pad_is_zero, copy=False)
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


class FactorizedLMHead(nn.Module):
    """Output projection tied to a factorized embedding: logits = (h·Vᵀ)·Uᵀ (+ bias).

    The head holds *no parameters of its own* besides the optional bias: it calls ``project`` of the embedding
    it is tied to, so both always use the same tensors and a state dict lists them once. With a
    FactorizedEmbedding this costs r·(d + vocab) multiply-adds per token instead of d·vocab. Any registered
    embedding layer type (block-wise, quantized, tensor-train) can be tied the same way.

    Example:
        >>> emb = FactorizedEmbedding(1000, 64, rank=16)
        >>> head = FactorizedLMHead(emb)
        >>> head(torch.randn(2, 64)).shape
        torch.Size([2, 1000])
        >>> head.U is emb.U
        True
    """

    def __init__(self, embedding: nn.Module, bias: torch.Tensor | nn.Parameter | None = None) -> None:
        super().__init__()
        if not is_factorized_layer(embedding):
            raise InvalidTypeError(
                f"FactorizedLMHead ties to a FactorizedEmbedding (or another embfactor layer), got {type(embedding).__name__}"
            )
        # Stored outside the module tree (a plain tuple), so the factors are not registered twice.
        self._tied = (embedding,)
        if bias is not None:
            if bias.shape != (embedding.num_embeddings,):
                raise ConfigError(f"bias must have shape ({embedding.num_embeddings},), got {tuple(bias.shape)}")
            bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach().clone())
        self.bias = bias

    @property
    def embedding(self) -> nn.Module:
        return self._tied[0]

    @property
    def U(self) -> nn.Parameter:
        return self.embedding.U

    @property
    def V(self) -> nn.Parameter:
        return self.embedding.V

    @property
    def in_features(self) -> int:
        return self.embedding.embedding_dim

    @property
    def out_features(self) -> int:
        return self.embedding.num_embeddings

    @property
    def weight(self) -> torch.Tensor:
        """The dense (vocab × d) weight, materialized on read."""
        return self.embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.embedding.project(hidden)
        return logits + self.bias if self.bias is not None else logits

    def extra_repr(self) -> str:
        e = self.embedding
        return f"in_features={e.embedding_dim}, out_features={e.num_embeddings}, tied to {type(e).__name__}, bias={self.bias is not None}"


def _owned(t: torch.Tensor, dtype: torch.dtype, copy: bool) -> torch.Tensor:
    """A contiguous tensor of ``dtype`` with t's values: t itself when allowed and already so, else a copy."""
    t = t.detach()
    if copy and t.dtype == dtype:
        return t.clone(memory_format=torch.contiguous_format)
    return t.to(dtype).contiguous()
