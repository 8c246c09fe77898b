"""Every fenced ``python`` and ``bash`` block of README.md and of the documentation (docs/*.md) runs as written, so
neither can rot.

Blocks are found anew on every run: a block added to the README or a page is run by this file without changes here.

How a block runs (working directory: a temporary folder linking the checkout's top-level entries and one ``out/``
shared by the run's blocks, so relative outputs such as ``out/minilm-r6`` land there, a later block reuses them, and
``benchmarks/...`` or ``make`` find the checkout; PATH starts with this
venv's ``bin``; PYTHONPATH starts with this checkout's ``src``):

- ``python``: the block in a fresh interpreter; it must exit 0.
- ``bash``: each command (``\\``-continued lines joined) in bash; each must exit 0. Three kinds are adapted:
  - ``make TARGET``: the Makefile's recipe with ``VENV`` = this venv and its set-up stamp taken as done (``make -o``),
    so the shared venv is never reinstalled. A target that ``.ci/run`` runs itself (``make test`` is this very
    suite, ``make bench-quick`` its benchmarks) is checked, not run again: the line must be in ``.ci/run`` and
    ``make -n`` must resolve it. ``make demo``'s printed table must match the README's "What `make demo` prints".
  - ``embfactor serve ...``: started in the background with ``--port`` (a free one) appended; it must answer
    ``/health`` and is then stopped.
- A block whose first line is ``# not run by tests/test_readme.py: REASON`` is skipped with that reason (keep it
  rare: a command a user may run should run here).
- A block whose first line starts with ``# synopsis`` (brackets = optional parts, ``A|B`` = alternatives) is checked
  instead: each line's ``embfactor`` command exists and every ``--flag`` it shows is in that command's ``--help``.

Blocks that load a bundled model (they name ``minilm`` or ``smollm2``, or run ``make demo``) are marked slow.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 200  # the product page; the manual is the documentation site
VENV = Path(sys.prefix)
OPT_OUT = "# not run by tests/test_readme.py:"
SYNOPSIS = "# synopsis"
CI_SCRIPT = ROOT / ".ci" / "run"


@dataclass
class Block:
    lang: str
    line: int  # 1-based line of the opening fence
    text: str
    doc: str = "README.md"  # the file, relative to the checkout

    @property
    def id(self) -> str:
        prefix = "" if self.doc == "README.md" else Path(self.doc).stem + "-"
        return f"{prefix}{self.lang}-line{self.line}"


def documents() -> list[Path]:
    """README.md and the documentation's pages."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def readme_blocks(text: str | None = None) -> list[Block]:
    """Every fenced block of the README and the pages (or of ``text``): (language, line of its fence, content)."""
    if text is None:
        return [b for doc in documents() for b in _blocks(doc.read_text(), str(doc.relative_to(ROOT)))]
    return _blocks(text, "README.md")


def _blocks(text: str, doc: str) -> list[Block]:
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, start = m.group(2), i
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        blocks.append(Block(m.group(3).lower(), start + 1, "\n".join(lines[start + 1:j]) + "\n", doc))
        i = j + 1
    return blocks


