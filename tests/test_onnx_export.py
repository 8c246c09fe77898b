"""ONNX export keeps the table compressed and computes what PyTorch computes, for every storage format.

Each case compresses a tiny random model (tests/test_hf_loading.py's recipes), writes ``onnx/model.onnx`` with
``embfactor export``, and runs it in ONNX Runtime: outputs match the PyTorch model, the file holds the format's own
tensors (uint8 codes, int8 codebooks, fp16 scales) and no vocab × d float table, a tied table is stored once, greedy
generation gives the same tokens, sentence-transformers loads the file, and a process without torch runs it.
"""

from __future__ import annotations

import json
import shutil
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
from embfactor.export.onnx import dense_tables, session
from tests.conftest import VOCAB, _llama, write_st_modules
from tests.test_hf_loading import IDS, MASK, _bert, _install, all_formats, recipe

# every registered format on its own (a new format is tested here without changes), and "every-format": one tiered
# table (compact index) holding the variants the planner builds: int-k, PQ with int8 codebooks, RVQ with rotation
# and row scales, low rank, int4 low rank, zeros
EXPORTABLE = [c for c in all_formats() if c != "tt"]


def _every_format(E: torch.Tensor) -> torch.nn.Module:
    """One tiered table holding every exportable format (compact index, planner's layout): int-k (int5), PQ with
    int8 codebooks, RVQ with rotation and row scales, low rank, int8 low rank, zeros."""
    from embfactor.decomposition import decompose
    from embfactor.formats import FactorizedEmbedding, QuantizedFactorizedEmbedding, TieredFormat, ZeroRows
    from embfactor.formats.base import from_factors

    tier_of = torch.arange(E.shape[0]) % 6
    ids = [torch.nonzero(tier_of == t).squeeze(1) for t in range(6)]
    position = torch.empty(E.shape[0], dtype=torch.long)
    position[torch.cat(ids)] = torch.arange(E.shape[0])
    U, S, Vh = torch.linalg.svd(E[ids[3]], full_matrices=False)
    tiers = [
        from_factors(decompose(E[ids[0]], method="int", bits=5, group=16)),
        from_factors(decompose(E[ids[1]], method="pq", sub_dim=4, K=8, codebook_dtype="int8")),
        from_factors(decompose(E[ids[2]], method="rvq", sub_dim=8, K=8, stages=2, rotation="random", row_scale=True)),
        FactorizedEmbedding.from_tensors(U[:, :6] * S[:6], Vh[:6]),
        QuantizedFactorizedEmbedding.from_tensors(U[:, :4] * S[:4], Vh[:4], bits=4),
        ZeroRows(len(ids[5]), E.shape[1]),
    ]
    return TieredFormat(tiers, position, padding_idx=0, compact_index=True, index_bits=4)  # 6 tiers: 4 bits a token


def _make(case: str):
    return (lambda m: _install(m, _every_format)) if case == "every-format" else recipe(case)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("tok")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "the", "cat", "dog", "sat"]
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return BertTokenizerFast(vocab=str(folder / "vocab.txt"))


def _compressed(tmp: Path, model: torch.nn.Module, case: str, tokenizer) -> tuple[Path, torch.nn.Module]:
    _make(case)(model)
    folder = tmp / case
    ef.save_compressed(model, folder, tokenizer=tokenizer)
    return folder, model


def _table_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    from embfactor.export.planes import export_tensors

    return {k: v for k, v in export_tensors(module).items() if v.numel() > 0}


def _initializers(path: Path) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _assert_stored_as_is(path: Path, model: torch.nn.Module, prefix: str) -> None:
    from embfactor.export.onnx import untied_head

    """Each tensor of the table is an initializer once, with its stored dtype and values (nothing decoded)."""
    inits = _initializers(path)
    emb = model.get_input_embeddings()
    for name, t in _table_tensors(emb).items():
        key, want = f"model.{prefix}.{name}", t.numpy()
        # the exporter merges initializers of equal values (two tiers' identical V), so look for the values
        same = [v for v in inits.values() if v.dtype == want.dtype and v.shape == want.shape and np.array_equal(v, want)]
        assert key in inits or same, f"{key} missing; initializers: {sorted(inits)[:8]}"
    proto = onnx.load(str(path))
    assert not dense_tables(proto, emb.num_embeddings, emb.embedding_dim, besides=untied_head(model))


