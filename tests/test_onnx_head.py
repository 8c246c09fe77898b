"""A tied head in ONNX: MatMulNBits over the stored integers, PyTorch's logits, and no float table in the session.

Each table format the planner builds (int-k of every width, symmetric or not, any group; int8 codebooks of odd and
even sub-space widths, several stages, rotation, row scales, int16 codes; tiered tables with zero tiers and a zeroed
padding row) is exported as a tied head alone, run in ONNX Runtime on hidden states of other batch and sequence sizes
than the trace's, and compared with the format's own ``project``. The session ONNX Runtime builds (after its
constant folding, saved with ``optimized_model_filepath``) must hold no float tensor of the table's size: what made
the session hold the table in float32 before.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import onnx

from embfactor.decomposition import decompose
from embfactor.export.graph import traceable_tables
from embfactor.export.head import nbits_head_formats, nbits_head_ready
from embfactor.formats import TieredFormat, ZeroRows
from embfactor.formats.base import from_factors
from embfactor.layers.head import FactorizedLMHead

VOCAB, D = 300, 64


def _table(seed: int = 0) -> torch.Tensor:
    return torch.randn(VOCAB, D, generator=torch.Generator().manual_seed(seed))


def _intk(bits: int, group: int | None, symmetric: bool) -> torch.nn.Module:
    return from_factors(decompose(_table(), method="int", bits=bits, group=group, symmetric=symmetric))


def _pq(**kw) -> torch.nn.Module:
    return from_factors(decompose(_table(), method="pq" if kw.get("stages", 1) == 1 else "rvq", codebook_dtype="int8",
                                  **kw))


def _tiered() -> torch.nn.Module:
    E = _table(1)
    tier_of = torch.arange(VOCAB) % 4
    ids = [torch.nonzero(tier_of == t).squeeze(1) for t in range(4)]
    position = torch.empty(VOCAB, dtype=torch.long)
    position[torch.cat(ids)] = torch.arange(VOCAB)
    tiers = [
        from_factors(decompose(E[ids[0]], method="int", bits=8, group=32)),
        from_factors(decompose(E[ids[1]], method="int", bits=5, group=32)),
        from_factors(decompose(E[ids[2]], method="pq", sub_dim=3, K=16, codebook_dtype="int8")),
        ZeroRows(len(ids[3]), D),
    ]
    return TieredFormat(tiers, position, padding_idx=0, compact_index=True, index_bits=2, zero_padding=True)


CASES = {
    **{f"int{b}-g32-sym": (lambda b=b: _intk(b, 32, True)) for b in (2, 3, 4, 5, 6, 8)},
    **{f"int{b}-g16-asym": (lambda b=b: _intk(b, 16, False)) for b in (3, 4, 5, 8)},
    "int6-row-sym": lambda: _intk(6, None, True),
    "int4-g64-asym": lambda: _intk(4, 64, False),
    "pq-sub3": lambda: _pq(sub_dim=3, K=16),  # odd sub-spaces; 22·3 = 66 > 64 columns
    "pq-sub4-K300": lambda: _pq(sub_dim=4, K=300),  # int16 codes
    "rvq-rotation-rowscale": lambda: _pq(sub_dim=8, K=8, stages=2, rotation="random", row_scale=True),
    "tiered": _tiered,
}


class _Head(torch.nn.Module):
    def __init__(self, fmt: torch.nn.Module) -> None:
        super().__init__()
        self.embedding = fmt
        self.head = FactorizedLMHead(fmt)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)


def _export(fmt: torch.nn.Module, path) -> onnx.ModelProto:
    from embfactor.export.nbits import NBITS_DOMAIN

    model = _Head(fmt).eval()
    with traceable_tables(model), torch.no_grad():
        torch.onnx.export(model, (torch.randn(2, 3, D),), str(path), dynamo=False, opset_version=18,
                          input_names=["hidden"], output_names=["logits"], do_constant_folding=False,
                          dynamic_axes={"hidden": {0: "b", 1: "t"}, "logits": {0: "b", 1: "t"}},
                          custom_opsets={NBITS_DOMAIN: 1})
    return onnx.load(str(path))


@pytest.mark.parametrize("case", list(CASES))
def test_head_logits_equal_pytorch_and_the_session_holds_no_float_table(tmp_path, case):
    fmt = CASES[case]().eval()
    proto = _export(fmt, tmp_path / "head.onnx")
    tiers = fmt.tiers if isinstance(fmt, TieredFormat) else [fmt]
    ready = [t for t in tiers if nbits_head_ready(t)]
    assert ready, "every case has a tier the 4-bit head serves"
    assert len(nbits_head_formats(fmt)) == len(ready)
    assert any(n.op_type == "MatMulNBits" for n in proto.graph.node)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    sess = ort.InferenceSession(str(tmp_path / "head.onnx"), so, providers=["CPUExecutionProvider"])
    for shape in ((1, 1, D), (3, 5, D)):
        h = torch.randn(*shape)
        with torch.no_grad():
            want = fmt.project(h).numpy()
        got = sess.run(None, {"hidden": h.numpy()})[0]
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), case
    if isinstance(fmt, TieredFormat):
        assert np.all(got[..., 0] == 0)  # the zeroed padding row
    folded = onnx.load(str(tmp_path / "optimized.onnx"))
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    big = [(t.name, list(t.dims)) for t in folded.graph.initializer
           if t.data_type in floats and int(np.prod(t.dims)) >= max(r.num_embeddings for r in ready) * D]
    assert not big, f"the session holds float tables: {big}"
