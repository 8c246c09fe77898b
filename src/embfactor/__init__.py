"""embfactor: parameter factorization of Transformer embedding layers.

The public API is loaded lazily so that ``import embfactor`` stays cheap (no torch import until needed).

Example:
    >>> import embfactor as ef
    >>> f = ef.decompose(E, rank=64, method="svd", seed=0)       # doctest: +SKIP
    >>> report = ef.factorize_(model, ratio=6, method="svd")     # doctest: +SKIP
    >>> ef.save_compressed(model, "out/"); model = ef.load_compressed("out/")          # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "decompose": "embfactor.decomposition",
    "Factors": "embfactor.decomposition",
    "available_methods": "embfactor.decomposition",
    "register_method": "embfactor.decomposition",
    "resolve_rank": "embfactor.decomposition",
    "default_method": "embfactor.decomposition",
    "FactorizedEmbedding": "embfactor.layers",
    "FactorizedLMHead": "embfactor.layers",
    "SinusoidalPositionalEncoding": "embfactor.layers",
    "LearnedPositionalEncoding": "embfactor.layers",
    "TransformerEmbedding": "embfactor.layers",
    "TTEmbedding": "embfactor.layers",
    "QuantizedFactorizedEmbedding": "embfactor.layers",
    "BlockFactorizedEmbedding": "embfactor.formats",
    "TieredFormat": "embfactor.formats",
    "RowFormat": "embfactor.formats",
    "register_format": "embfactor.formats",
    "available_formats": "embfactor.formats",
    "quantize_": "embfactor.surgery",
    "factorize_": "embfactor.surgery",
    "FactorizationReport": "embfactor.surgery",
    "save_compressed": "embfactor.surgery",
    "load_compressed": "embfactor.surgery",
    "load_model": "embfactor.models",
    "FactorizationConfig": "embfactor.config",
}

__all__ = ["__version__", *sorted(_LAZY)]

# Compressed folders load with transformers' from_pretrained once embfactor is imported: register embfactor's
# quantization method when transformers' quantizer registry is imported (a finder on sys.meta_path; no import now).
from embfactor.hf.hook import install_registration_hook as _install_hook  # noqa: E402

_install_hook()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'embfactor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
