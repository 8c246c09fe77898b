"""Healing: distillation reduces the loss (encoder and decoder), CLI output loads, resume, supervised, bad inputs."""

from __future__ import annotations

import copy
import importlib
import json
import math
import re
import types
from pathlib import Path

import pytest
import torch

import embfactor as ef
from embfactor.errors import ConfigError, InvalidInputError, SurgeryError
from embfactor.formats import RowFormat
from embfactor.models import LoadedModel
from embfactor.train.heal import STATE_JSON, STATE_TENSORS, HealConfig, heal

from .conftest import VOCAB

WORDS = (
    "the of and in to a was is for on as by with he that at from his it an were are which this be also or had has "
    "first one their its new after who they two her she been other when there all during into school time may "
    "years more most only over city some world would where later up such used many can state about national out "
    "known university united then made film south american system"
).split()
TEXTS = [
    "the city was known as the first national school in the world",
    "he made a film about the university and its new system",
    "the south american state has many schools and one university",
    "after two years she was known for her work in the city",
] * 4


def word_tokenizer():
    """A word-level fast tokenizer over VOCAB ids (the fixture BERT tokenizer maps every word to [UNK])."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "</s>"]
    vocab = list(dict.fromkeys(specials + WORDS))
    vocab += [f"w{i}" for i in range(VOCAB - len(vocab))]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab[:VOCAB])}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")


def pair(model, kind: str, rank: int = 4) -> tuple[LoadedModel, LoadedModel]:
    tok = word_tokenizer()
    teacher = LoadedModel("teacher", model, tok, kind, Path("/nonexistent-teacher"))
    student_model = copy.deepcopy(model)
    ef.factorize_(student_model, rank=rank, method="svd")
    return LoadedModel("student", student_model, tok, kind, Path("/nonexistent-student")), teacher


OPTS = {"lr": 2e-2, "eval_every": 3, "eval_size": 8, "batch_size": 4, "max_length": 24, "progress": False,
        "eval_texts": TEXTS[:8]}


def test_heal_encoder_reduces_distillation_loss(tiny_bert):
    student, teacher = pair(tiny_bert, "encoder")
    frozen = {k: v.clone() for k, v in student.model.named_parameters() if "word_embeddings" not in k}
    r = heal(student, teacher, texts=TEXTS, steps=6, **OPTS)
    assert r["steps"] == 6 and r["mode"] == "distillation"
    assert r["best_eval"]["loss"] < 0.9 * r["eval_before"]["loss"]
    assert r["best_eval"]["fidelity"] > r["eval_before"]["fidelity"]
    for k, v in student.model.named_parameters():  # only the factors were trained
        if k in frozen:
            assert torch.equal(v, frozen[k]), k


def test_heal_train_all_trains_every_weight(tiny_gpt2):
    student, teacher = pair(tiny_gpt2, "decoder")
    before = {k: v.clone() for k, v in student.model.named_parameters()}
    r = heal(student, teacher, texts=TEXTS * 4, steps=4, train_all=True, **{**OPTS, "lr": 1e-3})
    assert r["train_all"] and r["trainable_params"] == sum(p.numel() for p in student.model.parameters())
    assert r["best_eval"]["loss"] < r["eval_before"]["loss"]
    changed = [k for k, v in student.model.named_parameters() if not torch.equal(v, before[k])]
    assert any("attn" in k for k in changed) and any("mlp" in k for k in changed)
    # the tied head still shares the (trained) factors
    assert student.model.get_output_embeddings().embedding is student.model.get_input_embeddings()


def test_heal_decoder_reduces_kl(tiny_gpt2):
    student, teacher = pair(tiny_gpt2, "decoder")
    r = heal(student, teacher, texts=TEXTS * 4, steps=6, **OPTS)
    assert r["best_eval"]["loss"] < 0.9 * r["eval_before"]["loss"]
    assert student.model.get_output_embeddings().embedding is student.model.get_input_embeddings()


def test_heal_supervised_head(tiny_bert, tmp_path):
    student, teacher = pair(tiny_bert, "encoder")
    # teacher needs a real source folder only for the output-overlap check; the student must be saveable
    texts = [f"the film was good {w}" for w in WORDS[:20]] + [f"the film was bad {w}" for w in WORDS[:20]]
    labels = ["pos"] * 20 + ["neg"] * 20
    r = heal(student, teacher, labels=(texts, labels), steps=6, output=tmp_path / "sup", **OPTS)
    assert r["mode"] == "supervised" and 0.0 <= r["best_eval"]["accuracy"] <= 1.0
    assert json.loads((tmp_path / "sup" / "classifier.json").read_text())["classes"] == ["neg", "pos"]
    assert (tmp_path / "sup" / "classifier.safetensors").is_file()


def test_heal_mismatched_vocab_writes_nothing(tiny_bert, tmp_path):
    from transformers import BertConfig, BertModel

    student, _ = pair(tiny_bert, "encoder")
    other = BertModel(BertConfig(vocab_size=VOCAB + 8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=64))
    teacher = LoadedModel("other", other, word_tokenizer(), "encoder", Path("/nonexistent"))
    with pytest.raises(InvalidInputError, match=f"{VOCAB}×32 but the reference's is {VOCAB + 8}×32"):
        heal(student, teacher, texts=TEXTS, steps=2, output=tmp_path / "o", **OPTS)
    assert not (tmp_path / "o").exists()


def test_heal_empty_texts(tiny_bert):
    student, teacher = pair(tiny_bert, "encoder")
    with pytest.raises(InvalidInputError, match="empty"):
        heal(student, teacher, texts=["", "  "], steps=2, **OPTS)


def test_heal_cli_writes_loadable_output_and_resumes(tiny_bert_dir, tmp_path):
    from embfactor.cli.main import main

    comp, out = tmp_path / "c", tmp_path / "healed"
    assert main(["compress", str(tiny_bert_dir), "--rank", "4", "--method", "svd", "-o", str(comp), "-q"]) == 0
    txt = tmp_path / "t.txt"
    txt.write_text("\n\n".join(TEXTS))
    base = ["heal", str(comp), "--reference", str(tiny_bert_dir), "-o", str(out), "--text", str(txt), "-q",
            "--eval-every", "2", "--batch-size", "4", "--max-length", "16"]
    assert main(base + ["--steps", "2", "--json", str(tmp_path / "h.json")]) == 0
    lm = ef.load_model(str(out))
    assert lm.compressed and lm.record["healing"]["steps"] == 2
    assert (out / STATE_JSON).is_file() and (out / STATE_TENSORS).is_file()
    assert not list(out.glob("*.pt")) and not list(out.glob("*.bin"))  # no pickles
    assert main(base + ["--steps", "4", "--resume"]) == 0
    assert json.loads((out / STATE_JSON).read_text())["step"] == 4


def test_heal_cli_bad_inputs_write_nothing(tiny_bert_dir, tmp_path, capsys):
    from embfactor.cli.main import main

    comp = tmp_path / "c"
    assert main(["compress", str(tiny_bert_dir), "--rank", "4", "-o", str(comp), "-q"]) == 0
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    nolabel = tmp_path / "l.csv"
    nolabel.write_text("text,category\ngood film,pos\nbad film,neg\n")
    cases = [
        (["--text", str(tmp_path / "missing.txt")], "does not exist"),
        (["--text", str(empty)], "no text found"),
        (["--labels", str(nolabel)], "no 'label' column"),
        (["--loss-chunk", "-1"], "loss_chunk must be an integer ≥ 0, got -1"),
    ]
    for extra, msg in cases:
        out = tmp_path / "o"
        rc = main(["heal", str(comp), "--reference", str(tiny_bert_dir), "-o", str(out), "--steps", "1", "-q", *extra])
        assert rc == 2
        assert msg in capsys.readouterr().err
        assert not out.exists()


# ----------------------------------------------------------------------------------------------- progress, budget


def test_heal_evaluates_the_end_and_shows_the_current_best(tiny_bert, capsys):
    """An interval longer than the run still evaluates the last step, and the bar's best= is the final best."""
    student, teacher = pair(tiny_bert, "encoder")
    r = heal(student, teacher, texts=TEXTS, steps=5, **{**OPTS, "eval_every": 50, "progress": True})
    assert [h["step"] for h in r["history"]] == [0, 5]
    assert r["last_eval"]["step"] == 5 and r["best_eval"]["loss"] < r["eval_before"]["loss"]
    shown = re.findall(r"best=([0-9.]+)", capsys.readouterr().err)
    assert shown and shown[-1] == f"{r['best_eval']['loss']:.4f}"


