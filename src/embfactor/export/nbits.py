"""``--rest int4`` Linears as ONNX Runtime's 4-bit block MatMul (``com.microsoft.MatMulNBits``), written from the
stored integers.

An :class:`~embfactor.layers.intk_linear.IntKLinear` of ``--rest int4`` holds 4-bit integers per group of 32 input
columns, packed low nibble first, with an fp16 scale and minimum per group: ``w = q·scale + min``. That is
MatMulNBits' block layout (``B``: N × blocks × 16 bytes, ``bits=4``, ``block_size=32``) with a float zero point
``zp = −min / scale``, since MatMulNBits computes ``(q − zp)·scale``. The packed integers are used as they are (no
requantization); scales and minima stay fp16 in the file and are cast (and ``zp`` computed) by small nodes ONNX
Runtime folds when it loads, so the file holds the safetensors' bytes. A group whose scale is 0 (all its values
equal) would divide by zero: such a Linear keeps the traced dequantization.
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
                bias: torch.Tensor | None, module: IntKLinear) -> torch.Tensor:  # noqa: ARG004
        return module._plain_forward(x)

    @staticmethod
    def symbolic(g: Any, x: Any, packed: Any, scale: Any, lo: Any, bias: Any, module: IntKLinear) -> Any:
        from torch.onnx import TensorProtoDataType as T  # noqa: N817

        flat = g.op("Constant", value_t=torch.tensor([-1], dtype=torch.int64))
        blocks = g.op("Constant", value_t=torch.tensor([module.out_features, -1, module.group // 2], dtype=torch.int64))
        s = g.op("Reshape", g.op("Cast", scale, to_i=T.FLOAT), flat)
        zp = g.op("Reshape", g.op("Neg", g.op("Div", g.op("Cast", lo, to_i=T.FLOAT), g.op("Cast", scale, to_i=T.FLOAT))),
                  flat)
        y = g.op(f"{NBITS_DOMAIN}::MatMulNBits", x, g.op("Reshape", packed, blocks), s, zp,
                 K_i=module.in_features, N_i=module.out_features, bits_i=4, block_size_i=module.group)
        return y if module.bias is None else g.op("Add", y, bias)


def nbits_ready(m: IntKLinear) -> bool:
    """Whether MatMulNBits can carry this Linear's stored integers exactly (4 bits, asymmetric, a power-of-2 group
    of at least 16, no zero scale)."""
    g = m.group or 0
    return (m.bits == 4 and not m.symmetric and g >= 16 and g & (g - 1) == 0 and m.weight_min is not None
            and bool((m.weight_scale != 0).all()))


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
