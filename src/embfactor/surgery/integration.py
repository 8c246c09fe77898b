"""Keep a factorized model's ``config.quantization_config`` in step with its embedding, so ``save_pretrained`` works.

``factorize_``, ``quantize_`` and ``save_compressed`` call :func:`attach_quantization_config`; a model loaded by
``from_pretrained`` already carries it (the quantizer's postprocess sets it).
"""

from __future__ import annotations

from typing import Any

from torch import nn


def attach_quantization_config(model: nn.Module) -> Any:
    """Set ``model.config.quantization_config`` to the embfactor config describing its current embedding.

    Does nothing (returns None) for a model without a transformers config or without embfactor metadata.

    Example:
        >>> factorize_(model, rank=8)                        # doctest: +SKIP
        >>> model.save_pretrained("out")                     # doctest: +SKIP
    """
    from embfactor.surgery.meta import get_meta

    meta = get_meta(model)
    config = getattr(model, "config", None)
    if meta is None or config is None or not hasattr(config, "to_json_file"):
        return None
    from embfactor.surgery.qconfig import EmbfactorConfig

    qconfig = EmbfactorConfig.from_model(model, meta)
    config.quantization_config = qconfig
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer.quantization_config, "quant_method", None) == qconfig.quant_method:
        quantizer.quantization_config = qconfig
    elif quantizer is None:
        _attach_quantizer(model, qconfig)
    return qconfig


def _attach_quantizer(model: nn.Module, qconfig: Any) -> None:
    """Give a model compressed in this process the quantizer a loaded one has, so that transformers'
    ``save_pretrained`` stores the guard tensors too (:mod:`embfactor.surgery.share`): a folder it writes then
    fails loudly without embfactor instead of loading a random table. The class comes from transformers' registry,
    where ``embfactor.hf`` put it (surgery does not import hf)."""
    try:
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    except ImportError:
        return
    cls = AUTO_QUANTIZER_MAPPING.get(qconfig.quant_method)
    if cls is not None and hasattr(model, "save_pretrained"):
        model.hf_quantizer = cls(qconfig, pre_quantized=True)
