"""nn.Modules built on the storage formats: the tied output head, shared input tables and positional encodings.

The embedding formats themselves live in :mod:`embfactor.formats`; they are re-exported here because a
factorized embedding is the layer users put in their models.
"""

from embfactor.formats import (
    BlockFactorizedEmbedding,
    FactorizedEmbedding,
    QuantizedFactorizedEmbedding,
    TieredFormat,
    TTEmbedding,
)
from embfactor.layers.head import FactorizedLMHead
from embfactor.layers.shared import SharedEmbedding
from embfactor.layers.positional import LearnedPositionalEncoding, SinusoidalPositionalEncoding, TransformerEmbedding

__all__ = [
    "BlockFactorizedEmbedding",
    "FactorizedEmbedding",
    "FactorizedLMHead",
    "LearnedPositionalEncoding",
    "QuantizedFactorizedEmbedding",
    "SharedEmbedding",
    "SinusoidalPositionalEncoding",
    "TTEmbedding",
    "TieredFormat",
    "TransformerEmbedding",
]
