"""A compressed folder never loads as a random table without embfactor (issue 31).

Every folder embfactor writes carries zero-size guard tensors under the table's dense names (a plain transformers
load raises on their shape) and ships ``embfactor_remote.py`` (``trust_remote_code=True`` decodes the table in plain
PyTorch). In-process: the shipped decoder equals embfactor's table for every storage format. In fresh processes
where ``import embfactor`` fails: a plain load of an encoder, a decoder and a sentence-transformers folder exits
with the error, and the trust_remote_code load matches the embfactor-loaded model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import embfactor as ef
from embfactor.surgery import remote_code
from embfactor.surgery.share import GUARD_NOTE, REMOTE_FILE
from tests.conftest import _llama, write_st_modules
from tests.test_hf_loading import CASES, IDS, _bert, _compress

ROOT = Path(__file__).resolve().parents[1]
# formats the shipped file does not decode: trust_remote_code refuses them with the install hint
NOT_SHIPPED = {"block", "tt"}


def _decoded(folder: Path) -> torch.Tensor:
    from transformers import AutoConfig

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    model = __import__("transformers").AutoModel.from_config(
        AutoConfig.for_model(**{k: v for k, v in json.loads((folder / "config.json").read_text()).items()
                                if k not in ("quantization_config", "auto_map")}))
    state = remote_code.dense_state_dict(model, remote_code.read_tensors(folder), qc, torch.float32)
    return state[f"{qc['embedding_module']}.weight"]


@pytest.mark.parametrize("case", CASES)
def test_shipped_decoder_equals_the_stored_table(tmp_path, case):
    _compress(_bert(), case, tmp_path / "f")
    table = ef.load_compressed(tmp_path / "f").get_input_embeddings()
    if case.split("-")[0] in NOT_SHIPPED:
        with pytest.raises(remote_code.EmbfactorRemoteError, match="pip install embfactor"):
            _decoded(tmp_path / "f")
        return
    want = table(torch.arange(table.num_embeddings))
    assert torch.allclose(_decoded(tmp_path / "f"), want, atol=1e-6, rtol=0)


def test_folder_carries_guards_loader_and_auto_map(tmp_path):
    from safetensors import safe_open

    _compress(_llama(True), "intk", tmp_path / "f")
    with safe_open(str(tmp_path / "f" / "model.safetensors"), "pt") as fh:
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    assert shapes["model.embed_tokens.weight"] == (0,) and shapes["lm_head.weight"] == (0,)
    assert shapes[GUARD_NOTE] == (0,)
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    assert config["model_type"] == "llama"  # transformers.js and ONNX tools read it
    assert config["auto_map"]["AutoModelForCausalLM"] == "embfactor_remote.AutoModelForCausalLM"
    assert (tmp_path / "f" / REMOTE_FILE).read_text() == Path(remote_code.__file__).read_text()


def test_save_pretrained_of_a_loaded_model_keeps_the_guards(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    _compress(_llama(True), "codebook", tmp_path / "f")
    AutoModelForCausalLM.from_pretrained(tmp_path / "f").save_pretrained(tmp_path / "again")
    with safe_open(str(tmp_path / "again" / "model.safetensors"), "pt") as fh:
        assert GUARD_NOTE in fh.keys() and tuple(fh.get_slice("model.embed_tokens.weight").get_shape()) == (0,)


# --- fresh processes without embfactor -------------------------------------------------------------------------------
_NO_EMBFACTOR = """
import sys
sys.modules["embfactor"] = None  # `import embfactor` raises ImportError, even from a library
sys.path = [p for p in sys.path if not p.rstrip("/").endswith("/src")]
import torch, transformers
"""


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin",
           "TRANSFORMERS_VERBOSITY": "warning", "HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-c", _NO_EMBFACTOR + textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)


def test_decoder_without_embfactor_fails_plain_and_loads_with_trust_remote_code(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "dec"
    _compress(_llama(True), "tiered-compact", folder)
    with torch.inference_mode():
        want = AutoModelForCausalLM.from_pretrained(folder)(IDS).logits
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    tokens = ef.load_compressed(folder).generate(IDS[:1], **gen)
    torch.save({"ids": IDS, "gen": gen}, tmp_path / "inputs.pt")
    plain = _run(f"""
        transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r})
        print("LOADED")
    """, tmp_path)
    assert plain.returncode != 0 and "LOADED" not in plain.stdout
    assert "ignore_mismatched_sizes" in plain.stderr and GUARD_NOTE in plain.stderr  # the report names the remedy
    remote = _run(f"""
        d = torch.load({str(tmp_path / 'inputs.pt')!r})
        m = transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert "embfactor" not in sys.modules or sys.modules["embfactor"] is None
        with torch.inference_mode():
            torch.save({{"logits": m(d["ids"]).logits, "tokens": m.generate(d["ids"][:1], **d["gen"])}},
                       {str(tmp_path / 'out.pt')!r})
    """, tmp_path)
    assert remote.returncode == 0, remote.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    cos = torch.nn.functional.cosine_similarity(out["logits"].flatten(0, 1), want.flatten(0, 1), dim=-1)
    assert float(cos.min()) >= 0.9999 and torch.equal(out["tokens"], tokens)


def test_sentence_transformers_folder_without_embfactor(tmp_path):
    """An encoder with int4 rest Linears: plain SentenceTransformer fails; trust_remote_code matches embfactor's."""
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "enc"
    model = _bert()
    ef.factorize_(model, method="pq", sub_dim=4, K=16)
    from embfactor.surgery.rest import store_rest_

    store_rest_(model, "int4")
    vocab = {f"w{i}": i for i in range(120)} | {"[UNK]": 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="w0")
    ef.save_compressed(model, folder, tokenizer=fast)
    write_st_modules(folder, 32)
    texts = ["w5 w7 w9 w11", "w4 w8 w15"]
    want = SentenceTransformer(str(folder)).encode(texts, convert_to_tensor=True)
    plain = _run(f"""
        from sentence_transformers import SentenceTransformer
        SentenceTransformer({str(folder)!r}).encode(["w5"])
        print("LOADED")
    """, tmp_path)
    assert plain.returncode != 0 and "LOADED" not in plain.stdout
    remote = _run(f"""
        from sentence_transformers import SentenceTransformer
        m = SentenceTransformer({str(folder)!r}, trust_remote_code=True)
        torch.save(m.encode({texts!r}, convert_to_tensor=True), {str(tmp_path / 'st.pt')!r})
    """, tmp_path)
    assert remote.returncode == 0, remote.stderr[-3000:]
    got = torch.load(tmp_path / "st.pt")
    assert float(torch.nn.functional.cosine_similarity(got, want).min()) >= 0.9999


