"""The ``embfactor`` command: one sub-command per module in this package."""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from embfactor import __version__
from embfactor.errors import EmbfactorError

# Each module defines ``register(subparsers)``, which adds its parser and sets ``func=run``.
COMMANDS = ("inspect", "compress", "evaluate", "sweep", "heal", "export", "upgrade", "serve", "train")


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
        with no_progress_bars() if getattr(args, "quiet", False) else contextlib.nullcontext():
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


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """No progress bar at all while the body runs (``-q``): embfactor's, and third-party ones that take no flag.

    transformers' "Converting and de-quantizing GGUF tensors" and "Loading weights" bars, huggingface_hub's and any
    other tqdm bar: every tqdm is created disabled (the class is patched for the body, then restored), and the
    libraries' own switches and environment variables are set for the processes they start.
    """
    from tqdm import std

    saved_env = {k: os.environ.get(k) for k in _QUIET_ENV}
    os.environ.update(_QUIET_ENV)
    init = std.tqdm.__init__

    @functools.wraps(init)
    def disabled(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > _TQDM_DISABLE_ARG:  # given positionally (tqdm(it, desc, total, ..., disable))
            args = (*args[:_TQDM_DISABLE_ARG], True, *args[_TQDM_DISABLE_ARG + 1:])
        else:
            kwargs["disable"] = True
        init(self, *args, **kwargs)

    std.tqdm.__init__ = disabled
    hub = None
    with contextlib.suppress(ImportError):
        from huggingface_hub import utils as hub

        was_disabled = hub.are_progress_bars_disabled()
        hub.disable_progress_bars()
    try:
        yield
    finally:
        std.tqdm.__init__ = init
        if hub is not None and not was_disabled:
            hub.enable_progress_bars()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
_TQDM_DISABLE_ARG = 10  # the position of ``disable`` among tqdm's arguments


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
