"""The GGUF loader gives, for every architecture transformers reads from GGUF, exactly the model that
``from_pretrained(..., gguf_file=...)`` gives, through its own loop (never the fallback).

Each case is a tiny random model written as llama.cpp would (tests/gguf_models.py), in float32 and with quantized
tensors. The fast loop runs transformers' own per-tensor code, so the weights must be bit for bit the same; the
logits of a prompt too, and close to the source model's (the writer inverted each transform right).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from embfactor import gguf_file, gguf_loader
from embfactor.gguf_loader import load_gguf_causal_lm
from tests.gguf_models import (
    ARCHITECTURES,
    assert_same_weights,
    tiny_model,
    tiny_qwen35,
    write_gguf,
    write_qwen35_gguf,
)

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
    assert_same_weights(ours, ref)
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


@pytest.mark.parametrize("moe", [False, True], ids=["qwen35", "qwen35moe"])
@pytest.mark.parametrize("quantized", [False, True], ids=["f32", "q8_0-q4_0"])
def test_qwen35_equals_transformers(tmp_path, moe, quantized, no_fallback, monkeypatch):
    # transformers' newer GGUF path: norms offset by one but ssm_norm, -exp(A_log), value heads tiled (rows
    # reordered, out_proj's columns too), the experts' gate and up concatenated
    source = tiny_qwen35(moe=moe, tie_word_embeddings=False)
    types = {"weight": Q.Q8_0, "exps.weight": Q.Q4_0} if quantized else None
    path = write_qwen35_gguf(tmp_path / "qwen35.gguf", source, types)
    monkeypatch.setattr(gguf_file, "CHUNK_ELEMENTS", 200)
    ours = load_gguf_causal_lm(path)
    assert_same_model(ours, transformers_load(path))
    if not quantized:
        with torch.no_grad():
            assert torch.allclose(ours(PROMPT).logits, source(PROMPT).logits, atol=1e-5)


def test_a_falcon_or_bloom_head_of_its_own_stays_untied(tmp_path, no_fallback):
    # transformers' config ties these two architectures whatever the file holds; from_pretrained then keeps a head
    # present in the file and different from the embedding apart (with a warning), and so must the fast path
    for arch in ("falcon", "bloom"):
        source = tiny_model(arch, tied=False)
        path = write_gguf(tmp_path / f"{arch}.gguf", source, arch)
        ours = load_gguf_causal_lm(path)
        assert ours.config.tie_word_embeddings and not _tied(ours)
        assert torch.equal(ours.get_output_embeddings().weight, source.get_output_embeddings().weight)
        assert_same_model(ours, transformers_load(path))


def test_a_head_written_equal_to_the_embedding_stays_a_tensor_of_its_own(tmp_path, no_fallback):
    # a file with output.weight equal to token_embd.weight: untied in the config (transformers reads
    # tie_word_embeddings from the absence of output.weight), so two tensors, as from_pretrained gives them
    source = tiny_model("qwen2", tied=False)
    with torch.no_grad():
        source.lm_head.weight.copy_(source.model.embed_tokens.weight)
    path = write_gguf(tmp_path / "same-head.gguf", source, "qwen2")
    ours = load_gguf_causal_lm(path)
    assert not _tied(ours) and torch.equal(ours.lm_head.weight, ours.model.embed_tokens.weight)
    assert_same_model(ours, transformers_load(path))


def test_a_gpt_oss_file_is_refused_naming_the_experts_transformers_would_draw_at_random(tmp_path, no_fallback):
    from embfactor.errors import CorruptFileError

    path = write_gguf(tmp_path / "gpt-oss.gguf", tiny_model("gpt-oss"), "gpt-oss")
    with pytest.raises(CorruptFileError, match=r"lacks 8 of the model's tensors \(model\.layers\.0\.mlp\.experts\.down_proj "
                                               r"\(blk\.0\.ffn_down_exps\)"):
        load_gguf_causal_lm(path)


def test_gguf_and_transformers_dequantize_alike():
    """The packed path dequantizes with transformers' torch code, this loader with gguf's numpy code: the same
    values, bit for bit, for every type the torch code knows (random blocks, scales kept finite)."""
    from transformers.integrations.gguf.dequant import GGML_BLOCK
    from transformers.integrations.gguf.dequant import dequantize as torch_dequantize

    rng = np.random.default_rng(0)
    for type_id, (block, size) in GGML_BLOCK.items():
        qtype = Q(type_id)
        raw = rng.integers(0, 256, size=(64, 4 * size), dtype=np.uint8) & 0x3B  # no f16 inf/nan in the scales
        ours = gguf.quants.dequantize(raw, qtype)
        theirs = torch_dequantize(torch.from_numpy(raw), type_id).reshape(64, 4 * block).numpy()
        assert ours.dtype == theirs.dtype == np.float32
        assert np.array_equal(ours, theirs), qtype.name


def test_a_conversion_this_loop_does_not_know_falls_back(tmp_path, monkeypatch, caplog):
    from transformers.integrations.gguf import gguf_conversion_mapping

    path = write_gguf(tmp_path / "lfm2.gguf", tiny_model("lfm2"), "lfm2")

    class Mystery(gguf_conversion_mapping.ConversionOps):
        def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
            raise AssertionError("not run by the fast path")

    real = gguf_conversion_mapping.GGUF_ARCHS["lfm2"]

    def with_mystery(config):
        mapping = real(config)
        mapping[-1].operations.append(Mystery())  # the conv kernel's Unsqueeze, then this
        return mapping

    monkeypatch.setitem(gguf_conversion_mapping.GGUF_ARCHS, "lfm2", with_mystery)
    calls = []
    monkeypatch.setattr(gguf_loader, "_load_with_transformers", lambda p: calls.append(p) or "transformers' model")
    with caplog.at_level(logging.INFO, logger="embfactor.gguf_loader"):
        assert load_gguf_causal_lm(path) == "transformers' model"
    assert calls == [path]
    assert "converts 'blk.0.shortconv.conv.weight' with Mystery, not reproduced here" in caplog.text


def test_an_unknown_processor_falls_back_with_the_reason(tmp_path, monkeypatch, caplog):
    from transformers import modeling_gguf_pytorch_utils as m

    class Elsewhere(m.TensorProcessor):
        pass

    path = write_gguf(tmp_path / "qwen2.gguf", tiny_model("qwen2"), "qwen2")
    monkeypatch.setitem(m.TENSOR_PROCESSORS, "qwen2", Elsewhere)
    monkeypatch.setattr(gguf_loader, "_load_with_transformers", lambda p: "transformers' model")
    with caplog.at_level(logging.INFO, logger="embfactor.gguf_loader"):
        assert load_gguf_causal_lm(path) == "transformers' model"
    assert "architecture 'qwen2' needs Elsewhere, which works across tensors" in caplog.text