def virtual_clock(monkeypatch, step_seconds: float, start: float = 0.0) -> None:
    """heal's clock made virtual: only an optimizer step advances it, by ``step_seconds`` (tests then do not depend
    on the machine's load)."""
    heal_module = importlib.import_module("embfactor.train.heal")  # the module (the package exports the function)
    clock = [start]
    monkeypatch.setattr(heal_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0],
                                                                   process_time=lambda: clock[0]))
    step = torch.optim.AdamW.step

    def slow_step(self, *a, **k):
        clock[0] += step_seconds
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", slow_step)


def test_heal_keeps_the_time_budget_with_the_last_step(tiny_bert, monkeypatch):
    """A step starts only if it and the final evaluation fit: 0.6 s steps in a 2 s budget stop at 1.8 s, not 2.4 s.

    The loop's clock is virtual (only the optimizer step advances it), so the test does not depend on the load.
    """
    student, teacher = pair(tiny_bert, "encoder")
    virtual_clock(monkeypatch, step_seconds=0.6, start=1000.0)
    r = heal(student, teacher, texts=TEXTS, minutes=2 / 60, **{**OPTS, "eval_every": 100})
    assert r["steps"] == 3 and r["seconds"] == pytest.approx(1.8)
    # eval_every=100 is never reached, but a minutes budget is evaluated every 1/8 of it (0.25 s): after each
    # 0.6 s step here, so slow steps still give held-out evaluations to keep the best of; the end is evaluated
    assert [h["step"] for h in r["history"]] == [0, 1, 2, 3]


