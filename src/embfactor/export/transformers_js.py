"""Run an exported folder in transformers.js: in Node (``js/run.mjs``) and in headless Chromium (``js/browser.mjs``).

What a user of ``@huggingface/transformers`` does with ``embfactor export OUT --onnx``, from Python, so that tests and
``benchmarks/deploy_js.py`` compare it with PyTorch and ONNX Runtime: the folder loads from a local path with remote
models off, ``feature-extraction`` gives mean-pooled normalized vectors, ``text-generation`` greedy token ids. The
browser path serves the folder, examples/browser's page and transformers.js's web bundle (ONNX Runtime Web's wasm)
from a loopback server (``examples/browser/serve.py``); nothing is fetched from a CDN or model hub.

These need a source checkout: the repository's ``js/`` folder with its node_modules (``npm ci --ignore-scripts`` in
``js/``), Node (20+), and for the browser Debian's ``chromium`` (``apt-get install -y chromium``). :func:`missing`
names what is absent and the command that installs it. ``EMBFACTOR_JS_DIR`` and ``EMBFACTOR_CHROMIUM`` point
elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from embfactor.errors import EmbfactorError

REPO = Path(__file__).resolve().parents[3]
CHROMIUM = "/usr/bin/chromium"


class JsRuntimeError(EmbfactorError, RuntimeError):
    """transformers.js (Node or the page in Chromium) failed on a folder; the message holds its output."""


def js_dir() -> Path:
    """The folder with package.json, run.mjs and browser.mjs (``EMBFACTOR_JS_DIR`` or the checkout's ``js/``)."""
    return Path(os.environ.get("EMBFACTOR_JS_DIR") or REPO / "js")


def chromium_path() -> str:
    """The browser playwright-core drives: ``EMBFACTOR_CHROMIUM`` or Debian's ``/usr/bin/chromium``."""
    return os.environ.get("EMBFACTOR_CHROMIUM") or CHROMIUM


def page_dir() -> Path:
    """The checkout's ``examples/browser`` (index.html, app.js): the page :func:`run_browser` opens."""
    return REPO / "examples" / "browser"


def missing(browser: bool = False) -> str | None:
    """What is missing to run transformers.js (in Node, or also in Chromium), with its install command; None if ready.

    Example:
        >>> missing(browser=True)   # doctest: +SKIP
        'Chromium (/usr/bin/chromium): apt-get install -y chromium (or make js-setup as root)'
    """
    js = js_dir()
    if shutil.which("node") is None:
        return "Node.js (node on PATH): apt-get install -y nodejs (Node 20+)"
    need = ["@huggingface/transformers"] + (["playwright-core"] if browser else [])
    absent = [n for n in need if not (js / "node_modules" / n / "package.json").is_file()]
    if absent:
        return f"{', '.join(absent)} in {js}/node_modules: cd {js} && npm ci --ignore-scripts (or make js-setup)"
    if browser and not os.access(chromium_path(), os.X_OK):
        return f"Chromium ({chromium_path()}): apt-get install -y chromium (or make js-setup as root)"
    return None


def _node(script: str, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    why = missing(browser=script == "browser.mjs")
    if why:
        raise JsRuntimeError(f"cannot run transformers.js: missing {why}")
    res = subprocess.run(["node", str(js_dir() / script), json.dumps(request)], capture_output=True, text=True,
                         timeout=timeout, cwd=js_dir(), check=False)
    if res.returncode != 0:
        raise JsRuntimeError(f"node {script} failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_node(folder: str | Path, task: str, texts: list[str] | None = None, *, input_ids: list[list[int]] | None = None,
             max_new_tokens: int = 16, model_file_name: str | None = None, timeout: float = 300) -> dict[str, Any]:
    """transformers.js in Node on ``folder``: ``{"embeddings", "input_ids"}`` or ``{"sequences"}``, and timings.

    Args:
        folder: an exported folder (``embfactor export FOLDER --onnx``).
        task: ``feature-extraction`` (mean pooling + normalization) or ``text-generation`` (greedy token ids,
            exactly ``max_new_tokens`` new ones: EOS is suppressed like ``generate(min_new_tokens=...)``).
        input_ids: for ``text-generation``, prompts as token ids instead of ``texts`` (the caller's tokenization,
            e.g. without special tokens, exactly what PyTorch ``generate`` was given).
        model_file_name: another file of ``onnx/`` without ``.onnx`` (e.g. ``model_qint8``).

    Example:
        >>> run_node("out/minilm-8x", "feature-extraction", ["a cat", "a dog"])["embeddings"][0][:2]   # doctest: +SKIP
    """
    request = {"folder": str(Path(folder).resolve()), "task": task, "texts": texts, "max_new_tokens": max_new_tokens}
    if input_ids is not None:
        request["input_ids"] = input_ids
    if model_file_name:
        request["model_file_name"] = model_file_name
    return _node("run.mjs", request, timeout)


def run_browser(folder: str | Path, task: str, texts: list[str] | None = None, *,
                input_ids: list[list[int]] | None = None, max_new_tokens: int = 16,
                screenshot: str | Path | None = None, timeout: float = 300) -> dict[str, Any]:
    """The page of examples/browser in headless Chromium, serving ``folder`` on loopback: the same results as
    :func:`run_node`, plus ``bytes`` (what the page downloaded: model folder and runtime), ``remote_requests``
    (requests that left the loopback origin: none expected) and the browser's version."""
    from embfactor.export.serve import start

    server, url = start(folder, node_modules=js_dir() / "node_modules", page=page_dir())
    try:
        request = {"url": url, "task": task, "texts": texts, "max_new_tokens": max_new_tokens,
                   "executable": chromium_path(), "timeout_ms": int(timeout * 1000)}
        if input_ids is not None:
            request["input_ids"] = input_ids
        if screenshot:
            request["screenshot"] = str(Path(screenshot).resolve())
        return _node("browser.mjs", request, timeout + 30)
    finally:
        server.shutdown()
        server.server_close()
