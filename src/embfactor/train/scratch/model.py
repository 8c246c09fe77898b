"""The small pre-LN causal Transformer LM with a tied head over a dense, factorized or TT token embedding."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from embfactor.errors import UnknownMethodError
from embfactor.train.scratch.config import TrainConfig


@torch.no_grad()
def balance_factors_(emb: nn.Module, std: float) -> None:
    """Re-draw U and V of a FactorizedEmbedding with one common std s, where r·s⁴ = std² (table entries keep std).

    FactorizedEmbedding's default init puts the scale in U (std √std) and keeps V small (std √(std/r)). Adam moves
    every entry by about lr whatever its size, so a large U learns its per-token rows slowly: with that init a
    24-step run at d=256 left fact-d4 near uniform perplexity (train loss ~9.4 vs 7.6 dense). Equal scales give
    U and V the same relative step.

    Example:
        >>> from embfactor.layers import FactorizedEmbedding
        >>> _ = torch.manual_seed(0); e = FactorizedEmbedding(1000, 64, rank=16); balance_factors_(e, 0.125)
        >>> abs(float(e.weight.detach().std()) - 0.125) < 0.01
        True
    """
    s = (std / math.sqrt(emb.rank)) ** 0.5
    nn.init.normal_(emb.U, std=s)
    nn.init.normal_(emb.V, std=s)
    if emb.padding_idx is not None:
        emb.U[emb.padding_idx].zero_()


class CausalLM(nn.Module):
    """A small pre-LN causal Transformer LM whose output head is tied to the (dense/factorized/TT) token embedding.

    Args:
        vocab_size: vocabulary size.
        cfg: the run's :class:`TrainConfig` (size, positions, dropout).
        kind, rank: from :func:`parse_variant`.

    Example:
        >>> m = CausalLM(100, TrainConfig(d_model=16, heads=2, layers=1, seq_len=8), "factorized", 4)
        >>> m(torch.randint(0, 100, (2, 8))).shape
        torch.Size([2, 8, 100])
    """

    def __init__(self, vocab_size: int, cfg: TrainConfig, kind: str, rank: int | None = None) -> None:
        super().__init__()
        from embfactor.layers import FactorizedEmbedding, FactorizedLMHead, TransformerEmbedding

        d = cfg.d_model
        # Embedding rows of std d^-1/2, scaled by √d in TransformerEmbedding: unit-scale inputs like the sinusoids,
        # and tied logits of unit scale after the final LayerNorm.
        std = d**-0.5
        token: nn.Module
        if kind == "dense":
            token = nn.Embedding(vocab_size, d)
            nn.init.normal_(token.weight, std=std)
        elif kind == "factorized":
            token = FactorizedEmbedding(vocab_size, d, int(rank), init_std=std)  # type: ignore[arg-type]
            balance_factors_(token, std)
        elif kind == "tt":
            from embfactor.layers import TTEmbedding

            token = TTEmbedding(vocab_size, d, tt_rank=cfg.tt_rank, init_std=std)
        else:
            raise UnknownMethodError(f"unknown embedding kind {kind!r}; valid: dense, factorized, tt")
        self.kind = kind
        self.embed = TransformerEmbedding(
            vocab_size, d, max_len=cfg.seq_len, positional=cfg.positional, dropout=cfg.dropout, token_embedding=token
        )
        block = nn.TransformerEncoderLayer(
            d, cfg.heads, cfg.ffn_mult * d, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = FactorizedLMHead(token) if kind != "dense" else None
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(cfg.seq_len), persistent=False)

    @property
    def token_embedding(self) -> nn.Module:
        return self.embed.token

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        h = self.blocks(self.embed(ids), mask=self.causal[:t, :t].to(ids.device), is_causal=True)
        h = self.norm(h)
        if self.head is None:
            return F.linear(h, self.embed.token.weight.to(h.dtype))
        return self.head(h)


def embedding_params(model: CausalLM) -> int:
    """Parameters of the token embedding (shared with the tied head)."""
    return sum(p.numel() for p in model.token_embedding.parameters())


def total_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() lists shared tensors once


def _reset_non_embedding(model: CausalLM, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        pos = model.embed.position
        if pos is not None and hasattr(pos, "embedding"):
            nn.init.normal_(pos.embedding.weight, std=0.02)
        for m in [*model.blocks.modules(), model.norm]:
            if isinstance(m, nn.MultiheadAttention):
                m._reset_parameters()
            elif isinstance(m, (nn.Linear, nn.LayerNorm)):
                m.reset_parameters()