@pytest.mark.parametrize("case", [*EXPORTABLE, "every-format"])
def test_encoder_exports_every_format_compressed_and_matching(tmp_path, tokenizer, case, capsys):
    folder, model = _compressed(tmp_path, _bert(), case, tokenizer)
    assert main(["export", str(folder), "--onnx", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    path = folder / "onnx" / "model.onnx"
    assert report["files"] == {"onnx/model.onnx": path.stat().st_size}
    assert report["check"]["onnx/model.onnx"]["min_cosine"] >= 0.99999
    _assert_stored_as_is(path, model, "embeddings.word_embeddings")
    sess = session(path)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in sess.get_outputs()] == ["last_hidden_state"]
    for ids, mask in ((IDS, MASK), (IDS[:1, :3], MASK[:1, :3])):  # other batch and sequence sizes than the trace's
        got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                              "token_type_ids": np.zeros_like(ids.numpy())})[0]
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
        assert np.abs(got - want).max() <= 1e-5
    assert "onnx/model.onnx" in json.loads((folder / "embfactor-manifest.json").read_text())["entries"]


def _greedy(sess, ids: np.ndarray, steps: int, eos: int | None) -> np.ndarray:
    """Greedy decoding through ONNX Runtime with the KV cache, EOS suppressed as generate(min_new_tokens=steps) does."""
    return greedy_generate(sess, ids, steps, suppress=eos)


