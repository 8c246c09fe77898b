"""Causal LMs exported with a KV cache: optimum's / transformers.js' layout, PyTorch's tokens, the table compressed.

Every causal architecture of the conformance suite (tests/test_conformance.py) is compressed tiny, exported with
``embfactor export --onnx`` and run in ONNX Runtime with its cache: the inputs and outputs are named as optimum and
transformers.js feed them, a first pass and cached steps give PyTorch's logits, greedy decoding gives the tokens of
``generate`` on the same folder, and the file holds the table's stored tensors once (no vocab × d float table).
``--rest int4`` Linears become MatMulNBits from the stored integers (file no larger than the safetensors); a process
without torch generates with the file; a cache the layout cannot carry is refused before anything is written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx

import embfactor as ef
from embfactor.cli.main import main
from embfactor.export import export_onnx
from embfactor.export.decoder import empty_past, greedy_generate, step_feeds
from embfactor.export.onnx import dense_tables, session, untied_head
from tests.conftest import VOCAB
from tests.test_conformance import ARCHS, V, build
from tests.test_hf_loading import _install
from tests.test_onnx_export import _every_format

CAUSAL = [n for n, a in ARCHS.items() if a.model.endswith(("ForCausalLM", "LMHeadModel"))]
PROMPT = torch.tensor([[5, 17, 33, 2, 9]])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("tok")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", *[f"w{i}" for i in range(V - 8)]]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return BertTokenizerFast(vocab=str(folder / "vocab.txt"))


def _generate(model: torch.nn.Module, new: int) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0)
    return out.numpy()


def _eos(model: torch.nn.Module) -> int | None:
    eos = model.generation_config.eos_token_id
    return eos[0] if isinstance(eos, list) else eos


def _stored_once(proto: onnx.ModelProto, model: torch.nn.Module) -> None:
    """Each of the table's stored tensors is in the file exactly once (a tied head adds no copy)."""
    from onnx import numpy_helper

    from embfactor.export.planes import export_tensors

    inits = [numpy_helper.to_array(t) for t in proto.graph.initializer]
    for name, t in export_tensors(model.get_input_embeddings()).items():
        if t.numel() < 64:  # small tensors (scales of a few groups) may equal another initializer by chance
            continue
        want = t.numpy()
        hits = [v for v in inits if v.shape == want.shape and v.dtype == want.dtype and np.array_equal(v, want)]
        assert len(hits) == 1, f"{name}: {len(hits)} copies in the file"


