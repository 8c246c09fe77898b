"""Serve an exported folder and this page on loopback, to run the model in a browser with transformers.js.

    embfactor export out/minilm-8x --onnx
    python -m embfactor.export.serve out/minilm-8x      # (or examples/browser/serve.py) then open the address

Three roots, nothing else: ``/`` is this page (examples/browser), ``/models/model/`` the exported folder (its
config.json, tokenizer files and onnx/model.onnx), ``/node_modules/`` the repository's ``js/node_modules``
(transformers.js's web bundle and ONNX Runtime Web's wasm, installed by ``npm ci --ignore-scripts`` in ``js/``). The
page fetches nothing from a CDN or a model hub. :func:`embfactor.export.transformers_js.run_browser` uses
:func:`start`. Needs a source checkout (the page and ``js/`` are not in the wheel).
"""

from __future__ import annotations

import argparse
import http.server
import threading
from pathlib import Path
from typing import ClassVar

REPO = Path(__file__).resolve().parents[3]
HERE = REPO / "examples" / "browser"
NODE_MODULES = REPO / "js" / "node_modules"
TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json",
         ".onnx": "application/octet-stream", ".html": "text/html"}


class _Handler(http.server.SimpleHTTPRequestHandler):
    roots: ClassVar[dict[str, Path]] = {}  # set per server by make_server's subclass

    def translate_path(self, path: str) -> str:
        path = path.split("?", 1)[0].split("#", 1)[0]
        # the longest matching prefix wins; anything outside the three roots maps to a missing file (404)
        for prefix in sorted(self.roots, key=len, reverse=True):
            if path.startswith(prefix):
                base = self.roots[prefix].resolve()
                target = (base / path[len(prefix):].lstrip("/")).resolve()
                return str(target) if target == base or base in target.parents else str(base / "\0missing")
        return str(HERE / "\0missing")

    def guess_type(self, path: str) -> str:
        return TYPES.get(Path(path).suffix, "application/octet-stream")

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")  # a re-exported folder is never served stale
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:  # quiet: the tests read their own output
        pass


def make_server(folder: str | Path, *, port: int = 0, node_modules: str | Path = NODE_MODULES,
                page: str | Path = HERE) -> http.server.ThreadingHTTPServer:
    """A loopback HTTP server for ``folder`` (port 0: any free port; ``server.server_address[1]`` tells which).

    Example:
        >>> server = make_server("out/minilm-8x")   # doctest: +SKIP
    """
    folder, node_modules = Path(folder), Path(node_modules)
    if not (folder / "onnx" / "model.onnx").is_file():
        raise SystemExit(f"{folder}: no onnx/model.onnx; run `embfactor export {folder} --onnx` first")
    if not (node_modules / "@huggingface" / "transformers").is_dir():
        raise SystemExit(f"{node_modules}: no @huggingface/transformers; run `npm ci --ignore-scripts` in "
                         f"{node_modules.parent}")
    roots = {"/": Path(page), "/models/model/": folder, "/node_modules/": node_modules}
    handler = type("Handler", (_Handler,), {"roots": roots})
    return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)


def start(folder: str | Path, **kw: object) -> tuple[http.server.ThreadingHTTPServer, str]:
    """:func:`make_server` serving in a daemon thread; returns it and the page's address (``server.shutdown()``)."""
    server = make_server(folder, **kw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="an exported folder (embfactor export FOLDER --onnx)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--node-modules", default=str(NODE_MODULES), help="where `npm ci --ignore-scripts` installed js/")
    args = p.parse_args()
    server = make_server(args.folder, port=args.port, node_modules=args.node_modules)
    print(f"serving {args.folder} at http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
