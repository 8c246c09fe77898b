"""The tied head of every format at generation (1-8 rows) and prefill (> 16 rows) sizes, and its C kernels
against their PyTorch references (the paths a machine without a compiler takes)."""

from __future__ import annotations

import shutil

import pytest
import torch

from embfactor.decomposition.codebook import product_quantize, residual_quantize
from embfactor.decomposition.intk import int_quantize
from embfactor.formats import FactorizedEmbedding, TieredFormat, _lut_kernel, available_formats
from embfactor.formats.codebook import _LUT_MAX_BATCH, CodebookEmbedding
from embfactor.formats.intk import _FUSED_MAX_BATCH, IntKEmbedding
from embfactor.quant import KBITS, dequantize_groups
from tests.conftest import decaying_matrix
from tests.test_formats import build

N, D, PAD = 300, 40, 3
# batch rows that take each path: the batch-1 kernels, the fused/LUT kernels up to 8 and 16, the GEMM paths above
BATCHES = (1, 5, _FUSED_MAX_BATCH, _LUT_MAX_BATCH, 40)
HAS_CC = bool(shutil.which("cc") or shutil.which("gcc"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error (absolute against an all-zero reference: a ZeroRows table's logits)."""
    return float((a.double() - b.double()).norm() / max(float(b.norm()), 1.0))


@pytest.fixture(params=[False, True], ids=["kernels", "no-kernels"])
def kernels(request, monkeypatch):
    """Run a test with the compiled kernels and again without them (the PyTorch fallbacks)."""
    if request.param:
        monkeypatch.setattr(_lut_kernel, "lut_kernel", lambda: None)
    elif HAS_CC:
        assert _lut_kernel.lut_kernel() is not None  # a compiler is here: the kernels must really build
    return not request.param


@pytest.mark.parametrize("name", available_formats())
def test_every_format_head_equals_h_times_dense_transpose(name, kernels):
    E = decaying_matrix(N, D, seed=2)
    fmt = build(name, E, PAD)
    dense = fmt.dense().detach().double()
    for B in BATCHES:
        h = torch.randn(B, D, generator=torch.Generator().manual_seed(B))
        with torch.no_grad():
            got = fmt.project(h)
        ref = (h.double() @ dense.T).float()
        assert got.shape == (B, N) and got.dtype == torch.float32
        assert _rel(got, ref) < 1e-4, (name, B)


def _intk(bits: int, group: int | None, symmetric: bool, d: int = D) -> IntKEmbedding:
    E = decaying_matrix(N, d, seed=bits)
    return IntKEmbedding.from_factors(int_quantize(E, bits=bits, group=group, symmetric=symmetric), padding_idx=PAD)


@pytest.mark.skipif(not HAS_CC, reason="no C compiler: the kernel cannot be built")
@pytest.mark.parametrize("bits", KBITS)
@pytest.mark.parametrize("group,symmetric,d", [(16, True, 48), (32, False, 64), (None, True, 20), (None, False, 37)])
def test_intk_kernel_rows_and_logits_match_torch(bits, group, symmetric, d):
    emb = _intk(bits, group, symmetric, d)
    ref_rows = dequantize_groups(emb.packed, emb.scale, emb.lo, bits=bits, cols=d, group=group).detach()
    rows = torch.empty(N - 7, d)
    assert _lut_kernel.intk_dequant(emb.packed, emb.scale, emb.lo, bits=bits, group=group, d=d, r0=7, r1=N,
                                    out=rows)
    # the same float operations as PyTorch's (an asymmetric q·s + lo may be fused into one rounding)
    torch.testing.assert_close(rows, ref_rows[7:], rtol=0, atol=0 if symmetric else 1e-6)
    for B in (1, 3, 8):
        h = torch.randn(B, d, generator=torch.Generator().manual_seed(B))
        out = torch.full((B, N), float("nan"))
        assert _lut_kernel.intk_project(emb.packed, emb.scale, emb.lo, bits=bits, group=group, hidden=h, out=out)
        assert _rel(out, h @ ref_rows.T) < 1e-5
        with torch.no_grad():
            assert _rel(emb.project(h), emb._project_torch(h)) < 1e-5


@pytest.mark.skipif(not HAS_CC, reason="no C compiler: the kernel cannot be built")
def test_kernels_scatter_to_given_columns_and_split_rows_across_threads(monkeypatch):
    monkeypatch.setattr(_lut_kernel, "_MIN_ROWS_PER_THREAD", 16)  # several threads even on this small table
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    emb = _intk(5, 32, True, 64)
    cb = CodebookEmbedding.from_factors(product_quantize(decaying_matrix(N, 64, seed=4), sub_dim=4, K=16))
    cols = torch.randperm(2 * N, generator=torch.Generator().manual_seed(0))[:N].contiguous()
    for fmt in (emb, cb):
        for B in (1, 6, 20):
            h = torch.randn(B, 64, generator=torch.Generator().manual_seed(B))
            out = torch.zeros(B, 2 * N)
            with torch.no_grad():
                fmt.project_into(h, out, cols)
                ref = fmt.project(h)
            torch.testing.assert_close(out[:, cols], ref, rtol=1e-5, atol=1e-5)
            untouched = torch.ones(2 * N, dtype=torch.bool)
            untouched[cols] = False
            assert torch.count_nonzero(out[:, untouched]) == 0  # nothing written outside the given columns


def test_tiered_head_in_token_order_with_kernel_tiers(kernels):
    """A planner-like table (int8 + int5 + PQ tiers, plus a low-rank tier without a kernel) over shuffled tokens."""
    E = decaying_matrix(N, 48, seed=5)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    position = torch.empty_like(order)
    position[order] = torch.arange(N)
    cut = [0, 20, 120, 260, N]
    parts = [E[order[cut[i] : cut[i + 1]]] for i in range(4)]
    tiers = [
        IntKEmbedding.from_factors(int_quantize(parts[0], bits=8, group=16)),
        IntKEmbedding.from_factors(int_quantize(parts[1], bits=5, group=16)),
        CodebookEmbedding.from_factors(residual_quantize(parts[2], sub_dim=3, K=16, stages=2, row_scale=True)),
        FactorizedEmbedding(cut[4] - cut[3], 48, rank=4),
    ]
    fmt = TieredFormat(tiers, position, padding_idx=PAD)
    dense = fmt.dense().detach()
    for B in BATCHES:
        h = torch.randn(B, 48, generator=torch.Generator().manual_seed(B))
        with torch.no_grad():
            got = fmt.project(h)
        assert _rel(got, h @ dense.T) < 1e-4
        assert torch.count_nonzero(got[:, PAD]) == 0


def test_head_in_bfloat16_returns_bfloat16_close_to_float32(kernels):
    fmt = TieredFormat([_intk(5, 32, True, 64), CodebookEmbedding.from_factors(
        product_quantize(decaying_matrix(N, 64, seed=6), sub_dim=4, K=16))])
    for B in (4, 40):  # the kernels in float32; at prefill sizes a bf16 GEMM
        h = torch.randn(B, 64)
        with torch.no_grad():
            got, ref = fmt.project(h.bfloat16()), fmt.project(h.bfloat16().float())
        assert got.dtype == torch.bfloat16
        assert _rel(got.float(), ref) < 1e-2


def test_training_keeps_the_differentiable_path():
    emb = _intk(4, 16, False)
    h = torch.randn(3, D, requires_grad=True)
    emb.project(h).square().sum().backward()
    assert h.grad is not None and emb.scale.grad is not None and emb.lo.grad is not None


def test_forward_and_head_under_torch_compile():
    """Dynamo traces the formats' PyTorch path (the C kernels step aside while compiling); every id is checked."""
    fmt = TieredFormat([_intk(5, 32, True, 64), CodebookEmbedding.from_factors(
        product_quantize(decaying_matrix(N, 64, seed=7), sub_dim=4, K=16))], padding_idx=PAD)
    ids, h = torch.arange(2 * N).view(2, N), torch.randn(3, 64)
    torch._dynamo.reset()
    with torch.no_grad():
        rows, logits = torch.compile(fmt, backend="eager")(ids), torch.compile(fmt.project, backend="eager")(h)
        torch.testing.assert_close(rows, fmt(ids))
        torch.testing.assert_close(logits, fmt.project(h))


@pytest.mark.skipif(not HAS_CC, reason="no C compiler: the PyTorch path is the only one")
@pytest.mark.parametrize("codebook_dtype", ["float16", "int8"])
def test_small_batch_pq_head_is_the_two_c_kernels_and_equals_the_reference(monkeypatch, codebook_dtype):
    """The batch-1 head of a PQ table is the C LUT build and the C LUT sum, nothing else (issue 30: the PyTorch
    lookup tables' small parallel ops made it 1.8x instead of 2.7x faster than the dense head at 2 threads)."""
    cb = CodebookEmbedding.from_factors(product_quantize(decaying_matrix(N, 64, seed=4), sub_dim=4, K=16,
                                                         codebook_dtype=codebook_dtype))
    h = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        monkeypatch.setattr(_lut_kernel, "lut_kernel", lambda: None)
        ref = cb.project(h)
        monkeypatch.undo()
    calls = []
    for name in ("lut_build", "lut_sum", "lut_sum_batch"):
        real = getattr(_lut_kernel, name)
        monkeypatch.setattr(_lut_kernel, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))

    def refused(*a, **k):
        raise AssertionError("the PyTorch lookup tables ran on the kernel path")

    monkeypatch.setattr(CodebookEmbedding, "lookup_tables", refused)
    with torch.no_grad():
        got = cb.project(h)
        assert calls == ["lut_build", "lut_sum"]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        calls.clear()
        h8 = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
        cb.project(h8)
        assert calls == ["lut_build", "lut_sum_batch"]
        # the float codebooks kept between calls follow a change of the stored ones
        cb.codebooks.mul_(2) if codebook_dtype == "float16" else cb.codebook_scale.mul_(2)
        torch.testing.assert_close(cb.project(h), 2 * got, rtol=1e-4, atol=1e-4)
