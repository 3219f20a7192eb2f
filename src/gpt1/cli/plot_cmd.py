"""`gpt1 plot`: the loss / perplexity curves of one or more training runs as an image."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt1.cli.args import path_arg
from gpt1.core.errors import Gpt1Error
from gpt1.core.paths import check_within
from gpt1.core.progress import info
from gpt1.train.plot import plot_runs, plot_runs_to


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plot", help="plot runs' loss and perplexity curves to an image (PNG, SVG, PDF, JPEG)",
        description="Read RUN/metrics.jsonl of each run and write the train/validation loss and validation "
                    "perplexity curves as an image, one row per run (a run also writes RUN/loss.png when it ends).")
    parser.add_argument("runs", nargs="+", type=path_arg, metavar="RUN", help="training run dir (or a metrics.jsonl file)")
    parser.add_argument("--out", type=path_arg, default=None,
                        help="image to write, in the format its suffix names: .png, .svg, .pdf or .jpg (a name "
                             "without a suffix: PNG); - writes the PNG to standard output (default: RUN/loss.png of "
                             "the first run); never one of a run's or data dir's own files")
    parser.set_defaults(func=plot_command, stdout_product=lambda args: "the image (--out -)" if args.out == "-" else None)


def plot_command(args: argparse.Namespace) -> int:
    files = [run if run.is_file() else run / "metrics.jsonl" for run in map(Path, args.runs)]
    out = args.out or files[0].parent / "loss.png"  # a str: atomic_path sees a trailing slash
    if args.out is None:  # a name gpt1 chose in a run dir from anywhere, not a link the user made
        check_within(out, files[0].parent)
    # A row is named after its run (a run dir, or the folder of its metrics.jsonl) or its own file
    # (a.jsonl: "a"); names that collide are told apart by the paths as given.
    names = [f.parent.resolve().name if f.name == "metrics.jsonl" else f.stem for f in files]
    runs = {(name if names.count(name) == 1 else run): f for name, run, f in zip(names, args.runs, files)}
    if out == "-":  # as `eval --json -` and `bench --json -`: stdout, which then holds only the image
        if sys.stdout.isatty():
            raise Gpt1Error("--out -: standard output is a terminal, which would show the PNG's bytes; "
                            "redirect it (> loss.png) or pipe it to a program")
        sys.stdout.flush()
        plot_runs_to(runs, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        info("wrote the PNG to standard output")
        return 0
    plot_runs(runs, out)
    info(f"wrote {out}")
    print(out)
    return 0