def test_a_time_budget_is_evaluated_every_eighth_of_it(tiny_bert, monkeypatch):
    """0.1 s steps in an 8 s budget with eval_every=1000: an evaluation about every 1 s (8 in all, and the end)."""
    student, teacher = pair(tiny_bert, "encoder")
    virtual_clock(monkeypatch, step_seconds=0.1)
    r = heal(student, teacher, texts=TEXTS, minutes=8 / 60, **{**OPTS, "eval_every": 1000})
    steps = [h["step"] for h in r["history"]]
    assert steps[0] == 0 and steps[-1] == r["steps"] and 8 <= len(steps) - 1 <= 9
    gaps = [b - a for a, b in zip(steps[1:-1], steps[2:-1])]
    assert gaps and all(g in (10, 11) for g in gaps), steps  # 1 s of 0.1 s steps (float sums: 10 or 11)


# ----------------------------------------------------------------------------------------------- atomic output

# Runs `embfactor heal` with os.replace / os.fsync / the folder exchange instrumented: each call is an event, seen
# before and after it happens; at the event named by KILL_AT ("after rename_exchange#1": the first exchange, once
# done; "swapped:after fsync#1": the first fsync after it) the process SIGKILLs itself: a kill -9 at an exact moment.
KILLER = """
import os, signal, sys
from collections import Counter
import embfactor.fileio as fio
kill_at, seen, phase = os.environ["KILL_AT"], Counter(), [""]

def event(name):
    name = phase[0] + name
    seen[name] += 1
    if f"{name}#{seen[name]}" == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    if name.endswith("after rename_exchange"):
        phase[0] = "swapped:"

def wrap(mod, attr):
    orig = getattr(mod, attr)
    def wrapped(*a, **k):
        event("before " + attr)
        r = orig(*a, **k)
        event("after " + attr)
        return r
    setattr(mod, attr, wrapped)

for mod, attr in ((os, "replace"), (os, "fsync"), (fio, "rename_exchange")):
    wrap(mod, attr)
from embfactor.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def _complete_heal_output(out: Path) -> int:
    """The step count of a complete `heal --labels` output (model, classifier and resume state of one run)."""
    from embfactor.train.heal import HEAD_FILE, HEAD_JSON

    names = {p.name for p in out.iterdir()}
    for need in ("model.safetensors", "config.json", "embfactor.json", HEAD_FILE, HEAD_JSON, STATE_JSON,
                 STATE_TENSORS):
        assert need in names, f"{need} missing from {sorted(names)}"
    steps = ef.load_model(str(out)).record["healing"]["steps"]
    assert json.loads((out / STATE_JSON).read_text())["step"] == steps  # model and state are of the same run
    assert json.loads((out / HEAD_JSON).read_text())["classes"] == ["bad", "good"]
    return steps


@pytest.mark.slow  # four child processes (~7 CPU-seconds each, mostly imports)
def test_heal_labels_output_is_old_or_new_whenever_killed(tiny_bert_dir, tmp_path):
    """kill -9 of `heal --labels` before, during and after the swap: the target is the complete old or new output."""
    import os
    import shutil
    import subprocess
    import sys

    from embfactor.cli.main import main

    comp, old = tmp_path / "c", tmp_path / "old"
    assert main(["compress", str(tiny_bert_dir), "--rank", "4", "--method", "svd", "-o", str(comp), "-q"]) == 0
    labels = tmp_path / "l.csv"
    labels.write_text("text,label\n" + "".join(f"the {w} film is very good,good\nthe {w} film is very bad,bad\n"
                                               for w in ("cat", "dog", "mat", "movie", "a", "on")))
    args = ["heal", str(comp), "--reference", str(tiny_bert_dir), "--labels", str(labels), "-q", "--eval-every", "1",
            "--batch-size", "4", "--max-length", "16"]
    assert main(args + ["-o", str(old), "--steps", "1"]) == 0
    assert _complete_heal_output(old) == 1

    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    src = str(Path(ef.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    # files written into the temporary folder but none flushed; just before and just after the exchange; after the
    # folder's fsync. Run side by side, each on its own copy of the old output.
    moments = ["before fsync#1", "before rename_exchange#1", "after rename_exchange#1", "swapped:after fsync#1"]
    procs = []
    for i, kill_at in enumerate(moments):
        target = tmp_path / f"out{i}"
        shutil.copytree(old, target)
        cmd = [sys.executable, str(script), *args, "-o", str(target), "--steps", "2"]
        procs.append((kill_at, target, subprocess.Popen(cmd, env={**env, "KILL_AT": kill_at},
                                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
    found = {}
    for kill_at, target, proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == -9, (kill_at, err.decode()[-2000:])
        found[kill_at] = _complete_heal_output(target)
    # (where the file system cannot exchange two folders, "after rename_exchange" is still before the two renames)
    assert found["before fsync#1"] == found["before rename_exchange#1"] == 1, found
    assert found["swapped:after fsync#1"] == 2 and found["after rename_exchange#1"] in (1, 2), found


# ----------------------------------------------------------------------------------------------- any storage format


class ToyCodebook(RowFormat):
    """A toy storage format: each row is one of 8 float codewords (trainable); the codes are integer buffers."""

    def __init__(self, vocab: int, d: int, padding_idx: int | None = None, codes_as: str = "buffer") -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = vocab, d, padding_idx
        self.codebook = torch.nn.Parameter(torch.randn(8, d) * 0.3)
        codes = torch.arange(vocab, dtype=torch.uint8) % 8
        if codes_as == "buffer":
            self.register_buffer("codes", codes)
        else:  # an integer nn.Parameter (frozen: integers cannot require gradients)
            self.codes = torch.nn.Parameter(codes, requires_grad=False)

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        return self.codebook[self.codes[ids].long()]

    def format_config(self) -> dict:
        return {}

    @classmethod
    def empty(cls, num_embeddings, embedding_dim, padding_idx, *, device=None, dtype=None, **config):
        return cls(num_embeddings, embedding_dim, padding_idx)


def toy_pair(model, codes_as: str = "buffer") -> tuple[LoadedModel, LoadedModel]:
    tok = word_tokenizer()
    student_model = copy.deepcopy(model)
    student_model.set_input_embeddings(ToyCodebook(VOCAB, model.config.hidden_size, codes_as=codes_as))
    return (LoadedModel("student", student_model, tok, "encoder", Path("/nonexistent-student")),
            LoadedModel("teacher", model, tok, "encoder", Path("/nonexistent-teacher")))


@pytest.mark.parametrize("codes_as", ["buffer", "parameter"])
@pytest.mark.parametrize("train_all", [False, True])
def test_heal_trains_any_formats_float_parameters_never_its_codes(tiny_bert, train_all, codes_as):
    """Generic choice of what trains: a format's float parameters always, its integer codes (a buffer or an integer
    parameter) never, the rest of the model with train_all only (a format unknown to heal: defined here)."""
    student, teacher = toy_pair(tiny_bert, codes_as)
    emb = student.model.get_input_embeddings()
    codebook, codes = emb.codebook.detach().clone(), emb.codes.clone()
    rest = {k: v.detach().clone() for k, v in student.model.named_parameters() if "word_embeddings" not in k}
    r = heal(student, teacher, texts=TEXTS, steps=3, train_all=train_all, **OPTS)
    assert not torch.equal(emb.codebook, codebook)  # trained
    assert torch.equal(emb.codes, codes) and emb.codes.dtype == torch.uint8  # never trained, never cast
    assert not emb.codes.requires_grad
    changed = [k for k, v in student.model.named_parameters() if k in rest and not torch.equal(v, rest[k])]
    assert bool(changed) is train_all, changed
    expected = 8 * 32 + (sum(v.numel() for v in rest.values()) if train_all else 0)
    assert r["trainable_params"] == expected


def test_heal_refuses_a_format_with_nothing_to_train(tiny_bert):
    """A format whose tensors are all integer codes or buffers has nothing to heal alone: say what would work."""
    student, teacher = toy_pair(tiny_bert)
    emb = student.model.get_input_embeddings()
    emb.codebook.requires_grad_(False)
    del emb.codebook
    emb.register_buffer("codebook", torch.randn(8, 32))
    with pytest.raises(SurgeryError, match="no floating-point parameters to train.*--train-all"):
        heal(student, teacher, texts=TEXTS, steps=1, **OPTS)
    r = heal(student, teacher, texts=TEXTS, steps=1, train_layernorm=True, **OPTS)
    assert r["trainable_params"] > 0


@pytest.mark.parametrize("opts, match", [
    ({"lr": 0}, r"lr must be in \(0, 1\), got 0"),
    ({"lr": float("nan")}, r"lr must be in \(0, 1\), got nan"),
    ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ({"eval_every": 2.5}, "eval_every must be a positive integer, got 2.5"),
    ({"warmup_steps": -1}, "warmup_steps must be an integer ≥ 0, got -1"),
    ({"weight_decay": -0.1}, "weight_decay must be a finite number ≥ 0, got -0.1"),
    ({"bf16": "yes"}, "bf16 must be True, False or 'auto', got 'yes'"),
    ({"train_all": 1}, "train_all must be True or False, got 1"),
    ({"minutes": -1}, "minutes must be a positive number, got -1"),
    ({"steps": True}, "steps must be a positive integer, got True"),
    ({"learning_rate": 1e-3}, r"unknown healing options \['learning_rate'\]; valid: batch_size, bf16"),
])
def test_heal_config_errors_quote_value_and_range(opts, match):
    with pytest.raises(ConfigError, match=match):
        HealConfig.from_options(**opts)


def test_heal_takes_a_config_and_options_override_it(tiny_bert):
    student, teacher = pair(tiny_bert, "encoder")
    cfg = HealConfig(steps=2, lr=2e-2, batch_size=4, max_length=24, eval_size=8, eval_texts=TEXTS[:8])
    r = heal(student, teacher, texts=TEXTS, config=cfg, batch_size=2, progress=False)
    assert r["steps"] == 2 and r["batch_size"] == 2 and r["lr"] == 2e-2
    with pytest.raises(ConfigError, match="give a healing budget"):
        heal(student, teacher, texts=TEXTS, config=HealConfig(), progress=False)


def test_heal_twice_in_one_process_with_other_precision(tiny_bert):
    """bf16 autocast is per run: Accelerate's process-wide mixed_precision refused a second, different setting.
    "auto" turns it on where the device has native bf16 arithmetic."""
    from embfactor.train.heal import bf16_supported

    for bf16 in (True, False, True, "auto"):
        student, teacher = pair(tiny_bert, "encoder")
        r = heal(student, teacher, texts=TEXTS, steps=1, bf16=bf16, **OPTS)
        assert r["bf16"] is (bf16_supported("cpu") if bf16 == "auto" else bf16) and r["steps"] == 1


@pytest.mark.slow  # two processes of torch + transformers + accelerate (~30 s on a busy 2-core machine)
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_heal_under_two_cpu_processes(tiny_bert_dir, tmp_path, launcher):
    """Two CPU processes, started by `torchrun --nproc_per_node 2` or by `accelerate launch --multi_gpu
    --num_processes 2` with ACCELERATE_USE_CPU=1 (its --cpu flag starts one process without MPI): both train in step
    (each on its share of the batch, gradients averaged), agree on when to stop, and the main one writes a loadable
    output and the report."""
    import os
    import socket
    import subprocess
    import sys

    from embfactor.cli.main import main

    comp, out = tmp_path / "c", tmp_path / "healed"
    assert main(["compress", str(tiny_bert_dir), "--rank", "4", "--method", "svd", "-o", str(comp), "-q"]) == 0
    txt = tmp_path / "t.txt"
    txt.write_text("\n\n".join(TEXTS))
    with socket.socket() as s:  # a free port for the processes' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = str(Path(ef.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    if launcher == "torchrun":
        start = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    else:
        start = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--main_process_port", str(port)]
    cmd = [*start, "-m", "embfactor.cli.main",
           "heal", str(comp), "--reference", str(tiny_bert_dir), "-o", str(out), "--text", str(txt),
           "--steps", "4", "--batch-size", "4", "--max-length", "16", "--eval-every", "2",
           "--lr", "2e-2", "--json", str(tmp_path / "h.json"), "-q"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "h.json").read_text())
    assert r["processes"] == 2 and r["steps"] == 4
    assert r["best_eval"]["loss"] < r["eval_before"]["loss"]
    lm = ef.load_model(str(out))
    assert lm.record["healing"]["processes"] == 2 and json.loads((out / STATE_JSON).read_text())["step"] == 4
    assert proc.stdout.count("healed a") == 1  # the main process reports


@pytest.mark.parametrize("fixture, method, options", [
    ("tiny_bert", "pq", {"sub_dim": 4, "K": 16}),
    ("tiny_llama_tied", "int", {"bits": 2, "group": 16}),
])
def test_heal_trains_half_precision_codebooks_and_scales_in_float32(request, tmp_path, fixture, method, options):
    """Codebooks and int-k scales are stored in float16: AdamW on them directly turned the loss into NaN at step 1
    (its second moment and eps underflow). Healing trains float32 copies and gives back float16: the output has the
    stored dtype and byte count, trained values, and loads."""
    model = request.getfixturevalue(fixture)
    kind = "encoder" if fixture == "tiny_bert" else "decoder"
    tok = word_tokenizer()
    student_model = copy.deepcopy(model)
    ef.factorize_(student_model, method=method, **options)  # the options fix the size
    emb = student_model.get_input_embeddings()
    halves = {k: v.detach().clone() for k, v in emb.named_parameters() if v.dtype == torch.float16}
    assert halves, "the format under test stores no float16 parameter"
    nbytes = emb.num_bytes()
    student = LoadedModel("student", student_model, tok, kind, Path("/nonexistent-student"))
    teacher = LoadedModel("teacher", model, tok, kind, Path("/nonexistent-teacher"))
    r = heal(student, teacher, texts=TEXTS, steps=4, output=tmp_path / "out", **{**OPTS, "lr": 1e-2})
    assert math.isfinite(r["best_eval"]["loss"]) and r["best_eval"]["loss"] < r["eval_before"]["loss"]
    # the format's own healing settings fill what the caller left unset; what the caller gave wins
    assert (r["train_all"], r["lr_rest"], r["lr"]) == (True, 1e-5, 1e-2)
    now = dict(emb.named_parameters())
    assert {k: now[k].dtype for k in halves} == {k: torch.float16 for k in halves}
    assert any(not torch.equal(now[k], v) for k, v in halves.items())  # trained
    assert emb.num_bytes() == nbytes
    loaded = ef.load_compressed(tmp_path / "out").get_input_embeddings()
    assert loaded.num_bytes() == nbytes
    assert all(torch.equal(dict(loaded.named_parameters())[k], now[k]) for k in halves)


def test_format_heal_defaults_yield_to_explicit_options(tiny_bert):
    """A codebook table heals with its own settings (every weight, relative lr 3e-3 / 1e-5) unless told otherwise; a low-rank
    table with HealConfig's (table only, lr 5e-4)."""
    tok = word_tokenizer()
    student_model = copy.deepcopy(tiny_bert)
    ef.factorize_(student_model, method="pq", sub_dim=4, K=16)
    student = LoadedModel("student", student_model, tok, "encoder", Path("/nonexistent-student"))
    teacher = LoadedModel("teacher", tiny_bert, tok, "encoder", Path("/nonexistent-teacher"))
    opts = {k: v for k, v in OPTS.items() if k != "lr"}
    r = heal(student, teacher, texts=TEXTS, steps=1, **opts)
    assert (r["train_all"], r["lr"], r["relative_lr"], r["lr_rest"]) == (True, 3e-3, True, 1e-5)
    assert r["trainable_params"] > student_model.get_input_embeddings().num_params * 2
    r = heal(student, teacher, texts=TEXTS, steps=1, train_all=False, lr=1e-3, **opts)
    assert (r["train_all"], r["lr"]) == (False, 1e-3)
    assert r["trainable_params"] == sum(p.numel() for p in student_model.get_input_embeddings().parameters()
                                        if p.is_floating_point())
    s2, t2 = pair(tiny_bert, "encoder")
    r = heal(s2, t2, texts=TEXTS, steps=1, **opts)
    assert (r["train_all"], r["lr"], r["lr_rest"]) == (False, 5e-4, None)