# --- the model card ----------------------------------------------------------------------------------------------------
SOURCE_CARD = "---\nlicense: apache-2.0\nlanguage: en\ntags:\n- original-tag\n---\n# Tiny BERT\n\nORIGINAL CARD BODY\n"


def test_compress_and_heal_write_a_model_card_that_keeps_the_source_card(tiny_bert_dir, tmp_path):
    from huggingface_hub import ModelCard

    from embfactor.cli.main import main
    from tests.test_heal import TEXTS

    (tiny_bert_dir / "README.md").write_text(SOURCE_CARD)
    comp, healed = tmp_path / "c", tmp_path / "h"
    assert main(["compress", str(tiny_bert_dir), "--rank", "4", "--method", "svd", "-o", str(comp), "-q"]) == 0
    card = ModelCard.load(comp / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "feature-extraction"
    assert "embfactor" in meta["tags"] and (meta["license"], meta["language"]) == ("apache-2.0", "en")
    record = json.loads((comp / "embfactor.json").read_text())
    fidelity = record["verified"]["measured"]["fidelity"]
    assert f"fidelity **{fidelity:.4f}**" in card.text and "trust_remote_code=True" in card.text
    assert f"{record['report']['embedding_bytes_after'] / 1e6:,.2f} MB" in card.text
    assert card.text.count("ORIGINAL CARD BODY") == 1 and (tiny_bert_dir / "README.md").read_text() == SOURCE_CARD

    txt = tmp_path / "t.txt"
    txt.write_text("\n\n".join(TEXTS))
    assert main(["heal", str(comp), "--reference", str(tiny_bert_dir), "-o", str(healed), "--text", str(txt), "-q",
                 "--steps", "2", "--batch-size", "4", "--max-length", "16"]) == 0
    again = ModelCard.load(healed / "README.md")
    healed_fidelity = json.loads((healed / "embfactor.json").read_text())["verified"]["measured"]["fidelity"]
    assert f"fidelity **{healed_fidelity:.4f}**" in again.text
    assert again.text.count("ORIGINAL CARD BODY") == 1 and again.text.count("# Tiny BERT") == 1  # not nested
    assert again.data.to_dict()["license"] == "apache-2.0"


def test_upgrade_rewrites_an_earlier_folder_with_guards_loader_and_card(tmp_path, tiny_bert_dir, capsys):
    from safetensors import safe_open

    from embfactor.cli.main import main

    old = Path(__file__).parent / "fixtures" / "v1" / "factorized"  # written by embfactor 0.1.0: no guards
    with safe_open(str(old / "model.safetensors"), "pt") as fh:
        assert GUARD_NOTE not in fh.keys()
    assert main(["upgrade", str(old), "-o", str(tmp_path / "new")]) == 0
    with safe_open(str(tmp_path / "new" / "model.safetensors"), "pt") as fh:
        assert GUARD_NOTE in fh.keys()
    assert {REMOTE_FILE, "README.md", "embfactor.json"} <= {p.name for p in (tmp_path / "new").iterdir()}
    # not an embfactor output: exit 2 before anything is loaded, nothing written
    assert main(["upgrade", str(tiny_bert_dir), "-o", str(tmp_path / "x")]) == 2
    assert "embfactor.json is missing" in capsys.readouterr().err and not (tmp_path / "x").exists()
