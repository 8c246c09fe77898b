"""Saves are atomic: a `compress` killed (SIGKILL) in the middle of writing leaves any earlier output byte-for-byte
intact and no half-written folder that loads.

The child process is made deterministic by a hook: the writer (safetensors or the tokenizer's save_pretrained) does
its work, leaves a half-written file as a real kill would, tells the parent "writing" through a file, and sleeps
until the parent kills it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from embfactor.errors import ModelNotFoundError
from embfactor.fileio import atomic_directory
from embfactor.models import load_model

CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path

    model, out, rank, hook, flag = sys.argv[1:6]

    def stall(path):
        Path(flag).write_text("writing")
        time.sleep(600)  # the parent kills us here

    if hook == "weights":
        import safetensors.torch as st
        real = st.save_model

        def slow_save_model(model, filename, metadata=None, **kw):
            real(model, filename, metadata=metadata, **kw)
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])  # half a file, as a kill mid-write leaves it
            stall(filename)

        st.save_model = slow_save_model
    else:
        from transformers import PreTrainedTokenizerBase
        real_tok = PreTrainedTokenizerBase.save_pretrained

        def slow_tokenizer_save(self, folder, *a, **kw):
            files = real_tok(self, folder, *a, **kw)  # weights and config.json are complete; embfactor.json is not
            stall(folder)

        PreTrainedTokenizerBase.save_pretrained = slow_tokenizer_save

    # what `embfactor compress MODEL --rank R --output OUT` runs (without importing every other command)
    from embfactor.cli.compress_cmd import compress
    from embfactor.config import FactorizationConfig
    compress(model, FactorizationConfig(rank=int(rank)), out, progress=False)
    """
)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def start_child(model: Path, out: Path, hook: str, flag: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(model), str(out), "6", hook, str(flag)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )


def kill_when_writing(child: subprocess.Popen, flag: Path, timeout: float = 150) -> None:
    try:
        deadline = time.monotonic() + timeout
        while not flag.exists():
            if child.poll() is not None:
                pytest.fail(f"child exited early ({child.returncode}): {child.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "the child never started writing"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> dict[str, tuple[Path, dict[str, bytes] | None]]:
    """Two saves killed mid-write, run in parallel (each child spends most of its time importing torch).

    "weights": killed while model.safetensors is half written, over an earlier rank-4 output;
    "fresh": a first save (no earlier output) killed late: weights and config.json complete, embfactor.json not yet.
    """
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from embfactor.cli.main import main

    root = tmp_path_factory.mktemp("atomic")
    model = root / "bert"
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    BertModel(cfg).save_pretrained(model)
    (model / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                               + [f"w{i}" for i in range(115)]) + "\n")
    BertTokenizerFast(vocab_file=str(model / "vocab.txt")).save_pretrained(model)
    cases: dict[str, tuple[Path, dict[str, bytes] | None]] = {}
    children = {}
    for name, hook in (("weights", "weights"), ("fresh", "tokenizer")):
        (root / name).mkdir()
        out = root / name / "out"
        before = None
        if name != "fresh":
            assert main(["compress", str(model), "--rank", "4", "--output", str(out), "-q"]) == 0
            before = tree(out)
        cases[name] = (out, before)
        children[name] = start_child(model, out, hook, root / f"flag-{name}")
    for name, child in children.items():
        kill_when_writing(child, root / f"flag-{name}")
    cases["model"] = (model, None)
    return cases


def test_kill_mid_save_keeps_earlier_output(killed):
    from embfactor.cli.main import main

    out, before = killed["weights"]
    assert tree(out) == before  # the earlier output is untouched, byte for byte
    lm = load_model(out)
    assert lm.compressed and lm.record["rank"] == 4
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(".out.")]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".out.tmp-")  # the killed save's work folder
    assert (leftovers[0] / "model.safetensors").is_file()
    with pytest.raises(ModelNotFoundError, match="temporary folder of an interrupted save"):
        load_model(leftovers[0])
    # A new save still works (and replaces the earlier output).
    assert main(["compress", str(killed["model"][0]), "--rank", "6", "--output", str(out), "-q"]) == 0
    assert load_model(out).record["rank"] == 6


def test_kill_during_first_save_leaves_no_output(killed):
    out, _ = killed["fresh"]
    assert not out.exists()
    (leftover,) = [p for p in out.parent.iterdir() if p.name.startswith(".out.tmp-")]
    # complete weights and config.json, yet the folder is refused: the save never finished
    assert (leftover / "model.safetensors").is_file() and (leftover / "config.json").is_file()
    assert not (leftover / "embfactor.json").exists()
    with pytest.raises(ModelNotFoundError, match="interrupted save"):
        load_model(leftover)


def test_replacing_an_output_is_one_atomic_exchange(tmp_path, monkeypatch):
    """Replacing an existing folder must not go through a moment where the target does not exist."""
    target = tmp_path / "out"
    with atomic_directory(target) as d:
        (d / "embfactor.json").write_text("old")
    seen = []
    real_replace = os.replace

    def watching_replace(src, dst):
        seen.append((Path(src).name, Path(dst).name))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", watching_replace)
    with atomic_directory(target) as d:
        (d / "embfactor.json").write_text("new")
    assert (target / "embfactor.json").read_text() == "new"
    if sys.platform.startswith("linux"):
        assert seen == []  # renameat2(RENAME_EXCHANGE): no remove-then-rename window
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_save_cleans_up_and_keeps_earlier(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as d:
        (d / "embfactor.json").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(target) as d:
        (d / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("boom")
    assert (target / "embfactor.json").read_text() == "old" and not (target / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    shutil.rmtree(target)
