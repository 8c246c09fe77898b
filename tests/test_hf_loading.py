"""Compressed folders load with transformers' from_pretrained and sentence-transformers, for every storage format.

Each registered storage format is built by a recipe (below), saved by embfactor, and loaded three ways: embfactor.load,
AutoModel/AutoModelForCausalLM.from_pretrained (through embfactor's registered quantizer) and, for a
sentence-transformers folder, SentenceTransformer(folder). Outputs must agree to 1e-6, greedy generation token for
token, and save_pretrained must write a folder that loads again the same way.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import embfactor as ef
from embfactor.errors import CorruptFileError
from embfactor.formats import available_formats
from tests.conftest import VOCAB, _llama, write_st_modules

IDS = torch.tensor([[1, 5, 7, 9, 11, 3, 2], [4, 8, 15, 16, 23, 42, 0]])
MASK = torch.tensor([[1] * 7, [1] * 6 + [0]])


def _token_weights() -> torch.Tensor:
    return torch.linspace(1.0, 0.01, VOCAB) ** 2  # a Zipf-like frequency: low ids frequent


def _quantized(bits: int) -> Callable[[nn.Module], None]:
    def make(model: nn.Module) -> None:
        ef.factorize_(model, rank=6)
        ef.quantize_(model, bits)

    return make


def _install(model: nn.Module, build: Callable[[torch.Tensor], nn.Module]) -> None:
    """Put a hand-built format module in place of the embedding (for formats no decomposition method makes)."""
    from embfactor.surgery import find_embedding_and_head, install_format_

    install_format_(model, build(find_embedding_and_head(model).embedding.weight.detach()))


def _tiered(E: torch.Tensor) -> nn.Module:
    """Three tiers in three formats (low rank, int8 factors, zeros) over a shuffled row order."""
    from embfactor.formats import FactorizedEmbedding, QuantizedFactorizedEmbedding, TieredFormat
    from embfactor.formats.zeros import ZeroRows

    position = torch.randperm(E.shape[0], generator=torch.Generator().manual_seed(0))
    rows = torch.empty_like(E)
    rows[position] = E  # rows[p] is the row of the token at position p

    def lowrank(block: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        U, S, Vh = torch.linalg.svd(block, full_matrices=False)
        return U[:, :r] * S[:r], Vh[:r]
    a, b = lowrank(rows[:40], 8), lowrank(rows[40:90], 4)
    tiers = [FactorizedEmbedding.from_tensors(*a), QuantizedFactorizedEmbedding.from_tensors(*b, bits=8),
             ZeroRows(E.shape[0] - 90, E.shape[1])]
    return TieredFormat(tiers, position)


def _tiered_compact(E: torch.Tensor) -> nn.Module:
    """What the planner builds: tiers over frequency-ordered tokens, each tier's rows in id order, 1-byte tier map."""
    from embfactor.formats import FactorizedEmbedding, TieredFormat

    tier_of = torch.randint(0, 2, (E.shape[0],), generator=torch.Generator().manual_seed(1))
    ids = [torch.nonzero(tier_of == t).squeeze(1) for t in (0, 1)]
    position = torch.empty(E.shape[0], dtype=torch.long)
    position[torch.cat(ids)] = torch.arange(E.shape[0])
    tiers = [FactorizedEmbedding.from_tensors(E[i], torch.eye(E.shape[1])) for i in ids]
    return TieredFormat(tiers, position, compact_index=True)


def _zeros(E: torch.Tensor) -> nn.Module:
    from embfactor.formats.zeros import ZeroRows

    return ZeroRows(*E.shape)


# How to compress a model into each storage format. A format registered later without a recipe here is tried as a
# decomposition method of the same name; if there is none, test_every_format_has_a_recipe names it.
RECIPES: dict[str, Callable[[nn.Module], None]] = {
    "factorized": lambda m: ef.factorize_(m, rank=6, method="svd"),
    "block": lambda m: ef.factorize_(m, ratio=2, method="block", token_weights=_token_weights()),
    "tt": lambda m: ef.factorize_(m, rank=4, method="tt"),
    "quantized": _quantized(8),
    "tiered": lambda m: _install(m, _tiered),
    "zeros": lambda m: _install(m, _zeros),
    "codebook": lambda m: ef.factorize_(m, method="pq", sub_dim=4, K=16),
    "intk": lambda m: ef.factorize_(m, method="int", bits=4, group=16),
}
EXTRA_CASES = {
    "quantized-int4": _quantized(4),
    "codebook-rvq": lambda m: ef.factorize_(m, method="rvq", sub_dim=8, K=16, stages=2),
    "codebook-int8": lambda m: ef.factorize_(m, method="pq", sub_dim=4, K=16, codebook_dtype="int8"),
    "tiered-compact": lambda m: _install(m, _tiered_compact),  # the planner's layout: positions from a tier map
}  # same format, another config (packed nibbles)


