"""PyTorch layers that wrap the decompositions: factorized embeddings, tied heads, positional encodings."""

from embfactor.layers.embedding import FactorizedEmbedding, FactorizedLMHead, check_token_ids
from embfactor.layers.positional import LearnedPositionalEncoding, SinusoidalPositionalEncoding, TransformerEmbedding

__all__ = [
    "FactorizedEmbedding",
    "FactorizedLMHead",
    "LearnedPositionalEncoding",
    "SinusoidalPositionalEncoding",
    "TransformerEmbedding",
    "check_token_ids",
]
