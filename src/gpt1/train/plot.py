"""Loss and perplexity curves of a training run (`metrics.jsonl`) as an image (PNG, SVG, PDF, JPEG)."""

from __future__ import annotations

import json
import math
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator

from gpt1.core.atomic import atomic_path
from gpt1.core.errors import Gpt1Error
from gpt1.core.imports import import_quietly
from gpt1.core.paths import file_target
from gpt1.core.progress import printable, warn

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

# The image formats `plot --out` writes, named by the file's suffix (no suffix: PNG). matplotlib
# saves these with what it always has (Agg, its SVG and PDF writers, and Pillow for JPEG); the
# format is not inferred from the name of the temporary file it writes first, so it is passed
# explicitly.
FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf", ".jpg": "jpg", ".jpeg": "jpg", "": "png"}
DPI = 110
# The largest loss a run can log: a cross-entropy (nats per token, never negative) is at most
# the spread of the fp32 logits (2 x 3.4e38) plus ln(vocab size). A larger or a negative one is
# no training's (a loss of 1e308 beside -1e308 overflowed matplotlib's tick locator).
MAX_LOSS = 1e39
# The most points a training-loss curve is drawn with: a longer one is drawn as the means of runs
# of consecutive steps (a week-long run's 3M points took 3.6 GB and 40 s to plot, for an image
# 1,200 pixels wide).
MAX_POINTS = 10_000


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl whose "step" is a count (0 to 2^63 - 1) and whose "loss"
    and "val_loss", when present, are losses (0 to MAX_LOSS; or null, a skipped step). The last
    line, cut short by a kill, is skipped quietly; any other line that is not such a record is
    skipped with a warning naming it, so that a damaged file still plots on a numeric axis."""
    return list(_records(path))


def _records(path: str | Path) -> Iterator[dict]:
    """`read_metrics`'s records, one at a time, the file read a line at a time; the warning comes
    once the last is read."""
    path = Path(path)
    if not path.is_file():
        raise Gpt1Error(f"{path}: metrics file not found (is this a training run dir?)")
    bad, bad_lines = 0, []  # the count, and the first line numbers (the warning names five)
    # A bad byte makes a bad line. The lines are those `str.splitlines` finds ("\r" and "\u2028"
    # end one too): the file's, split at "\n", "\r" and "\r\n" (newline=""), split at the others.
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        lines = enumerate((line for chunk in f for line in chunk.splitlines()), 1)
        ahead = next(lines, None)
        while ahead is not None:
            (number, line), ahead = ahead, next(lines, None)
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # not JSON, a number of over 4,300 digits, "[[[[..." nested too deeply
                if ahead is None:  # the last line, cut short by a kill
                    break
                record = None
            if isinstance(record, dict) and _is_metrics_record(record):
                yield record
            else:
                bad += 1
                if len(bad_lines) < 5:
                    bad_lines.append(number)
    if bad:
        where = ", ".join(map(str, bad_lines)) + (", ..." if bad > 5 else "")
        warn(f"{path}: skipped {bad} line{'s' if bad > 1 else ''} that {'are' if bad > 1 else 'is'} "
             f"not a step's record with finite numbers (line{'s' if bad > 1 else ''} {where})")


def _is_metrics_record(record: dict) -> bool:
    def a_loss(value) -> bool:
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                 and 0 <= value <= MAX_LOSS)

    step = record.get("step")
    # matplotlib draws in floats and int64: a step of 400 digits overflowed its float conversion.
    return (isinstance(step, int) and not isinstance(step, bool) and 0 <= step < 2**63
            and a_loss(record.get("loss")) and a_loss(record.get("val_loss")))


def plot_metrics(metrics_file: str | Path, out: str | Path, title: str | None = None) -> Path:
    """Plot train and validation loss (left) and validation perplexity (right) to the image `out`."""
    return plot_runs({title or "": metrics_file}, out)


def plot_runs(runs: dict[str, str | Path], out: str | Path) -> Path:
    """One row per run (title -> metrics.jsonl): loss curves on the left, validation perplexity
    on the right; written atomically to `out`, in the format its suffix names (`FORMATS`)."""
    image_format = FORMATS.get(Path(out).suffix.lower())
    if image_format is None:  # a .txt or .gif silently got PNG bytes
        raise Gpt1Error(f"{out}: plot writes {', '.join(s for s in FORMATS if s)} files; "
                        f"expected a file name ending in one of them, not {Path(out).suffix}")
    fig = _draw(runs)
    # Checked once the metrics are read (a missing one leaves no new folder behind): not a
    # folder, nor a run's or data dir's own file (`--out RUN/model.safetensors`).
    file_target(out)  # `out` as given: a str's trailing slash says "a folder"
    # Opened here, write-only: given a path, Pillow opens it read-write, which a FIFO (`--out
    # >(cmd)`, a named pipe; atomic_path yields those themselves) cannot be.
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, dpi=DPI, format=image_format)
    return Path(out)


def plot_runs_to(runs: dict[str, str | Path], stream: BinaryIO, image_format: str = "png") -> None:
    """`plot_runs`'s image written to an open binary stream (`gpt1 plot --out -`: stdout)."""
    _draw(runs).savefig(stream, dpi=DPI, format=image_format)


