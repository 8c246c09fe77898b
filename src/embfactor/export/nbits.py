"""``--rest int4`` Linears as ONNX Runtime's 4-bit block MatMul (``com.microsoft.MatMulNBits``), written from the
stored integers.

An :class:`~embfactor.layers.intk_linear.IntKLinear` of ``--rest int4`` holds 4-bit integers per group of 32 input
columns, packed low nibble first, with an fp16 scale and minimum per group: ``w = q·scale + min``. That is
MatMulNBits' block layout (``B``: N × blocks × 16 bytes, ``bits=4``, ``block_size=32``) with the default zero point 8
plus a correction, since MatMulNBits computes ``(q − 8)·scale``: ``w = (q − 8)·scale + (min + 8·scale)``, the
second term the input's per-group sums times a small matrix. The packed integers are used as they are (no
requantization); scales and minima stay fp16 in the file and are cast (and the correction computed) by small nodes ONNX
Runtime folds when it loads, so the file holds the safetensors' bytes. A Linear whose width is not a multiple of
its group keeps the traced dequantization.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from embfactor.layers.intk_linear import IntKLinear

NBITS_DOMAIN = "com.microsoft"


class _MatMulNBits(torch.autograd.Function):
    """PyTorch computes the dequantized product; the ONNX symbolic is one MatMulNBits node (+ bias Add)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor,
                bias: torch.Tensor | None, module: IntKLinear) -> torch.Tensor:
        return module._plain_forward(x)

    @staticmethod
    def symbolic(g: Any, x: Any, packed: Any, scale: Any, lo: Any, bias: Any, module: IntKLinear) -> Any:
        from torch.onnx import TensorProtoDataType as T

        # B goes in as stored (N × packed bytes): :func:`nbits_weight_shapes` gives the initializer MatMulNBits'
        # N × blocks × bytes shape afterwards (the same bytes; a Reshape node here would cost nodes per Linear)
        # no zero-point input (MatMulNBits' default, 8): ONNX Runtime's fast prepacked kernel; a float zero point
        # made it dequantize the weight on every call (0.65 s per SmolLM2 token). The stored minimum is exact as
        # w = (q − 8)·scale + (min + 8·scale), the second term a product of the input's per-group sums with a
        # G × N matrix that ONNX Runtime folds at load (the file keeps the fp16 scales and minima)
        s = g.op("Cast", scale, to_i=T.FLOAT)
        m8 = g.op("Add", g.op("Cast", lo, to_i=T.FLOAT), g.op("Mul", s, g.op("Constant", value_t=torch.tensor(8.0))))
        y = g.op(f"{NBITS_DOMAIN}::MatMulNBits", x, packed, s,
                 K_i=module.in_features, N_i=module.out_features, bits_i=4, block_size_i=module.group)
        sums = group_sums(g, x, module.in_features // module.group, module.group)
        y = g.op("Add", y, g.op("MatMul", sums, g.op("Transpose", m8, perm_i=[1, 0])))
        y = set_last_dim(y, x, module.out_features)
        return y if module.bias is None else g.op("Add", y, bias)


def group_sums(g: Any, x: Any, groups: int, group: int) -> Any:
    """(..., groups·group) → (..., groups): the sums of each group of ``group`` consecutive columns (ONNX nodes)."""
    shape = g.op("Concat", g.op("Slice", g.op("Shape", x), g.op("Constant", value_t=torch.tensor([0])),
                                g.op("Constant", value_t=torch.tensor([-1]))),
                 g.op("Constant", value_t=torch.tensor([groups, group])), axis_i=0)
    return g.op("ReduceSum", g.op("Reshape", x, shape), g.op("Constant", value_t=torch.tensor([-1])), keepdims_i=0)


def set_last_dim(y: Any, x: Any, n: int) -> Any:
    """Give a custom op's output ``y`` the type of ``x`` with last dimension ``n`` (for the exporter's shape
    inference; best effort)."""
    with contextlib.suppress(Exception):
        sizes = x.type().varyingSizes()
        y.setType(x.type().with_sizes([*sizes[:-1], n]))
    return y


def nbits_weight_shapes(proto: Any) -> int:
    """Give each MatMulNBits' packed weight initializer the N × blocks × bytes shape it requires (in place)."""
    inits = {t.name: t for t in proto.graph.initializer}
    done = 0
    for n in proto.graph.node:
        if n.op_type != "MatMulNBits" or n.input[1] not in inits:
            continue
        attrs = {a.name: a.i for a in n.attribute}
        t = inits[n.input[1]]
        blob = attrs["block_size"] * attrs["bits"] // 8
        if len(t.dims) == 2:
            t.dims[:] = [attrs["N"], t.dims[1] // blob, blob]
            done += 1
    return done


def nbits_ready(m: IntKLinear) -> bool:
    """Whether MatMulNBits can carry this Linear's stored integers exactly (4 bits, asymmetric, a power-of-2 group
    of at least 16, no zero scale)."""
    g = m.group or 0
    return (m.bits == 4 and not m.symmetric and g >= 16 and g & (g - 1) == 0 and m.weight_min is not None
            and m.in_features % g == 0)


def _nbits_forward(self: IntKLinear, x: torch.Tensor) -> torch.Tensor:
    return _MatMulNBits.apply(x, self.weight, self.weight_scale, self.weight_min, self.bias, self)


@contextlib.contextmanager
def matmul_nbits(model: nn.Module) -> Iterator[list[str]]:
    """Within the block, every ``--rest int4`` Linear of ``model`` exports as MatMulNBits (yields their names)."""
    patched = []
    try:
        for name, m in model.named_modules():
            if isinstance(m, IntKLinear) and nbits_ready(m):
                m._plain_forward = types.MethodType(IntKLinear.forward, m)
                m.forward = types.MethodType(_nbits_forward, m)
                patched.append((name, m))
        yield [n for n, _ in patched]
    finally:
        for _, m in patched:
            m.__dict__.pop("forward", None)
            m.__dict__.pop("_plain_forward", None)