@pytest.mark.parametrize("relative", [True, False])
def test_relative_lr_steps_each_table_tensor_by_lr_times_its_rms(tiny_bert, relative):
    """Adam's first step moves every entry by lr (±): with relative_lr, by lr × the tensor's RMS, so a tensor of
    small entries (int8 scales) is not wrecked by the lr that suits codebooks."""
    tok = word_tokenizer()
    student_model = copy.deepcopy(tiny_bert)
    ef.factorize_(student_model, method="pq", sub_dim=4, K=16, codebook_dtype="float32")
    emb = student_model.get_input_embeddings()
    with torch.no_grad():
        emb.codebooks.mul_(0.01)  # small entries, as int8 scales have
    before = emb.codebooks.detach().clone()
    rms = float(before.pow(2).mean().sqrt())
    student = LoadedModel("student", student_model, tok, "encoder", Path("/nonexistent-student"))
    teacher = LoadedModel("teacher", tiny_bert, tok, "encoder", Path("/nonexistent-teacher"))
    opts = {**OPTS, "lr": 1e-2, "eval_every": 100, "warmup_steps": 0}
    heal(student, teacher, texts=TEXTS, steps=1, train_all=False, relative_lr=relative, **opts)
    moved = (emb.codebooks.detach() - before).abs()
    step = 1e-2 * rms if relative else 1e-2
    assert moved.max() == pytest.approx(step, rel=0.05)


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_int8_codebooks_train_as_floats_and_are_saved_as_int8(tiny_bert, tiny_gpt2, tmp_path, kind):
    model = tiny_bert if kind == "encoder" else tiny_gpt2
    tok = word_tokenizer()
    student_model = copy.deepcopy(model)
    ef.factorize_(student_model, method="pq", sub_dim=4, K=16, codebook_dtype="int8")
    emb = student_model.get_input_embeddings()
    before_q, before_rows = emb.codebooks.detach().clone(), emb.dense().detach().clone()
    student = LoadedModel("student", student_model, tok, kind, Path("/nonexistent-student"))
    teacher = LoadedModel("teacher", model, tok, kind, Path("/nonexistent-teacher"))
    r = heal(student, teacher, texts=TEXTS, steps=1, train_all=False, output=tmp_path / "h",
             **{**OPTS, "lr": 1e-2, "relative_lr": True, "eval_every": 100, "warmup_steps": 0})
    assert r["trainable_params"] == emb.codebooks.numel()  # the values train (scales are folded into them)
    # in memory and on disk: int8 values (moved by training) times fp16 column scales, the same rows
    assert emb.codebooks.dtype == torch.int8 and emb.codebook_scale.dtype == torch.float16
    assert not torch.equal(emb.codebooks, before_q)
    assert not torch.allclose(emb.dense(), before_rows)
    loaded = ef.load_compressed(tmp_path / "h").get_input_embeddings()
    assert loaded.codebooks.dtype == torch.int8 and torch.equal(loaded.codebooks, emb.codebooks)
    torch.testing.assert_close(loaded.dense(), emb.dense())
    assert loaded.num_bytes() == emb.num_bytes() == r_bytes(emb)


def r_bytes(emb) -> int:
    return sum(t.numel() * t.element_size() for t in emb.state_dict().values())


def test_decoder_loss_is_the_masked_mean_kl_from_teacher_logprobs():
    """KL(teacher ‖ student) per position, from the teacher's log-probabilities, masked mean: the formula written out."""
    from embfactor.train.distill import decoder_loss, teacher_logprobs

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    tl, sl = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    kl = (tl.exp() * (tl - sl)).sum(-1)
    assert torch.allclose(decoder_loss(s, teacher_logprobs(t), mask), (kl * mask).sum() / mask.sum(), atol=1e-6)
    assert torch.allclose(decoder_loss(s, teacher_logprobs(t)), kl.mean(), atol=1e-6)
    assert float(decoder_loss(t, teacher_logprobs(t))) == pytest.approx(0.0, abs=1e-6)
