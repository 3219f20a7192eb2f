"""`gpt1 plot`: the loss / perplexity curve of a training run as a PNG."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plot", help="plot a run's loss and perplexity curve to a PNG",
        description="Read RUN/metrics.jsonl and write the train/validation loss and validation perplexity "
                    "curves as a PNG (also written automatically at the end of a run as RUN/loss.png).")
    parser.add_argument("run", help="training run dir (or a metrics.jsonl file)")
    parser.add_argument("--out", default=None, help="PNG file to write (default: RUN/loss.png)")
    parser.set_defaults(func=plot_command)


def plot_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gpt1.plot import plot_metrics
    from gpt1.progress import info

    run = Path(args.run)
    metrics = run if run.is_file() else run / "metrics.jsonl"
    out = Path(args.out) if args.out else metrics.parent / "loss.png"
    plot_metrics(metrics, out, title=metrics.parent.name)
    info(f"wrote {out}")
    print(out)
    return 0