def recipe(name: str) -> Callable[[nn.Module], None] | None:
    if name in RECIPES:
        return RECIPES[name]
    if name in EXTRA_CASES:
        return EXTRA_CASES[name]
    if name in ef.available_methods():
        return lambda m: ef.factorize_(m, ratio=2, method=name)
    return None


def all_formats() -> list[str]:
    return available_formats()


CASES = [*all_formats(), *EXTRA_CASES]


def test_every_format_has_a_recipe():
    missing = [f for f in all_formats() if recipe(f) is None]
    assert not missing, f"add a recipe for storage formats {missing} to RECIPES in tests/test_hf_loading.py"


def _compress(model: nn.Module, case: str, folder: Path) -> nn.Module:
    make = recipe(case)
    if make is None:
        pytest.fail(f"no recipe for format {case!r}")
    make(model)
    fmt = case.split("-")[0]
    layer = model.get_input_embeddings()
    assert getattr(layer, "format_name", "") == fmt or getattr(layer, "layer_type", "") == fmt
    ef.save_compressed(model, folder)
    return model


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0,
    )
    return BertModel(cfg).eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("case", CASES)
def test_encoder_from_pretrained_matches_embfactor_load(tmp_path, case):
    from transformers import AutoModel

    folder = tmp_path / "enc"
    model = _compress(_bert(), case, folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "embfactor"
    ours = ef.load_compressed(folder)
    theirs = AutoModel.from_pretrained(folder)
    assert type(theirs.get_input_embeddings()) is type(ours.get_input_embeddings())
    with torch.inference_mode():
        want = model(input_ids=IDS, attention_mask=MASK).last_hidden_state
        a = ours(input_ids=IDS, attention_mask=MASK).last_hidden_state
        b = theirs(input_ids=IDS, attention_mask=MASK).last_hidden_state
    assert _max_diff(a, want) <= 1e-6 and _max_diff(b, a) <= 1e-6
    # save_pretrained -> from_pretrained, and embfactor's loader accepts that folder too
    theirs.save_pretrained(tmp_path / "resaved")
    again = AutoModel.from_pretrained(tmp_path / "resaved")
    with torch.inference_mode():
        c = again(input_ids=IDS, attention_mask=MASK).last_hidden_state
    assert _max_diff(c, a) <= 1e-6
    saved = json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]
    assert saved["format"] == case.split("-")[0] and saved["format_config"] == config["quantization_config"][
        "format_config"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_decoder_logits_and_greedy_generation(tmp_path, case, tied):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "dec"
    model = _compress(_llama(tied), case, folder)
    ours = ef.load_compressed(folder)
    theirs = AutoModelForCausalLM.from_pretrained(folder)
    head = theirs.get_output_embeddings()
    assert (type(head).__name__ == "FactorizedLMHead") == tied
    if tied:
        assert head.embedding is theirs.get_input_embeddings()  # one set of tensors, shared
    with torch.inference_mode():
        want = model(IDS).logits
        a, b = ours(IDS).logits, theirs(IDS).logits
    assert _max_diff(a, want) <= 1e-6 and _max_diff(b, a) <= 1e-6
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    tokens = ours.generate(IDS[:1], **gen)
    assert torch.equal(theirs.generate(IDS[:1], **gen), tokens) and tokens.shape[1] == IDS.shape[1] + 6
    theirs.save_pretrained(tmp_path / "resaved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")
    assert torch.equal(again.generate(IDS[:1], **gen), tokens)
    with torch.inference_mode():
        assert _max_diff(again(IDS).logits, a) <= 1e-6


def test_save_pretrained_right_after_factorize(tmp_path):
    """A model compressed in this session writes a loadable folder with plain save_pretrained (no embfactor.save)."""
    from transformers import AutoModelForCausalLM

    model = _llama(True)
    ef.factorize_(model, rank=5)
    model.save_pretrained(tmp_path / "a")
    with torch.inference_mode():
        assert _max_diff(AutoModelForCausalLM.from_pretrained(tmp_path / "a")(IDS).logits, model(IDS).logits) <= 1e-6
    ef.quantize_(model, 8)  # the format changed: the config follows
    model.save_pretrained(tmp_path / "b")
    q = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]
    assert q["format"] == "quantized" and q["format_config"]["bits"] == 8
    with torch.inference_mode():
        assert _max_diff(AutoModelForCausalLM.from_pretrained(tmp_path / "b")(IDS).logits, model(IDS).logits) <= 1e-6


