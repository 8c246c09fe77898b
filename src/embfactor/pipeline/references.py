"""External references: the storage users would otherwise pick for an embedding table, computed by its own tool.

A sweep (``embfactor sweep --methods gguf-q4_0,...``) and the frontier benchmark evaluate these at the same
protocol as embfactor's own points: the table is quantized by the other tool, read back as the tool reads it
(dequantized to float32, which is what its kernels compute with), written into the model, and scored; the bytes are
what the tool stores.

- ``gguf-q8_0``, ``gguf-q5_0``, ``gguf-q4_0``: llama.cpp's block types through the ``gguf`` package's quantizers
  (its NumPy port of ggml-quants): blocks of 32 values with an fp16 scale, 8.5 / 5.5 / 4.5 bits per value. The
  K and IQ types need rows that are multiples of 256 values (llama.cpp falls back to 4.5+ bits for 384/576/640).
- ``torchao-int8``, ``torchao-int4``: torchao's ``IntxWeightOnlyConfig`` on the ``nn.Embedding`` (int8 per row;
  int4 per group of 32), the layout torchao holds (``IntxUnpackedToInt8Tensor``: one int8 per value, fp32 scales,
  int8 zero points), so its bytes are int8's whatever the bit width. torchao is optional (extra ``torchao``): once
  installed, transformers imports it at every model load (0.2 s, and stderr lines about CUDA kernels on CPU).
"""

from __future__ import annotations

from typing import Any

import torch

from embfactor.errors import ConfigError

GGUF_TYPES = {"gguf-q8_0": "Q8_0", "gguf-q5_0": "Q5_0", "gguf-q4_0": "Q4_0"}
TORCHAO_TYPES = {"torchao-int8": (8, None), "torchao-int4": (4, 32)}
EXTERNAL_METHODS = (*GGUF_TYPES, *TORCHAO_TYPES)


def is_external(name: str) -> bool:
    """True for the name of an external reference (:data:`EXTERNAL_METHODS`)."""
    return name in EXTERNAL_METHODS


def check_external(name: str, d: int | None = None) -> None:
    """Raise ConfigError when ``name`` cannot store rows of width ``d`` or its tool is not installed."""
    if name not in EXTERNAL_METHODS:
        raise ConfigError(f"unknown external reference {name!r}; valid: {', '.join(EXTERNAL_METHODS)}")
    if name in GGUF_TYPES and d is not None and d % 32:
        raise ConfigError(f"{name} stores blocks of 32 values: rows of {d} values are not a multiple of 32")
    module = "gguf" if name in GGUF_TYPES else "torchao"
    try:
        __import__(module)
    except ImportError:
        raise ConfigError(f"{name} needs the {module} package: pip install 'embfactor[{module}]'") from None


def external_table(name: str, E: torch.Tensor) -> tuple[torch.Tensor, int, dict[str, Any]]:
    """(table as the tool reads it back, bytes the tool stores, settings) of E (vocab × d) in format ``name``.

    Example:
        >>> T, nbytes, info = external_table("gguf-q4_0", torch.randn(10, 64))
        >>> T.shape, nbytes, info["bits_per_value"]
        (torch.Size([10, 64]), 360, 4.5)
    """
    check_external(name, E.shape[1])
    n, d = E.shape
    if name in GGUF_TYPES:
        from importlib.metadata import version

        import gguf
        from gguf import quants

        qtype = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[name])
        raw = quants.quantize(E.detach().float().cpu().numpy(), qtype)
        table = torch.from_numpy(quants.dequantize(raw, qtype).copy()).view(n, d)
        return table, int(raw.nbytes), {"tool": f"gguf {version('gguf')}", "type": GGUF_TYPES[name],
                                         "bits_per_value": raw.nbytes * 8 / E.numel()}
    import torchao
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    bits, group = TORCHAO_TYPES[name]
    emb = torch.nn.Sequential(torch.nn.Embedding(n, d, _weight=E.detach().float().clone()))
    config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"),
                                  granularity=PerGroup(group) if group else PerAxis(0))
    quantize_(emb, config, filter_fn=lambda m, _fqn: isinstance(m, torch.nn.Embedding))
    w = emb[0].weight
    nbytes = sum(getattr(w, k).numel() * getattr(w, k).element_size() for k in w.tensor_data_names)
    return w.dequantize().float(), int(nbytes), {"tool": f"torchao {torchao.__version__}", "type": type(w).__name__,
                                                 "bits_per_value": nbytes * 8 / E.numel()}