def _first_pass(sess, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Logits of a first pass (empty past) of the cached decoder file."""
    return sess.run(None, step_feeds(sess, ids, mask, empty_past(sess, len(ids))))[0]


@pytest.mark.parametrize("case", ["codebook-int8", "every-format"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_decoder_logits_and_greedy_generation_through_onnx_runtime(tmp_path, tokenizer, case, tied):
    folder, model = _compressed(tmp_path, _llama(tied), case, tokenizer)
    report = export_onnx(folder)
    path = folder / "onnx" / "model.onnx"
    assert report.output == "logits" and report.check["onnx/model.onnx"]["min_cosine"] >= 0.99999
    _assert_stored_as_is(path, model, "model.embed_tokens")
    inits = _initializers(path)
    if tied:  # the head reads the table's initializers: no second copy, no head weight
        assert not any("lm_head" in k for k in inits)
    sess = session(path)
    with torch.no_grad():
        want = model(IDS, attention_mask=MASK).logits.numpy()
    got = _first_pass(sess, IDS.numpy(), MASK.numpy())
    assert np.abs(got - want)[MASK.numpy().astype(bool)].max() <= 1e-4
    tokens = model.generate(IDS[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert np.array_equal(_greedy(sess, IDS[:1].numpy(), 6, model.generation_config.eos_token_id), tokens.numpy())


def test_gpt2_tied_head_exports(tmp_path, tokenizer, tiny_gpt2):
    folder, model = _compressed(tmp_path, tiny_gpt2, "intk", tokenizer)
    export_onnx(folder)
    sess = session(folder / "onnx" / "model.onnx")
    tokens = model.generate(IDS[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert np.array_equal(_greedy(sess, IDS[:1].numpy(), 5, model.generation_config.eos_token_id), tokens.numpy())


def test_int8_rest_quantizes_matmuls_but_not_the_table(tmp_path, tokenizer):
    folder, model = _compressed(tmp_path, _bert(), "every-format", tokenizer)
    r = export_onnx(folder, int8_rest=True)
    q = folder / "onnx" / "model_qint8.onnx"
    assert set(r.files) == {"onnx/model.onnx", "onnx/model_qint8.onnx"} and r.files["onnx/model_qint8.onnx"] > 0
    proto = onnx.load(str(q))
    ops = [n.op_type for n in proto.graph.node]
    assert "DynamicQuantizeLinear" in ops or "DynamicQuantizeMatMul" in ops or "MatMulInteger" in ops
    table = [n for n in proto.graph.node if "/word_embeddings/" in n.name]
    assert table and not any("Quant" in n.op_type or "Integer" in n.op_type for n in table)
    _assert_stored_as_is(q, model, "embeddings.word_embeddings")
    assert r.check["onnx/model_qint8.onnx"]["min_cosine"] > 0.9


def test_tt_is_refused_before_writing(tmp_path, tokenizer, capsys):
    folder, _ = _compressed(tmp_path, _bert(), "tt", tokenizer)
    assert main(["export", str(folder), "--onnx"]) == 2
    err = capsys.readouterr().err
    assert "'tt' storage format cannot be exported to ONNX" in err and "--method int" in err
    assert not (folder / "onnx").exists()


def test_bad_folders_and_foreign_files_are_refused(tmp_path, tokenizer, tiny_bert_dir, capsys):
    assert main(["export", str(tmp_path / "nope"), "--onnx"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["export", str(tiny_bert_dir), "--onnx"]) == 2  # a plain HF folder, not an embfactor output
    assert "not an embfactor output folder" in capsys.readouterr().err
    folder, _ = _compressed(tmp_path, _bert(), "intk", tokenizer)
    assert main(["export", str(folder)]) == 2
    assert "--onnx" in capsys.readouterr().err
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"mine")
    assert main(["export", str(folder), "--onnx"]) == 2
    assert "embfactor did not write it" in capsys.readouterr().err
    assert (folder / "onnx" / "model.onnx").read_bytes() == b"mine"
    shutil.rmtree(folder / "onnx")
    assert main(["export", str(folder), "--onnx"]) == 0  # and again over its own file
    assert main(["export", str(folder), "--onnx", "--int8-rest"]) == 0
    assert (folder / "onnx" / "model_qint8.onnx").is_file()


NO_TORCH = """
import json, sys
import numpy as np
import onnxruntime as ort
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
ids = np.array(json.loads(sys.argv[2]), dtype=np.int64)
given = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
feeds = {i.name: given[i.name] for i in sess.get_inputs()}
out = sess.run(None, feeds)[0]
print(json.dumps({"torch": "torch" in sys.modules, "out": out.tolist()}))
"""


def test_onnx_runtime_runs_the_file_without_torch(tmp_path, tokenizer):
    folder, model = _compressed(tmp_path, _bert(), "every-format", tokenizer)
    export_onnx(folder)
    ids = IDS[:, :5]
    res = subprocess.run([sys.executable, "-c", NO_TORCH, str(folder / "onnx" / "model.onnx"), json.dumps(ids.tolist())],
                         capture_output=True, text=True, check=True)
    r = json.loads(res.stdout)
    assert r["torch"] is False
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state.numpy()
    assert np.abs(np.array(r["out"]) - want).max() <= 1e-5


def test_sentence_transformers_loads_the_file_without_exporting(tmp_path, tokenizer, tiny_bert_dir):
    from embfactor.export import enable_optimum

    enable_optimum()
    pytest.importorskip("optimum.onnxruntime")
    from sentence_transformers import SentenceTransformer

    src = tmp_path / "st"
    shutil.copytree(tiny_bert_dir, src)
    write_st_modules(src, 32)
    lm = ef.load_model(str(src))
    _install(lm.model, _every_format)
    ef.save_compressed(lm.model, tmp_path / "out", tokenizer=lm.tokenizer, modules_from=src)
    out = tmp_path / "out"
    export_onnx(out)
    texts = ["the cat sat on the mat", "a dog", "the"]
    onnx_st = SentenceTransformer(str(out), backend="onnx", device="cpu")
    assert type(onnx_st[0].auto_model).__name__ == "ORTModelForFeatureExtraction"
    got = onnx_st.encode(texts)
    want = SentenceTransformer(str(out), device="cpu").encode(texts)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.99999
    assert sorted(p.name for p in (out / "onnx").iterdir()) == ["model.onnx"]  # loaded, not exported again


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_a_scaled_embedding_keeps_its_scale_in_the_graph(tmp_path, tokenizer, scale):
    """Gemma 3 multiplies its lookup by embed_scale (and ties its head): the graph applies it, at extreme values too."""
    from tests.test_conformance import build

    model = build("gemma3")
    model.get_input_embeddings().embed_scale.fill_(scale)
    ef.factorize_(model, method="int", bits=8)
    assert model.get_input_embeddings().embed_scale == pytest.approx(scale)
    ef.save_compressed(model, tmp_path / "g", tokenizer=tokenizer)
    report = export_onnx(tmp_path / "g")
    assert report.check["onnx/model.onnx"]["min_cosine"] >= 0.99999
    ids = IDS.clamp(max=model.config.vocab_size - 1)
    got = _first_pass(session(tmp_path / "g" / "onnx" / "model.onnx"), ids.numpy(), np.ones_like(ids.numpy()))
    with torch.no_grad():
        want = model(ids).logits.numpy()
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_encoder_decoders_are_refused(tmp_path, tokenizer, capsys):
    from tests.test_conformance import build

    model = build("t5")
    ef.factorize_(model, method="int", bits=8)
    ef.save_compressed(model, tmp_path / "t5", tokenizer=tokenizer)
    assert main(["export", str(tmp_path / "t5"), "--onnx"]) == 2
    assert "is an encoder-decoder" in capsys.readouterr().err and not (tmp_path / "t5" / "onnx").exists()
