"""An exported folder runs in transformers.js as a user runs it: in Node and in a real browser (headless Chromium).

Each case compresses a tiny random model into one tiered table holding every exportable format
(tests/test_onnx_export.py's "every-format"), runs ``embfactor export --onnx``, then loads the folder in
``@huggingface/transformers`` from a local path with remote models off (js/run.mjs in Node; examples/browser's page
served on loopback and driven by playwright-core in Debian's Chromium, js/browser.mjs) and compares with ONNX Runtime
in Python and with PyTorch: sentence embeddings (mean pooling + normalization) for an encoder, greedy token ids for a
causal LM (which needs the KV-cache decoder export of issue 29 part A: until ``onnx/model.onnx`` takes
``past_key_values.*``, those cases skip and say so).

A machine without Node, js/node_modules or Chromium skips with the missing piece and its install command;
``EMBFACTOR_REQUIRE_BROWSER=1`` (set by .ci/run) turns those skips into failures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import embfactor as ef
from embfactor.export import export_onnx
from embfactor.export.onnx import TRANSFORMERS_JS_KEY, session
from embfactor.export.transformers_js import missing, run_browser, run_node
from tests.conftest import _llama
from tests.test_hf_loading import _bert, _install
from tests.test_onnx_export import _every_format

TEXTS = ["the cat sat on the mat", "a dog", "w5 w7 the w9 cat w11 dog w13 sat"]  # three lengths: padding is exercised
PROMPTS = ["the cat sat", "a dog w5"]
NEW_TOKENS = 12


def need(browser: bool = False) -> None:
    """Skip (or fail under EMBFACTOR_REQUIRE_BROWSER=1) when Node, js/node_modules or Chromium is missing."""
    why = missing(browser=browser)
    if why is None:
        return
    if os.environ.get("EMBFACTOR_REQUIRE_BROWSER") == "1":
        pytest.fail(f"EMBFACTOR_REQUIRE_BROWSER=1 but transformers.js cannot run: missing {why}")
    pytest.skip(f"transformers.js tests need {why}")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    from tests.conftest import VOCAB

    folder = tmp_path_factory.mktemp("tok")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "the", "cat", "dog", "sat"]
    words += ["on", "mat", *[f"w{i}" for i in range(VOCAB - len(words) - 2)]]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return BertTokenizerFast(vocab=str(folder / "vocab.txt"))


def _export(folder: Path, model: torch.nn.Module, tokenizer, **kw) -> Path:
    _install(model, _every_format)
    ef.save_compressed(model, folder, tokenizer=tokenizer)
    export_onnx(folder, **kw)
    return folder


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, tokenizer):
    """(folder, PyTorch model, ONNX Runtime's normalized mean-pooled vectors of TEXTS for each onnx file)."""
    folder = _export(tmp_path_factory.mktemp("enc") / "bert", _bert(), tokenizer, int8_rest=True)
    model = ef.load_model(str(folder)).model.eval()
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    ort = {name: _pooled(session(folder / "onnx" / f"{name}.onnx").run(None, {
        k: enc[k].numpy() for k in ("input_ids", "attention_mask", "token_type_ids")})[0], enc["attention_mask"].numpy())
        for name in ("model", "model_qint8")}
    return folder, _pooled(hidden.numpy(), enc["attention_mask"].numpy()), ort, enc["input_ids"]


def _pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    v = (hidden * m).sum(1) / m.sum(1)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _check_embeddings(result: dict, encoder, name: str = "model") -> None:
    _, torch_vecs, ort, ids = encoder
    got = np.array(result["embeddings"])
    mask = ids != 0
    # the same tokens: transformers.js's tokenizer reads the folder's tokenizer.json
    assert result["input_ids"] == [row[m].tolist() for row, m in zip(ids, mask)]
    assert np.abs(got - ort[name]).max() <= 1e-4, "transformers.js differs from ONNX Runtime (Python) on the same file"
    # fidelity to PyTorch within 1e-4 of ONNX Runtime Python's
    assert np.abs(_cos(got, torch_vecs) - _cos(ort[name], torch_vecs)).max() <= 1e-4


def test_export_names_the_file_for_transformers_js(encoder):
    config = json.loads((encoder[0] / "config.json").read_text())
    assert config[TRANSFORMERS_JS_KEY] == {"dtype": "fp32"}  # without it the browser looks for model_quantized.onnx
    assert config["quantization_config"]["quant_method"] == "embfactor"  # the rest of config.json is untouched


def test_node_feature_extraction_matches_onnx_runtime_and_pytorch(encoder):
    need()
    result = run_node(encoder[0], "feature-extraction", TEXTS)
    _check_embeddings(result, encoder)
    assert _cos(np.array(result["embeddings"]), encoder[1]).min() >= 0.99999


def test_node_loads_the_int8_rest_file_by_name(encoder):
    need()
    _check_embeddings(run_node(encoder[0], "feature-extraction", TEXTS, model_file_name="model_qint8"), encoder,
                      "model_qint8")


def test_browser_feature_extraction_matches_onnx_runtime_and_pytorch(encoder, tmp_path):
    need(browser=True)
    result = run_browser(encoder[0], "feature-extraction", TEXTS, screenshot=tmp_path / "page.png")
    _check_embeddings(result, encoder)
    assert result["remote_requests"] == []  # everything from the loopback server
    assert result["ready"] == {"task": "feature-extraction", "model_type": "bert"}
    onnx_bytes = (encoder[0] / "onnx" / "model.onnx").stat().st_size
    assert result["bytes"]["model"]["/models/model/onnx/model.onnx"] == onnx_bytes  # the page reports what it fetched
    assert not [m for m in result["console"] if m.startswith(("error", "pageerror"))]
    assert (tmp_path / "page.png").stat().st_size > 0
    a, b = np.array(result["embeddings"][:2])
    assert result["shown"] == f"cosine similarity: {a @ b:.4f}"  # the page's button shows the same vectors' cosine


def test_a_missing_piece_is_named_with_its_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBFACTOR_JS_DIR", str(tmp_path / "js"))
    assert "npm ci --ignore-scripts" in missing() and "@huggingface/transformers" in missing()
    assert "playwright-core" in missing(browser=True)
    monkeypatch.delenv("EMBFACTOR_JS_DIR")
    monkeypatch.setenv("EMBFACTOR_CHROMIUM", str(tmp_path / "chromium"))
    if missing() is None:  # Node packages here: only the browser is missing
        assert "apt-get install -y chromium" in missing(browser=True)
    monkeypatch.delenv("EMBFACTOR_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="transformers.js tests need"):
        need(browser=True)
    monkeypatch.setenv("EMBFACTOR_REQUIRE_BROWSER", "1")  # CI: a missing piece fails instead of skipping
    with pytest.raises(pytest.fail.Exception, match="EMBFACTOR_REQUIRE_BROWSER=1 but transformers.js cannot run"):
        need(browser=True)


def test_the_page_refuses_a_folder_without_export(tmp_path, tokenizer):
    from embfactor.export.serve import make_server

    model = _bert()
    _install(model, _every_format)
    ef.save_compressed(model, tmp_path / "plain", tokenizer=tokenizer)
    with pytest.raises(SystemExit, match="embfactor export .* --onnx"):
        make_server(tmp_path / "plain")


# ---- decoders (issue 29 part A writes the KV-cache graph that transformers.js's generation loop drives) ----

@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def decoder(request, tmp_path_factory, tokenizer):
    """(folder, PyTorch greedy token ids of PROMPTS), or a skip while the export has no KV cache."""
    from onnx import load

    model = _llama(request.param)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # larger weights than the init's 0.02: greedy tokens then depend on the context
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    folder = _export(tmp_path_factory.mktemp("dec") / "llama", model, tokenizer)
    inputs = [i.name for i in load(str(folder / "onnx" / "model.onnx"), load_external_data=False).graph.input]
    if "past_key_values.0.key" not in inputs:
        pytest.skip(f"decoder export without KV cache (onnx/model.onnx takes {inputs}; issue 29 part A adds "
                    "past_key_values.N.key/value, which transformers.js's text-generation needs)")
    model = ef.load_model(str(folder)).model.eval()  # the folder as written, not the model before saving
    want = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        want.append(out[0].tolist())
        assert len(set(want[-1][ids.shape[1]:])) > 3, "degenerate greedy text: the comparison would prove little"
    return folder, want


def test_node_text_generation_gives_pytorch_greedy_tokens(decoder):
    need()
    folder, want = decoder
    assert run_node(folder, "text-generation", PROMPTS, max_new_tokens=NEW_TOKENS)["sequences"] == want
    # prompts as token ids (what benchmarks give: the caller's tokenization) take the same path
    prompt_ids = [w[:-NEW_TOKENS] for w in want]
    assert run_node(folder, "text-generation", input_ids=prompt_ids, max_new_tokens=NEW_TOKENS)["sequences"] == want


def test_browser_text_generation_gives_pytorch_greedy_tokens(decoder):
    need(browser=True)
    folder, want = decoder
    # the page's API gets token ids, its Generate button the first text
    result = run_browser(folder, "text-generation", PROMPTS, input_ids=[w[:-NEW_TOKENS] for w in want],
                         max_new_tokens=NEW_TOKENS)
    assert result["sequences"] == want
    assert result["remote_requests"] == []
    assert result["ready"]["task"] == "text-generation"
    assert result["shown"].strip()  # the page's Generate button printed the decoded text


# ---- the real model: all-MiniLM-L6-v2 (int4 g32 table + int8 rest: what --size 8x --rest int8 stores, without the
# planner's minutes; benchmarks/deploy_js.py measures the --size 8x folder itself) ----

@pytest.mark.slow
def test_minilm_int8_rest_runs_the_same_in_onnx_runtime_node_and_chromium(tmp_path):
    need(browser=True)
    from benchmarks.onnx_export import onnx_embeddings

    from embfactor.cli.main import main
    from embfactor.eval.embed import sentence_embeddings

    out = tmp_path / "minilm"
    assert main(["compress", "minilm", "--size", "7x", "--method", "int", "--method-option", "bits=4",
                 "--method-option", "group=32", "--rest", "int8", "--no-verify", "--output", str(out), "-q"]) == 0
    export_onnx(out)
    assert (out / "onnx" / "model.onnx").stat().st_size <= 19e6  # 90 MB as fp32 ONNX
    texts = ["A man is playing a guitar.", "Someone plays an instrument on stage.",
             "The embedding table is the largest tensor of a small encoder, so it is compressed first."]
    ref = ef.load_model("minilm")
    with torch.no_grad():
        want = sentence_embeddings(ref.model, ref.tokenizer, texts).double().numpy()
    ort = onnx_embeddings(session(out / "onnx" / "model.onnx"), ref.tokenizer, texts)
    node = np.array(run_node(out, "feature-extraction", texts)["embeddings"])
    page = run_browser(out, "feature-extraction", texts)
    for got in (node, np.array(page["embeddings"])):
        assert np.abs(got - ort).max() <= 1e-4
        assert np.abs(_cos(got, want) - _cos(ort, want)).max() <= 1e-4
    assert _cos(ort, want).min() >= 0.99  # int4 g32 + int8 Linears stay close to the original model
    assert page["bytes"]["model"]["/models/model/onnx/model.onnx"] == (out / "onnx" / "model.onnx").stat().st_size