def commands(text: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, blank and comment-only lines dropped."""
    out, cur = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        if cur.strip() and not cur.strip().startswith("#"):
            out.append(cur.strip())
        cur = ""
    return out


def _without_comment(cmd: str) -> list[str]:
    lex = shlex.shlex(cmd, posix=True, punctuation_chars=False)
    lex.whitespace_split = True
    lex.commenters = "#"
    return list(lex)


def _is_slow(block: Block) -> bool:
    return bool(re.search(r"\bminilm\b|\bsmollm2\b|make demo", block.text))


def _params(lang: str) -> list:
    return [
        pytest.param(b, id=b.id, marks=[pytest.mark.slow] if _is_slow(b) else [])
        for b in readme_blocks()
        if b.lang == lang
    ]


@pytest.fixture(scope="session")
def shared_out(tmp_path_factory) -> Path:
    """One ``out/`` for every block of the run: a folder a block writes (``out/minilm-8x``) is reused by the blocks
    after it that read it, instead of each compressing the model again (blocks run in file order)."""
    return tmp_path_factory.mktemp("out")


@pytest.fixture
def workdir(tmp_path: Path, shared_out: Path) -> Path:
    for entry in ROOT.iterdir():
        if entry.name not in (".git", ".venv", "out") and not entry.name.startswith(".pytest"):
            (tmp_path / entry.name).symlink_to(entry)
    (tmp_path / "out").symlink_to(shared_out)
    return tmp_path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _run(args: list[str] | str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    r = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout,
                       shell=isinstance(args, str), executable="/bin/bash" if isinstance(args, str) else None)
    assert r.returncode == 0, f"{args!r} exited {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


def _skip_reason(block: Block) -> str | None:
    first = block.text.lstrip().splitlines()[0] if block.text.strip() else ""
    if first.startswith(OPT_OUT):
        reason = first[len(OPT_OUT):].strip()
        assert reason, f"README {block.id}: an opted-out block must say why"
        return reason
    return None


# ------------------------------------------------------------------------------------------------ python blocks
@pytest.mark.parametrize("block", _params("python"))
def test_readme_python_block_runs(block: Block, workdir: Path) -> None:
    if reason := _skip_reason(block):
        pytest.skip(reason)
    script = workdir / f"readme_{block.id}.py"
    script.write_text(block.text)
    _run([sys.executable, str(script)], workdir)


# -------------------------------------------------------------------------------------------------- bash blocks
def _ci_lines() -> set[str]:
    return {line.strip() for line in CI_SCRIPT.read_text().splitlines()} if CI_SCRIPT.is_file() else set()


def _make(words: list[str], workdir: Path, *, dry: bool = False) -> subprocess.CompletedProcess:
    stamp = VENV / ".embfactor-installed"
    return _run(["make", *(["-n"] if dry else []), "-o", str(stamp), f"VENV={VENV}", *words[1:]], workdir)


def _demo_table() -> list[str]:
    text = README.read_text()
    m = re.search(r"## What `make demo` prints\s*\n\s*```[^\n]*\n(.*?)```", text, re.S)
    assert m, "README: the 'What `make demo` prints' section with its output block is missing"
    return [line for line in m.group(1).splitlines() if line.strip()]


def _check_demo_output(out: str) -> None:
    printed = [line.rstrip() for line in out.splitlines()]
    for line in _demo_table():
        if line.startswith("wall time:"):  # timings vary run to run; the rest of the line may not
            pattern = re.escape(line.rstrip())
            pattern = re.sub(r"\d+(?:\\\.\d+)?(?=\\ s)", r"[\\d.]+", pattern)
            assert any(re.fullmatch(pattern, p) for p in printed), f"README demo line {line!r} not printed:\n{out}"
        else:
            assert line.rstrip() in printed, f"README demo line {line!r} is not what `make demo` prints:\n{out}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(cmd: str, workdir: Path) -> None:
    import httpx

    port = _free_port()
    proc = subprocess.Popen(f"{shlex.join(_without_comment(cmd))} --port {port}", shell=True, cwd=workdir,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"{cmd!r} exited {proc.returncode}:\n{proc.stdout.read()[-3000:]}"
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{cmd!r} did not answer /health within 300 s"
            time.sleep(0.5)
        info = httpx.get(f"http://127.0.0.1:{port}/info", timeout=30).json()
        if info["kind"] == "encoder":
            r = httpx.post(f"http://127.0.0.1:{port}/embed", json={"texts": ["a test sentence"]}, timeout=120)
            assert r.status_code == 200, r.text
    finally:
        # the shell's process group: terminating only the shell left `embfactor serve` running after the test
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def _synopsis(block: Block) -> None:
    import argparse

    from embfactor.cli.main import build_parser

    (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for cmd in commands(block.text):
        words = _without_comment(cmd)
        assert words[0] == "embfactor", f"README {block.id}: synopsis line {cmd!r} is not an embfactor command"
        sub = words[1]
        assert sub in subparsers.choices, f"README {block.id}: there is no `embfactor {sub}` command"
        helps = {sub: subparsers.choices[sub].format_help()}  # what `embfactor SUB --help` prints
        for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", cmd):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps[sub]), (
                f"README {block.id}: `embfactor {sub}` has no {flag} (its --help does not list it)"
            )


@pytest.mark.parametrize("block", _params("bash"))
def test_readme_bash_block_runs(block: Block, workdir: Path) -> None:
    if reason := _skip_reason(block):
        pytest.skip(reason)
    if block.text.lstrip().startswith(SYNOPSIS):
        _synopsis(block)
        return
    ci = _ci_lines()
    for cmd in commands(block.text):
        words = _without_comment(cmd)
        if words[0] == "make":
            if shlex.join(words) in ci:  # CI runs exactly this line (and `make test` is this suite itself)
                _make(words, workdir, dry=True)
                continue
            out = _make(words, workdir).stdout
            if words[1:] == ["demo"]:
                _check_demo_output(out)
        elif words[:2] == ["embfactor", "serve"]:
            _serve(cmd, workdir)
        else:
            _run(cmd, workdir)


# ------------------------------------------------------------------------------------------------ the harness
def test_harness_finds_blocks_commands_and_opt_outs() -> None:
    """The extraction itself: fences of any length and language, continuation lines, comments, opt-outs."""
    text = (
        "x\n```bash\nmake demo   # comment\n\n# only a comment\nembfactor compress a \\\n  --rank 4\n```\n"
        "````python\nprint('```')\n````\n```\nplain output\n```\n"
        f"```bash\n{OPT_OUT} takes an hour\nmake bench\n```\n"
    )
    blocks = readme_blocks(text)
    assert [(b.lang, b.line) for b in blocks] == [("bash", 2), ("python", 9), ("", 12), ("bash", 15)]
    assert commands(blocks[0].text) == ["make demo   # comment", "embfactor compress a    --rank 4"]
    assert _without_comment(commands(blocks[0].text)[0]) == ["make", "demo"]
    assert blocks[1].text == "print('```')\n"
    assert _skip_reason(blocks[3]) == "takes an hour" and _skip_reason(blocks[0]) is None
    langs = {b.lang for b in readme_blocks()}
    assert {"python", "bash"} <= langs, "README.md has no python or bash block: is the extraction broken?"


def test_synopsis_check_catches_a_flag_the_command_lacks() -> None:
    good = Block("bash", 1, f"{SYNOPSIS}\nembfactor serve MODEL [--port 8000] [--request-timeout S]\n")
    _synopsis(good)
    with pytest.raises(AssertionError, match="`embfactor serve` has no --no-such-flag"):
        _synopsis(Block("bash", 1, f"{SYNOPSIS}\nembfactor serve MODEL [--no-such-flag]\n"))
    with pytest.raises(AssertionError, match="there is no `embfactor squash` command"):
        _synopsis(Block("bash", 1, f"{SYNOPSIS}\nembfactor squash MODEL\n"))


def test_demo_output_check_catches_a_changed_table() -> None:
    table = "\n".join(_demo_table())
    _check_demo_output(re.sub(r"wall time: [\d.]+ s", "wall time: 12.25 s", table))
    changed = table.replace("model on disk", "model size")
    with pytest.raises(AssertionError, match="is not what `make demo` prints"):
        _check_demo_output(changed)


def test_readme_first_screen_is_the_demo() -> None:
    """The first screen shows `make demo` and what it prints, and `make demo` is the planner at 8x on minilm: the
    summary (whole-model bytes, embedding bytes, the written model's measured quality) leads its output."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe and "embfactor compress minilm --size 8x " in recipe.group(1), "make demo is not compress --size 8x"
    first = "\n".join(README.read_text().splitlines()[:40])
    assert "make demo" in first and "## What `make demo` prints" in first, "the demo is not on the README's first screen"
    assert "--size 8x" in first
    table = _demo_table()
    assert table[0].startswith("model on disk: ") and " -> " in table[0]
    assert table[1].startswith("embedding: ") and "8.00x fewer bytes than fp32" in table[1]
    assert re.match(r"written model, reloaded with \w+\.from_pretrained: fidelity 0\.99\d\d to the original", table[2])
    last = "\n".join(README.read_text().splitlines()[:60])
    assert "tiers" in last and "rank 63" not in first, "low rank belongs to its own section, not the first screen"


def test_readme_is_the_product_page_and_links_the_documentation() -> None:
    """The README stays short (the manual lives in docs/), and every relative link in it names a file that exists."""
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES, f"README.md is over {README_MAX_LINES} lines: move it to docs/"
    links = re.findall(r"\]\((?!https?:|#)([^)#\s]+)", text)
    assert links and all((ROOT / link).exists() for link in links), [k for k in links if not (ROOT / k).exists()]
    pages = {p.name for p in DOCS.glob("*.md")}
    assert {"getting-started.md", "loading.md", "deploy.md", "api.md"} <= pages
