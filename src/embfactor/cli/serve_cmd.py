"""``embfactor serve``: a REST API (FastAPI + uvicorn) for a model, typically a compressed embfactor output."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import Any

from embfactor.cli.common import add_model_arg
from embfactor.errors import InvalidInputError


def build_app(model: str, limits: Any = None) -> Any:
    """Load ``model`` and return the FastAPI app that serves it (what ``serve`` runs; tested in-process).

    Example:
        >>> app = build_app("out/minilm-r6")   # doctest: +SKIP
    """
    from embfactor.models import load_model
    from embfactor.server import create_app

    return create_app(load_model(model), limits)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    from embfactor.server import Limits

    try:
        from embfactor.server.runner import bind_socket, make_config, serve, url_of
    except ImportError:  # pragma: no cover - the [server] extra is missing
        raise InvalidInputError("serve needs the server extra: pip install 'embfactor[server]'") from None
    limits = Limits(
        max_texts=args.max_texts, max_tokens=args.max_tokens, max_new_tokens=args.max_new_tokens,
        max_text_chars=args.max_text_chars, max_body_bytes=args.max_body_bytes, max_pending=args.max_pending,
    )
    timeouts = {"request_timeout": args.request_timeout, "keep_alive": args.keep_alive}
    make_config(None, **timeouts)  # validates the timeouts before anything slow
    # Bind before the model loads (seconds): a busy port fails at once, and only a server that can run is announced.
    sock = bind_socket(args.host, args.port)
    try:
        if args.torch_threads:
            import torch

            torch.set_num_threads(args.torch_threads)
        app = build_app(args.model, limits)
        lm = app.state.lm
        sock.listen(2048)  # from here connections queue until the server accepts them (uvicorn's backlog)
        if not _is_loopback(args.host):
            print(f"warning: listening on {args.host}, reachable from other machines; there is no authentication",
                  file=sys.stderr)
        print(f"serving {lm.name} ({lm.kind}) on {url_of(sock)}  (API docs: /docs)", file=sys.stderr, flush=True)
        serve(app, sock, log_level=args.log_level, access_log=args.access_log, **timeouts)
    finally:
        sock.close()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP: /embed (encoders), /generate and /score (decoders)")
    add_model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--max-texts", type=int, default=64, help="texts per /embed or /score request (default 64)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per text or prompt (default 256)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="cap of /generate max_new_tokens (default 128)")
    p.add_argument("--max-text-chars", type=int, default=20_000, help="characters per text (default 20000)")
    p.add_argument("--max-body-bytes", type=int, default=2_000_000, help="request body size (default 2 MB)")
    p.add_argument("--max-pending", type=int, default=256, help="requests queued for the model (429 beyond)")
    p.add_argument("--request-timeout", type=float, default=30.0,
                   help="seconds a request has to arrive in full, headers and body (408 and closed after; default 30)")
    p.add_argument("--keep-alive", type=float, default=5.0,
                   help="seconds an idle connection stays open after a response (default 5)")
    p.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True, help="log every request")
    p.set_defaults(func=run)