def test_load_model_accepts_a_save_pretrained_folder(tmp_path, tiny_bert_dir):
    """embfactor.load_model (CLI, server) opens what from_pretrained opens: a save_pretrained folder too."""
    from transformers import AutoModel, AutoTokenizer

    from embfactor.pipeline import compress
    from embfactor.models import load_model

    compress(str(tiny_bert_dir), ef.FactorizationConfig(rank=4), tmp_path / "c", progress=False)
    hf = AutoModel.from_pretrained(tmp_path / "c")
    hf.save_pretrained(tmp_path / "s")
    AutoTokenizer.from_pretrained(tmp_path / "c").save_pretrained(tmp_path / "s")
    lm = load_model(tmp_path / "s")
    assert lm.compressed and lm.record["layer_type"] == "factorized" and lm.record["rank"] == 4
    with torch.inference_mode():
        assert _max_diff(lm.model(IDS).last_hidden_state, hf(IDS).last_hidden_state) <= 1e-6


@pytest.mark.parametrize("name", ["block", "factorized", "quantized", "tt"])
def test_folder_from_previous_version_loads_and_upgrades(tmp_path, name):
    """Folders of embfactor 0.1.0 (tests/fixtures/v1: no quantization_config, older block tensor names) load with
    embfactor.load; upgrade_folder rewrites them so that from_pretrained loads them with the same outputs."""
    from transformers import AutoModel

    from embfactor.pipeline.upgrade import upgrade_folder

    old = Path(__file__).parent / "fixtures" / "v1" / name
    assert "quantization_config" not in json.loads((old / "config.json").read_text())
    expected = torch.load(old / "expected.pt")
    upgrade_folder(old, tmp_path / "new")
    from safetensors import safe_open

    from embfactor.surgery.share import GUARD_NOTE, REMOTE_FILE

    with safe_open(str(tmp_path / "new" / "model.safetensors"), "pt") as fh:  # now safe to share (tests/test_share.py)
        assert GUARD_NOTE in fh.keys()
    assert (tmp_path / "new" / REMOTE_FILE).is_file() and (tmp_path / "new" / "README.md").is_file()
    arch = json.loads((old / "embfactor.json").read_text())["architecture"]
    cls = AutoModel if not arch.endswith("ForCausalLM") else __import__("transformers").AutoModelForCausalLM
    model = cls.from_pretrained(tmp_path / "new")
    with torch.inference_mode():
        out = model(input_ids=expected["ids"])
        before = ef.load_compressed(old)(input_ids=expected["ids"])
    got = out.logits if hasattr(out, "logits") else out.last_hidden_state
    ref = before.logits if hasattr(before, "logits") else before.last_hidden_state
    assert _max_diff(got, ref) <= 1e-6
    torch.testing.assert_close(got, expected["output"], rtol=1e-5, atol=1e-5)


