"""Storage formats of an embedding table: each knows gather / project / num_bytes / its config / dense.

Every format is an ``nn.Module`` subclass of :class:`RowFormat`, registered by name; the forward pass, the
dense view and the tied head (:class:`embfactor.layers.FactorizedLMHead`) are shared by all of them.
"""

from embfactor.formats.base import RowFormat, available_formats, from_factors, get_format, is_row_format, register_format

__all__ = ["RowFormat", "available_formats", "from_factors", "get_format", "is_row_format", "register_format"]
