"""quantize_: store a factorized model's U and V as per-row int8/int4 (the tied head keeps sharing them)."""

from __future__ import annotations

from typing import Any

from torch import nn

from embfactor.errors import SurgeryError
from embfactor.formats.lowrank import FactorizedEmbedding
from embfactor.formats.quantized import QuantizedFactorizedEmbedding, parse_bits
from embfactor.layers.head import FactorizedLMHead
from embfactor.surgery.factorize import as_module
from embfactor.surgery.integration import attach_quantization_config
from embfactor.surgery.meta import CompressionMeta, get_meta
from embfactor.surgery.replace import replace_modules_, shared_views


def dense_embedding_bytes(vocab: int, d: int, bits: int | None = None) -> int:
    """Bytes of a dense (vocab × d) table: fp32 (bits=None) or per-row int8/int4 with float32 scales.

    Example:
        >>> dense_embedding_bytes(30522, 384), dense_embedding_bytes(30522, 384, 8)
        (46881792, 11842536)
    """
    from embfactor.quant import quantized_bytes

    return vocab * d * 4 if bits is None else quantized_bytes(vocab, d, bits)


def factor_bytes(vocab: int, d: int, rank: int, bits: int | None = None) -> int:
    """Bytes of U (vocab × r) and V (r × d): fp32 (bits=None) or quantized per row with float32 scales.

    Example:
        >>> factor_bytes(30522, 384, 63, 8)     # MiniLM at 6x parameters, int8: 22.7x fewer bytes than fp32
        2069418
    """
    from embfactor.quant import quantized_bytes

    if bits is None:
        return 4 * rank * (vocab + d)
    return quantized_bytes(vocab, rank, bits) + quantized_bytes(rank, d, bits)


def quantize_(model: nn.Module | Any, bits: int | str = 8) -> dict[str, Any]:
    """Convert a factorized model's embedding (and its tied head) to quantized factor storage, in place.

    The model must have been factorized with a U·V layer (:func:`embfactor.factorize_`, any matrix method).
    Everything is checked before the model changes. The model's embfactor metadata records the quantization,
    so :func:`embfactor.save` / :func:`embfactor.load` round-trip it (bit-exact outputs).

    Args:
        model: a factorized model (or what :func:`embfactor.load_model` returns, factorized).
        bits: 8 / "int8" or 4 / "int4". A codebook embedding (pq, rvq) has integer codes already: its codebooks,
            rotation and row scales are stored in fp16 instead, whatever ``bits`` says.

    Returns:
        {"bits", "embedding_bytes", "fp32_embedding_bytes", "factor_fp32_bytes", "bytes_ratio"}.

    Raises:
        SurgeryError: the model is not factorized, or its embedding is not a FactorizedEmbedding (e.g. TT).
        ConfigError: bits other than 8 or 4.

    Example:
        >>> factorize_(model, ratio=6); quantize_(model, "int8")      # doctest: +SKIP
        >>> save_compressed(model, "out/")                                     # doctest: +SKIP
    """
    b = None if bits in (16, "fp16") else parse_bits(bits)  # 16: what compress passes for codebook methods
    model = as_module(model, "quantize_")
    meta = get_meta(model)
    if meta is None:
        raise SurgeryError(
            f"{type(model).__name__} is not factorized; call embfactor.factorize_(model, ...) before quantize_"
        )
    emb_fqn = meta.embedding_module
    layer = model.get_submodule(emb_fqn)
    from embfactor.formats.codebook import CodebookEmbedding
    from embfactor.formats.intk import IntKEmbedding

    if isinstance(layer, CodebookEmbedding):
        summary = _codebooks_to_fp16(layer, meta)
        attach_quantization_config(model)  # the format's config changed (fp16 codebooks)
        return summary
    if isinstance(layer, IntKEmbedding):
        raise SurgeryError(f"the embedding {emb_fqn!r} is already dense int{layer.bits} (method int)")
    b = parse_bits(bits)
    if isinstance(layer, QuantizedFactorizedEmbedding):
        raise SurgeryError(f"the embedding {emb_fqn!r} is already quantized ({layer.bits} bits)")
    if not isinstance(layer, FactorizedEmbedding):
        raise SurgeryError(
            f"quantize_ stores U·V factors; the embedding {emb_fqn!r} is a {type(layer).__name__} "
            f"(layer type {getattr(layer, 'layer_type', '?')!r}); factorize with a matrix method (svd, eig, ...)"
        )
    replacements: dict[str, nn.Module] = {}
    new = QuantizedFactorizedEmbedding.from_factorized(layer, b)
    new.embed_scale = layer.embed_scale
    replacements[emb_fqn] = new
    replacements.update(shared_views(meta.shared_modules, new))  # T5/BART's other readers of the table
    head_fqn = meta.head_module if meta.tied_head else None
    if head_fqn:
        head = model.get_submodule(head_fqn)
        if not isinstance(head, FactorizedLMHead):
            raise SurgeryError(f"{head_fqn!r} should be the tied FactorizedLMHead, found {type(head).__name__}")
        replacements[head_fqn] = FactorizedLMHead(new, head.bias)
    # --- the model is mutated only below this line ---
    replace_modules_(model, replacements)
    vocab, d, r = new.num_embeddings, new.embedding_dim, new.rank
    summary = {
        "bits": b,
        "embedding_bytes": new.num_bytes(),
        "fp32_embedding_bytes": dense_embedding_bytes(vocab, d),
        "factor_fp32_bytes": factor_bytes(vocab, d, r),
        "bytes_ratio": dense_embedding_bytes(vocab, d) / new.num_bytes(),
    }
    meta.report["quantization"] = summary
    attach_quantization_config(model)  # the format changed: model.save_pretrained must describe the new one
    return summary


def _codebooks_to_fp16(layer: nn.Module, meta: CompressionMeta) -> dict[str, Any]:
    """Store a CodebookEmbedding's float tensors (codebooks, rotation, row scales) as fp16, in place.

    int8 codebooks stay int8 (already narrower); their column scales become fp16 like the other float tensors.
    """
    import torch

    vocab, d = layer.num_embeddings, layer.embedding_dim
    int8 = layer.codebook_scale is not None
    # --- the model is mutated only below this line (nothing above can fail half-way) ---
    with torch.no_grad():
        if int8:
            layer.codebook_scale = nn.Parameter(layer.codebook_scale.detach().half())
        else:
            layer.codebooks = nn.Parameter(layer.codebooks.detach().half())
        if layer.row_scale is not None:
            layer.row_scale = nn.Parameter(layer.row_scale.detach().half())
        if layer.rotation is not None:
            layer.rotation = layer.rotation.half()
    layer.codebook_dtype = "int8" if int8 else "float16"
    summary = {
        "bits": 16,
        "embedding_bytes": layer.num_bytes(),
        "fp32_embedding_bytes": dense_embedding_bytes(vocab, d),
        "factor_fp32_bytes": None,
        "bytes_ratio": dense_embedding_bytes(vocab, d) / layer.num_bytes(),
    }
    meta.report["quantization"] = summary
    return summary