def test_newer_format_version_is_a_clear_error(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _llama(True)
    ef.factorize_(model, rank=5)
    ef.save_compressed(model, tmp_path / "new")
    path = tmp_path / "new" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"].update(format_version=9, embfactor_version="9.0")
    path.write_text(json.dumps(config))
    with pytest.raises(CorruptFileError, match=r"format_version 9 \(written by embfactor 9\.0\) is newer .* upgrade"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "new")


def test_import_embfactor_registers_without_importing_transformers():
    """`import embfactor` stays cheap; from_pretrained in the same process finds the quantizer."""
    code = (
        "import sys, embfactor; assert 'transformers' not in sys.modules and 'torch' not in sys.modules; "
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as m; print(m['embfactor'].__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "EmbfactorHfQuantizer"
    # transformers imported first, embfactor second: registered at once
    code = (
        "import transformers.quantizers.auto as a; assert 'embfactor' not in a.AUTO_QUANTIZER_MAPPING; "
        "import embfactor; print('embfactor' in a.AUTO_QUANTIZER_MAPPING)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


# ------------------------------------------------------------------------------------------ sentence-transformers


@pytest.fixture
def st_folder(tmp_path, tiny_bert_dir) -> Path:
    """A sentence-transformers folder (Transformer + mean Pooling + Normalize, prompts) around the tiny BERT."""
    folder = tmp_path / "st"
    shutil.copytree(tiny_bert_dir, folder)
    write_st_modules(folder, 32)
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": "the "}}))
    return folder


TEXTS = ["the cat sat on the mat", "a very good movie", "dog"]


@pytest.mark.parametrize("case", ["factorized", "block", "tt", "quantized"])
def test_sentence_transformers_folder_keeps_modules_and_embeddings(tmp_path, st_folder, case):
    from sentence_transformers import SentenceTransformer

    from embfactor.pipeline import compress
    from embfactor.eval.embed import pooled_embeddings
    from embfactor.models import load_model

    out = tmp_path / "out"
    config = {"factorized": dict(rank=4), "block": dict(ratio=2, method="block"), "tt": dict(rank=4, method="tt"),
              "quantized": dict(rank=4)}[case]
    compress(str(st_folder), ef.FactorizationConfig(**config), out, progress=False,
             quantize="int8" if case == "quantized" else None)
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                 "1_Pooling/config.json"):
        assert (out / name).read_bytes() == (st_folder / name).read_bytes()
    st = SentenceTransformer(str(out), device="cpu")
    assert type(st[0].auto_model.get_input_embeddings()).__name__ != "Embedding"
    got = torch.from_numpy(st.encode(TEXTS))
    want = pooled_embeddings(load_model(out), TEXTS)
    assert got.shape == want.shape and _max_diff(got, want) <= 1e-6
    assert st.prompts["query"] == "the "  # the prompts came along
    # heal/evaluate/compress again keep the modules: a compressed copy of the compressed folder has them
    lm = load_model(out)
    ef.save_compressed(lm.model, tmp_path / "again", tokenizer=lm.tokenizer)
    assert (tmp_path / "again" / "modules.json").is_file() and (tmp_path / "again" / "1_Pooling").is_dir()


def test_plain_hf_folder_gets_no_sentence_transformers_files(tmp_path, tiny_bert_dir):
    from embfactor.pipeline import compress

    compress(str(tiny_bert_dir), ef.FactorizationConfig(rank=4), tmp_path / "o", progress=False)
    assert not (tmp_path / "o" / "modules.json").exists()


def test_modules_outside_the_folder_are_not_copied(tmp_path, st_folder):
    from embfactor.surgery.st_folder import sentence_transformers_files

    (tmp_path / "elsewhere").mkdir()
    modules = json.loads((st_folder / "modules.json").read_text())
    modules[1]["path"] = "../elsewhere"
    (st_folder / "modules.json").write_text(json.dumps(modules))
    assert "elsewhere" not in sentence_transformers_files(st_folder)
    assert "../elsewhere" not in sentence_transformers_files(st_folder)


# ------------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_minilm_sentence_transformers_and_from_pretrained(tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from embfactor.pipeline import compress
    from embfactor.eval.embed import pooled_embeddings
    from embfactor.models import load_model, minilm_path

    out = tmp_path / "m16"
    compress("minilm", ef.FactorizationConfig(ratio=16), out, progress=False)
    assert sorted(p.name for p in (out / "1_Pooling").iterdir()) == ["config.json"]
    texts = ["A man is playing a guitar.", "Compressed embeddings load everywhere."]
    st = SentenceTransformer(str(out), device="cpu")
    want = pooled_embeddings(load_model(out), texts)
    assert _max_diff(torch.from_numpy(st.encode(texts)), want) <= 1e-6
    # and on the original folder, sentence-transformers and embfactor's pooling agree too (same pipeline)
    original = SentenceTransformer(str(minilm_path()), device="cpu").encode(texts)
    assert _max_diff(torch.from_numpy(original), pooled_embeddings(load_model("minilm"), texts)) <= 1e-6
    hf = AutoModel.from_pretrained(out)
    assert type(hf.get_input_embeddings()).__name__ == "FactorizedEmbedding"