def _perplexity_axis(ax, perplexities: list[float]) -> None:
    """A scale whose labels a value can be read from: linear within a decade, else logarithmic
    with labels at 1, 2 and 5 of each decade as plain numbers (matplotlib's own log axis labelled
    a curve from 400 down to 68 with one tick, `10^2`)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    low, high = min(perplexities), max(perplexities)
    if high < 10 * low:
        return
    ax.set_yscale("log")
    if high <= 1e4 * low:  # wider: the default decades are labels enough
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.6g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())


def _curves(metrics_file: str | Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(steps, losses) of the training loss and of the validation loss, kept as arrays as the records
    stream by (held as dicts, a 3M-step run's took 3.6 GB)."""
    # Imported when a plot is drawn, as matplotlib (which loads it anyway): `gpt1 --help` builds
    # the parser, which imports this module, and a Ctrl-C there would not name its command.
    import numpy as np

    train_steps, train_loss, val_steps, val_loss = array("q"), array("d"), array("q"), array("d")
    for record in _records(metrics_file):
        if record.get("loss") is not None:
            train_steps.append(record["step"])
            train_loss.append(record["loss"])
        if record.get("val_loss") is not None:
            val_steps.append(record["step"])
            val_loss.append(record["val_loss"])
    return ((np.frombuffer(train_steps, np.int64), np.frombuffer(train_loss)),
            (np.frombuffer(val_steps, np.int64), np.frombuffer(val_loss)))


def _thinned(steps: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A curve of at most MAX_POINTS points: as it is, or the mean step and loss of each run of
    ceil(n / MAX_POINTS) consecutive points (the last run shorter)."""
    import numpy as np

    if len(steps) <= MAX_POINTS:
        return steps, losses
    starts = np.arange(0, len(steps), math.ceil(len(steps) / MAX_POINTS))
    counts = np.diff(np.append(starts, len(steps)))
    # Steps summed as floats: 2^63 - 1 a run of them would overflow int64.
    return np.add.reduceat(steps.astype(np.float64), starts) / counts, np.add.reduceat(losses, starts) / counts


def _draw(runs: dict[str, str | Path]) -> Figure:
    # A figure of its own on the Agg canvas, not pyplot's: switching the process's backend (or
    # pyplot's figures) would break the host's plots, e.g. a notebook's, for the rest of its session.
    import_quietly("matplotlib.backends.backend_agg")  # matplotlib.figure and the font cache: their set-up warns
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4 * len(runs)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(runs), 2, squeeze=False)
    for (title, metrics_file), (ax_loss, ax_ppl) in zip(runs.items(), axes):
        (train_steps, train_loss), (val_steps, val_loss) = _curves(metrics_file)
        if not len(train_steps) and not len(val_steps):
            raise Gpt1Error(f"{metrics_file}: no loss values to plot yet")
        if len(train_steps):
            ax_loss.plot(*_thinned(train_steps, train_loss), label="train loss", linewidth=0.8, alpha=0.8)
        if len(val_steps):
            ax_loss.plot(val_steps, val_loss, "o-", label="val loss", markersize=3)
            perplexities = [math.exp(min(v, 700)) for v in val_loss.tolist()]
            ax_ppl.plot(val_steps, perplexities, "o-", color="C1", markersize=3)
            _perplexity_axis(ax_ppl, perplexities)
        prefix = f"{printable(title)}: " if title else ""  # a run folder's name, from anywhere
        ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title=f"{prefix}loss")
        ax_loss.legend()
        ax_loss.grid(alpha=0.3)
        ax_ppl.set(xlabel="step", ylabel="perplexity", title=f"{prefix}validation perplexity")
        ax_ppl.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig
