"""The `gpt1` command line: thin wrappers that parse flags and call the library.

Each subcommand lives in its own module here with a `register(subparsers)` function that adds
its parser and sets `func`. `main` turns a Gpt1Error into one line on stderr (exit 2) and
Ctrl-C into exit 130: a user never sees a traceback for bad input.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from gpt1 import __version__
from gpt1.core.errors import Gpt1Error
from gpt1.core.progress import setup_console_logging

# Subcommands in the order `gpt1 --help` lists them; a module that is not there is skipped.
COMMANDS = ["quickstart", "tokenizer", "prepare", "pretrain", "finetune", "generate", "chat",
            "eval", "serve", "export", "bench", "plot", "info"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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


RESUMABLE = {"quickstart", "prepare", "pretrain", "finetune"}  # they pick up where a killed run stopped


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    setup_console_logging()
    try:
        return args.func(args) or 0
    except Gpt1Error as e:
        print(f"gpt1 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = "; run the same command again to resume" if args.command in RESUMABLE else ""
        print(f"\ngpt1 {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `gpt1 generate ... | head`
        return 0


def run() -> None:
    sys.exit(main())
