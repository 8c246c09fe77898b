"""The ``embfactor`` command: one sub-command per module in this package."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from embfactor import __version__
from embfactor.errors import EmbfactorError

# Each module defines ``register(subparsers)``, which adds its parser and sets ``func=run``.
COMMANDS = ("inspect", "compress", "evaluate", "sweep", "heal", "export", "serve", "train")


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
    stderr = sys.stderr
    sys.stderr = tracker = _LineTracker(stderr)  # before any progress bar takes sys.stderr as its stream
    try:
        return int(args.func(args) or 0)
    except EmbfactorError as e:
        _end_progress_line(tracker)
        print(f"embfactor {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _end_progress_line(tracker)
        print(f"embfactor {args.command}: interrupted; earlier outputs are intact", file=sys.stderr)
        return 130
    finally:
        sys.stderr = stderr


class _LineTracker:
    """stderr, remembering whether the last text written ended a line.

    A progress bar redraws its line with carriage returns and never ends it while it runs; in a piped log (not a
    terminal) an error printed after it would be glued to the bar's last state. On a terminal a carriage return
    already goes back to the line start.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        isatty = getattr(stream, "isatty", None)
        self._ends = ("\n", "\r") if callable(isatty) and isatty() else ("\n",)
        self.at_line_start = True

    def write(self, text: str) -> int:
        if text:
            self.at_line_start = text.endswith(self._ends)
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _end_progress_line(tracker: _LineTracker) -> None:
    # Close the bars the error interrupted (they stop redrawing), then start a fresh line for the message.
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        with contextlib.suppress(Exception):
            bar.close()
    if not tracker.at_line_start:
        tracker.write("\n")


if __name__ == "__main__":
    sys.exit(main())
