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
from embfactor.fileio import (
    _host_key,
    atomic_directory,
    atomic_write_bytes,
    remove_stale_temporaries,
    writer_is_gone,
)
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
        real = st.save_file  # what embfactor's save_state writes model.safetensors with

        def slow_save_file(tensors, filename, metadata=None, **kw):
            real(tensors, filename, metadata=metadata, **kw)
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])  # half a file, as a kill mid-write leaves it
            stall(filename)

        st.save_file = slow_save_file
    else:
        from transformers import PreTrainedTokenizerBase
        real_tok = PreTrainedTokenizerBase.save_pretrained

        def slow_tokenizer_save(self, folder, *a, **kw):
            files = real_tok(self, folder, *a, **kw)  # weights and config.json are complete; embfactor.json is not
            stall(folder)

        PreTrainedTokenizerBase.save_pretrained = slow_tokenizer_save

    # what `embfactor compress MODEL --rank R --output OUT` runs (without importing every other command)
    from embfactor.pipeline import compress
    from embfactor.config import FactorizationConfig
    # (no check of the written model: the kill comes mid-write, before it; the child reaches the write sooner)
    compress(model, FactorizationConfig(rank=int(rank)), out, progress=False, verify=False)
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
        (root / name / "pid").write_text(str(child.pid))
    cases["model"] = (model, None)
    return cases


def test_kill_mid_save_keeps_earlier_output(killed):
    from embfactor.cli.main import main

    out, before = killed["weights"]
    assert tree(out) == before  # the earlier output is untouched, byte for byte
    lm = load_model(out)
    assert lm.compressed and lm.record["rank"] == 4
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(".out.")]
    pid = (out.parent / "pid").read_text()
    # the killed save's work folder, named after the target and the writer's PID
    assert len(leftovers) == 1 and leftovers[0].name.startswith(f".out.tmp-{pid}-")
    assert (leftovers[0] / "model.safetensors").is_file()
    with pytest.raises(ModelNotFoundError, match="temporary folder of an interrupted save"):
        load_model(leftovers[0])
    # A new save still works (and replaces the earlier output), and removes the dead writer's leftover.
    assert main(["compress", str(killed["model"][0]), "--rank", "6", "--output", str(out), "-q"]) == 0
    assert load_model(out).record["rank"] == 6
    assert sorted(p.name for p in out.parent.iterdir()) == ["out", "pid"]


def test_kill_during_first_save_leaves_no_output(killed):
    out, _ = killed["fresh"]
    assert not out.exists()
    (leftover,) = [p for p in out.parent.iterdir() if p.name.startswith(".out.tmp-")]
    # complete weights and config.json, yet the folder is refused: the save never finished
    assert (leftover / "model.safetensors").is_file() and (leftover / "config.json").is_file()
    assert not (leftover / "embfactor.json").exists()
    with pytest.raises(ModelNotFoundError, match="interrupted save"):
        load_model(leftover)
    # a live writer's folder for the same target (a concurrent save) and another target's stale one are left alone
    live = fake_temporary(out, os.getpid())
    other = fake_temporary(out.parent / "out2", int(leftover.name.split("-")[1]))
    with atomic_directory(out) as d:
        (d / "embfactor.json").write_text("{}")
    assert not leftover.exists() and live.is_dir() and other.is_dir()
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["out", "pid", live.name, other.name])


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def fake_temporary(target: Path, pid: int, *, kind: str = "tmp", host: str | None = None) -> Path:
    """A folder named as atomic_directory names its work folder for ``target``, written by process ``pid``."""
    folder = target.parent / f".{target.name}.{kind}-{pid}-{host or _host_key()}-abc_1234"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 1000)
    return folder


def test_stale_temporaries_of_dead_writers_only_are_removed(tmp_path):
    target = tmp_path / "out"
    dead = dead_pid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = fake_temporary(target, dead)
        stale_old = fake_temporary(target, dead, kind="old")
        keep = [
            fake_temporary(target, sleeper.pid),  # a live writer (another process saving to the same target)
            fake_temporary(target, os.getpid()),  # this process
            fake_temporary(tmp_path / "out2", dead),  # another target
            fake_temporary(tmp_path / "o", dead),  # a prefix of this target's name
            fake_temporary(target, dead, host="00000000"),  # written on another host / PID namespace
        ]
        for name in (".out.tmp-abcd1234", f".out.tmp-{dead}-x", f"out.tmp-{dead}-{_host_key()}-abc_1234"):
            (tmp_path / name).mkdir()  # no PID (older embfactor), not our pattern, not hidden
            keep.append(tmp_path / name)
        as_file = tmp_path / f".out.tmp-{dead}-{_host_key()}-abcd_123"
        as_file.write_text("a file, not a folder")
        keep.append(as_file)
        link = tmp_path / f".out.tmp-{dead}-{_host_key()}-link_123"
        link.symlink_to(keep[0], target_is_directory=True)
        keep.append(link)

        assert remove_stale_temporaries(target) == [stale]
        assert stale_old.is_dir()  # .old-* folders go only after a successful save (they may hold the only copy)
        with atomic_directory(target) as d:
            (d / "embfactor.json").write_text("{}")
        assert not stale_old.exists() and (target / "embfactor.json").is_file()
        assert all(os.path.lexists(p) for p in keep)
        assert (keep[0] / "model.safetensors").read_bytes() == b"x" * 1000
    finally:
        sleeper.kill()
        sleeper.wait()
    # once its writer is dead, the folder that was live is stale too
    assert remove_stale_temporaries(target) == [keep[0]]


def test_stale_temporary_files_are_removed(tmp_path):
    """atomic_write_bytes' temporary files (a heal state file can be as large as the model) are cleaned alike."""
    target = tmp_path / "state.safetensors"
    dead = dead_pid()
    stale = tmp_path / f".state.safetensors.tmp-{dead}-{_host_key()}-abc_1234.tmp"
    live = tmp_path / f".state.safetensors.tmp-{os.getpid()}-{_host_key()}-abc_1234.tmp"
    for p in (stale, live):
        p.write_bytes(b"half")
    atomic_write_bytes(target, b"data")
    assert target.read_bytes() == b"data" and not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name])


def test_zombie_writer_counts_as_gone():
    """A killed writer its parent has not reaped yet can no longer write."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not writer_is_gone(child.pid)
        child.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not writer_is_gone(child.pid):  # a zombie until wait() below
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert Path(f"/proc/{child.pid}").exists() or not sys.platform.startswith("linux")
    finally:
        child.kill()
        child.wait()
    assert writer_is_gone(child.pid) and not writer_is_gone(os.getpid())


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
