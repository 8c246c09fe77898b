"""IntKLinear: an ``nn.Linear`` whose weight is stored weight-only as k-bit integers with fp16 scales.

``--rest int8`` stores every Linear embfactor does not compress this way (one scale per output channel), and
``--rest int4`` with 4-bit integers, an fp16 scale and minimum per group of 32 input columns (the layout of
llama.cpp's Q4_1). The integers are :func:`embfactor.quant.quantize_groups`' (one row = one output channel), so the
bytes and the rounding are the dense int-k table format's. The forward dequantizes the weight in the input's dtype
and calls ``F.linear``: a weight of SmolLM2's is at most 1536 × 576, so this costs little next to the product.

The tensors keep the Linear's names where transformers' model code reads them: ``weight`` (the packed integers, a
uint8 buffer: some models test ``module.weight.dtype``, and T5 skips its cast for an integer weight, as for
bitsandbytes) and ``bias``; ``weight_scale`` and ``weight_min`` are new.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from embfactor.errors import ConfigError
from embfactor.quant import check_kbits, dequantize_groups, grouped_bytes, packed_width, quantize_groups

# the settings of each --rest integer width: (bits, group, symmetric)
REST_SETTINGS: dict[str, dict[str, Any]] = {
    "int8": {"bits": 8, "group": None, "symmetric": True},   # per output channel
    "int4": {"bits": 4, "group": 32, "symmetric": False},    # per 32 input columns, scale + minimum (Q4_1)
}


class IntKLinear(nn.Module):
    """A Linear layer storing its weight as packed k-bit integers per group (None: per output channel).

    Example:
        >>> lin = IntKLinear.from_linear(nn.Linear(64, 16), bits=8)
        >>> lin(torch.randn(2, 64)).shape, lin.num_bytes()
        (torch.Size([2, 16]), 1056)
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 8, group: int | None = None,
        symmetric: bool = True, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        self.bits = check_kbits(bits)
        if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 1):
            raise ConfigError(f"group must be a positive number of input columns or None (per channel), got {group!r}")
        self.in_features, self.out_features = in_features, out_features
        self.group, self.symmetric = group, bool(symmetric)
        g = group or in_features
        groups = -(-in_features // g)
        self.register_buffer("weight", torch.zeros(out_features, packed_width(groups * g, bits), dtype=torch.uint8,
                                                   device=device))
        self.weight_scale = nn.Parameter(torch.ones(out_features, groups, dtype=torch.float16, device=device))
        self.weight_min = None if symmetric else nn.Parameter(
            torch.zeros(out_features, groups, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, bits: int = 8, group: int | None = None,
                    symmetric: bool = True) -> IntKLinear:
        """Quantize ``linear``'s weight (one row per output channel); the bias is kept as it is (the same tensor)."""
        w = linear.weight.detach()
        new = cls(linear.in_features, linear.out_features, bias=False, bits=bits, group=group, symmetric=symmetric,
                  device="meta")
        packed, scale, lo = quantize_groups(w, bits, group, symmetric=symmetric)
        new.weight = packed
        new.weight_scale = nn.Parameter(scale, requires_grad=linear.weight.requires_grad)
        new.weight_min = None if lo is None else nn.Parameter(lo, requires_grad=linear.weight.requires_grad)
        new.bias = linear.bias
        return new

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out × in) weight the integers stand for, in ``dtype``."""
        return dequantize_groups(self.weight, self.weight_scale, self.weight_min, bits=self.bits,
                                 cols=self.in_features, group=self.group, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def num_bytes(self) -> int:
        """Bytes of the integers, scales and minima (the bias is counted with the rest of the model)."""
        return grouped_bytes(self.out_features, self.in_features, self.bits, self.group, symmetric=self.symmetric)

    def settings(self) -> dict[str, Any]:
        return {"bits": self.bits, "group": self.group, "symmetric": self.symmetric}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group={self.group}" + ("" if self.symmetric else ", symmetric=False"))
