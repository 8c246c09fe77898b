"""The CLI as a user runs it: in-process through main(), on a tiny saved model folder."""

from __future__ import annotations

import json

import pytest

from embfactor.cli.main import main


def test_compress_writes_model_and_json(tiny_bert_dir, tmp_path, capsys):
    out, rep = tmp_path / "out", tmp_path / "rep.json"
    assert main(["compress", str(tiny_bert_dir), "--ratio", "3", "--output", str(out), "--json", str(rep), "-q"]) == 0
    text = capsys.readouterr().out
    for row in ("embedding parameters", "model parameters", "bytes on disk", "relative error", "optimum for rank"):
        assert row in text
    r = json.loads(rep.read_text())
    keys = {
        "model", "method", "rank", "vocab_size", "hidden_size", "embedding_params_before", "embedding_params_after",
        "model_params_before", "model_params_after", "ratio", "relative_error", "optimal_relative_error",
        "tied_head", "seconds",
    }
    assert keys <= r.keys()
    assert r["ratio"] >= 3 and r["bytes_after"] < r["bytes_before"]
    assert r["relative_error"] <= r["optimal_relative_error"] * 1.01 + 1e-9


def test_compressed_folder_is_a_model(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "out"
    main(["compress", str(tiny_bert_dir), "--rank", "8", "--output", str(out), "-q"])
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "factorized, rank 8" in capsys.readouterr().out
    # and compressing it again says clearly that it is already factorized
    assert main(["compress", str(out), "--rank", "4", "--output", str(tmp_path / "again"), "-q"]) == 2
    assert "already factorized" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("method", ["svd", "rsvd", "als"])
def test_compress_methods(tiny_bert_dir, tmp_path, method):
    rep = tmp_path / "r.json"
    args = ["compress", str(tiny_bert_dir), "--rank", "6", "--method", method, "-o", str(tmp_path / "o")]
    assert main([*args, "--json", str(rep), "-q"]) == 0
    assert json.loads(rep.read_text())["method"] == method


def test_inspect_plot_and_json(tiny_bert_dir, tmp_path, capsys):
    png, js = tmp_path / "s.png", tmp_path / "s.json"
    assert main(["inspect", str(tiny_bert_dir), "--plot", str(png), "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "embedding share" in text and "energy kept" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    facts = json.loads(js.read_text())
    assert facts["vocab_size"] == 120 and facts["hidden_size"] == 32 and facts["tied_head"] is False
    energies = [s["energy"] for s in facts["spectrum"]]
    assert energies == sorted(energies) and 0 < energies[0] < 1


def test_inspect_methods(capsys):
    assert main(["inspect", "--methods"]) == 0
    out = capsys.readouterr().out
    assert "svd" in out and "eig" in out and "als" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compress", "no/such/model", "--rank", "4", "-o", "X"], "not found: not a built-in name"),
        (["compress", "MODEL", "--rank", "0", "-o", "X"], "rank must be >= 1"),
        (["compress", "MODEL", "--ratio", "1", "-o", "X"], "ratio must be a finite number > 1"),
        (["compress", "MODEL", "--energy", "1.5", "-o", "X"], r"energy must be in (0, 1]"),
        (["compress", "MODEL", "--rank", "40", "-o", "X"], "< min(vocab, d)=32"),
        (["compress", "MODEL", "--rank", "4", "--method", "magic", "-o", "X"], "valid methods: als"),
        (["compress", "MODEL", "--rank", "4", "-o", "MODEL"], "is the input model's folder"),
    ],
)
def test_cli_bad_inputs(tiny_bert_dir, tmp_path, capsys, argv, message):
    argv = [a.replace("MODEL", str(tiny_bert_dir)).replace("X", str(tmp_path / "x")) for a in argv]
    before = sorted(p.name for p in tiny_bert_dir.iterdir())
    assert main([*argv, "-q"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert sorted(p.name for p in tiny_bert_dir.iterdir()) == before


def test_missing_target_is_usage_error(tiny_bert_dir, tmp_path, capsys):
    # not an argparse error any more (options such as int's bits= fix the size without a target; see
    # test_explicit_size.py), but still exit 2 with what to add
    assert main(["compress", str(tiny_bert_dir), "-o", str(tmp_path / "o")]) == 2
    assert "no size target: give one of --size" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bert_folder_without_pooler_runs_every_command(tiny_bert_dir, tmp_path, capsys):
    """Sentence-embedding exports saved with add_pooling_layer=False load, compress, heal, evaluate and serve."""
    import shutil

    import torch
    from transformers import BertModel

    import embfactor as ef

    folder = tmp_path / "no-pooler"
    shutil.copytree(tiny_bert_dir, folder)
    torch.manual_seed(0)
    BertModel(BertModel.config_class.from_pretrained(folder), add_pooling_layer=False).save_pretrained(folder)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        assert not [k for k in fh.keys() if "pooler" in k]
    lm = ef.load_model(folder)
    assert lm.model.pooler is None and lm.kind == "encoder"
    comp, healed, txt = tmp_path / "comp", tmp_path / "healed", tmp_path / "t.txt"
    txt.write_text("the cat sat on the mat\n\na good film\n\na bad movie\n\nthe dog is very good")
    assert main(["compress", str(folder), "--rank", "4", "-o", str(comp), "-q"]) == 0
    assert ef.load_model(comp).model.pooler is None
    assert main(["heal", str(comp), "--reference", str(folder), "-o", str(healed), "--text", str(txt), "--steps", "1",
                 "--batch-size", "2", "--max-length", "8", "-q"]) == 0
    assert main(["evaluate", str(healed), "--task", "similarity", "--reference", str(folder), "-q"]) == 0
    assert "fidelity" in capsys.readouterr().out
    from fastapi.testclient import TestClient

    from embfactor.server import create_app

    r = TestClient(create_app(ef.load_model(healed))).post("/embed", json={"texts": ["a good film"]})
    assert r.status_code == 200, r.text


def test_a_folder_without_pooler_loads_without_transformers_load_report(tiny_bert_dir, tmp_path):
    """transformers' report calls the absent pooler "newly initialized"; embfactor drops it, so nothing is logged."""
    import logging
    import shutil

    from transformers import BertModel

    import embfactor as ef

    folder = tmp_path / "no-pooler"
    shutil.copytree(tiny_bert_dir, folder)
    BertModel(BertModel.config_class.from_pretrained(folder), add_pooling_layer=False).save_pretrained(folder)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    # transformers' own handler holds the sys.stderr of its import (pytest's), so capture the records themselves
    loggers = [logging.getLogger(n) for n in ("transformers.modeling_utils", "transformers.distributed.tensor_parallel")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        assert ef.load_model(folder).model.pooler is None
        out = tmp_path / "out"
        assert main(["compress", str(folder), "--rank", "4", "-o", str(out), "-q"]) == 0
        records.clear()  # the compressed folder loads through embfactor's quantizer: no report either
        assert ef.load_model(out).model.pooler is None
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    assert not records, [r.getMessage()[:200] for r in records]


def test_a_partial_pooler_is_still_refused(tiny_bert_dir, tmp_path):
    """Only a wholly absent pooler is dropped: one that is half there means a damaged file."""
    import shutil

    from safetensors.torch import load_file, save_file

    from embfactor.errors import CorruptFileError
    from embfactor.models import load_model

    folder = tmp_path / "half"
    shutil.copytree(tiny_bert_dir, folder)
    t = load_file(folder / "model.safetensors")
    del t["pooler.dense.bias"]
    save_file(t, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptFileError, match=r"lacks 1 of the model's tensors \(pooler\.dense\.bias\)"):
        load_model(folder)


@pytest.mark.parametrize(("args", "stored_as", "top"), [
    (["--rank", "8"], "(factorized, rank 8)", 8),
    (["--rank", "5", "--quantize", "int8"], "(factorized, rank 5, quantized format)", 5),
    (["--ratio", "3", "--method", "tt"], "tt format)", None),
    (["--ratio", "3", "--method", "block"], "block format)", None),
])
def test_inspect_compressed_folders_of_every_format(tiny_bert_dir, tmp_path, capsys, args, stored_as, top):
    """No crash on tt/block/quantized outputs; no 'energy kept 1.0000' rows above a U·V format's rank."""
    out, js = tmp_path / "out", tmp_path / "i.json"
    assert main(["compress", str(tiny_bert_dir), *args, "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert stored_as in text, text
    ranks = [s["rank"] for s in json.loads(js.read_text())["spectrum"]]
    if top is not None:
        assert max(ranks) == top
    else:  # a TT or block table has a higher matrix rank than its budget rank: the rows above it say something
        assert max(ranks) > 8


def test_evaluate_with_reference_prints_the_references_own_score(tiny_bert_dir, tmp_path, capsys):
    out, js = tmp_path / "out", tmp_path / "e.json"
    assert main(["compress", str(tiny_bert_dir), "--rank", "4", "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--task", "similarity", "--reference", str(tiny_bert_dir), "-q",
                 "--json", str(js)]) == 0
    text = capsys.readouterr().out
    r = json.loads(js.read_text())
    assert "metric" in text and "model" in text.splitlines()[1] and "reference" in text.splitlines()[1]
    spearman = next(line for line in text.splitlines() if line.startswith("spearman *")).split()
    assert [float(x) for x in spearman[2:]] == [round(r["spearman"], 4), round(r["reference_spearman"], 4)]
    assert r["reference_spearman"] != r["spearman"] and "reference_pearson" in r


def test_help_states_model_defaults_truthfully(capsys):
    for cmd, says in (("evaluate", "(default"), ("inspect", "(default: minilm)")):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert ("(default" in text.split("MODEL", 2)[-1].split("options:")[0]) == (cmd == "inspect"), text
    assert says in text


def test_error_starts_its_own_line_after_a_progress_bar(tiny_bert_dir, tmp_path, capsys):
    """stderr is a pipe here: the bar's last redraw has no newline, the error must not be glued to it."""
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(tiny_bert_dir, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 100)
    assert main(["compress", str(bad), "--rank", "3", "-o", str(tmp_path / "o")]) == 2  # no -q: bars on
    err = capsys.readouterr().err
    assert "compress:" in err  # the bar did draw
    line = next(x for x in err.split("\n") if "error:" in x)
    assert line.startswith("embfactor compress: error: ") and "corrupt or truncated" in line, repr(err)


def test_healed_an_encoder_wording():
    from embfactor.cli.heal_cmd import render

    ev = {"loss": 1.0, "fidelity": 0.9}
    r = {"kind": "encoder", "mode": "distillation", "steps": 2, "seconds": 1.0, "trainable_params": 10, "best_step": 2,
         "eval_before": ev, "best_eval": ev, "output": "o"}
    assert render(r).startswith("healed an encoder (distillation)")
    assert render({**r, "kind": "decoder"}).startswith("healed a decoder")


def test_reconstruction_task_does_not_warn_about_sequence_length(tiny_bert_dir, tmp_path):
    """Counting tokens of whole articles is no forward pass: transformers' 'indexing errors' warning is noise."""
    import logging

    from transformers import AutoTokenizer

    from embfactor.eval.reconstruction import token_counts

    tok = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    tok.model_max_length = 4
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        counts = token_counts(tok, ["the cat sat on the mat and the dog is very good"], 120)
    finally:
        logger.removeHandler(handler)
    assert counts.sum() > 4
    assert not [r for r in records if "indexing errors" in r.getMessage()]


def test_quiet_silences_third_party_progress_bars(tmp_path, capsys, monkeypatch):
    """-q: no bar at all, transformers' own included ("Converting and de-quantizing GGUF tensors" when a GGUF file
    loads through transformers, which takes no flag to turn it off); without -q that bar shows."""
    from embfactor import gguf_loader
    from tests.test_gguf_loader import _tiny_llama, write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf", _tiny_llama(tied=True), tokenizer=True)
    monkeypatch.setattr(gguf_loader, "_unsupported", lambda reader: "load it through transformers")
    argv = ["compress", str(path), "--method", "int", "--method-option", "bits=8", "--verify", "1"]
    assert main([*argv, "-o", str(tmp_path / "loud")]) == 0
    assert "de-quantizing GGUF tensors" in capsys.readouterr().err  # the bar the test is about exists
    assert main([*argv, "-o", str(tmp_path / "quiet"), "-q"]) == 0
    err = capsys.readouterr().err
    assert "GGUF" not in err and "it/s" not in err and "%|" not in err, err
    from tqdm import tqdm

    assert not tqdm(range(1), file=None).disable  # restored after the command


def test_a_size_target_for_one_method_says_what_it_picked_and_what_it_narrowly_missed(tiny_bert_dir, tmp_path,
                                                                                       capsys, monkeypatch):
    import embfactor.decomposition.choice as choice

    monkeypatch.setattr(choice, "NEAR", 0.1)  # the tiny table's int-k settings are 6% apart or more
    fp32 = 4 * 120 * 32
    sizes = sorted({b for b, _ in choice.settings_for("int", 120, 32, {})})
    finer = next(b for b, lower in zip(sizes[1:], sizes) if b < lower * 1.08)  # a step finer by under 8%
    size = f"{fp32 * 1.01 / finer:.4f}x"  # its bytes are 1% over this budget
    rep = tmp_path / "r.json"
    argv = ["compress", str(tiny_bert_dir), "--method", "int", "--size", size, "-q", "--no-verify"]
    assert main([*argv, "-o", str(tmp_path / "a"), "--json", str(rep)]) == 0
    out = capsys.readouterr().out
    r = json.loads(rep.read_text())
    c = r["size_choice"]
    assert c["bytes"] == r["embedding_bytes_after"] < finer
    assert "int picked bits=" in out and f"{c['bytes']:,} bytes" in out
    f = c["finer"]
    assert f["bytes"] == finer and 0 < f["over"] <= 0.1 and "over the budget" in out
    assert f"{f['flags'][0]}, or {f['flags'][1]} instead of --size, gets it" in out
    # each suggested flag does get the finer setting
    for flags in (f["flags"][0].split(), f["flags"][1].split()):
        argv = ["compress", str(tiny_bert_dir), "--method", "int", *flags, "-q", "--no-verify"]
        assert main([*argv, "-o", str(tmp_path / "b"), "--json", str(rep)]) == 0
        assert json.loads(rep.read_text())["embedding_bytes_after"] == finer


def test_pq_15x_on_minilm_s_shape_names_sub_dim_4():
    """The issue's case, in arithmetic: MiniLM's table at --method pq --size 15x stores sub_dim 5 (18.4x) because
    sub_dim 4 (14.99x) is 0.04% over; the report names both flags, and --size 14.99x does pick sub_dim 4."""
    from embfactor.decomposition.choice import size_choice
    from embfactor.decomposition.codebook import codebook_bytes, plan_codebook

    vocab, d = 30522, 384
    budget = vocab * d * 4 / 15
    picked = plan_codebook(vocab, d, budget)
    c = size_choice("pq", vocab, d, budget, picked, codebook_bytes(vocab, d, sub_dim=picked["sub_dim"]))
    assert picked["sub_dim"] == 5 and c["finer"]["settings"] == {"sub_dim": 4}
    assert c["finer"]["flags"] == ["--size 14.99x", "--method-option sub_dim=4"]
    assert plan_codebook(vocab, d, vocab * d * 4 / 14.99)["sub_dim"] == 4
    # a budget that the finer setting misses by more than NEAR: only what was picked is said
    assert "finer" not in size_choice("pq", vocab, d, vocab * d * 4 / 17, plan_codebook(vocab, d, vocab * d * 4 / 17),
                                      codebook_bytes(vocab, d, sub_dim=5))
