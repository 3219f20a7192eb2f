"""The `gpt1` command line: thin wrappers that parse flags and call the library.

Each subcommand lives in its own module here with a `register(subparsers)` function that adds
its parser and sets `func`. `main` turns a Gpt1Error into one line on stderr (exit 2) and
Ctrl-C into exit 130: a user never sees a traceback for bad input. `GPT1_DEBUG=1` prints the
traceback behind the line as well (for bug reports).

Text from the terminal enters here, in one place: an argument that is not valid UTF-8 (Python
keeps such bytes as lone surrogates) and invalid UTF-8 on stdin (typed into `gpt1 chat` or
piped into `gpt1 generate`) are bad input like any other.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import errno
import importlib
import importlib.util
import io
import os
import re
import signal
import sys
import threading
import traceback

from gpt1 import __version__
from gpt1.core.errors import Gpt1Error
from gpt1.core.progress import setup_console_logging

# Subcommands in the order `gpt1 --help` lists them; a module that is not there is skipped.
COMMANDS = ["quickstart", "tokenizer", "prepare", "pretrain", "finetune", "generate", "chat",
            "eval", "serve", "export", "bench", "plot", "info"]


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser with its errors on one line, as every other error (exit 2, as argparse)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="gpt1",
        description="Train a GPT-style chat model from scratch, fine-tune it with LoRA, and serve it.",
    )
    parser.add_argument("--version", action="version", version=f"gpt1 {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module_name = f"gpt1.cli.{name}_cmd"
        if importlib.util.find_spec(module_name) is not None:
            importlib.import_module(module_name).register(subparsers)
    return parser


UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}
RESUMABLE = {"quickstart", "prepare", "pretrain", "finetune"}  # they pick up where a killed run stopped
OWN_SIGTERM = {"serve"}  # uvicorn drains the open requests first, then exits by the signal


def debug_enabled() -> bool:
    return os.environ.get("GPT1_DEBUG", "") not in ("", "0")


def _check_arguments(argv: list[str]) -> None:
    for position, arg in enumerate(argv, start=1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError as e:
            raw = arg.encode("utf-8", errors="surrogateescape")
            raise Gpt1Error(f"argument {position} is not valid UTF-8 (byte {raw[e.start:e.start + 1]!r} "
                            f"after {e.start} characters): pass text in UTF-8") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse takes one run of positionals: `key=value` overrides after a flag
        # (`gpt1 finetune --base B model=x --data D lr=1e-4`) are overrides too, in order.
        if hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    setup_console_logging()
    if isinstance(sys.stdin, io.TextIOWrapper):
        # By default bad bytes fail deep inside a command (or, under a C locale, travel on as
        # lone surrogates): decoding stdin raises the one clear error at the edge instead.
        sys.stdin.reconfigure(encoding="utf-8", errors="gpt1-stdin")
    try:
        _check_arguments(sys.argv[1:] if argv is None else argv)
        with _sigterm_raises(args.command not in OWN_SIGTERM):
            return args.func(args) or 0
    except Terminated:
        hint = "; run the same command again to resume" if args.command in RESUMABLE else ""
        print(f"gpt1 {args.command}: terminated{hint}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except Gpt1Error as e:
        if getattr(e, "reported_elsewhere", False):  # another torchrun rank's error: that rank prints it
            return 2
        return _error(args.command, str(e))
    except OSError as e:
        if e.errno not in UNWRITABLE:
            raise
        # Every writing command meets these the same way (a read-only --out, a full disk, a
        # folder made read-only mid-run): one class, handled here rather than at each write.
        return _error(args.command, f"{e.filename or 'a file'}: cannot write ({e.strerror}); "
                                    "choose a writable --out or free some space")
    except KeyboardInterrupt:
        hint = "; run the same command again to resume" if args.command in RESUMABLE else ""
        print(f"\ngpt1 {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `gpt1 generate ... | head`
        return 0


class Terminated(BaseException):
    """SIGTERM, raised where the command is (a BaseException: no `except Exception` swallows it)."""


@contextlib.contextmanager
def _sigterm_raises(enabled: bool = True):
    """SIGTERM (`kill`, a scheduler's stop) ends the command as Ctrl-C does, through its cleanup
    (temporary files deleted, locks released) instead of at once. Only where nothing else has
    claimed the signal (a server installs its own), and restored after (main runs in tests too)."""
    if not enabled or threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminate(signum, frame):
        raise Terminated

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _error(command: str, message: str) -> int:
    if debug_enabled():
        traceback.print_exc()
    # A message quoting a library's may hold newlines; spaces inside it (a quoted value) stay.
    one_line = re.sub(r"\s*\n\s*", " ", message.strip())
    print(f"gpt1 {command}: error: {one_line}", file=sys.stderr)
    return 2


def _stdin_not_utf8(error: UnicodeError) -> tuple[str, int]:
    raise Gpt1Error(f"stdin: the input is not valid UTF-8 (byte {error.object[error.start:error.start + 1]!r}); "
                    "type or pipe UTF-8 text")


codecs.register_error("gpt1-stdin", _stdin_not_utf8)


def run() -> None:
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before a command started: while its modules (torch) were loading
        print("\ngpt1: interrupted", file=sys.stderr)
        sys.exit(130)
