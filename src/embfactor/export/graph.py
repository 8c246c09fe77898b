"""The compressed lookup as a traceable graph: every storage format's rows from ops ONNX has (opset 18).

Tracing a model (``torch.onnx.export(..., dynamo=False)``) records what its modules compute on example inputs. A
storage format's ``forward`` checks ids with Python branches, the codebook format runs a fused C loop, a tiered table
selects each tier's ids with ``nonzero`` (data-dependent shapes): none of these trace into a graph that serves any
input. :func:`traceable_tables` swaps, for the duration of an export, each format's ``lookup`` (and each tied head's
``forward``) for :func:`export_rows`, which keeps the stored integers, codebooks and scales as they are (uint8 / int8 / fp16
initializers) and decodes only the looked-up rows inside the graph:

  - int-k: Gather of packed uint8 rows, the bit unpacking (shifts and masks), times the fp16 scales; tables of 4, 5,
    6 and 8 bits are written in the tied head's 4-bit plane layout (the same bytes, :func:`embfactor.export.planes.intk_planes`)
    and their rows decoded from it;
  - codebook (PQ/RVQ): Gather of the ids' codes, Gather of codebook rows, Sum over stages, Concat of sub-spaces;
  - low rank (float or quantized U): Gather of U rows, MatMul with V;
  - tiered (and block): every tier decodes the ids (clamped into its own rows) and Where keeps each id's tier;
  - zeros: zeros.
A tied head reads the same initializers (:mod:`embfactor.export.head`): its int-k and int8-codebook tiers are ONNX
Runtime's 4-bit block MatMul over the stored integers, so neither the file nor the loaded session holds a float table.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import nn

from embfactor.errors import SurgeryError
from embfactor.export.head import head_logits
from embfactor.export.planes import intk_planes, planes_ready
from embfactor.export.rows import export_rows
from embfactor.formats.base import RowFormat, is_row_format
from embfactor.formats.tt import TTEmbedding
from embfactor.layers.head import FactorizedLMHead

# formats whose gather cannot be traced into a graph that serves every input (data-dependent shapes)
_NOT_EXPORTABLE = {TTEmbedding: "tensor-train (tt) rows are built from per-batch unique prefixes"}


def check_exportable(model: nn.Module) -> None:
    """Raise SurgeryError naming the first table whose format has no ONNX lookup (before any export work)."""
    for name, m in model.named_modules():
        for cls, why in _NOT_EXPORTABLE.items():
            if isinstance(m, cls):
                raise SurgeryError(
                    f"{name or 'the embedding'}: the {m.format_name!r} storage format cannot be exported to ONNX "
                    f"({why}); compress with another format (--method int, pq, rvq, svd, or --size with the planner)"
                )


def _table_lookup(self: RowFormat, input: torch.Tensor) -> torch.Tensor:
    # replaces ``lookup`` (the id checks have Python branches), so ``forward``'s embed_scale and the modules that
    # share the table (SharedEmbedding reads ``lookup``) stay as they are
    rows = export_rows(self, input.reshape(-1).long())
    return rows.reshape(*input.shape, self.embedding_dim)


def _head_forward(self: FactorizedLMHead, hidden: torch.Tensor) -> torch.Tensor:
    logits = head_logits(self.embedding, hidden).to(hidden.dtype)
    return logits + self.bias if self.bias is not None else logits


@contextlib.contextmanager
def traceable_tables(model: nn.Module) -> Iterator[list[str]]:
    """Within the block, every storage format and tied head of ``model`` computes with :func:`export_rows`.

    Yields :func:`table_scopes`. The model is restored on exit, also on error.
    """
    check_exportable(model)
    patched: list[tuple[nn.Module, str]] = []
    planed: list[nn.Module] = []
    try:
        for name in table_scopes(model):
            m = model.get_submodule(name)
            verb, fn = ("forward", _head_forward) if isinstance(m, FactorizedLMHead) else ("lookup", _table_lookup)
            setattr(m, verb, types.MethodType(fn, m))
            patched.append((m, verb))
        # int-k tables are written as the 4-bit planes a tied head multiplies (same bytes as their packing); the
        # packed buffer, unused by the graph, is then not written
        for m in model.modules():
            if planes_ready(m):
                low, high = intk_planes(m)
                m.register_buffer("onnx_low", low)
                if high is not None:  # (a None buffer breaks the tracer)
                    m.register_buffer("onnx_high", high)
                planed.append(m)
        yield table_scopes(model)
    finally:
        for m, verb in patched:
            m.__dict__.pop(verb, None)
        for m in planed:
            m._buffers.pop("onnx_low", None)
            m._buffers.pop("onnx_high", None)


def table_scopes(model: nn.Module) -> list[str]:
    """Module names of the model's storage formats and tied heads (the scopes of their nodes in a traced graph)."""
    return [name for name, m in model.named_modules() if isinstance(m, FactorizedLMHead) or is_row_format(m)]


def trace_to_onnx(model: nn.Module, module: nn.Module, args: tuple, *, opset: int, input_names: list[str],
                  output_names: list[str], dynamic_axes: dict[str, dict[int, str]]) -> object:
    """The TorchScript export both exports use (an ``onnx.ModelProto``): ``module`` (a wrapper of ``model``) traced
    on ``args`` with the tables computing from their stored tensors (:func:`traceable_tables`), ``--rest int4``
    Linears as MatMulNBits, eager attention (SDPA decides on masks with Python branches a trace would freeze) and no
    constant folding (it would decode a tied head's table into a dense float initializer)."""
    import io
    import warnings

    import onnx

    from embfactor.export.nbits import NBITS_DOMAIN, matmul_nbits, nbits_weight_shapes

    buf = io.BytesIO()
    attn = getattr(model.config, "_attn_implementation", None)
    switch = attn not in (None, "eager") and hasattr(model, "set_attn_implementation")
    with traceable_tables(model), matmul_nbits(model) as nbits, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about Python values it records as constants
        if switch:
            model.set_attn_implementation("eager")
        try:
            torch.onnx.export(module, args, buf, dynamo=False, opset_version=opset, input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=False,
                              custom_opsets={NBITS_DOMAIN: 1} if nbits else None)
        finally:
            if switch:
                model.set_attn_implementation(attn)
    proto = onnx.load_from_string(buf.getvalue())
    nbits_weight_shapes(proto)
    return proto