@pytest.mark.parametrize("name", CAUSAL)
def test_every_causal_architecture_exports_with_a_kv_cache(tmp_path, tokenizer, name):
    model = build(name)
    ef.factorize_(model, method="int", bits=4)
    folder = tmp_path / name
    ef.save_compressed(model, folder, tokenizer=tokenizer)
    assert main(["export", str(folder), "--onnx", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["check"]["onnx/model.onnx"]["min_cosine"] >= 0.9999  # first pass + 3 cached steps vs PyTorch
    path = folder / "onnx" / "model.onnx"
    sess = session(path)
    layers = model.config.num_hidden_layers
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    pos = [] if name == "bloom" else ["position_ids"]  # ALiBi: no positions
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", *pos, *past]
    assert [o.name for o in sess.get_outputs()] == ["logits", *(p.replace("past_key_values", "present") for p in past)]
    shape = next(i.shape for i in sess.get_inputs() if i.name == past[0])
    assert shape[0] == "batch_size" and shape[2] == "past_sequence_length" and isinstance(shape[1], int)

    reloaded = ef.load_model(str(folder)).model
    got = greedy_generate(sess, PROMPT.numpy(), 6, suppress=_eos(reloaded))
    assert np.array_equal(got, _generate(reloaded, 6))
    # a batch of two left-padded prompts, first pass then one cached step, against PyTorch
    ids = torch.tensor([[0, 0, 7, 8, 9], [4, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1] * 5])
    kw = {"position_ids": (mask.cumsum(1) - 1).clamp(min=0)} if pos else {}
    with torch.no_grad():
        want = reloaded(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
    res = sess.run(None, step_feeds(sess, ids.numpy(), mask.numpy(), empty_past(sess, 2)))
    real = mask.numpy().astype(bool)
    assert np.abs(res[0] - want.logits.numpy())[real].max() <= 1e-4
    nxt, mask2 = want.logits[:, -1:].argmax(-1), torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    kw = {"position_ids": (mask2.cumsum(1) - 1)[:, -1:]} if pos else {}
    with torch.no_grad():
        want2 = reloaded(input_ids=nxt, attention_mask=mask2, past_key_values=want.past_key_values, **kw).logits
    past_feeds = {n.replace("present.", "past_key_values."): v for n, v in zip([o.name for o in sess.get_outputs()][1:], res[1:])}
    got2 = sess.run(None, step_feeds(sess, nxt.numpy(), mask2.numpy(), past_feeds))[0]
    assert np.abs(got2 - want2.numpy()).max() <= 1e-4

    proto = onnx.load(str(path))
    emb = model.get_input_embeddings()
    assert not dense_tables(proto, emb.num_embeddings, emb.embedding_dim, besides=untied_head(model))
    _stored_once(proto, model)
    if model.get_output_embeddings() is not None and "lm_head" not in "".join(untied_head(reloaded)):
        assert not any("lm_head" in t.name for t in proto.graph.initializer)  # tied: the head reads the table
    assert json.loads((folder / "generation_config.json").read_text())  # what optimum / transformers.js read


def _int4_llama(tmp_path: Path, tokenizer, table: str = "every-format", hidden: int = 128) -> tuple[Path, torch.nn.Module]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from embfactor.surgery.rest import store_rest_

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    if table == "every-format":
        _install(model, _every_format)
    else:
        ef.factorize_(model, method="int", bits=4, group=32)
    store_rest_(model, "int4")
    folder = tmp_path / "int4"
    ef.save_compressed(model, folder, tokenizer=tokenizer)
    return folder, model


def test_int4_rest_exports_as_matmulnbits_no_larger_than_safetensors(tmp_path, tokenizer):
    from embfactor.layers.intk_linear import IntKLinear

    # a realistic ratio of weights to graph nodes: a plain int4 table (every-format's graph is node-heavy), width 512
    folder, model = _int4_llama(tmp_path, tokenizer, "intk", hidden=512)
    report = export_onnx(folder)
    path = folder / "onnx" / "model.onnx"
    proto = onnx.load(str(path))
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    rest = [n for n in nbits if "embed_tokens" not in n.input[1]]
    assert len(rest) == sum(isinstance(m, IntKLinear) for m in model.modules()) == 14
    # the tied head: one MatMulNBits over the int4 table's integers as stored (its packing is MatMulNBits' blocks)
    head = [n for n in nbits if n not in rest]
    assert [n.input[1] for n in head] == ["model.model.embed_tokens.onnx_low"]
    assert all(n.domain == "com.microsoft" for n in nbits)
    # no larger than the folder it came from (weights, config, tokenizer); the graph's nodes cost ~0.5% of the
    # safetensors on a model this small
    folder_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name != "generation_config.json")
    assert report.files["onnx/model.onnx"] <= folder_bytes
    assert report.files["onnx/model.onnx"] <= 1.01 * report.safetensors_bytes
    assert report.check["onnx/model.onnx"]["min_cosine"] >= 0.9999
    reloaded = ef.load_model(str(folder)).model
    got = greedy_generate(session(path), PROMPT.numpy(), 8, suppress=_eos(reloaded))
    assert np.array_equal(got, _generate(reloaded, 8))
    emb = model.get_input_embeddings()
    assert not dense_tables(proto, emb.num_embeddings, emb.embedding_dim)
    _stored_once(proto, model)


NO_TORCH = """
import json, sys
import numpy as np
import onnxruntime as ort
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
ids = np.array(json.loads(sys.argv[2]), dtype=np.int64)
names = [i.name for i in sess.get_inputs()]
present = [o.name for o in sess.get_outputs()][1:]
past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in sess.get_inputs()
        if i.name.startswith("past_key_values.")}
out, cur = ids, ids
for _ in range(int(sys.argv[3])):
    feeds = {"input_ids": cur, "attention_mask": np.ones_like(out), **past}
    if "position_ids" in names:
        feeds["position_ids"] = np.arange(out.shape[1] - cur.shape[1], out.shape[1])[None]
    res = sess.run(None, feeds)
    logits = res[0][:, -1]
    if int(sys.argv[4]) >= 0:
        logits[:, int(sys.argv[4])] = -np.inf
    cur = logits.argmax(-1)[:, None].astype(np.int64)
    out = np.concatenate([out, cur], axis=1)
    past = {n.replace("present.", "past_key_values."): v for n, v in zip(present, res[1:])}
print(json.dumps({"torch": "torch" in sys.modules, "tokens": out.tolist()}))
"""


def test_onnx_runtime_generates_with_the_cache_without_torch(tmp_path, tokenizer):
    folder, _ = _int4_llama(tmp_path, tokenizer)
    export_onnx(folder)
    reloaded = ef.load_model(str(folder)).model
    eos = _eos(reloaded)
    res = subprocess.run([sys.executable, "-c", NO_TORCH, str(folder / "onnx" / "model.onnx"),
                          json.dumps(PROMPT.tolist()), "8", str(-1 if eos is None else eos)],
                         capture_output=True, text=True, check=True)
    r = json.loads(res.stdout)
    assert r["torch"] is False
    assert np.array_equal(np.array(r["tokens"]), _generate(reloaded, 8))


def test_optimum_loads_the_decoder_and_steps_with_its_cache(tmp_path, tokenizer):
    from embfactor.export import enable_optimum

    folder, _ = _int4_llama(tmp_path, tokenizer)
    export_onnx(folder)
    enable_optimum()
    optimum_ort = pytest.importorskip("optimum.onnxruntime")
    ort_model = optimum_ort.ORTModelForCausalLM.from_pretrained(str(folder), subfolder="onnx", file_name="model.onnx")
    assert ort_model.can_use_cache
    reloaded = ef.load_model(str(folder)).model
    mask = torch.ones_like(PROMPT)
    with torch.no_grad():
        got = ort_model(input_ids=PROMPT, attention_mask=mask, use_cache=True)
        want = reloaded(input_ids=PROMPT, attention_mask=mask, use_cache=True)
        assert (got.logits - want.logits).abs().max() <= 1e-4
        nxt, mask = want.logits[:, -1:].argmax(-1), torch.ones(1, PROMPT.shape[1] + 1, dtype=torch.long)
        got2 = ort_model(input_ids=nxt, attention_mask=mask, past_key_values=got.past_key_values, use_cache=True)
        want2 = reloaded(input_ids=nxt, attention_mask=mask, past_key_values=want.past_key_values, use_cache=True)
    assert (got2.logits - want2.logits).abs().max() <= 1e-4


def test_a_cache_the_layout_cannot_carry_is_refused_before_writing(tmp_path, tokenizer, capsys):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, state_size=4)
    model = transformers.MambaForCausalLM(cfg).eval()
    ef.factorize_(model, method="int", bits=8)
    ef.save_compressed(model, tmp_path / "mamba", tokenizer=tokenizer)
    assert main(["export", str(tmp_path / "mamba"), "--onnx"]) == 2
    err = capsys.readouterr().err
    assert "MambaForCausalLM" in err and "cannot be exported with a KV cache" in err
    assert not (tmp_path / "mamba" / "onnx").exists() and not (tmp_path / "mamba" / "generation_config.json").exists()


def test_a_folder_without_a_tokenizer_is_refused_before_writing(tmp_path, capsys):
    model = build("llama")
    ef.factorize_(model, method="int", bits=8)
    ef.save_compressed(model, tmp_path / "notok")  # no tokenizer: optimum and transformers.js could not run it
    assert main(["export", str(tmp_path / "notok"), "--onnx"]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "notok" / "onnx").exists()
