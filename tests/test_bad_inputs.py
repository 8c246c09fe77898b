"""Every documented bad input of the CLI and the library: a clear error naming what is wrong (and the file), exit code
2 on the command line, nothing written, no model mutated."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import embfactor as ef
from embfactor.cli.main import main
from embfactor.config import FactorizationConfig
from embfactor.errors import (
    ConfigError,
    CorruptFileError,
    InvalidInputError,
    InvalidTypeError,
    ModelNotFoundError,
    SurgeryError,
    TokenIndexError,
    UnknownMethodError,
)
from embfactor.models import load_model
from embfactor.surgery import load_compressed, save_compressed

from .conftest import D, VOCAB

SRC = Path(__file__).resolve().parents[1] / "src" / "embfactor"


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """A tiny BERT folder and its rank-4 compressed output, built once; tests work on copies."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("bad-inputs")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    model = BertModel(cfg).eval()
    model.save_pretrained(root / "bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(VOCAB - 5)]]
    (root / "bert" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(root / "bert" / "vocab.txt"))
    tok.save_pretrained(root / "bert")
    ef.factorize_(model, rank=4, method="svd")
    save_compressed(model, root / "comp", tokenizer=tok)
    return {"bert": root / "bert", "comp": root / "comp"}


@pytest.fixture
def work(tmp_path, base) -> Path:
    shutil.copytree(base["bert"], tmp_path / "bert")
    shutil.copytree(base["comp"], tmp_path / "comp")
    return tmp_path


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root (hidden temporary folders included) with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert type(model.get_input_embeddings()) is nn.Embedding


def _edit_json(name: str, **changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        d = json.loads((folder / name).read_text())
        for k, v in changes.items():
            if v is KeyError:
                del d[k]
            else:
                d[k] = v
        (folder / name).write_text(json.dumps(d))

    return edit


def _unlink(*names: str) -> Callable[[Path], None]:
    return lambda folder: [(folder / n).unlink() for n in names]


def _write(name: str, data: bytes | Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def w(folder: Path) -> None:
        p = folder / name
        p.write_bytes(data(p.read_bytes()) if callable(data) else data)

    return w


def _drop_tensors(*names: str) -> Callable[[Path], None]:
    """Rewrite model.safetensors without ``names`` (a valid file that lacks some of the model's tensors)."""
    def drop(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "model.safetensors")
        for n in names:
            del tensors[n]
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    return drop


Q = "encoder.layer.0.attention.self.query.weight"

# (id, which folder, mutation, error class, file named in the message, text in the message)
FOLDER_CASES = [
    ("hf-no-config", "bert", _unlink("config.json"), ModelNotFoundError, "", "has no config.json"),
    ("hf-no-weights", "bert", _unlink("model.safetensors"), ModelNotFoundError, "", "safetensors weights only"),
    ("hf-corrupt-weights", "bert", _write("model.safetensors", b"\x00" * 4096), CorruptFileError, "model.safetensors",
     "corrupt or truncated safetensors"),
    ("hf-truncated-weights", "bert", _write("model.safetensors", lambda b: b[:1000]), CorruptFileError,
     "model.safetensors", "corrupt or truncated safetensors"),
    ("hf-config-not-json", "bert", _write("config.json", b"{bad"), CorruptFileError, "config.json",
     "cannot be read as a transformers config"),
    ("hf-config-wrong-type", "bert", _edit_json("config.json", hidden_size="big"), CorruptFileError, "config.json",
     "hidden_size"),
    ("hf-config-unknown-model-type", "bert", _edit_json("config.json", model_type="nosuch"), CorruptFileError,
     "config.json", "nosuch"),
    ("hf-config-shape-mismatch", "bert", _edit_json("config.json", hidden_size=64), CorruptFileError,
     "model.safetensors", "do not match"),
    ("hf-weights-lack-a-tensor", "bert", _drop_tensors(Q), CorruptFileError, "model.safetensors",
     rf"lacks 1 of the model's tensors \({re.escape(Q)}\); transformers would fill them with random values"),
    ("hf-weights-lack-embedding-and-pooler", "bert",
     _drop_tensors("embeddings.word_embeddings.weight", "pooler.dense.bias"), CorruptFileError, "model.safetensors",
     r"lacks 2 of the model's tensors \(embeddings\.word_embeddings\.weight, pooler\.dense\.bias\)"),
    ("hf-no-tokenizer", "bert", _unlink("tokenizer.json", "vocab.txt", "tokenizer_config.json"), ModelNotFoundError,
     "", "has no tokenizer"),
    ("ef-truncated-weights", "comp", _write("model.safetensors", lambda b: b[:-100]), CorruptFileError,
     "model.safetensors", "corrupt or truncated safetensors"),
    ("ef-garbage-header", "comp", _write("model.safetensors", b"\xff" * 64), CorruptFileError, "model.safetensors",
     "corrupt or truncated"),
    ("ef-missing-weights", "comp", _unlink("model.safetensors"), ModelNotFoundError, "model.safetensors",
     "is missing"),
    ("ef-weights-lack-a-tensor", "comp", _drop_tensors(Q), CorruptFileError, "model.safetensors",
     rf"weights do not match the model structure[\s\S]*Missing key[\s\S]*{re.escape(Q)}"),
    ("ef-missing-config", "comp", _unlink("config.json"), ModelNotFoundError, "config.json", "is missing"),
    ("ef-json-invalid", "comp", _write("embfactor.json", b"{"), CorruptFileError, "embfactor.json", "not valid JSON"),
    ("ef-json-not-object", "comp", _write("embfactor.json", b"[1, 2]"), CorruptFileError, "embfactor.json",
     "expected a JSON object"),
    ("ef-json-wrong-version", "comp", _edit_json("embfactor.json", format_version=99), CorruptFileError,
     "embfactor.json", "format_version 99 is not supported"),
    ("ef-json-unknown-layer", "comp", _edit_json("embfactor.json", layer_type="magic"), CorruptFileError,
     "embfactor.json", "unknown storage format 'magic'; valid formats:"),
    ("ef-json-missing-field", "comp", _edit_json("embfactor.json", rank=KeyError), CorruptFileError,
     "embfactor.json", r"missing fields \['rank'\]"),
    ("ef-json-bad-rank", "comp", _edit_json("embfactor.json", rank=0), CorruptFileError, "embfactor.json",
     "rank must be a positive integer"),
    ("ef-json-bad-layer-config", "comp", _edit_json("embfactor.json", layer_config={"rnk": 4}), CorruptFileError,
     "embfactor.json", "does not match the model"),
    ("ef-json-rank-mismatch", "comp", _edit_json("embfactor.json", layer_config={"rank": 5}), CorruptFileError,
     "model.safetensors", "weights do not match the model structure"),
    ("hf-config-zero-heads", "bert", _edit_json("config.json", num_attention_heads=0), CorruptFileError,
     "config.json", "num_attention_heads must be a positive integer, got 0"),
    ("hf-config-heads-not-dividing", "bert", _edit_json("config.json", num_attention_heads=3), CorruptFileError,
     "config.json", "hidden_size 32 is not divisible by num_attention_heads 3"),
    ("hf-config-fewer-layers", "bert", _edit_json("config.json", num_hidden_layers=0), CorruptFileError,
     "model.safetensors", r"holds 16 tensors the model built from .*config.json does not have \(encoder\.layer\.0\."),
    ("ef-config-zero-heads", "comp", _edit_json("config.json", num_attention_heads=0), CorruptFileError,
     "config.json", "num_attention_heads must be a positive integer, got 0"),
    ("ef-json-other-architecture", "comp", _edit_json("embfactor.json", architecture="GPT2LMHeadModel"),
     CorruptFileError, "embfactor.json", "architecture 'GPT2LMHeadModel' takes a GPT2Config, but .* is a BertConfig"),
    ("ef-json-top-rank-mismatch", "comp", _edit_json("embfactor.json", rank=7), CorruptFileError, "embfactor.json",
     "rank 7 disagrees with the stored factors, which have rank 4"),
    ("ef-json-vocab-mismatch", "comp", _edit_json("embfactor.json", vocab_size=999), CorruptFileError,
     "embfactor.json", "vocab_size 999 disagrees with the stored embedding"),
    ("ef-json-not-a-class", "comp", _edit_json("embfactor.json", architecture="os.system"), CorruptFileError,
     "embfactor.json", "is not a transformers model class"),
    ("ef-json-bad-dtype", "comp", _edit_json("embfactor.json", torch_dtype="save"), CorruptFileError,
     "embfactor.json", "is not a torch dtype"),
    ("ef-json-bad-factorization", "comp",
     _edit_json("embfactor.json", factorization={"rank": -1, "format_version": 1}), CorruptFileError,
     "embfactor.json", "rank must be >= 1"),
    ("ef-json-unknown-config-field", "comp",
     _edit_json("embfactor.json", factorization={"rank": 4, "colour": 1, "format_version": 1}), CorruptFileError,
     "embfactor.json", r"unknown fields \['colour'\]"),
]


@pytest.mark.parametrize(("which", "mutate", "err", "fname", "text"), [c[1:] for c in FOLDER_CASES],
                         ids=[c[0] for c in FOLDER_CASES])
def test_library_load_bad_folder(work, which, mutate, err, fname, text):
    folder = work / which
    mutate(folder)
    before = snapshot(work)
    named = re.escape(str(folder / fname) if fname else str(folder))
    with pytest.raises(err, match=f"{named}.*{text}" if text else named):
        load_model(folder)
    assert snapshot(work) == before


@pytest.mark.parametrize(("which", "mutate", "err", "fname", "text"), [c[1:] for c in FOLDER_CASES],
                         ids=[c[0] for c in FOLDER_CASES])
def test_cli_compress_bad_folder(work, capsys, which, mutate, err, fname, text):
    folder, out = work / which, work / "out"
    mutate(folder)
    before = snapshot(work)
    assert main(["compress", str(folder), "--rank", "3", "--output", str(out), "-q"]) == 2
    msg = capsys.readouterr().err
    assert msg.startswith("embfactor compress: error: ")
    assert str(folder / fname if fname else folder) in msg and re.search(text, msg)
    assert "Traceback" not in msg
    assert snapshot(work) == before and not out.exists()


@pytest.mark.parametrize(("fixture", "dropped", "named"), [
    ("tiny_gpt2", "transformer.wte.weight", "lm_head.weight, transformer.wte.weight"),  # tied head
    ("tiny_llama_tied", "model.embed_tokens.weight", "lm_head.weight, model.embed_tokens.weight"),
    ("tiny_llama_untied", "lm_head.weight", "lm_head.weight"),
    ("tiny_llama_untied", "model.norm.weight", "model.norm.weight"),
])
def test_hf_folder_lacking_tensors_is_refused_valid_one_loads(request, work, capsys, fixture, dropped, named):
    """A complete folder loads (tied heads and other expected-missing keys do not count); one tensor less does not."""
    model = request.getfixturevalue(fixture)
    folder = work / fixture
    model.save_pretrained(folder)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(work / "bert" / f, folder / f)
    lm = load_model(folder)
    want = model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in lm.model.state_dict().items())
    _drop_tensors(dropped)(folder)
    before = snapshot(work)
    with pytest.raises(CorruptFileError, match=re.escape(f"{folder / 'model.safetensors'}: lacks ") + r"\d+ .*"
                       + re.escape(f"({named})")):
        load_model(folder)
    assert main(["compress", str(folder), "--rank", "3", "--output", str(work / "out"), "-q"]) == 2
    msg = capsys.readouterr().err
    assert msg.startswith("embfactor compress: error: ") and f"({named})" in msg and "Traceback" not in msg
    assert snapshot(work) == before and not (work / "out").exists()


def test_missing_weights_ignores_only_expected_missing(tiny_gpt2, tiny_bert):
    """Whatever transformers reports: a tied copy whose source loaded, or a declared ignore pattern, is no error."""
    from embfactor.models import missing_weights

    assert missing_weights(tiny_gpt2, {"missing_keys": {"lm_head.weight"}}) == []
    both = {"lm_head.weight", "transformer.wte.weight"}
    assert missing_weights(tiny_gpt2, {"missing_keys": both}) == sorted(both)
    tiny_bert._keys_to_ignore_on_load_missing = [r"pooler\."]
    assert missing_weights(tiny_bert, {"missing_keys": {"pooler.dense.bias", "embeddings.LayerNorm.bias"}}) == [
        "embeddings.LayerNorm.bias"
    ]


def test_load_compressed_on_plain_hf_folder(work):
    with pytest.raises(ModelNotFoundError, match=r"is not an embfactor output: embfactor.json is missing"):
        load_compressed(work / "bert")


# ---------------------------------------------------------------- CLI arguments


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compress", "{work}/no-such", "--rank", "3", "-o", "{out}"], "not found: not a built-in name"),
        (["inspect", "{work}/no-such"], "not found: not a built-in name"),
        (["compress", "{work}/bert/config.json", "--rank", "3", "-o", "{out}"], "is a file; give the folder"),
        (["compress", "{work}/bert", "--rank", "0", "-o", "{out}"], "rank must be >= 1"),
        (["compress", "{work}/bert", "--rank", "-3", "-o", "{out}"], "rank must be >= 1"),
        (["compress", "{work}/bert", "--rank", "32", "-o", "{out}"], r"< min\(vocab, d\)=32, got rank=32"),
        (["compress", "{work}/bert", "--ratio", "1", "-o", "{out}"], "ratio must be a finite number > 1"),
        (["compress", "{work}/bert", "-o", "{out}"], "no size target: give one of --size"),
        (["compress", "{work}/bert", "--ratio", "0.5", "-o", "{out}"], "ratio must be a finite number > 1"),
        (["compress", "{work}/bert", "--ratio", "nan", "-o", "{out}"], "ratio must be a finite number > 1"),
        (["compress", "{work}/bert", "--ratio", "1e9", "-o", "{out}"], "largest reachable ratio"),
        (["compress", "{work}/bert", "--energy", "0", "-o", "{out}"], r"energy must be in \(0, 1\]"),
        (["compress", "{work}/bert", "--energy", "1.5", "-o", "{out}"], r"energy must be in \(0, 1\]"),
        (["compress", "{work}/bert", "--max-error", "0", "-o", "{out}"], r"max_error must be in \(0, 1\)"),
        (["compress", "{work}/bert", "--max-error", "1", "-o", "{out}"], r"max_error must be in \(0, 1\)"),
        (["compress", "{work}/bert", "--rank", "3", "--method", "magic", "-o", "{out}"], "valid methods: "),
        (["compress", "{work}/bert", "--rank", "3", "-o", "{work}/bert"], "is the input model's folder"),
        (["compress", "{work}/comp", "--rank", "3", "-o", "{work}/comp"], "is the input model's folder"),
        (["compress", "{work}/bert", "--rank", "3", "-o", "{work}/foreign"], "is not an embfactor output; refusing"),
        (["compress", "{work}/bert", "--rank", "3", "-o", "{work}/afile.txt"], "exists and is not a folder"),
        (["compress", "{work}/comp", "--rank", "3", "-o", "{out}"], "already factorized"),
    ],
)
def test_cli_bad_arguments(work, capsys, argv, message):
    (work / "foreign").mkdir()
    (work / "foreign" / "notes.txt").write_text("mine")
    (work / "afile.txt").write_text("mine")
    before = snapshot(work)
    argv = [a.format(work=work, out=work / "out") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert snapshot(work) == before and not (work / "out").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compress", "M", "--rank", "abc", "-o", "O"], "invalid int value: 'abc'"),
        (["compress", "M", "--rank", "2", "--ratio", "3", "-o", "O"], "not allowed with argument"),
        (["compress", "M", "--rank", "2"], "the following arguments are required: --output"),
        (["no-such-command"], "invalid choice"),
    ],
)
def test_cli_argument_syntax(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main([a.replace("O", str(tmp_path / "o")) for a in argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- library: factorize_, save, layers


@pytest.mark.parametrize(
    ("kwargs", "err", "message"),
    [
        ({"rank": 0}, ConfigError, "rank must be >= 1"),
        ({"rank": D}, ConfigError, r"< min\(vocab, d\)=32"),
        ({"rank": 2.5}, ConfigError, "rank must be an integer"),
        ({"rank": True}, ConfigError, "rank must be an integer"),
        ({"ratio": 1.0}, ConfigError, "ratio must be a finite number > 1"),
        ({"ratio": float("inf")}, ConfigError, "ratio must be a finite number > 1"),
        ({"energy": 0.0}, ConfigError, r"energy must be in \(0, 1\]"),
        ({"energy": 1.01}, ConfigError, r"energy must be in \(0, 1\]"),
        ({"max_error": 0.0}, ConfigError, r"max_error must be in \(0, 1\)"),
        ({"max_error": 1.5}, ConfigError, r"max_error must be in \(0, 1\)"),
        ({}, ConfigError, "give exactly one of rank=, ratio=, energy=, max_error=, size= \\(got none\\)"),
        ({"rank": 3, "ratio": 2}, ConfigError, r"got rank, ratio"),
        ({"rank": 3, "method": "magic"}, UnknownMethodError, "magic"),
        ({"rank": 3, "module_name": "nope"}, SurgeryError, "has no submodule 'nope'"),
    ],
)
def test_factorize_bad_settings_leave_model_untouched(tiny_bert, kwargs, err, message):
    before = state(tiny_bert)
    with pytest.raises(err, match=message):
        ef.factorize_(tiny_bert, **kwargs)
    assert_unchanged(tiny_bert, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_factorize_non_finite_embedding(tiny_bert, bad):
    with torch.no_grad():
        tiny_bert.get_input_embeddings().weight[7, 3] = bad
    before = state(tiny_bert)
    with pytest.raises(InvalidInputError, match=r"NaN or Inf \(first at row 7, column 3\)"):
        ef.factorize_(tiny_bert, rank=4)
    torch.testing.assert_close(tiny_bert.state_dict(), before, equal_nan=True, rtol=0, atol=0)
    assert type(tiny_bert.get_input_embeddings()) is nn.Embedding


def test_factorize_wrong_types(tiny_bert):
    with pytest.raises(InvalidTypeError, match="needs a torch nn.Module, got str"):
        ef.factorize_("minilm", rank=3)
    before = state(tiny_bert)
    with pytest.raises(SurgeryError, match="either config= or keyword settings, not both"):
        ef.factorize_(tiny_bert, FactorizationConfig(rank=3), rank=4)
    assert_unchanged(tiny_bert, before)


def test_already_factorized_is_refused_and_kept(tiny_gpt2):
    ef.factorize_(tiny_gpt2, rank=6)
    before = state(tiny_gpt2)
    with pytest.raises(SurgeryError, match="already factorized"):
        ef.factorize_(tiny_gpt2, rank=3)
    after = tiny_gpt2.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert tiny_gpt2.get_input_embeddings().rank == 6


def test_decompose_bad_matrices():
    with pytest.raises(InvalidInputError, match=r"2-D \(vocab × d\) matrix, got shape \(5,\)"):
        ef.decompose(torch.zeros(5), rank=2)
    with pytest.raises(InvalidTypeError, match="floating-point tensor, got dtype torch.int64"):
        ef.decompose(torch.zeros(6, 4, dtype=torch.long), rank=2)


def test_save_unfactorized_writes_nothing(tiny_bert, tmp_path):
    with pytest.raises(SurgeryError, match="is not factorized; call embfactor.factorize_"):
        save_compressed(tiny_bert, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_foreign_and_input_folders(tiny_bert, tmp_path):
    ef.factorize_(tiny_bert, rank=4)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    before = snapshot(tmp_path)
    with pytest.raises(InvalidInputError, match="is not an embfactor output; refusing to overwrite"):
        save_compressed(tiny_bert, foreign)
    with pytest.raises(InvalidInputError, match="is the input model's folder"):
        save_compressed(tiny_bert, foreign, inputs=(foreign,))
    assert snapshot(tmp_path) == before


def test_bad_token_ids(tiny_bert):
    ef.factorize_(tiny_bert, rank=4)
    emb = tiny_bert.get_input_embeddings()
    bad = VOCAB + 5
    with pytest.raises(TokenIndexError, match=rf"token id {bad} is out of range .* \(valid ids: 0..{VOCAB - 1}\)"):
        emb(torch.tensor([[1, VOCAB + 5]]))
    with pytest.raises(TokenIndexError, match="token id -1 is out of range"):
        tiny_bert(input_ids=torch.tensor([[2, -1]]))
    with pytest.raises(InvalidTypeError, match="integer tensor .* got dtype torch.float32"):
        emb(torch.tensor([[1.0, 2.0]]))


def test_sentence_embeddings_bad_texts(tiny_bert):
    from embfactor.eval.embed import sentence_embeddings

    for bad in ([], "a single string"):
        with pytest.raises(InvalidInputError, match="non-empty list of strings"):
            sentence_embeddings(tiny_bert, None, bad)


def test_config_from_dict_rejects_unknown_and_versions():
    with pytest.raises(CorruptFileError, match=r"cfg.json: format_version 7 is not supported"):
        FactorizationConfig.from_dict({"rank": 3, "format_version": 7}, source="cfg.json")
    with pytest.raises(CorruptFileError, match=r"cfg.json: expected a JSON object"):
        FactorizationConfig.from_dict([1], source="cfg.json")


# ---------------------------------------------------------------- no pickles, no remote code


def test_pickle_weights_are_never_loaded(work):
    """A folder with only pytorch_model.bin is refused without opening it: a malicious pickle cannot run."""
    folder = work / "bert"
    (folder / "model.safetensors").unlink()
    sentinel = work / "pwned"

    class Evil:
        def __reduce__(self):
            return (pathlib.Path.touch, (sentinel,))

    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(ModelNotFoundError, match=r"found pytorch_model.bin: pickle files can run code"):
        load_model(folder)
    assert not sentinel.exists()


def test_source_never_enables_remote_code_or_pickles():
    """A static check of the package's calls (not its strings: the model card tells *users* about
    ``trust_remote_code=True``): no trust_remote_code=True, no torch.load / pickle.load(s), no allow_pickle=True,
    no use_safetensors=None/False."""
    import ast

    def bad(node: ast.AST) -> bool:
        if not isinstance(node, ast.Call):
            return False
        f = node.func
        name = f"{getattr(f.value, 'id', '')}.{f.attr}" if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        if name in ("torch.load", "pickle.load", "pickle.loads"):
            return True
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        const = {k: v.value for k, v in kw.items() if isinstance(v, ast.Constant)}
        return (const.get("trust_remote_code") is True or const.get("allow_pickle") is True
                or ("use_safetensors" in const and const["use_safetensors"] in (None, False)))

    hits = [f"{p.relative_to(SRC)}:{n.lineno}" for p in SRC.rglob("*.py")
            for n in ast.walk(ast.parse(p.read_text())) if bad(n)]
    assert hits == []
    assert bad(ast.parse("f(x, trust_remote_code=True)").body[0].value)  # the check finds what it looks for
    assert bad(ast.parse("torch.load(p)").body[0].value) and not bad(ast.parse("f('trust_remote_code=True')").body[0].value)


# ---------------------------------------------------------------- outputs: never delete or overwrite what is not ours


@pytest.fixture
def no_load(monkeypatch):
    """Make any model load fail loudly: the checks under test must come before the (slow) load."""
    import embfactor.models

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(embfactor.models, "load_model", refuse)


@pytest.mark.parametrize(("input_rel", "output_rel", "message"), [
    ("nest/hfmodel", "nest", "contains the input model"),                 # the input inside an earlier output
    ("nest/hfmodel", "nest/hfmodel/..", "contains the input model"),      # the same through ".."
    ("nest/hfmodel", "link", "contains the input model"),                 # the same through a symbolic link
    ("bert", "bert/sub", "lies inside the input model's folder"),         # the output inside the input
    ("bert", "bert-link", "is the input model's folder"),
])
def test_output_containing_or_inside_the_input_is_refused(work, capsys, no_load, input_rel, output_rel, message):
    shutil.copytree(work / "comp", work / "nest")  # an earlier embfactor output: replacing it was allowed
    shutil.copytree(work / "bert", work / "nest" / "hfmodel")
    (work / "link").symlink_to(work / "nest")
    (work / "bert-link").symlink_to(work / "bert")
    before = snapshot(work)
    assert main(["compress", str(work / input_rel), "--rank", "3", "-o", str(work / output_rel), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("embfactor compress: error: output folder ") and message in err, err
    assert snapshot(work) == before


def test_save_compressed_refuses_an_output_holding_the_input(tiny_bert, work):
    ef.factorize_(tiny_bert, rank=4)
    shutil.copytree(work / "bert", work / "comp" / "hf")
    before = snapshot(work)
    with pytest.raises(InvalidInputError, match=r"contains the input model .*comp/hf: replacing it would delete"):
        save_compressed(tiny_bert, work / "comp", inputs=(work / "comp" / "hf",))
    assert snapshot(work) == before


def test_replacing_an_output_keeps_files_the_user_added(work, capsys):
    out = work / "out"
    assert main(["compress", str(work / "bert"), "--rank", "3", "-o", str(out), "-q"]) == 0
    manifest = json.loads((out / "embfactor-manifest.json").read_text())["entries"]
    assert sorted(manifest) == sorted(p.name for p in out.iterdir() if p.name != "embfactor-manifest.json")
    assert main(["compress", str(work / "bert"), "--rank", "4", "-o", str(out), "-q"]) == 0  # only ours: replaced
    assert json.loads((out / "embfactor.json").read_text())["rank"] == 4
    (out / "my_results.txt").write_text("mine")
    (out / "plots").mkdir()
    (out / "plots" / "a.png").write_bytes(b"png")
    capsys.readouterr()
    before = snapshot(work)
    assert main(["compress", str(work / "bert"), "--rank", "5", "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "holds files embfactor did not write (my_results.txt, plots/)" in err, err
    assert snapshot(work) == before and (out / "my_results.txt").read_text() == "mine"


def test_a_file_added_to_a_listed_folder_or_during_a_save_is_kept(tmp_path):
    from embfactor.fileio import MARKER_FILE, atomic_directory

    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / MARKER_FILE).write_text("{}")
        (tmp / "tok").mkdir()
        (tmp / "tok" / "vocab.txt").write_text("a")
    (out / "tok" / "notes.txt").write_text("mine")  # inside a folder embfactor wrote
    with pytest.raises(InvalidInputError, match=r"did not write \(tok/notes.txt\)"), atomic_directory(out) as tmp:
        pass
    (out / "tok" / "notes.txt").unlink()
    with pytest.raises(InvalidInputError, match=r"did not write \(late.txt\)"), atomic_directory(out) as tmp:
        (tmp / MARKER_FILE).write_text("{}")
        (out / "late.txt").write_text("added while the save ran")  # e.g. during a long heal
    assert (out / "late.txt").read_text() == "added while the save ran" and (out / "tok" / "vocab.txt").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


@pytest.mark.parametrize(("extra", "refused"), [(None, False), ("my_results.txt", True), ("heal_state.json", False)])
def test_output_without_manifest_is_replaced_only_with_known_files(work, capsys, extra, refused):
    """An output of an earlier embfactor (no manifest) may hold only the files embfactor is known to write."""
    for name in ("embfactor-manifest.json", "README.md", "embfactor_remote.py"):  # what earlier versions lacked
        (work / "comp" / name).unlink()
    if extra:
        (work / "comp" / extra).write_text("x")
    before = snapshot(work)
    code = main(["compress", str(work / "bert"), "--rank", "3", "-o", str(work / "comp"), "-q"])
    err = capsys.readouterr().err
    if refused:
        assert code == 2 and f"holds files embfactor did not write ({extra})" in err, err
        assert snapshot(work) == before
    else:
        assert code == 0, err
        assert json.loads((work / "comp" / "embfactor.json").read_text())["rank"] == 3


LONG = "n" * 300


@pytest.mark.parametrize(("argv", "message"), [
    (["compress", "{bert}", "--rank", "3", "-o", "/proc/x"], "cannot write output /proc/x: "),
    (["compress", "{bert}", "--rank", "3", "-o", "{work}/afile.txt/sub"], "afile.txt is a file, not a folder"),
    (["compress", "{bert}", "--rank", "3", "-o", "{work}/" + LONG], "a name in it is 300 bytes long"),
    (["compress", "{bert}", "--rank", "3", "-o", "{work}/" + "n" * 240], "use at most"),  # too long with .tmp-...
    (["compress", "{bert}", "--rank", "3", "-o", "{out}", "--json", "/proc/x.json"], "cannot write --json /proc/x"),
    (["compress", "{bert}", "--rank", "3", "-o", "{out}", "--json", "{work}/" + LONG], "--json .* 300 bytes long"),
    (["compress", "{bert}", "--rank", "3", "-o", "{out}", "--json", "{bert}/model.safetensors"], "inside the input"),
    (["compress", "{bert}", "--rank", "3", "-o", "{out}", "--json", "{work}"], "is a folder"),
    (["heal", "{comp}", "--reference", "{bert}", "-o", "/proc/x", "--steps", "1"], "cannot write output /proc/x"),
    (["heal", "{comp}", "--reference", "{bert}", "-o", "{out}", "--steps", "1", "--json", "/proc/x.json"],
     "cannot write --json"),
    (["evaluate", "{bert}", "--task", "similarity", "--json", "/proc/x.json"], "cannot write --json /proc/x.json"),
    (["inspect", "{bert}", "--json", "{work}/afile.txt/x.json"], "afile.txt is a file, not a folder"),
    (["inspect", "{bert}", "--plot", "/proc/x.png"], "cannot write --plot /proc/x.png"),
    (["sweep", "{bert}", "--json", "/proc/x.json"], "cannot write --json /proc/x.json"),
    (["train", "--steps", "1", "--output", "/proc/x"], "cannot write --output /proc/x"),
])
def test_unwritable_outputs_are_refused_before_loading(work, capsys, no_load, monkeypatch, argv, message):
    import embfactor.train.scratch

    monkeypatch.setattr(embfactor.train.scratch, "train_variants", lambda *a, **k: pytest.fail("trained"))
    (work / "afile.txt").write_text("mine")
    before = snapshot(work)
    argv = [a.format(work=work, out=work / "out", bert=work / "bert", comp=work / "comp") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"embfactor {argv[0]}: error: ") and re.search(message, err), err
    assert snapshot(work) == before


# ---------------------------------------------------------------- labels files


@pytest.mark.parametrize(("name", "data", "message"), [
    ("binary.csv", b"text,label\n\x89PNG\r\n\x1a\n\x00\x00\xff\xfe,1\n", r"binary.csv:2: not UTF-8 text \(byte 0x89 at offset 11\)"),
    ("latin1.csv", "text,label\ngood,1\ncaf\xe9 bad,0\n".encode("latin-1"), r"latin1.csv:3: not UTF-8 text"),
    ("nul.csv", b"text,label\ngood\x00,1\nbad,0\n", r"nul.csv:2: holds NUL bytes: a binary file"),
    ("unclosed.csv", b'text,label\ngood,1\n"bad movie,0\nworse,0\n', r"unclosed.csv:3: not valid CSV: .*never closed"),
    ("commas.csv", b"text,label\ngood, very good,1\nbad,0\n", r"commas.csv:2: 2 columns expected"),
    ("one-label.csv", b"text,label\ngood,1\nfine,1\n", r"one-label.csv: needs at least two different labels"),
    ("one-label.jsonl", b'{"text": "a", "label": 1}\n{"text": "b", "label": 1}\n', "needs at least two different"),
    ("no-rows.csv", b"text,label\n", r"no-rows.csv: no labelled rows"),
])
def test_bad_labels_files(work, capsys, no_load, name, data, message):
    """Refused with the file and line named, by the library and by both commands that read labels, before loading."""
    from embfactor.data import read_labelled

    f = work / name
    f.write_bytes(data)
    with pytest.raises(InvalidInputError, match=message):
        read_labelled(f)
    before = snapshot(work)
    for argv in (["heal", str(work / "comp"), "--reference", str(work / "bert"), "-o", str(work / "out"),
                  "--steps", "1", "--labels", str(f), "-q"],
                 ["evaluate", str(work / "comp"), "--task", "classification", "--labels", str(f), "-q"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"embfactor {argv[0]}: error: ") and re.search(message, err), err
    assert snapshot(work) == before


def test_good_labels_file_with_quoted_commas_and_newlines(tmp_path):
    from embfactor.data import read_labelled

    f = tmp_path / "ok.csv"
    f.write_text('text,label\n"good, very good",pos\n"two\nlines",neg\n')
    assert read_labelled(f) == (["good, very good", "two\nlines"], ["pos", "neg"])


@pytest.mark.parametrize(("vocab", "d", "rank"), [(100, 16, 16), (100, 16, 40), (10, 16, 10)])
def test_factorized_embedding_refuses_rank_at_least_min_dims(vocab, d, rank):
    from embfactor.layers import FactorizedEmbedding

    with pytest.raises(ConfigError, match=rf"rank must be < min\(num_embeddings, embedding_dim\)={min(vocab, d)}, "
                                          rf"got rank={rank}"):
        FactorizedEmbedding(vocab, d, rank=rank)
    assert FactorizedEmbedding(vocab, d, rank=min(vocab, d) - 1).rank == min(vocab, d) - 1  # as decompose allows


@pytest.mark.parametrize(("argv", "message"), [
    (["compress", "{bert}", "--rank", "3", "-o", "{out}", "--text", "{work}/none.txt"], "text file .*none.txt does not"),
    (["compress", "{bert}", "--ratio", "0.5", "-o", "{out}"], "ratio must be a finite number > 1"),
    (["evaluate", "{bert}", "--task", "classification", "--labels", "{work}/none.csv"], "labels file .* does not exist"),
    (["evaluate", "{bert}", "--task", "classification", "--folds", "1"], "--folds must be at least 2, got 1"),
    (["evaluate", "{bert}", "--task", "perplexity", "--max-tokens", "0"], "--max-tokens must be at least 2"),
    (["evaluate", "{bert}", "--task", "perplexity", "--window", "8", "--stride", "9"], "--stride 9 must not exceed"),
    (["evaluate", "{bert}", "--task", "reconstruction", "--queries", "0"], "--queries must be at least 1"),
    (["heal", "{comp}", "--reference", "{bert}", "-o", "{out}", "--steps", "0"], "steps must be a positive integer"),
    (["heal", "{comp}", "--reference", "{bert}", "-o", "{out}", "--minutes", "-1"], "minutes must be a positive"),
    (["heal", "{comp}", "--reference", "{bert}", "-o", "{out}", "--steps", "1", "--lr", "-1"], r"lr must be in \(0, 1\)"),
    (["heal", "{comp}", "--reference", "{bert}", "-o", "{out}", "--steps", "1", "--batch-size", "0"],
     "batch_size must be a positive integer"),
    (["heal", "{comp}", "--reference", "{bert}", "-o", "{out}", "--steps", "1", "--text", "{work}/none.txt"],
     "does not exist"),
])
def test_cheap_checks_come_before_the_model_loads(work, capsys, no_load, argv, message):
    before = snapshot(work)
    argv = [a.format(work=work, out=work / "out", bert=work / "bert", comp=work / "comp") for a in argv]
    assert main([*argv, "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"embfactor {argv[0]}: error: ") and re.search(message, err), err
    assert snapshot(work) == before


@pytest.fixture
def immutable(work):
    """An empty folder and one with the Linux immutable attribute (skipped where chattr is not permitted)."""
    import subprocess

    folder = work / "imm"
    folder.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("chattr +i is not permitted here")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize(("target", "message"), [
    ("imm", "is immutable or append-only"),              # replacing it would fail at the very end
    ("imm/x", r"cannot write output .*imm/x: Operation not permitted"),
])
def test_immutable_output_is_refused_before_loading(work, immutable, capsys, no_load, target, message):
    assert main(["compress", str(work / "bert"), "--rank", "3", "-o", str(work / target), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("embfactor compress: error: ") and re.search(message, err), err
    assert list(immutable.iterdir()) == [] and not [p for p in work.iterdir() if ".tmp-" in p.name]


@pytest.fixture
def word_level_bert(tmp_path):
    """A BERT whose word-level tokenizer has no unknown token: any word outside its 120 raises while encoding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder = tmp_path / "wl"
    BertModel(BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, pad_token_id=0)).save_pretrained(folder)
    vocab = {w: i for i, w in enumerate(["[PAD]", "the", "of", "and", "in", *(f"w{i}" for i in range(115))])}
    tok = Tokenizer(models.WordLevel(vocab))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]").save_pretrained(folder)
    (tmp_path / "ok.txt").write_text("the of and in w1 w2 w3\n\nw5 w6 the of w7 w8\n")
    return folder


@pytest.mark.parametrize("extra, remedy", [([], "give --text"), (["--text", "ok.txt"], "pass --no-verify")],
                         ids=["calibration", "verification"])
def test_a_tokenizer_that_cannot_encode_the_text_is_exit_2_before_any_work(word_level_bert, tmp_path, capsys,
                                                                            extra, remedy):
    extra = [str(tmp_path / e) if e.endswith(".txt") else e for e in extra]
    out = tmp_path / "out"
    assert main(["compress", str(word_level_bert), "--size", "4x", "-o", str(out), "-q", *extra]) == 2
    err = capsys.readouterr().err
    assert "Missing [UNK] token" in err and remedy in err and "Traceback" not in err
    assert not out.exists()
    # the remedies work: encodable text and no verification write the model
    assert main(["compress", str(word_level_bert), "--size", "4x", "-o", str(out), "-q", "--no-verify",
                 "--text", str(tmp_path / "ok.txt")]) == 0
