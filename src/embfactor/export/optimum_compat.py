"""Let optimum-onnx 0.1.0 (the newest release) import under transformers 5.

sentence-transformers' ``backend="onnx"`` loads files through ``optimum.onnxruntime``. optimum-onnx 0.1.0 declares
``transformers<4.58`` and imports names transformers 5 moved or dropped: ``transformers.utils.is_offline_mode``
(now huggingface_hub's), ``transformers.modeling_utils.get_parameter_dtype`` and two names of
``transformers.utils.generic`` (now in ``transformers.utils.output_capturing``), and ``ORTModelForCausalLM`` calls
``PretrainedConfig._get_non_default_generation_parameters`` (gone: configs hold no generation settings). :func:`enable_optimum` puts those
names back where optimum looks for them, and only where they are missing; loading and running exported files is all
it is used for (optimum's own exporters and quantizers are not).
"""

from __future__ import annotations

import importlib


def enable_optimum() -> list[str]:
    """Add the names optimum-onnx 0.1.0 imports and transformers 5 lacks; returns the ones added (idempotent).

    Example:
        >>> from embfactor.export import enable_optimum
        >>> enable_optimum()     # doctest: +SKIP
        ['transformers.utils.is_offline_mode', ...]
        >>> SentenceTransformer("out/minilm-16x", backend="onnx")     # doctest: +SKIP
    """
    added = []

    def put(module: str, name: str, value: object) -> None:
        mod = importlib.import_module(module)
        if not hasattr(mod, name):
            setattr(mod, name, value)
            added.append(f"{module}.{name}")

    import huggingface_hub

    put("transformers.utils", "is_offline_mode", huggingface_hub.is_offline_mode)
    put("transformers.modeling_utils", "get_parameter_dtype", _parameter_dtype)
    # ORTModelForCausalLM moves generation settings found in config.json to the generation config; transformers 5
    # keeps none there (they live in generation_config.json), so there is nothing to move
    from transformers import PretrainedConfig

    if not hasattr(PretrainedConfig, "_get_non_default_generation_parameters"):
        PretrainedConfig._get_non_default_generation_parameters = _no_generation_parameters  # type: ignore[attr-defined]
        added.append("transformers.PretrainedConfig._get_non_default_generation_parameters")
    try:
        capturing = importlib.import_module("transformers.utils.output_capturing")
    except ImportError:
        return added
    for name in ("OutputRecorder", "_CAN_RECORD_REGISTRY"):
        if hasattr(capturing, name):
            put("transformers.utils.generic", name, getattr(capturing, name))
    return added


def _no_generation_parameters(self: object) -> dict[str, object]:
    return {}


def _parameter_dtype(module: object) -> object:
    """dtype of a module's first floating parameter (what transformers 4's helper returned)."""
    import torch

    for p in module.parameters():  # type: ignore[attr-defined]
        if p.is_floating_point():
            return p.dtype
    return torch.float32
