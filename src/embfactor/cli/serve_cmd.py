"""``embfactor serve``: a REST API (FastAPI + uvicorn) for a model, typically a compressed embfactor output."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import Any

from embfactor.cli.common import add_model_arg
from embfactor.errors import ConfigError, InvalidInputError


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
        import uvicorn
    except ImportError:  # pragma: no cover - the [server] extra is missing
        raise InvalidInputError("serve needs the server extra: pip install 'embfactor[server]'") from None
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    limits = Limits(
        max_texts=args.max_texts, max_tokens=args.max_tokens, max_new_tokens=args.max_new_tokens,
        max_text_chars=args.max_text_chars, max_body_bytes=args.max_body_bytes, max_pending=args.max_pending,
    )
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    app = build_app(args.model, limits)
    lm = app.state.lm
    if not _is_loopback(args.host):
        print(f"warning: listening on {args.host}, reachable from other machines; there is no authentication",
              file=sys.stderr)
    print(f"serving {lm.name} ({lm.kind}) on http://{args.host}:{args.port}  (API docs: /docs)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log)
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
    p.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True, help="log every request")
    p.set_defaults(func=run)
