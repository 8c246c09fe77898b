"""compress and heal verify what they wrote: the folder, loaded as users load it, scored against the original."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import embfactor as ef
from embfactor.cli.main import main
from embfactor.models import LoadedModel


def break_loaded_embeddings(monkeypatch) -> None:
    """Every folder loaded the way users load it comes back with a random embedding module: a saved model that is
    not the one that was compressed (as a format dropping its module's scale would be)."""
    import embfactor.models as models

    real = models._load_hf_folder

    def broken(path):
        model, tok = real(path)
        if not (Path(path) / "embfactor.json").is_file():  # the input model loads as it is
            return model, tok
        old = model.get_input_embeddings()
        torch.manual_seed(1)
        model.set_input_embeddings(nn.Embedding(old.num_embeddings, old.embedding_dim))
        return model, tok

    monkeypatch.setattr(models, "_load_hf_folder", broken)


def test_compress_reports_the_measured_figure_of_the_written_model(tiny_bert_dir, tmp_path, capsys):
    out, rep = tmp_path / "out", tmp_path / "rep.json"
    argv = ["compress", str(tiny_bert_dir), "--method", "int", "--method-option", "bits=8", "-o", str(out), "-q"]
    assert main([*argv, "--json", str(rep), "--verify", "8"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[2].startswith("written model, reloaded with BertModel.from_pretrained: fidelity ")  # the summary block leads the report
    v = json.loads(rep.read_text())["verified"]
    assert v["ok"] and v["metric"] == "fidelity" and v["text"] == "8 held-out Wikipedia passages"
    assert v["loaded_with"] == "BertModel.from_pretrained"
    assert v["measured"]["fidelity"] == pytest.approx(v["predicted"]["fidelity"], abs=1e-5)
    assert json.loads((out / "embfactor.json").read_text())["verified"]["measured"] == v["measured"]


def test_an_honest_poor_result_is_not_an_error(tiny_bert_dir, tmp_path):
    """Low rank 2 of a random table is a poor model, and a true one: compared with the prediction, it passes."""
    rep = tmp_path / "rep.json"
    assert main(["compress", str(tiny_bert_dir), "--rank", "2", "-o", str(tmp_path / "o"), "-q", "--json", str(rep)]) == 0
    v = json.loads(rep.read_text())["verified"]
    assert v["ok"] and v["measured"]["fidelity"] < 0.99


def test_compress_fails_and_writes_nothing_when_the_written_model_differs(tiny_bert_dir, tmp_path, capsys,
                                                                          monkeypatch):
    break_loaded_embeddings(monkeypatch)
    out, rep = tmp_path / "out", tmp_path / "rep.json"
    argv = ["compress", str(tiny_bert_dir), "--method", "int", "--method-option", "bits=8", "-o", str(out), "-q"]
    assert main([*argv, "--json", str(rep)]) == 2
    err = capsys.readouterr().err
    assert "far worse than the model that was compressed" in err and "nothing was written" in err
    assert not out.exists() and not rep.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary folder left either
    # the check can be turned off (and then nothing catches it)
    assert main([*argv, "--no-verify"]) == 0 and out.is_dir()


def test_compress_decoder_verifies_kl_top1_and_perplexity(tiny_gpt2, tmp_path):
    from tests.test_heal import word_tokenizer

    folder = tmp_path / "gpt2"
    tiny_gpt2.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    r = ef.compress(str(folder), method="int", method_options={"bits": 8}, output=tmp_path / "o", progress=False,
                    verify=1).to_dict()
    m = r["verified"]["measured"]
    assert r["verified"]["metric"] == "kl" and m["kl"] < 1e-3 and m["top1_agreement"] > 0.95
    assert m["perplexity_ratio"] == pytest.approx(1.0, abs=0.01)


def test_heal_verifies_its_final_save_and_fails_when_it_differs(tiny_bert, tmp_path, monkeypatch):
    from tests.test_heal import OPTS, TEXTS, word_tokenizer

    tok = word_tokenizer()
    teacher = LoadedModel("teacher", tiny_bert, tok, "encoder", Path("/nonexistent-teacher"))
    student_model = copy.deepcopy(tiny_bert)
    ef.factorize_(student_model, method="int", bits=8)
    student = LoadedModel("student", student_model, tok, "encoder", Path("/nonexistent-student"))
    from embfactor.train.heal import heal

    r = heal(student, teacher, texts=TEXTS, steps=2, output=tmp_path / "ok", verify=8, **OPTS)
    assert r["verified"]["ok"] and r["verified"]["measured"]["fidelity"] > 0.99
    break_loaded_embeddings(monkeypatch)
    with pytest.raises(ef.VerificationError, match="far worse"):
        heal(student, teacher, texts=TEXTS, steps=2, output=tmp_path / "bad", verify=8, **OPTS)
    assert not (tmp_path / "bad").exists()


def test_the_planner_s_check_catches_a_model_broken_in_memory_too(tiny_bert_dir, tmp_path, capsys, monkeypatch):
    """A replacement that loses part of the original module's forward (as a dropped sqrt(d) scale did) is wrong in
    memory and on disk alike: the written model is then compared with the plan's check of the same table, on the
    check's own text."""
    import embfactor.plan as plan

    real = plan.plan_compress_

    def scale_dropped(lm, config, **kw):
        rep = real(lm, config, **kw)
        with torch.no_grad():  # every row of the installed table 8x too small, in memory and as saved
            for p in lm.model.get_input_embeddings().parameters():
                if p.is_floating_point():
                    p.mul_(0.125)
        return rep

    out, rep = tmp_path / "out", tmp_path / "rep.json"
    argv = ["compress", str(tiny_bert_dir), "--size", "4x", "-o", str(out), "-q", "--json", str(rep)]
    assert main(argv) == 0  # as planned: passes, and the plan's check agrees with the written model
    check = json.loads(rep.read_text())["verified"]["plan_check"]
    assert check["measured"] == pytest.approx(check["predicted"], abs=1e-4)
    monkeypatch.setattr(plan, "plan_compress_", scale_dropped)
    assert main([*argv[:4], "-o", str(tmp_path / "bad"), "-q"]) == 2
    assert "predicted by the plan's check" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_decoder_figures_computed_a_few_positions_at_a_time_equal_the_whole_batch_formula(tiny_gpt2, tmp_path):
    """Verifier.score reads a window, then 32 positions at a time: the same KL, top-1 and perplexity as computed
    over the whole batch at once (as the check did before it held no vocabulary-sized tensor of the batch)."""
    import math

    import torch

    from embfactor.verify import Verifier
    from tests.test_heal import word_tokenizer

    folder = tmp_path / "gpt2"
    tiny_gpt2.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    lm = ef.load_model(str(folder))
    v = Verifier(lm, samples=2)
    assert v.ids.shape[1] > 32  # more than one chunk of positions per window
    with torch.no_grad():
        w = lm.model.get_input_embeddings().weight
        w.add_(0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
        out = torch.cat([torch.log_softmax(lm.model(input_ids=x[None]).logits.float(), -1) for x in v.ids])
    ref, tgt = v.reference, v.ids[:, 1:, None]
    nll, ref_nll = -float(out[:, :-1].gather(-1, tgt).mean()), -float(ref[:, :-1].gather(-1, tgt).mean())
    got = v.score(lm)
    assert got["kl"] == pytest.approx(float((ref.exp() * (ref - out)).sum(-1).mean()), rel=1e-4)
    assert got["kl"] > 1e-4
    assert got["top1_agreement"] == pytest.approx(float((out.argmax(-1) == ref.argmax(-1)).float().mean()))
    assert got["perplexity_ratio"] == pytest.approx(math.exp(nll - ref_nll), rel=1e-5)
