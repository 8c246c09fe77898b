"""The GGUF loader gives, for every architecture transformers reads from GGUF, exactly the model that
``from_pretrained(..., gguf_file=...)`` gives, through its own loop (never the fallback).

Each case is a tiny random model written as llama.cpp would (tests/gguf_models.py), in float32 and with quantized
tensors. The fast loop runs transformers' own per-tensor code, so the weights must be bit for bit the same; the
logits of a prompt too, and close to the source model's (the writer inverted each transform right).
"""

from __future__ import annotations

import pytest
import torch

from embfactor import gguf_file, gguf_loader
from embfactor.gguf_loader import load_gguf_causal_lm
from tests.gguf_models import ARCHITECTURES, tiny_model, write_gguf

gguf = pytest.importorskip("gguf")

Q = gguf.GGMLQuantizationType
PROMPT = torch.tensor([[1, 17, 42, 99, 5, 64, 3, 110]])


@pytest.fixture
def no_fallback(monkeypatch):
    """Fail the test if the loader hands the file to transformers."""

    def refuse(path):
        raise AssertionError(f"{path} went through transformers' loader, not the fast path")

    monkeypatch.setattr(gguf_loader, "_load_with_transformers", refuse)


def transformers_load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype="float32", local_files_only=True
    ).eval()


def _tied(model) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def assert_same_model(ours, ref) -> None:
    """Same class, config, parameters and buffers bit for bit, same tying, same logits."""
    assert type(ours) is type(ref)
    a, b = ours.state_dict(), ref.state_dict()
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"differ from transformers' load: {different}"
    buffers, ref_buffers = dict(ours.named_buffers()), dict(ref.named_buffers())
    assert sorted(buffers) == sorted(ref_buffers)
    assert all(not t.is_meta and torch.equal(t, ref_buffers[k]) for k, t in buffers.items())
    assert not any(p.is_meta for p in ours.parameters())
    assert _tied(ours) == _tied(ref)
    assert all(p.is_contiguous() for p in ours.parameters())
    with torch.no_grad():
        # transformers leaves GPT-2's transposed weights in the transposed view's column-major layout (np.copy keeps
        # it), which changes the matmul's rounding; ours are contiguous. Same values, so the same layout must give
        # the same logits bit for bit.
        for p in ref.parameters():
            p.data = p.data.contiguous()
        assert torch.equal(ours(PROMPT).logits, ref(PROMPT).logits)
    assert not ours.training and ours.config.architectures == [type(ours).__name__]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_float32_equals_transformers_and_the_source(tmp_path, arch, no_fallback):
    source = tiny_model(arch)
    path = write_gguf(tmp_path / f"{arch}.gguf", source, arch)
    ours = load_gguf_causal_lm(path)
    assert_same_model(ours, transformers_load(path))
    with torch.no_grad():  # the writer did what llama.cpp does: the file is the source model
        assert torch.allclose(ours(PROMPT).logits, source(PROMPT).logits, atol=1e-4)


QUANTIZED = {"weight": Q.Q8_0, "ffn_down.weight": Q.Q4_0, "ffn_down_exps.weight": Q.Q4_0, "attn_v.weight": Q.F16,
             "output.weight": Q.Q4_1}


@pytest.mark.parametrize("arch", ["qwen2", "gemma3", "gpt2", "bloom", "qwen2moe", "mamba", "lfm2", "phi3"])
def test_quantized_equals_transformers(tmp_path, arch, no_fallback, monkeypatch):
    source = tiny_model(arch, tied=False) if arch not in ("mamba", "gpt2") else tiny_model(arch)
    path = write_gguf(tmp_path / f"{arch}-q.gguf", source, arch, QUANTIZED)
    assert {t.tensor_type for t in gguf_loader.open_gguf(path).tensors} >= {Q.Q8_0, Q.F32}
    monkeypatch.setattr(gguf_file, "CHUNK_ELEMENTS", 200)  # several chunks per tensor, even these small ones
    assert_same_model(load_gguf_causal_lm(path), transformers_load(path))
