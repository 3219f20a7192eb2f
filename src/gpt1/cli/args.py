"""Argument types shared by the subcommands: a bad value is refused by argparse, with the flag.

Nothing here (nor in a command's `register`) loads torch: `gpt1 --help` builds every parser."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os

from gpt1.core.errors import Gpt1Error

# gpt1.inference.llm.DTYPES' names, which that module maps to torch's dtypes (a test keeps the two equal).
DTYPES = ("auto", "float32", "bfloat16", "float16")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter without its noise: "(default: X)" only where the
    help does not state its default itself (it said "(default: the best available) (default:
    None)") and X tells something (not None, not a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def text(value: str) -> str:
    """A flag's text (a prompt, a stop string) as typed. Under a locale that is not UTF-8 (LANG=C
    without Python's UTF-8 mode) Python holds typed UTF-8 as lone surrogates, which the tokenizer
    refuses: decode them. Paths stay as Python holds them (the OS needs those bytes back); bytes
    that are not UTF-8 stay surrogates, for the CLI to refuse naming the argument."""
    return value.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="surrogateescape")


def path_arg(value: str) -> str:
    """A file or folder argument, not empty: `--out "$DIR"` with DIR unset would otherwise name
    the current folder (Path("") is ".") and a run would write there. A leading `~` or `~user`
    (also after `hf:`) is expanded, as recipe keys' are: the shell leaves `--out=~/x` alone, which
    made a folder named `~` in the current one."""
    if not value:
        raise argparse.ArgumentTypeError("expected a path, got an empty one (an unset shell variable?)")
    prefix = "hf:" if value.startswith("hf:~") else ""
    if value[len(prefix):].startswith("~"):
        return prefix + os.path.expanduser(value[len(prefix):])
    return value


def folder_arg(value: str) -> str:
    """An output folder: a path (see `path_arg`), not `-`, which other outputs (`eval --json -`,
    `plot --out -`) take for standard output and which here made a folder named `-`."""
    if value == "-":
        raise argparse.ArgumentTypeError("'-' is standard output elsewhere; this output is a folder: name one")
    return path_arg(value)


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {number}")
    return number


def val_split(value: str) -> float:
    """A fraction in (0, 1) or a whole number of documents >= 1 (not inf, not nan)."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number <= 0 or (number >= 1 and number != int(number)):
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1) such as 0.001, or a whole number of "
                                         f"documents such as 100, got {value!r}")
    return number


def add_dtype_flag(parser: argparse.ArgumentParser) -> None:
    """--dtype of the commands that load a model for inference (generate, chat, serve)."""
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="the weights' and the KV cache's dtype. auto: bfloat16 on a GPU that supports it, "
                             "else float32 (weights saved in fp16/bf16 are upcast). bfloat16 on a CPU with native bf16 (AVX-512 BF16, "
                             "AMX) decodes ~1.2x faster than float32, with output that may differ from it; "
                             "float16 for GPUs without bf16 (default: %(default)s)")


def training_rerun_hint(args: argparse.Namespace) -> str:
    """What a rerun of an interrupted pretrain/finetune does: resume from the run's latest
    checkpoint, named with the step it holds (the steps after it are lost), or start over when
    it was stopped before its first."""
    from gpt1.train.checkpoint import checkpoint_step, latest_checkpoint  # loaded by the run by now; not by the parser

    with contextlib.suppress(OSError):  # an unreadable run dir: the rerun will say so
        if args.out:
            if (latest := latest_checkpoint(args.out)) is None:
                return " before its first checkpoint; a rerun starts over"
            return (f"; its latest checkpoint is step {checkpoint_step(latest):,} (any steps after it are lost); "
                    "run the same command again to resume")
    return "; run the same command again to resume"


def require(args: argparse.Namespace, *flags: str) -> None:
    """The flags a run needs but --print-config does not (it reads nothing): argparse's own
    `required=True` asked for them before printing a recipe."""
    missing = [flag for flag in flags if getattr(args, flag.removeprefix("--").replace("-", "_")) is None]
    if missing:
        raise Gpt1Error(f"the following arguments are required: {', '.join(missing)} (see gpt1 {args.command} --help)")


def print_recipe(recipe: dict) -> None:
    """--print-config: JSON scalars and arrays are valid TOML values, so the output is a loadable recipe."""
    print("".join(f"{key} = {toml_value(value)}\n" for key, value in recipe.items()), end="")


def toml_value(value) -> str:
    """A JSON scalar or array as TOML: characters as they are (TOML is UTF-8; JSON's ASCII escapes
    write one outside the BMP, an emoji, as a surrogate pair, which TOML refuses), control
    characters escaped, DEL too (JSON leaves it, TOML does not)."""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
