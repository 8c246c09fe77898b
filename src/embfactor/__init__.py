"""embfactor: compress the token-embedding table of Transformer models.

The public API is loaded lazily so that ``import embfactor`` stays cheap (no torch import until needed).

The main job, one call each (what the CLI commands run):

- :func:`compress` (``embfactor compress``): load, compress the embedding for a byte target, save, verify;
- :func:`heal` (``embfactor heal``): distill the original into the compressed model;
- :func:`evaluate` (``embfactor evaluate``): task metrics, against the original;
- :func:`sweep` (``embfactor sweep``): quality against bytes over methods and sizes;
- :func:`describe` (``embfactor inspect``): the facts of a model, compressed or not.

Example:
    >>> import embfactor as ef
    >>> r = ef.compress("minilm", size="8x", output="out/minilm-8x")        # doctest: +SKIP
    >>> r.verified["measured"]["fidelity"]                                  # doctest: +SKIP
    0.999...
    >>> f = ef.decompose(E, rank=64, method="svd", seed=0)                  # doctest: +SKIP
    >>> ef.save_compressed(model, "out/"); model = ef.load_compressed("out/")          # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "compress": "embfactor.pipeline.compress",
    "CompressReport": "embfactor.pipeline.compress",
    "heal": "embfactor.pipeline.heal",
    "evaluate": "embfactor.pipeline.evaluate",
    "export_onnx": "embfactor.export",
    "sweep": "embfactor.pipeline.sweep",
    "describe": "embfactor.pipeline.describe",
    "ModelFacts": "embfactor.pipeline.describe",
    "LoadedModel": "embfactor.models",
    "EmbfactorError": "embfactor.errors",
    "VerificationError": "embfactor.errors",
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

# Removed names that still work for one version, with a DeprecationWarning naming the new one (see CHANGELOG.md).
_DEPRECATED = {"save": "save_compressed", "load": "load_compressed"}

__all__ = ["__version__", *sorted(_LAZY)]

# Compressed folders load with transformers' from_pretrained once embfactor is imported: register embfactor's
# quantization method when transformers' quantizer registry is imported (a finder on sys.meta_path; no import now).
from embfactor.hf.hook import install_registration_hook as _install_hook  # noqa: E402

_install_hook()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _DEPRECATED:
        new = _DEPRECATED[name]
        warnings.warn(f"embfactor.{name} is deprecated and kept for one release after 0.1.0; use embfactor.{new} "
                      "(same arguments)", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_LAZY[new]), new)
    raise AttributeError(f"module 'embfactor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
