"""Dense int-k quantization of an embedding table (``int``): the baseline every compressed format is compared with.

Each row is cut into groups of ``group`` columns (or one group per row); each group stores k-bit integers,
packed 8 values into k bytes, and an fp16 scale (plus an fp16 minimum when asymmetric): see
:func:`embfactor.quant.quantize_groups`. int4 per group of 32 stores 18 bytes per 32 values (7.1x fewer than fp32).

Why not a library: torchao's int-k layouts (``IntxWeightOnlyConfig``, uintx) target Linear weights and are not
installed here; bitsandbytes on CPU offers 8-bit and 4-bit (nf4/fp4) only, not 2/3/5/6 bits; faiss's
ScalarQuantizer has 4/6/8-bit codes with one range per *dimension* (not per row or group) and no 2/3/5 bits.
The packing here is ~40 lines of tensor code, vectorized, with exact byte counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from embfactor.decomposition._common import HESSIAN_DAMP, in_row_blocks, inverse_cholesky
from embfactor.decomposition.factors import _BLOCK_ROWS, Factors
from embfactor.decomposition.registry import register_method
from embfactor.errors import ConfigError, InvalidInputError
from embfactor.quant import (
    KBITS,
    QUANT_BLOCK_ROWS,
    check_kbits,
    dequantize_groups,
    grouped_bytes,
    pack_bits,
    quantize_groups,
)

GROUPS = (None, 16, 32, 64, 128)


@dataclass
class IntFactors(Factors):
    """A dense table stored as packed k-bit integers per group, with fp16 scales (and minima if asymmetric).

    ``U``/``V`` are empty placeholders (vocab × 0, 0 × d) that carry the shape.

    Example:
        >>> f = int_quantize(torch.randn(100, 64), bits=4, group=32)
        >>> f.packed.shape, f.scale.shape, f.num_bytes
        (torch.Size([100, 32]), torch.Size([100, 2]), 3600)
    """

    packed: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))
    scale: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float16))
    lo: torch.Tensor | None = None
    bits: int = 8
    group: int | None = None

    @property
    def symmetric(self) -> bool:
        return self.lo is None

    @property
    def rank(self) -> int:
        """No rank: 0 (the size is in ``num_bytes``)."""
        return 0

    @property
    def num_params(self) -> int:
        """Stored entries (packed bytes, scales, minima), as the format module counts them."""
        return sum(t.numel() for t in (self.packed, self.scale, self.lo) if t is not None)

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.lo) if t is not None)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        lo = None if self.lo is None else self.lo[start:stop]
        return dequantize_groups(self.packed[start:stop], self.scale[start:stop], lo, bits=self.bits,
                                 cols=self.shape[1], group=self.group)

    def reconstruct(self) -> torch.Tensor:
        return torch.cat([self.rows(s, s + _BLOCK_ROWS) for s in range(0, self.shape[0], _BLOCK_ROWS)])

    def relative_error(self, E: torch.Tensor) -> float:
        num = den = 0.0
        for s in range(0, E.shape[0], _BLOCK_ROWS):
            e = E[s : s + _BLOCK_ROWS].double()
            num += float((e - self.rows(s, s + _BLOCK_ROWS).double()).pow(2).sum())
            den += float(e.pow(2).sum())
        return (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))

    def to(self, dtype: torch.dtype) -> IntFactors:
        return IntFactors(self.U.to(dtype), self.V.to(dtype), self.method, None, dict(self.meta), packed=self.packed,
                          scale=self.scale, lo=self.lo, bits=self.bits, group=self.group)


def int_quantize(E: torch.Tensor, *, bits: int = 4, group: int | None = 32, symmetric: bool = True) -> IntFactors:
    """Quantize E (vocab × d) to packed int-k per group of columns (group=None: per row).

    Args:
        bits: 2, 3, 4, 5, 6 or 8.
        group: 16, 32, 64, 128 columns, or None for one group per row (d is zero-padded to a multiple).
        symmetric: absmax scale only (True) or scale + minimum (False, one more fp16 per group).

    Example:
        >>> int_quantize(torch.randn(10, 64), bits=8, group=None).relative_error(torch.randn(10, 64)) > 0
        True
    """
    if E.ndim != 2:
        raise InvalidInputError(f"E must be a 2-D (vocab × d) table, got shape {tuple(E.shape)}")
    bits = check_kbits(bits)
    if group not in GROUPS:
        raise ConfigError(f"group must be one of {GROUPS} (None: per row), got {group!r}")
    if not isinstance(symmetric, bool):
        raise ConfigError(f"symmetric must be True or False, got {symmetric!r}")
    packed, scale, lo = quantize_groups(E, bits, group, symmetric=symmetric)  # in blocks of rows (bounded memory)
    n, d = E.shape
    meta = {"bits": bits, "group": group, "symmetric": symmetric}
    return IntFactors(torch.empty(n, 0, dtype=E.dtype), torch.empty(0, d, dtype=E.dtype), "int", None, meta,
                      packed=packed, scale=scale, lo=lo, bits=bits, group=group)


# Rows rounded at once by :func:`hessian_round` (rows are independent; a 16,384 × 576 float32 block is 38 MB).
_HESSIAN_ROWS = 16384


def hessian_round(E: torch.Tensor, H: torch.Tensor, *, bits: int = 4, group: int | None = 32,
                  damp: float = HESSIAN_DAMP) -> IntFactors:
    """Symmetric int-k per group of E, rounded to keep ``x @ E.T`` for inputs x of second moment ``H`` (GPTQ-style).

    A tied head computes logits ``h @ E.T``: a row's logit error under hidden state h is ``hᵀ(Eᵢ − Êᵢ)``, so the
    error that matters is ``(Eᵢ − Êᵢ) H (Eᵢ − Êᵢ)ᵀ`` with ``H = E[h hᵀ]`` over the head's inputs, not the plain
    squared error. The columns are rounded in order; each column's rounding error is fed forward to the columns
    not yet rounded through the upper Cholesky factor of ``H⁻¹`` (Frantar et al. 2022, GPTQ), and each group's
    absmax scale is taken from its values as updated when the group starts. The result has the bytes and layout of
    :func:`int_quantize` (the same reader); with ``H`` = identity it *is* :func:`int_quantize`'s rounding.
    Measured on SmolLM2's tied table (frontier-probes.md): int4 g32 KL 0.150 -> 0.070, int3 g32 0.728 -> 0.371.

    Args:
        E: the (vocab × d) table.
        H: (d × d) symmetric positive semi-definite second moment of the head's inputs.
        bits, group: as :func:`int_quantize` (symmetric scales only).
        damp: added to H's diagonal as a share of its mean diagonal (keeps the Cholesky factor finite).

    Example:
        >>> E = torch.randn(50, 64)
        >>> a, b = hessian_round(E, torch.eye(64), bits=4), int_quantize(E, bits=4)
        >>> torch.equal(a.packed, b.packed) and torch.equal(a.scale, b.scale)
        True
    """
    if E.ndim != 2:
        raise InvalidInputError(f"E must be a 2-D (vocab × d) table, got shape {tuple(E.shape)}")
    n, d = E.shape
    if tuple(H.shape) != (d, d):
        raise InvalidInputError(f"H must be {d} × {d} (the table's width), got shape {tuple(H.shape)}")
    bits = check_kbits(bits)
    if group not in GROUPS:
        raise ConfigError(f"group must be one of {GROUPS} (None: per row), got {group!r}")
    g = group or d
    dp = -(-d // g) * g  # padded columns are zeros: they round to 0 with no error
    U = inverse_cholesky(H, dp, damp=damp)
    qmax = (1 << (bits - 1)) - 1
    tiny = torch.finfo(torch.float16).tiny
    block = max(128 // g, 1) * g  # columns updated lazily together; a group never straddles two blocks
    codes = torch.empty(n, dp, dtype=torch.uint8)
    scales = torch.empty(n, dp // g, dtype=torch.float16)

    def rows_from(r0: int, r1: int) -> None:  # rows r0..r1-1 into codes and scales (rows are independent)
        # columns as rows (d × rows, contiguous): each step reads and updates whole columns
        wT = torch.nn.functional.pad(E[r0:r1].detach().float(), (0, dp - d)).T.contiguous()
        rows = wT.shape[1]
        codesT = torch.empty(dp, rows, dtype=torch.uint8)
        for b0 in range(0, dp, block):
            b1 = min(b0 + block, dp)
            wb, ub = wT[b0:b1], U[b0:b1, b0:b1]
            errs = torch.empty_like(wb)
            for i in range(b1 - b0):
                c = b0 + i
                if c % g == 0:
                    sc = (wb[i:i + g].abs().amax(0) / qmax).clamp_min(tiny).half()
                    scales[r0:r0 + rows, c // g] = sc
                    sf = sc.float()
                q = torch.round(wb[i] / sf).clamp_(-qmax, qmax)
                codesT[c] = (q + qmax).to(torch.uint8)
                torch.div(wb[i] - q * sf, ub[i, i], out=errs[i])
                wb[i + 1:].addr_(ub[i, i + 1:], errs[i], alpha=-1)
            wT[b1:].addmm_(U[b0:b1, b1:].T, errs, alpha=-1)
        codes[r0:r0 + rows] = codesT.T

    in_row_blocks(rows_from, n, _HESSIAN_ROWS)  # blocks side by side, one torch thread each
    packed = torch.cat([pack_bits(codes[s:s + QUANT_BLOCK_ROWS], bits) for s in range(0, n, QUANT_BLOCK_ROWS)])
    meta = {"bits": bits, "group": group, "symmetric": True, "rounding": "hessian"}
    return IntFactors(torch.empty(n, 0, dtype=E.dtype), torch.empty(0, d, dtype=E.dtype), "int", None, meta,
                      packed=packed, scale=scales, lo=None, bits=bits, group=group)


def int_settings(vocab: int, d: int, **fixed: Any) -> list[tuple[int, dict[str, Any]]]:
    """Every (bytes, settings) :func:`plan_int` chooses among.

    Example:
        >>> int_settings(30522, 384, bits=4, group=32)
        [(6592752, {'bits': 4, 'group': 32, 'symmetric': True})]
    """
    sym = fixed.get("symmetric", True)
    bits_c = [fixed["bits"]] if fixed.get("bits") is not None else KBITS
    groups_c = [fixed["group"]] if "group" in fixed else GROUPS
    return [(grouped_bytes(vocab, d, b, g, symmetric=sym), {"bits": b, "group": g, "symmetric": sym})
            for b in bits_c for g in groups_c]


def plan_int(vocab: int, d: int, budget_bytes: float, **fixed: Any) -> dict[str, Any]:
    """The (bits, group) with the most bytes within ``budget_bytes`` (at equal bytes: more bits).

    Example:
        >>> plan_int(30522, 384, 30522 * 384 * 4 / 6)     # 6x fewer bytes than fp32
        {'bits': 5, 'group': 64, 'symmetric': True}
    """
    cands = int_settings(vocab, d, **fixed)
    fits = [c for c in cands if c[0] <= budget_bytes]
    if not fits:
        smallest = min(c[0] for c in cands)
        raise ConfigError(
            f"no int-k setting fits {budget_bytes:,.0f} bytes for a {vocab} × {d} table; the smallest takes "
            f"{smallest:,} bytes ({vocab * d * 4 / smallest:.1f}x fewer than fp32)"
        )
    # most bytes first; at equal bytes, more bits beat finer groups (int4 g64 > int3 g16 measured on MiniLM)
    return max(fits, key=lambda c: (c[0], c[1]["bits"]))[1]


def int_stored_bytes(vocab: int, d: int, options: Mapping[str, Any]) -> int:
    """Bytes ``int`` stores with explicit ``bits`` (``group`` default 32, as :func:`int_method` uses it).

    Example:
        >>> int_stored_bytes(100, 64, {"bits": 4}) == grouped_bytes(100, 64, 4, 32)
        True
    """
    group = options.get("group", "auto")
    group = 32 if group == "auto" else group
    if group not in GROUPS:
        raise ConfigError(f"group must be one of {GROUPS} (None: per row), got {group!r}")
    return grouped_bytes(vocab, d, check_kbits(options["bits"]), group, symmetric=options.get("symmetric", True))


@register_method("int", description="dense int-k (k = 2..8) per row or per group, packed, fp16 scales",
                 size_options=("bits",), stored_bytes=int_stored_bytes)
def int_method(
    E: torch.Tensor, rank: int | None = None, *, seed: int = 0, progress: bool = False,
    budget_bytes: float | None = None, token_weights: Any = None, bits: int | None = None,
    group: int | None | str = "auto", symmetric: bool = True, hessian: torch.Tensor | None = None,
) -> IntFactors:
    """Registered ``int``: explicit ``bits`` (``group`` default 32; None = per row), else the setting that fits.

    Explicit ``bits`` fix the size: no target is needed, and a target given with them is checked to allow their
    bytes (:func:`embfactor.decomposition.registry.check_explicit_size`). ``rank`` is read as a budget, the fp32
    bytes of a rank-r U·V (as pq/rvq read it). ``token_weights`` are accepted and unused (uniform rounding serves
    every row alike), so sweeps can pass them to every method. ``hessian``: the (d × d) second moment of a tied
    head's inputs; given, the table is rounded in the head's metric (:func:`hessian_round`, same bytes).
    """
    if bits is None and (budget_bytes is not None or rank is not None):
        budget = budget_bytes if budget_bytes is not None else 4.0 * rank * (E.shape[0] + E.shape[1])
        fixed: dict[str, Any] = {"symmetric": symmetric}
        if group != "auto":
            fixed["group"] = group
        plan = plan_int(E.shape[0], E.shape[1], budget, **fixed)
        bits, group = plan["bits"], plan["group"]
    bits, group = 4 if bits is None else bits, 32 if group == "auto" else group
    if hessian is not None:
        if not symmetric:
            raise ConfigError("rounding in the head's metric (hessian=...) stores symmetric scales: symmetric=True")
        return hessian_round(E, hessian, bits=bits, group=group)
    return int_quantize(E, bits=bits, group=group, symmetric=symmetric)
