"""The library's pipeline: what the CLI, the server and the sweep do, as functions returning typed reports.

- :func:`compress`: load, factorize (data-aware methods get token weights here, and only here), quantize, save;
- :func:`describe`: the facts ``embfactor inspect`` and ``/info`` show;
- :func:`sweep`: compress at several (method, ratio, storage) points, optionally heal, and evaluate each.
"""

from embfactor.pipeline.compress import CompressReport, compress, data_weights, quantize_bits
from embfactor.pipeline.describe import ModelFacts, describe, spectrum_facts
from embfactor.pipeline.sweep import sweep

__all__ = [
    "CompressReport",
    "ModelFacts",
    "compress",
    "data_weights",
    "describe",
    "quantize_bits",
    "spectrum_facts",
    "sweep",
]
