"""Storage formats of an embedding table: each knows gather / project / num_bytes / its config / dense.

Every format is an ``nn.Module`` subclass of :class:`RowFormat`, registered by name; the forward pass, the
dense view and the tied head (:class:`embfactor.layers.FactorizedLMHead`) are shared by all of them.
Importing this package registers the built-in formats (each module registers the format it is named after).
"""

from embfactor.formats.base import (
    RowFormat,
    available_formats,
    check_format_args,
    check_token_ids,
    from_factors,
    get_format,
    is_row_format,
    register_format,
)
from embfactor.formats.lowrank import FactorizedEmbedding
from embfactor.formats.quantized import QuantizedFactorizedEmbedding
from embfactor.formats.tiered import TieredFormat
from embfactor.formats.block import BlockFactorizedEmbedding
from embfactor.formats.tt import TTEmbedding
from embfactor.formats.zeros import ZeroRows
from embfactor.formats.codebook import CodebookEmbedding
from embfactor.formats.intk import IntKEmbedding

__all__ = [
    "BlockFactorizedEmbedding",
    "CodebookEmbedding",
    "FactorizedEmbedding",
    "IntKEmbedding",
    "QuantizedFactorizedEmbedding",
    "RowFormat",
    "TTEmbedding",
    "TieredFormat",
    "ZeroRows",
    "available_formats",
    "check_format_args",
    "check_token_ids",
    "from_factors",
    "get_format",
    "is_row_format",
    "register_format",
]
