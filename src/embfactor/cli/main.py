"""The ``embfactor`` command: one sub-command per module in this package."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from embfactor import __version__
from embfactor.errors import EmbfactorError

# Each module defines ``register(subparsers)``, which adds its parser and sets ``func=run``.
COMMANDS = ("inspect", "compress", "evaluate", "sweep", "heal", "serve", "train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embfactor",
        description="Parameter factorization of Transformer embedding layers: E ≈ U·V.",
    )
    parser.add_argument("--version", action="version", version=f"embfactor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"embfactor.cli.{name}_cmd").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except EmbfactorError as e:
        print(f"embfactor {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"embfactor {args.command}: interrupted; earlier outputs are intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
