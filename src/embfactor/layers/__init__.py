"""PyTorch layers that wrap the decompositions: factorized embeddings, tied heads, positional encodings."""

from embfactor.layers.block import BlockFactorizedEmbedding
from embfactor.layers.embedding import FactorizedEmbedding, FactorizedLMHead, check_token_ids
from embfactor.layers.registry import available_layers, get_layer, is_factorized_layer, register_layer
from embfactor.layers.positional import LearnedPositionalEncoding, SinusoidalPositionalEncoding, TransformerEmbedding
from embfactor.layers.quantized import QuantizedFactorizedEmbedding
from embfactor.layers.tt import TTEmbedding

__all__ = [
    "BlockFactorizedEmbedding",
    "FactorizedEmbedding",
    "FactorizedLMHead",
    "LearnedPositionalEncoding",
    "QuantizedFactorizedEmbedding",
    "SinusoidalPositionalEncoding",
    "TTEmbedding",
    "TransformerEmbedding",
    "available_layers",
    "check_token_ids",
    "get_layer",
    "is_factorized_layer",
    "register_layer",
]

# the codebook (pq/rvq) and dense int-k storage formats register themselves on import
from embfactor.formats import codebook as _codebook_format, intk as _intk_format  # noqa: E402, F401
